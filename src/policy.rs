//! Loads the device's trust policy: the configuration plus the public key
//! files it names. IO, so it is neither in `config` (plain data) nor in
//! `trust` (which performs none).

use crate::config::{Config, ConfigError};
use crate::trust::{Policy, PublicKey};

/// The device's trust policy from its configuration: reads every public
/// key file and the slot sizes.
pub fn load(config: &Config) -> Result<Policy, ConfigError> {
    let mut keys = Vec::new();
    for (kid, file) in &config.trust.keys {
        let key_error = |message: String| ConfigError::KeyFile {
            path: config.source.clone(),
            key: format!("trust.keys.{kid}"),
            file: file.clone(),
            message,
        };
        // Capped and by type: a FIFO does not hang, /dev/zero is not read.
        let bytes = crate::fsutil::read_public_file(file).map_err(|e| key_error(e.to_string()))?;
        let pem = String::from_utf8(bytes).map_err(|_| key_error("not a PEM text file".into()))?;
        let key = PublicKey::from_pem(&pem).map_err(|e| key_error(e.to_string()))?;
        keys.push((kid.clone(), key));
    }
    Ok(Policy {
        keys,
        project: config.device.project.clone(),
        hardware: config.device.hardware.clone(),
        device_id: config.device.id.clone(),
        groups: config.device.groups.clone(),
        leeway_s: config.trust.leeway_s,
        max_validity_s: config.trust.max_validity_s,
        allow_http: config.trust.allow_http,
        max_image_size: config.smallest_slot_size(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key file that is not there is named by its key and its path.
    #[test]
    fn missing_key_file_is_named() {
        let text = fleetd_fixture::DeviceConfig {
            trust: "leeway_s = 30".into(),
            keys: vec![
                ("fleet".into(), "keys/fleet.pub.pem".into()),
                ("cosigner".into(), "/etc/fleetd/keys/cosigner.pub.pem".into()),
            ],
            boot: "backend = \"uboot\"".into(),
            ..Default::default()
        }
        .to_toml();
        let c = Config::parse(&text, std::path::Path::new("/etc/fleetd/fleetd.toml")).unwrap();
        let e = load(&c).unwrap_err().to_string();
        assert!(e.contains("`trust.keys.cosigner`") && e.contains("cosigner.pub.pem"), "{e}");
    }
}
