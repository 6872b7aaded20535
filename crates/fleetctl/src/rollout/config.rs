//! `fleetctl rollout --config FILE`: where the fleet side's broker, keys,
//! co-signer and database are. Relative paths are from the file's directory.

use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    pub project: String,
    /// `sqlite://PATH` (created when missing) or the registrar's
    /// `postgres://...`. Default: `rollouts.db` next to this file.
    #[serde(default)]
    pub database: Option<String>,
    pub broker: BrokerConfig,
    pub signing: SigningConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Default: `fleetctl-<random>` (two watches never take each other's session).
    #[serde(default)]
    pub client_id: Option<String>,
}

/// How a halt is signed: by this fleet server (kid `server:<server>`) for
/// the co-signer, which adds its signature, then by the fleet key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    pub server: String,
    pub server_key: PathBuf,
    pub fleet_key: PathBuf,
    #[serde(default = "default_fleet_kid")]
    pub fleet_kid: String,
    pub cosigner_url: String,
    /// Trust only this CA for an https co-signer.
    #[serde(default)]
    pub cosigner_ca: Option<PathBuf>,
    /// Seconds a halt stays valid at least (it lives as long as the update
    /// it stops, so a device that comes online late still sees it).
    #[serde(default = "default_halt_valid")]
    pub halt_valid_for_s: u64,
}

fn default_port() -> u16 {
    8883
}
fn default_fleet_kid() -> String {
    "fleet".into()
}
fn default_halt_valid() -> u64 {
    24 * 3600
}

#[derive(Debug, thiserror::Error)]
pub enum FleetConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: key `{key}`: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
}

impl FleetConfig {
    pub fn load(path: &Path) -> Result<Self, FleetConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| FleetConfigError::Io { path: path.to_path_buf(), source })?;
        let invalid = |key: &str, message: &str| FleetConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        };
        let mut config: Self = serde_path_to_error::deserialize(toml::Deserializer::new(&text))
            .map_err(|e| invalid(&e.path().to_string(), e.inner().message()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.broker.ca);
        resolve(&mut config.broker.cert);
        resolve(&mut config.broker.key);
        resolve(&mut config.signing.server_key);
        resolve(&mut config.signing.fleet_key);
        if let Some(ca) = config.signing.cosigner_ca.as_mut() {
            resolve(ca);
        }
        config.database = Some(match config.database.take() {
            None => format!("sqlite://{}", base.join("rollouts.db").display()),
            Some(url) => match url.strip_prefix("sqlite://") {
                Some(file) if !file.starts_with('/') => format!("sqlite://{}", base.join(file).display()),
                _ if url.starts_with("sqlite:") || url.starts_with("postgres") => url,
                _ => return Err(invalid("database", "sqlite://PATH or postgres://...")),
            },
        });
        if config.project.is_empty() {
            return Err(invalid("project", "must not be empty"));
        }
        Ok(config)
    }

    pub fn database_url(&self) -> &str {
        self.database.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_against_the_file_and_bad_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetctl.toml");
        let base = "project = \"acme\"\n[broker]\nhost = \"b\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                    [signing]\nserver = \"fs1\"\nserver_key = \"fs1.key.pem\"\nfleet_key = \"/k/fleet.key.pem\"\n\
                    cosigner_url = \"http://127.0.0.1:8700\"\n";
        std::fs::write(&path, base).unwrap();
        let c = FleetConfig::load(&path).unwrap();
        assert_eq!(c.broker.ca, dir.path().join("ca.pem"));
        assert_eq!(c.signing.fleet_key, PathBuf::from("/k/fleet.key.pem"));
        assert_eq!(c.database_url(), format!("sqlite://{}", dir.path().join("rollouts.db").display()));
        assert_eq!(c.broker.port, 8883);
        std::fs::write(&path, format!("database = \"mysql://x\"\n{base}")).unwrap();
        assert!(FleetConfig::load(&path).unwrap_err().to_string().contains("key `database`"));
        std::fs::write(&path, format!("{base}colour = 1\n")).unwrap();
        assert!(FleetConfig::load(&path).unwrap_err().to_string().contains("colour"));
    }
}
