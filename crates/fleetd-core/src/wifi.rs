//! What the network backends and the portal both speak of, in neither:
//! `net` (IO, below) fills it from a scan, `provision::portal` (pure)
//! shows it, and neither depends on the other.

use serde::Serialize;

/// A network seen by the scan made before the access point came up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Network {
    pub ssid: String,
    /// 0-100.
    pub signal: u8,
    /// "open", "wpa2", "wpa3", …
    pub security: String,
}
