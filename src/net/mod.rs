//! The network backends provisioning drives: raise the access point, scan,
//! join the Wi-Fi a phone handed over. One file per backend, one enum over
//! them (the set is closed and small; no trait object needed).
//! - `networkmanager`: NM's D-Bus API (`networkmanager.rs`);
//! - `hostapd`: hostapd's control socket, and wpa_supplicant's to join
//!   (`hostapd.rs` over `wpa_ctrl.rs`);
//! - `none`: no access point; the portal listens on `provision.listen`
//!   (wired or USB-gadget set-up, and tests).

pub mod hostapd;
pub mod networkmanager;
pub mod wpa_ctrl;

pub use crate::wifi::Network;

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
    NetworkManager(networkmanager::NetworkManager),
    Hostapd(hostapd::Hostapd),
    None,
}

impl Backend {
    /// `client_dir` holds the control-socket clients' own sockets (hostapd).
    pub async fn from_config(
        settings: &crate::config::Provision,
        client_dir: &std::path::Path,
    ) -> Result<Self, NetError> {
        use crate::config::ProvisionBackend as B;
        match settings.backend {
            B::Networkmanager => {
                Ok(Self::NetworkManager(networkmanager::NetworkManager::connect(&settings.interface).await?))
            }
            B::Hostapd => Ok(Self::Hostapd(hostapd::Hostapd::new(settings, client_dir.to_path_buf()))),
            B::None => Ok(Self::None),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::NetworkManager(_) => "networkmanager",
            Self::Hostapd(_) => "hostapd",
            Self::None => "none",
        }
    }

    /// Whether this backend can join a Wi-Fi network (`none` cannot).
    pub fn joins_wifi(&self) -> bool {
        !matches!(self, Self::None)
    }

    /// Whether a network the device already knows is up: then provisioning
    /// never raises an access point over it.
    pub async fn known_network_active(&mut self) -> Result<bool, NetError> {
        match self {
            Self::NetworkManager(nm) => nm.known_network_active().await,
            // hostapd owns the radio as an access point; there is no station to take over.
            Self::Hostapd(_) => Ok(false),
            Self::None => Ok(false),
        }
    }

    /// Scans (before the access point is up: a radio in AP mode cannot).
    pub async fn scan(&mut self) -> Result<Vec<Network>, NetError> {
        match self {
            Self::NetworkManager(nm) => nm.scan().await,
            Self::Hostapd(_) => Ok(Vec::new()),
            Self::None => Ok(Vec::new()),
        }
    }

    /// Raises the access point; returns its address (`None`: no AP).
    pub async fn start_ap(&mut self, ap: &AccessPoint) -> Result<Option<std::net::IpAddr>, NetError> {
        match self {
            Self::NetworkManager(nm) => nm.start_ap(ap).await.map(Some),
            Self::Hostapd(h) => h.start_ap(ap).await.map(Some),
            Self::None => Ok(None),
        }
    }

    pub async fn stop_ap(&mut self) -> Result<(), NetError> {
        match self {
            Self::NetworkManager(nm) => nm.stop_ap().await,
            Self::Hostapd(h) => h.stop_ap().await,
            Self::None => Ok(()),
        }
    }

    /// Joins `ssid` as a station and keeps the profile.
    pub async fn join(&mut self, ssid: &str, psk: &str) -> Result<(), NetError> {
        match self {
            Self::NetworkManager(nm) => nm.join(ssid, psk).await,
            Self::Hostapd(h) => h.join(ssid, psk).await,
            Self::None => {
                Err(NetError::Join { reason: format!("backend none has no Wi-Fi to join {ssid:?} with") })
            }
        }
    }
}

/// `fleetd reset --factory`: the Wi-Fi profiles provisioning made go too.
/// `ssid` is the network provisioning joined, if any.
pub async fn forget_wifi(
    settings: &crate::config::Provision,
    ssid: Option<&str>,
    client_dir: &std::path::Path,
) -> Result<(), NetError> {
    match (settings.backend, ssid) {
        (crate::config::ProvisionBackend::Networkmanager, _) => {
            networkmanager::NetworkManager::connect(&settings.interface).await?.forget().await
        }
        (crate::config::ProvisionBackend::Hostapd, Some(ssid)) => {
            hostapd::Hostapd::new(settings, client_dir.to_path_buf()).forget(ssid).await
        }
        _ => Ok(()),
    }
}

/// Where control-socket clients bind their own sockets: systemd's
/// RuntimeDirectory when there is one (hostapd must be able to answer
/// there), else the state directory.
pub fn client_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| state_dir.to_path_buf())
}
