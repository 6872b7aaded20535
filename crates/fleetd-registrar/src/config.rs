//! `registrar.toml`: parsed strictly (unknown keys refused), paths resolved
//! against the file's directory, and the unsafe setups refused at load:
//! plain HTTP on a non-loopback address.

use crate::error::{RegistrarError, Result};
use fleetd_core::provision::enroll::MAX_CLAIM_TTL_S;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    /// `sqlite://PATH` or `postgres://...`.
    pub database: String,
    /// What devices are told to call.
    pub public_url: String,
    pub crl_file: PathBuf,
    /// A shell command run (`sh -c`, in the working directory of the process,
    /// at most 60 s; a failure is logged) after the CRL file changed.
    #[serde(default)]
    pub on_crl_change: Option<String>,
    /// Seconds a claim lives (capped at `MAX_CLAIM_TTL_S`).
    #[serde(default = "default_claim_ttl")]
    pub claim_ttl_s: u64,
    /// Seconds a login token lives.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_s: u64,
    pub ca: CaConfig,
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// The issuing CA's certificate (PEM). For OpenSSL (mosquitto) to accept
    /// its CRL it must have key usage keyCertSign and cRLSign.
    pub cert: PathBuf,
    /// Its key: PKCS#8 or SEC1 PEM, mode 0600.
    pub key: PathBuf,
    #[serde(default = "default_validity")]
    pub validity_days: u32,
    /// In place of `validity_days`: short-lived certificates (and renewal
    /// tests), at least 60 s.
    #[serde(default)]
    pub validity_s: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub ca_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaConfig {
    /// `validity_s` when given, else `validity_days`.
    pub fn validity(&self) -> crate::ca::Validity {
        match self.validity_s {
            Some(seconds) => crate::ca::Validity { seconds: i64::from(seconds) },
            None => crate::ca::Validity::days(self.validity_days),
        }
    }
}

fn default_claim_ttl() -> u64 {
    1800
}
fn default_token_ttl() -> u64 {
    12 * 3600
}
fn default_validity() -> u32 {
    30
}

impl Config {
    /// Reads, checks and resolves `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| RegistrarError::File { path: path.to_path_buf(), source })?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Self::parse(&text, dir).map_err(|e| match e {
            RegistrarError::Config { message, .. } => {
                RegistrarError::Config { path: path.to_path_buf(), message }
            }
            other => other,
        })
    }

    /// Parses `text`, resolving relative paths against `dir`. Pure.
    pub fn parse(text: &str, dir: &Path) -> Result<Self> {
        let invalid = |message: String| RegistrarError::Config { path: PathBuf::new(), message };
        let mut config: Config = toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
        config.claim_ttl_s = config.claim_ttl_s.min(MAX_CLAIM_TTL_S);
        if config.claim_ttl_s == 0 || config.token_ttl_s == 0 {
            return Err(invalid("claim_ttl_s and token_ttl_s must be positive".into()));
        }
        if config.ca.validity_days == 0 || config.ca.validity_days > 3650 {
            return Err(invalid("ca.validity_days must be 1-3650".into()));
        }
        if config.ca.validity_s.is_some_and(|s| s < 60) {
            return Err(invalid("ca.validity_s must be at least 60".into()));
        }
        if !(config.database.starts_with("sqlite:") || config.database.starts_with("postgres")) {
            return Err(invalid(format!("database {:?}: sqlite://PATH or postgres://...", config.database)));
        }
        let addr: SocketAddr =
            config.listen.parse().map_err(|_| invalid(format!("listen {:?}: ADDR:PORT", config.listen)))?;
        if config.tls.is_none() && !addr.ip().is_loopback() {
            return Err(RegistrarError::PlainHttpNotLoopback(config.listen.clone()));
        }
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        resolve(&mut config.crl_file);
        resolve(&mut config.ca.cert);
        resolve(&mut config.ca.key);
        resolve(&mut config.mqtt.ca_file);
        if let Some(tls) = &mut config.tls {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
        }
        if let Some(rest) = config.database.strip_prefix("sqlite://") {
            let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
            let file = Path::new(file);
            if file.is_relative() && !file.as_os_str().is_empty() && file != Path::new(":memory:") {
                let joined = dir.join(file);
                config.database = format!(
                    "sqlite://{}{}{query}",
                    joined.display(),
                    if query.is_empty() { "" } else { "?" }
                );
            }
        }
        Ok(config)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.parse().expect("checked at load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
listen = "127.0.0.1:8443"
database = "sqlite://reg.db"
public_url = "https://registrar.example.com"
crl_file = "crl.pem"
[ca]
cert = "ca.pem"
key = "/abs/ca.key.pem"
[mqtt]
host = "broker.example.com"
port = 8883
ca_file = "mqtt-ca.pem"
"#;

    #[test]
    fn defaults_and_paths() {
        let c = Config::parse(BASE, Path::new("/etc/reg")).unwrap();
        assert_eq!(c.ca.validity_days, 30);
        assert_eq!(c.claim_ttl_s, 1800);
        assert_eq!(c.token_ttl_s, 12 * 3600);
        assert_eq!(c.crl_file, Path::new("/etc/reg/crl.pem"));
        assert_eq!(c.ca.cert, Path::new("/etc/reg/ca.pem"));
        assert_eq!(c.ca.key, Path::new("/abs/ca.key.pem"));
        assert_eq!(c.database, "sqlite:///etc/reg/reg.db");
        assert_eq!(c.ca.validity(), crate::ca::Validity::days(30));
        let short =
            Config::parse(&BASE.replace("[ca]\n", "[ca]\nvalidity_s = 90\n"), Path::new("/")).unwrap();
        assert_eq!(short.ca.validity(), crate::ca::Validity { seconds: 90 });
        assert!(Config::parse(&BASE.replace("[ca]\n", "[ca]\nvalidity_s = 59\n"), Path::new("/")).is_err());
    }

    #[test]
    fn refusals_by_table() {
        let cases: [(String, &str); 5] = [
            (BASE.replace("127.0.0.1:8443", "0.0.0.0:8443"), "plain-http-not-loopback"),
            (BASE.replace("127.0.0.1:8443", "192.168.1.2:80"), "plain-http-not-loopback"),
            (format!("extra = 1\n{BASE}"), "config-invalid"),
            (BASE.replace("sqlite://reg.db", "mysql://x"), "config-invalid"),
            (BASE.replace("port = 8883", "port = 8883\nuser = \"x\""), "config-invalid"),
        ];
        for (text, name) in cases {
            assert_eq!(Config::parse(&text, Path::new("/")).unwrap_err().name(), name, "{text}");
        }
        let with_tls =
            format!("{}\n[tls]\ncert = \"t.pem\"\nkey = \"t.key\"\n", BASE.replace("127.0.0.1", "0.0.0.0"));
        assert!(Config::parse(&with_tls, Path::new("/")).is_ok());
        let capped = format!("claim_ttl_s = 99999\n{BASE}");
        assert_eq!(Config::parse(&capped, Path::new("/")).unwrap().claim_ttl_s, MAX_CLAIM_TTL_S);
    }
}
