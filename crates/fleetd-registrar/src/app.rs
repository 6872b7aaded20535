//! The registrar's state, shared by every request: the database, the
//! issuing CA, the settings, the CRL being served and its worker.

use crate::ca::Issuer;
use crate::config::Config;
use crate::db::{self, Db};
use crate::error::Result;
use crate::files::read_text;
use crate::limiter::Limiter;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// Logins per minute (and burst) per source address.
pub const LOGINS_PER_MINUTE: u32 = 10;
pub const LOGIN_BURST: u32 = 10;

/// What devices are told about the broker.
#[derive(Debug, Clone)]
pub struct Mqtt {
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
}

/// How long a burst of revocations is gathered into one CRL.
pub const CRL_COALESCE: std::time::Duration = std::time::Duration::from_secs(1);

/// The registrar's state, shared by every request.
#[derive(Debug)]
pub struct App {
    pub db: Db,
    pub issuer: Issuer,
    pub validity: crate::ca::Validity,
    pub claim_ttl_s: u64,
    pub token_ttl_s: u64,
    pub mqtt: Mqtt,
    pub crl_file: PathBuf,
    pub on_crl_change: Option<String>,
    /// The latest CRL, served at `GET /v1/crl`.
    pub crl_pem: RwLock<String>,
    crl_changed: tokio::sync::Notify,
    /// One regeneration at a time (they share the temp file).
    crl_writing: tokio::sync::Mutex<()>,
    pub login_limiter: Limiter,
}

impl App {
    /// Connects to the database (migrating it) and loads the CA.
    pub async fn new(config: &Config) -> Result<Self> {
        let issuer = Issuer::load(&config.ca.cert, &config.ca.key)?;
        let ca_pem = read_text(&config.mqtt.ca_file)?;
        let db = Db::connect(&config.database).await?;
        Ok(App {
            db,
            issuer,
            validity: config.ca.validity(),
            claim_ttl_s: config.claim_ttl_s,
            token_ttl_s: config.token_ttl_s,
            mqtt: Mqtt { host: config.mqtt.host.clone(), port: config.mqtt.port, ca_pem },
            crl_file: config.crl_file.clone(),
            on_crl_change: config.on_crl_change.clone(),
            crl_pem: RwLock::new(String::new()),
            crl_changed: tokio::sync::Notify::new(),
            crl_writing: tokio::sync::Mutex::new(()),
            login_limiter: Limiter::new(LOGINS_PER_MINUTE, LOGIN_BURST),
        })
    }

    /// Asks [`App::crl_worker`] for a new CRL (a certificate was revoked).
    pub fn crl_changed(&self) {
        self.crl_changed.notify_one();
    }

    /// Makes a new CRL after each change, coalescing a burst: one CRL (and
    /// one `on_crl_change`, one broker reload) per [`CRL_COALESCE`] however
    /// many devices re-enroll at once. A change during a regeneration is
    /// kept (Notify stores one permit) and makes the next.
    pub async fn crl_worker(self: Arc<Self>) {
        loop {
            self.crl_changed.notified().await;
            tokio::time::sleep(CRL_COALESCE).await;
            if let Err(e) = self.regenerate_crl().await {
                eprintln!("registrar: the CRL after a revocation: {e}");
            }
        }
    }

    /// A new CRL: written, hooked, and served from now on.
    pub async fn regenerate_crl(&self) -> Result<()> {
        let _writing = self.crl_writing.lock().await;
        let pem = crate::crl::regenerate(
            &self.db,
            &self.issuer,
            &self.crl_file,
            self.on_crl_change.as_deref(),
            db::now(),
        )
        .await?;
        *self.crl_pem.write().unwrap_or_else(|e| e.into_inner()) = pem;
        Ok(())
    }
}
