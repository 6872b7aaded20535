//! The network backends provisioning drives: raise the access point, scan,
//! join the Wi-Fi a phone handed over. One file per backend, one enum over
//! them (the set is closed and small; no trait object needed).
//! - `none`: no access point; the portal listens on `provision.listen`
//!   (wired or USB-gadget set-up, and tests).

use crate::provision::portal::Network;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("ap-failed: {0}")]
    Ap(String),
    /// The Wi-Fi could not be joined; `reason` is for the person at the
    /// portal ("the passphrase is wrong (no-secrets)").
    #[error("join-failed: {reason}")]
    Join { reason: String },
    #[error("network-backend: {0}")]
    Backend(String),
}

/// The access point to raise.
#[derive(Clone)]
pub struct AccessPoint {
    pub interface: String,
    pub ssid: String,
    /// Derived from the proof of possession (`Pop::ap_passphrase`).
    pub passphrase: String,
}

impl std::fmt::Debug for AccessPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPoint").field("interface", &self.interface).field("ssid", &self.ssid).finish()
    }
}

pub enum Backend {
    None,
}

impl Backend {
    pub fn from_config(settings: &crate::config::Provision) -> Result<Self, NetError> {
        match settings.backend {
            crate::config::ProvisionBackend::None => Ok(Self::None),
            other => Err(NetError::Backend(format!("backend {other:?} is not built into this fleetd"))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
        }
    }

    /// Whether a network the device already knows is up: then provisioning
    /// never raises an access point over it.
    pub async fn known_network_active(&mut self) -> Result<bool, NetError> {
        match self {
            Self::None => Ok(false),
        }
    }

    /// Scans (before the access point is up: a radio in AP mode cannot).
    pub async fn scan(&mut self) -> Result<Vec<Network>, NetError> {
        match self {
            Self::None => Ok(Vec::new()),
        }
    }

    /// Raises the access point; returns its address (`None`: no AP).
    pub async fn start_ap(&mut self, _ap: &AccessPoint) -> Result<Option<std::net::IpAddr>, NetError> {
        match self {
            Self::None => Ok(None),
        }
    }

    pub async fn stop_ap(&mut self) -> Result<(), NetError> {
        match self {
            Self::None => Ok(()),
        }
    }

    /// Joins `ssid` as a station and keeps the profile.
    pub async fn join(&mut self, ssid: &str, _psk: &str) -> Result<(), NetError> {
        match self {
            Self::None => {
                Err(NetError::Join { reason: format!("backend none has no Wi-Fi to join {ssid:?} with") })
            }
        }
    }
}

/// `fleetd reset --factory`: the Wi-Fi profile provisioning made goes too.
pub fn forget_wifi(settings: &crate::config::Provision) -> Result<(), NetError> {
    match settings.backend {
        crate::config::ProvisionBackend::None => Ok(()),
        _ => Ok(()),
    }
}
