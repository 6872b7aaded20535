//! The co-signer: an independent service that adds its signature to an
//! update message only when a registered, non-revoked fleet server asks and
//! the claims are within its policy. Revoking a server here is enough to stop
//! a stolen server key; no device needs to change.

mod ratelimit;
mod registry;
mod service;

pub use ratelimit::{PeerGate, RateLimiter, MAX_BUCKETS as MAX_PEER_BUCKETS};
pub use registry::{Registry, ServerEntry};
pub use service::{serve, App, CosignError, BODY_TIMEOUT, LIMITS, REFUSALS_AUDITED_PER_MINUTE};

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The co-signer's own failures (configuration, registry, key), by cause.
#[derive(Debug, thiserror::Error)]
pub enum CosignerError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: key `{key}`: {message}")]
    Config { path: PathBuf, key: String, message: String },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Key { path: PathBuf, source: fleetd::trust::KeyError },
    /// The key file is unsafe or unreadable (`key-permissions`, not a regular file, ...).
    #[error("{path}: {source}")]
    KeyFile { path: PathBuf, source: fleetd::fsutil::ReadError },
    #[error("server id {0:?} must be 1-128 characters of [A-Za-z0-9_-]")]
    BadServerId(String),
    #[error("server-revoked: {id:?} was revoked at {at}; pass --reinstate to register it again")]
    Revoked { id: String, at: u64 },
    #[error("server-unknown: {0:?} is not registered")]
    Unknown(String),
}

/// Fleet servers sign with kid `server:<id>`.
pub const SERVER_KID_PREFIX: &str = "server:";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CosignerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The kid devices know this service's key by.
    #[serde(default = "default_kid")]
    pub kid: String,
    /// The co-signer's private key (PKCS#8 or SEC1 PEM, 0600: refused when
    /// others may read it).
    pub key: PathBuf,
    /// Holds `registry.json` and `audit.jsonl`.
    pub state_dir: PathBuf,
    /// Projects this co-signer signs for.
    pub projects: Vec<String>,
    #[serde(default = "default_max_validity")]
    pub max_validity_s: u64,
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// Requests per minute and burst, per fleet server.
    #[serde(default = "default_rate")]
    pub rate_limit_per_minute: u32,
    #[serde(default = "default_burst")]
    pub rate_limit_burst: u32,
    /// Requests per minute and burst, per peer address, counted before any
    /// signature is verified: an unauthenticated flood costs no ECDSA.
    #[serde(default = "default_peer_rate")]
    pub peer_rate_limit_per_minute: u32,
    #[serde(default = "default_peer_burst")]
    pub peer_rate_limit_burst: u32,
    /// Image URLs over plain http (the devices' `trust.allow_http`).
    #[serde(default)]
    pub allow_http: bool,
    /// The largest `version` signed. A version is installed once and every
    /// later one must exceed it, so a huge one (2^64 - 1) would end every
    /// update of the devices that took it. The default, 2^53 - 1, is also
    /// the largest integer JSON tools keep exactly.
    #[serde(default = "default_max_version")]
    pub max_version: u64,
}

/// 2^53 - 1 (JavaScript's `Number.MAX_SAFE_INTEGER`).
pub const DEFAULT_MAX_VERSION: u64 = (1 << 53) - 1;

fn default_max_version() -> u64 {
    DEFAULT_MAX_VERSION
}
fn default_listen() -> String {
    "127.0.0.1:8700".into()
}
fn default_kid() -> String {
    "cosigner".into()
}
fn default_max_validity() -> u64 {
    fleetd::trust::DEFAULT_MAX_VALIDITY_S
}
fn default_leeway() -> u64 {
    60
}
fn default_rate() -> u32 {
    60
}
fn default_burst() -> u32 {
    10
}
fn default_peer_rate() -> u32 {
    120
}
fn default_peer_burst() -> u32 {
    20
}

impl CosignerConfig {
    pub fn load(path: &Path) -> Result<Self, CosignerError> {
        let invalid = |key: &str, message: &str| CosignerError::Config {
            path: path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        };
        let text = std::fs::read_to_string(path)
            .map_err(|source| CosignerError::Io { path: path.to_path_buf(), source })?;
        let de = toml::Deserializer::new(&text);
        let mut config: Self = serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(&e.path().to_string(), e.inner().message()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for p in [&mut config.key, &mut config.state_dir] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if config.projects.is_empty() {
            return Err(invalid("projects", "at least one project is required"));
        }
        if config.rate_limit_per_minute == 0 || config.rate_limit_burst == 0 {
            return Err(invalid("rate_limit_per_minute", "rate and burst must be positive"));
        }
        if config.peer_rate_limit_per_minute == 0 || config.peer_rate_limit_burst == 0 {
            return Err(invalid("peer_rate_limit_per_minute", "rate and burst must be positive"));
        }
        Ok(config)
    }

    pub fn registry_path(&self) -> PathBuf {
        self.state_dir.join("registry.json")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.state_dir.join("audit.jsonl")
    }
}
