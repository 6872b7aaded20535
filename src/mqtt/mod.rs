//! MQTT: rumqttc over rustls (ring) with the device's client certificate.
//!
//! Architecture invariant: only this module knows topic names.
//!
//! rumqttc does not resubscribe after a reconnect, does not back off, and
//! caps packets at 10 KiB by default; `client.rs` handles all three.

pub mod aws;
mod client;
pub mod fleet;
mod limiter;

pub use client::{run, ClientEvent, ClientSetup, Inbound, Outbound};
pub use limiter::ProgressLimiter;

use crate::config::{Config, Mqtt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Update messages are at most 64 KiB; leave room for the MQTT header.
pub const MAX_PACKET: usize = crate::trust::MAX_MESSAGE_BYTES + 4096;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt-config: {0}")]
    Config(String),
    #[error("mqtt-tls: {0}")]
    Tls(String),
}

/// The native profile's topics for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub updates: Vec<String>,
    pub status: String,
    pub progress: String,
    pub online: String,
}

impl Topics {
    pub fn native(project: &str, device: &str, groups: &[String]) -> Self {
        let base = format!("fleet/{project}/devices/{device}");
        let mut updates = vec![format!("{base}/update")];
        updates.extend(groups.iter().map(|g| format!("fleet/{project}/groups/{g}/update")));
        Self {
            updates,
            status: format!("{base}/status"),
            progress: format!("{base}/progress"),
            online: format!("{base}/online"),
        }
    }

    pub fn for_config(config: &Config) -> Self {
        Self::native(&config.device.project, &config.device.id, &config.device.groups)
    }

    /// Where the fleet publishes an update for a device or a group.
    pub fn update_for_device(project: &str, device: &str) -> String {
        format!("fleet/{project}/devices/{device}/update")
    }

    pub fn update_for_group(project: &str, group: &str) -> String {
        format!("fleet/{project}/groups/{group}/update")
    }

    /// What `fleetctl watch` subscribes to.
    pub fn fleet_watch(project: &str) -> Vec<String> {
        ["status", "progress", "online"].iter().map(|t| format!("fleet/{project}/devices/+/{t}")).collect()
    }
}

/// The client certificate and key: configured, else the provisioned identity.
pub fn identity_paths(config: &Config, mqtt: &Mqtt) -> (PathBuf, PathBuf) {
    let identity = config.device.state_dir.join("identity");
    (
        mqtt.cert_file.clone().unwrap_or_else(|| identity.join("cert.pem")),
        mqtt.key_file.clone().unwrap_or_else(|| identity.join("key.pem")),
    )
}

/// rustls with the ring provider, trusting only `ca_file`, presenting `cert`/`key`.
pub fn tls_config(ca_file: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig, MqttError> {
    let named = |path: &Path, e: &dyn std::fmt::Display| MqttError::Tls(format!("{}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(ca_file).map_err(|e| named(ca_file, &e))? {
        roots.add(ca.map_err(|e| named(ca_file, &e))?).map_err(|e| named(ca_file, &e))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| named(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| named(cert, &e))?;
    if chain.is_empty() {
        return Err(MqttError::Tls(format!("{}: no certificate", cert.display())));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| named(key, &e))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private_key)
        .map_err(|e| MqttError::Tls(format!("{}: {e}", key.display())))
}

/// Connection options for one client: persistent session, manual acks,
/// packets large enough for a 64 KiB message, and a last will.
pub fn options(
    client_id: &str,
    host: &str,
    port: u16,
    tls: rustls::ClientConfig,
    keep_alive_s: u64,
    will: Option<(String, Vec<u8>)>,
) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, host, port);
    options
        .set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(tls))))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_keep_alive(std::time::Duration::from_secs(keep_alive_s.max(5)));
    if let Some((topic, payload)) = will {
        options.set_last_will(rumqttc::LastWill::new(topic, payload, rumqttc::QoS::AtLeastOnce, true));
    }
    options
}

/// Plain TCP on loopback, for `fleetd demo` only: a device's configuration
/// has no way to turn TLS off.
pub(crate) fn plain_options_for_demo(
    client_id: &str,
    host: &str,
    port: u16,
    will: Option<(String, Vec<u8>)>,
) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, host, port);
    options.set_clean_session(false).set_manual_acks(true).set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some((topic, payload)) = will {
        options.set_last_will(rumqttc::LastWill::new(topic, payload, rumqttc::QoS::AtLeastOnce, true));
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_topics() {
        let t = Topics::native("acme", "gw-1", &["pilot".into(), "eu".into()]);
        assert_eq!(
            t.updates,
            vec![
                "fleet/acme/devices/gw-1/update",
                "fleet/acme/groups/pilot/update",
                "fleet/acme/groups/eu/update"
            ]
        );
        assert_eq!(t.status, "fleet/acme/devices/gw-1/status");
        assert_eq!(t.progress, "fleet/acme/devices/gw-1/progress");
        assert_eq!(Topics::update_for_group("acme", "eu"), "fleet/acme/groups/eu/update");
    }

    #[test]
    fn tls_errors_name_the_file() {
        let err = tls_config(Path::new("/nonexistent/ca.pem"), Path::new("c"), Path::new("k")).unwrap_err();
        assert!(err.to_string().starts_with("mqtt-tls: /nonexistent/ca.pem"), "{err}");
    }
}
