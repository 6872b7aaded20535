//! MQTT: rumqttc over rustls (ring) with the device's client certificate.
//!
//! Architecture invariant: only this module knows topic names.
//!
//! rumqttc does not resubscribe after a reconnect, does not back off, and
//! caps packets at 10 KiB by default; `client.rs` handles all three.

pub use fleetd_core::mqtt::aws;
mod client;
mod limiter;

pub use client::{
    read_connection_file, run, ClientEvent, ClientSetup, Inbound, Outbound, Progress, MAX_WAITING,
    RETRY_UNSAVED,
};
pub use limiter::ProgressLimiter;

use crate::config::{Config, Mqtt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Update messages are at most 64 KiB; leave room for the MQTT header.
/// What fleetd itself sends is never larger.
pub const MAX_PACKET: usize = crate::trust::MAX_MESSAGE_BYTES + 4096;

/// The largest packet fleetd reads. A larger one would make rumqttc drop
/// the connection, and the broker would hand the same message back at every
/// reconnect: one oversized message would cut the device off for good. So
/// the device reads far more than a valid message (refusing the excess by
/// name), and the broker is told to accept less than this: mosquitto's
/// `max_packet_size` in packaging/mosquitto (AWS IoT caps messages at
/// 128 KB of its own).
pub const MAX_INCOMING_PACKET: usize = 1 << 20;

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

/// Checks that the certificate's CN is the device id: the broker knows the
/// device by its CN, fleetd by its id, and the two must be one name.
pub fn check_identity(cert: &Path, device_id: &str) -> Result<(), MqttError> {
    let der = CertificateDer::pem_file_iter(cert)
        .map_err(|e| MqttError::Tls(format!("{}: {e}", cert.display())))?
        .next()
        .ok_or_else(|| MqttError::Tls(format!("{}: no certificate", cert.display())))?
        .map_err(|e| MqttError::Tls(format!("{}: {e}", cert.display())))?;
    match crate::der::certificate_common_name(&der) {
        Some(cn) if cn == device_id => Ok(()),
        Some(cn) => Err(MqttError::Config(format!(
            "{}: the certificate's CN is {cn:?} but the device id is {device_id:?}; they must match",
            cert.display()
        ))),
        None => Err(MqttError::Config(format!("{}: the certificate has no subject CN", cert.display()))),
    }
}

fn tls_error(e: crate::http::HttpError) -> MqttError {
    match e {
        crate::http::HttpError::TlsConfig(detail) => MqttError::Tls(detail),
        other => MqttError::Tls(other.to_string()),
    }
}

/// rustls with the ring provider, trusting only `ca_file`, presenting `cert`/`key`.
pub fn tls_config(ca_file: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig, MqttError> {
    let named = |path: &Path, e: &dyn std::fmt::Display| MqttError::Tls(format!("{}: {e}", path.display()));
    let roots = crate::http::roots_from_pem(ca_file).map_err(tls_error)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| named(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| named(cert, &e))?;
    if chain.is_empty() {
        return Err(MqttError::Tls(format!("{}: no certificate", cert.display())));
    }
    // Refused when others may read it (`key-permissions`), as ssh does.
    let pem = crate::fsutil::read_private_key(key).map_err(|e| named(key, &e))?;
    let private_key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| named(key, &e))?;
    crate::http::ring_client_builder()
        .map_err(tls_error)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private_key)
        .map_err(|e| MqttError::Tls(format!("{}: {e}", key.display())))
}

/// Reconnect backoff: full jitter from 1 s, each wait capped at 60 s. A
/// network change ends any wait at once (see `client::poll_forever`).
pub const RECONNECT: crate::backoff::Backoff = crate::backoff::Backoff {
    base: std::time::Duration::from_secs(1),
    cap: std::time::Duration::from_secs(60),
};

/// The limit on one connection attempt (TCP, TLS and CONNACK).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How soon after the network comes back the client is connected again,
/// at most: the change starts an attempt as soon as the attempts' floor
/// allows, and should the network not quite be ready (an address still
/// tentative), the next change or the first backoff wait (at most
/// `RECONNECT.base`, and the floor) starts another.
pub fn reconnect_after_network_change() -> std::time::Duration {
    crate::backoff::MIN_RECONNECT_INTERVAL + CONNECT_TIMEOUT * 2 + RECONNECT.base
}

/// Connection options for one client: persistent session, manual acks,
/// incoming packets up to `MAX_INCOMING_PACKET`, and a last will.
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
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_PACKET)
        .set_keep_alive(std::time::Duration::from_secs(keep_alive_s.max(5)));
    if let Some((topic, payload)) = will {
        options.set_last_will(rumqttc::LastWill::new(topic, payload, rumqttc::QoS::AtLeastOnce, true));
    }
    options
}

/// Plain TCP on loopback, for `fleetd demo` only (through `daemon::run_until`):
/// a device's configuration has no way to turn TLS off.
pub fn plain_options_for_demo(
    client_id: &str,
    host: &str,
    port: u16,
    will: Option<(String, Vec<u8>)>,
) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, host, port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_PACKET);
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
