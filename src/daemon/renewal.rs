//! Certificate renewal while connected: at the time `provision::renewal`
//! picks (two thirds of the life, jittered), a new key and its CSR signed
//! by the current key go to the registrar (`POST /v1/renew`); the answer
//! is checked as an identity, stored (`ProvisionStore::save_renewed`: one
//! commit point, so key and certificate always match), and the MQTT client
//! reconnects with it once, keeping its session. A network error or a 5xx
//! is retried with capped, jittered backoff until the certificate expires;
//! a refusal (`revoked`, `device-retired`) stops renewing, logged by name
//! and shown as the status's last error.

use crate::config::{Broker, Config};
use crate::logging::{self, Priority};
use crate::provision::enroll::{sign_renewal, RenewRequest};
use crate::provision::identity::{certificate_validity, DeviceKey};
use crate::provision::registrar::{self, EnrollFailure};
use crate::provision::renewal::{self, Failure, Next};
use crate::provision::request::Registrar;
use crate::provision::store::{write_renewal_status, ProvisionStore, RenewalStatus};
use crate::status::IdentityStatus;
use std::time::Duration;
use tokio::sync::mpsc;

/// Backoff between failed renewals: full jitter from 30 s, capped at 1 h
/// (and never past the certificate's expiry).
pub const RETRY: crate::backoff::Backoff =
    crate::backoff::Backoff { base: Duration::from_secs(30), cap: Duration::from_secs(3600) };

/// The longest one sleep lasts before the wall clock is read again (a
/// gateway without an RTC sets its clock late).
const CLOCK_RECHECK: Duration = Duration::from_secs(60);

pub(super) struct Renewal {
    pub config: Config,
    pub broker: Broker,
    pub registrar: Registrar,
    /// The lowest trusted time, for the new certificate's validity.
    pub clock_floor: u64,
    /// The MQTT client's new TLS setup, once renewed.
    pub renewed: mpsc::Sender<rustls::ClientConfig>,
}

/// The registrar to renew with, when the device renews at all: its
/// identity is the provisioned one (not `[mqtt] cert_file`), and it
/// enrolled with a registrar or its image names one.
pub(super) fn registrar_for(config: &Config) -> Option<Registrar> {
    if config.provision.is_none() || config.mqtt.as_ref().is_some_and(|m| m.cert_file.is_some()) {
        return None;
    }
    match ProvisionStore::new(&config.device.state_dir).registrar() {
        Ok(Some(r)) => return Some(r),
        Ok(None) => {}
        Err(e) => logging::log(&format!("renewal: {e}")),
    }
    match crate::provision::registrar::from_config(config) {
        Ok(r) => r,
        Err(e) => {
            logging::log(&format!("renewal: {e}; not renewing"));
            None
        }
    }
}

pub(super) async fn run(r: Renewal) {
    let store = ProvisionStore::new(&r.config.device.state_dir);
    let mut last_error: Option<String> = None;
    loop {
        let validity = store.current_cert().ok().as_deref().and_then(certificate_validity);
        let Some((not_before, not_after)) = validity else {
            logging::log("renewal: the certificate's validity cannot be read; not renewing");
            return;
        };
        let at = renewal::renew_at(not_before, not_after, random_u64());
        show(&r, not_after, Some(at), last_error.clone(), false);
        logging::log(&format!("renewal: the certificate is valid until {not_after}; renewing at {at}"));
        sleep_until(at).await;
        let mut attempt = 0u32;
        loop {
            match renew_once(&r, &store).await {
                Ok(new_not_after) => {
                    logging::log(&format!(
                        "renewal: renewed; the new certificate is valid until {new_not_after}; reconnecting with it"
                    ));
                    last_error = None;
                    break;
                }
                Err(e) => {
                    let failure = match &e {
                        e if e.is_refusal() => Failure::Final(e.to_string()),
                        _ => Failure::Retryable,
                    };
                    let delay = RETRY.delay(attempt).as_secs();
                    attempt = attempt.saturating_add(1);
                    match renewal::after_failure(crate::system_now(), not_after, &failure, delay) {
                        Next::At(next) => {
                            logging::event(
                                Priority::Warning,
                                &format!("renewal: {e}; trying again at {next}"),
                                &[(logging::ERROR, failure_name(&e))],
                            );
                            last_error = Some(e.to_string());
                            show(&r, not_after, Some(next), last_error.clone(), false);
                            sleep_until(next).await;
                        }
                        Next::Stop(reason) => {
                            logging::event(
                                Priority::Error,
                                &format!("renewal: {reason}; not renewing again"),
                                &[(logging::ERROR, failure_name(&e))],
                            );
                            show(&r, not_after, None, Some(reason), true);
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// One renewal: a new key, its CSR signed by the current key, the answer
/// checked and stored, the MQTT client told. The new certificate's expiry.
async fn renew_once(r: &Renewal, store: &ProvisionStore) -> Result<u64, EnrollFailure> {
    let id = &r.config.device.id;
    let current = store.current_key()?;
    let new_key = DeviceKey::generate()?;
    let csr_pem = new_key.csr_pem(id)?;
    let signature = sign_renewal(&current, &csr_pem)?;
    let answer = registrar::renew(&r.registrar, &RenewRequest { csr_pem, signature }).await?;
    let now = crate::system_now().max(r.clock_floor);
    let identity = registrar::check_answer(id, &answer, &new_key, now)?;
    store.save_renewed(&identity)?;
    match crate::mqtt::tls_config(&r.broker.ca_file, &r.broker.cert_file, &r.broker.key_file) {
        Ok(tls) => {
            let _ = r.renewed.send(tls).await;
        }
        // Stored: the next start uses it.
        Err(e) => logging::log(&format!("renewal: {e}; the new identity is used from the next start")),
    }
    Ok(identity.not_after)
}

fn failure_name(e: &EnrollFailure) -> &str {
    match e {
        EnrollFailure::Call(c) => c.name(),
        EnrollFailure::Identity(i) => i.name(),
        EnrollFailure::Store(_) => "provision-store",
    }
}

fn show(
    r: &Renewal,
    not_after: u64,
    renew_at: Option<u64>,
    last_renewal_error: Option<String>,
    stopped: bool,
) {
    let status =
        RenewalStatus { identity: IdentityStatus { not_after, renew_at, last_renewal_error }, stopped };
    if let Err(e) = write_renewal_status(&r.config.device.state_dir, &status) {
        logging::log(&format!("renewal: {e}"));
    }
}

/// Sleeps until the wall clock reads `at`, reading it again at least every
/// `CLOCK_RECHECK`.
async fn sleep_until(at: u64) {
    loop {
        let now = crate::system_now();
        if now >= at {
            return;
        }
        tokio::time::sleep(Duration::from_secs(at - now).min(CLOCK_RECHECK)).await;
    }
}

fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}
