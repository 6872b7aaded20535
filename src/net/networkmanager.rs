//! The NetworkManager backend, over NM's D-Bus API (zbus, async).
//!
//! - The access point uses the settings `nmcli dev wifi hotspot` makes
//!   (`hotspot_settings`), activated with `AddAndActivateConnection2`,
//!   `persist=volatile` and `bind-activation=dbus-client`: if fleetd dies,
//!   NM takes the access point down and forgets it.
//! - Activation is followed by signals (`Connection.Active.StateChanged`,
//!   `Device.StateChanged`), never by polling; a failure carries NM's
//!   device-state reason (7, no-secrets: a wrong passphrase).
//! - The scan is made before the access point comes up (a radio in AP mode
//!   cannot scan) and waits for `LastScan` to change.
//! - The station profile a phone hands over is kept on disk (`persist=disk`,
//!   autoconnect), named `fleetd-wifi-<ssid>`; a failed one is deleted.
//!
//! The settings builders and the reason names are pure and unit-tested; the
//! rest is tested against a stand-in on a private dbus-daemon
//! (tests/networkmanager.rs).

use super::Network;
use super::{AccessPoint, NetError};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

const NM: &str = "org.freedesktop.NetworkManager";
const NM_PATH: &str = "/org/freedesktop/NetworkManager";
const SETTINGS_PATH: &str = "/org/freedesktop/NetworkManager/Settings";
const DEVICE: &str = "org.freedesktop.NetworkManager.Device";
const WIRELESS: &str = "org.freedesktop.NetworkManager.Device.Wireless";
const ACTIVE: &str = "org.freedesktop.NetworkManager.Connection.Active";

/// The profile names fleetd makes: the access point, and stations.
pub const HOTSPOT_ID: &str = "fleetd-hotspot";
pub const STATION_PREFIX: &str = "fleetd-wifi-";

/// NM's `NMDeviceState`.
const DEVICE_ACTIVATED: u32 = 100;
const DEVICE_FAILED: u32 = 120;
/// NM's `NMActiveConnectionState`.
const ACTIVE_ACTIVATED: u32 = 2;
const ACTIVE_DEACTIVATED: u32 = 4;

/// How long an activation may take before fleetd gives up on it. NM's own
/// supplicant timeout is 20-25 s; DHCP adds to it.
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a requested scan to finish.
const SCAN_TIMEOUT: Duration = Duration::from_secs(15);

/// `a{sa{sv}}`: a connection's settings.
pub type Settings = HashMap<&'static str, HashMap<&'static str, Value<'static>>>;

/// The hotspot's channel. Channels 1-11 are open to an access point in
/// every regulatory domain. Left to itself, NM picks a channel for band bg
/// from the SSID, and for some device ids it picked 13 (2472 MHz). The
/// world domain and the US do not allow an access point there, and the
/// activation fails with `supplicant-timeout`. The real NM showed this on
/// mac80211_hwsim (tests/system_wifi.rs).
pub const HOTSPOT_CHANNEL: u32 = 1;

/// What `nmcli dev wifi hotspot` creates, with the PoP-derived passphrase.
/// The differences from nmcli are by design, and tests/system_wifi.rs
/// checks them against the real NM on mac80211_hwsim:
/// - the id and `interface-name`;
/// - `band` = bg (nmcli leaves the band to the driver);
/// - `channel` = [`HOTSPOT_CHANNEL`];
/// - `pmf` = 1 (nmcli keeps the default).
pub fn hotspot_settings(ap: &AccessPoint) -> Settings {
    let mut s = Settings::new();
    s.insert(
        "connection",
        HashMap::from([
            ("id", Value::from(HOTSPOT_ID)),
            ("type", Value::from("802-11-wireless")),
            ("autoconnect", Value::from(false)),
            ("interface-name", Value::from(ap.interface.clone())),
        ]),
    );
    s.insert(
        "802-11-wireless",
        HashMap::from([
            ("ssid", Value::from(ap.ssid.as_bytes().to_vec())),
            ("mode", Value::from("ap")),
            ("band", Value::from("bg")),
            ("channel", Value::from(HOTSPOT_CHANNEL)),
        ]),
    );
    s.insert(
        "802-11-wireless-security",
        HashMap::from([
            ("key-mgmt", Value::from("wpa-psk")),
            ("psk", Value::from(ap.passphrase.clone())),
            ("proto", Value::from(vec!["rsn"])),
            ("pairwise", Value::from(vec!["ccmp"])),
            ("group", Value::from(vec!["ccmp"])),
            // 1 = disable: Raspberry Pi (brcmfmac) clients fail to join with PMF.
            ("pmf", Value::from(1i32)),
        ]),
    );
    s.insert("ipv4", HashMap::from([("method", Value::from("shared"))]));
    s.insert("ipv6", HashMap::from([("method", Value::from("ignore"))]));
    s
}

/// The station profile for the network a phone handed over.
pub fn station_settings(interface: &str, ssid: &str, psk: &str) -> Settings {
    let mut s = Settings::new();
    s.insert(
        "connection",
        HashMap::from([
            ("id", Value::from(format!("{STATION_PREFIX}{ssid}"))),
            ("type", Value::from("802-11-wireless")),
            ("autoconnect", Value::from(true)),
            ("interface-name", Value::from(interface.to_string())),
        ]),
    );
    s.insert(
        "802-11-wireless",
        HashMap::from([
            ("ssid", Value::from(ssid.as_bytes().to_vec())),
            ("mode", Value::from("infrastructure")),
        ]),
    );
    s.insert(
        "802-11-wireless-security",
        HashMap::from([("key-mgmt", Value::from("wpa-psk")), ("psk", Value::from(psk.to_string()))]),
    );
    s.insert("ipv4", HashMap::from([("method", Value::from("auto"))]));
    s.insert("ipv6", HashMap::from([("method", Value::from("auto"))]));
    s
}

/// NM's `NMDeviceStateReason`, the ones a person can act on by name.
pub fn device_reason(reason: u32) -> String {
    let name = match reason {
        7 => "no-secrets: the passphrase is wrong",
        8 => "supplicant-disconnect: the network dropped the device while it authenticated",
        9 => "supplicant-config-failed",
        10 => "supplicant-failed",
        11 => "supplicant-timeout: no answer from the network",
        15 => "dhcp-start-failed",
        16 => "dhcp-error",
        17 => "dhcp-failed: no address from the network",
        53 => "ssid-not-found: the network is not in range",
        _ => return format!("device-state-reason {reason}"),
    };
    format!("{name} (reason {reason})")
}

/// The security a scanned access point offers, from its flag words.
pub fn security(flags: u32, wpa_flags: u32, rsn_flags: u32) -> &'static str {
    const KEY_MGMT_PSK: u32 = 0x100;
    const KEY_MGMT_802_1X: u32 = 0x200;
    const KEY_MGMT_SAE: u32 = 0x400;
    const PRIVACY: u32 = 0x1;
    if rsn_flags & KEY_MGMT_SAE != 0 {
        "wpa3"
    } else if rsn_flags & KEY_MGMT_PSK != 0 {
        "wpa2"
    } else if (rsn_flags | wpa_flags) & KEY_MGMT_802_1X != 0 {
        "enterprise"
    } else if wpa_flags & KEY_MGMT_PSK != 0 {
        "wpa"
    } else if flags & PRIVACY != 0 {
        "wep"
    } else {
        "open"
    }
}

/// Merges scan results by SSID, strongest first; hidden networks dropped.
pub fn networks_by_ssid(seen: Vec<Network>) -> Vec<Network> {
    let mut best: HashMap<String, Network> = HashMap::new();
    for n in seen.into_iter().filter(|n| !n.ssid.is_empty()) {
        match best.get(&n.ssid) {
            Some(b) if b.signal >= n.signal => {}
            _ => {
                best.insert(n.ssid.clone(), n);
            }
        }
    }
    let mut list: Vec<_> = best.into_values().collect();
    list.sort_by(|a, b| b.signal.cmp(&a.signal).then(a.ssid.cmp(&b.ssid)));
    list
}

fn dbus(context: &str) -> impl FnOnce(zbus::Error) -> NetError + '_ {
    move |e| NetError::Backend(format!("NetworkManager: {context}: {e}"))
}

pub struct NetworkManager {
    conn: zbus::Connection,
    interface: String,
    device: OwnedObjectPath,
    hotspot: Option<OwnedObjectPath>,
}

impl NetworkManager {
    /// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured)
    /// and finds the Wi-Fi device.
    pub async fn connect(interface: &str) -> Result<Self, NetError> {
        let conn = zbus::Connection::system().await.map_err(dbus("the system bus"))?;
        let nm = proxy(&conn, NM_PATH, NM).await?;
        let device: OwnedObjectPath = nm
            .call("GetDeviceByIpIface", &(interface,))
            .await
            .map_err(dbus(&format!("device {interface}")))?;
        Ok(Self { conn, interface: interface.to_string(), device, hotspot: None })
    }

    /// A station connection (not ours) is up or coming up on the device.
    pub async fn known_network_active(&mut self) -> Result<bool, NetError> {
        let device = proxy(&self.conn, &self.device, DEVICE).await?;
        let state: u32 = device.get_property("State").await.map_err(dbus("device state"))?;
        if !(40..=DEVICE_ACTIVATED).contains(&state) {
            return Ok(false);
        }
        let active: OwnedObjectPath =
            device.get_property("ActiveConnection").await.map_err(dbus("active connection"))?;
        if active.as_str() == "/" {
            return Ok(false);
        }
        let active = proxy(&self.conn, &active, ACTIVE).await?;
        let id: String = active.get_property("Id").await.map_err(dbus("active connection id"))?;
        Ok(id != HOTSPOT_ID)
    }

    pub async fn scan(&mut self) -> Result<Vec<Network>, NetError> {
        let wireless = proxy(&self.conn, &self.device, WIRELESS).await?;
        let before: i64 = wireless.get_property("LastScan").await.unwrap_or(0);
        let properties = proxy(&self.conn, &self.device, "org.freedesktop.DBus.Properties").await?;
        let mut changes = properties.receive_signal("PropertiesChanged").await.map_err(dbus("subscribe"))?;
        let options: HashMap<&str, Value> = HashMap::new();
        // Refused (a scan runs already, or the radio is busy): use the
        // list NM has when it has scanned before, else wait for a scan.
        let requested = wireless.call::<_, _, ()>("RequestScan", &(options,)).await;
        let waited = tokio::time::timeout(SCAN_TIMEOUT, async {
            if requested.is_err() && before > 0 {
                return;
            }
            while let Some(signal) = changes.next().await {
                let Ok((iface, changed, _)) =
                    signal.body().deserialize::<(String, HashMap<String, OwnedValue>, Vec<String>)>()
                else {
                    continue;
                };
                let last = changed.get("LastScan").and_then(|v| i64::try_from(v.clone()).ok());
                if iface == WIRELESS && last.is_some_and(|t| t != before) {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() {
            crate::logging::log("provisioning: the scan took too long; using what NM has");
        }
        let paths: Vec<OwnedObjectPath> =
            wireless.call("GetAllAccessPoints", &()).await.map_err(dbus("access points"))?;
        let mut seen = Vec::new();
        for path in paths {
            let ap = proxy(&self.conn, &path, "org.freedesktop.NetworkManager.AccessPoint").await?;
            let ssid: Vec<u8> = ap.get_property("Ssid").await.unwrap_or_default();
            let strength: u8 = ap.get_property("Strength").await.unwrap_or(0);
            let flags: u32 = ap.get_property("Flags").await.unwrap_or(0);
            let wpa: u32 = ap.get_property("WpaFlags").await.unwrap_or(0);
            let rsn: u32 = ap.get_property("RsnFlags").await.unwrap_or(0);
            seen.push(Network {
                ssid: String::from_utf8_lossy(&ssid).into_owned(),
                signal: strength.min(100),
                security: security(flags, wpa, rsn).to_string(),
            });
        }
        Ok(networks_by_ssid(seen))
    }

    /// Raises the hotspot; returns its address (NM's shared mode picks it).
    pub async fn start_ap(&mut self, ap: &AccessPoint) -> Result<IpAddr, NetError> {
        let options = HashMap::from([
            ("persist", Value::from("volatile")),
            ("bind-activation", Value::from("dbus-client")),
        ]);
        let active = self.activate(hotspot_settings(ap), options).await.map_err(|e| match e {
            NetError::Join { reason } => NetError::Ap(reason),
            other => other,
        })?;
        self.hotspot = Some(active.clone());
        Ok(self.ipv4_address(&active).await.unwrap_or(IpAddr::from([10, 42, 0, 1])))
    }

    pub async fn stop_ap(&mut self) -> Result<(), NetError> {
        let Some(active) = self.hotspot.take() else { return Ok(()) };
        let nm = proxy(&self.conn, NM_PATH, NM).await?;
        let device = proxy(&self.conn, &self.device, DEVICE).await?;
        let mut changes = device.receive_signal("StateChanged").await.map_err(dbus("subscribe"))?;
        nm.call::<_, _, ()>("DeactivateConnection", &(active,))
            .await
            .map_err(dbus("deactivate the hotspot"))?;
        // The radio is free once the device is disconnected (or less).
        let _ = tokio::time::timeout(ACTIVATION_TIMEOUT, async {
            while let Some(signal) = changes.next().await {
                if let Ok((new, _, _)) = signal.body().deserialize::<(u32, u32, u32)>() {
                    if new <= 30 {
                        return;
                    }
                }
            }
        })
        .await;
        Ok(())
    }

    /// Joins as a station with a profile kept on disk; a failed profile is
    /// deleted so NM does not retry it against the access point.
    pub async fn join(&mut self, ssid: &str, psk: &str) -> Result<(), NetError> {
        let options = HashMap::from([("persist", Value::from("disk"))]);
        match self.activate(station_settings(&self.interface, ssid, psk), options).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = self.delete_profiles(|id| id == format!("{STATION_PREFIX}{ssid}")).await;
                Err(e)
            }
        }
    }

    /// `fleetd reset --factory`: every station profile fleetd made.
    pub async fn forget(&mut self) -> Result<(), NetError> {
        self.delete_profiles(|id| id.starts_with(STATION_PREFIX)).await
    }

    async fn delete_profiles(&self, matches: impl Fn(&str) -> bool) -> Result<(), NetError> {
        let settings = proxy(&self.conn, SETTINGS_PATH, "org.freedesktop.NetworkManager.Settings").await?;
        let paths: Vec<OwnedObjectPath> =
            settings.call("ListConnections", &()).await.map_err(dbus("list profiles"))?;
        for path in paths {
            let connection =
                proxy(&self.conn, &path, "org.freedesktop.NetworkManager.Settings.Connection").await?;
            let Ok(s) = connection
                .call::<_, _, HashMap<String, HashMap<String, OwnedValue>>>("GetSettings", &())
                .await
            else {
                continue;
            };
            let id =
                s.get("connection").and_then(|c| c.get("id")).and_then(|v| String::try_from(v.clone()).ok());
            if id.is_some_and(|id| matches(&id)) {
                connection.call::<_, _, ()>("Delete", &()).await.map_err(dbus("delete a profile"))?;
            }
        }
        Ok(())
    }

    /// `AddAndActivateConnection2`, then follows the signals to the end.
    async fn activate(
        &self,
        settings: Settings,
        options: HashMap<&str, Value<'_>>,
    ) -> Result<OwnedObjectPath, NetError> {
        // Subscribed before the call, so no transition is missed.
        let device = proxy(&self.conn, &self.device, DEVICE).await?;
        let mut device_changes = device.receive_signal("StateChanged").await.map_err(dbus("subscribe"))?;
        let nm = proxy(&self.conn, NM_PATH, NM).await?;
        let root = OwnedObjectPath::try_from("/").map_err(|e| dbus("path")(e.into()))?;
        let (_profile, active, _result): (OwnedObjectPath, OwnedObjectPath, HashMap<String, OwnedValue>) = nm
            .call("AddAndActivateConnection2", &(settings, &self.device, root, options))
            .await
            .map_err(|e| NetError::Join { reason: format!("NetworkManager refused the connection: {e}") })?;
        let active_proxy = proxy(&self.conn, &active, ACTIVE).await?;
        let mut active_changes =
            active_proxy.receive_signal("StateChanged").await.map_err(dbus("subscribe"))?;
        let state: u32 = active_proxy.get_property("State").await.unwrap_or(ACTIVE_DEACTIVATED);
        if state == ACTIVE_ACTIVATED {
            return Ok(active);
        }
        let outcome = tokio::time::timeout(ACTIVATION_TIMEOUT, async {
            loop {
                // Device first: NM fails the device (with the reason) before
                // it deactivates the connection, and zbus delivers in order.
                tokio::select! {
                    biased;
                    Some(signal) = device_changes.next() => {
                        let Ok((new, _old, reason)) = signal.body().deserialize::<(u32, u32, u32)>() else { continue };
                        if new == DEVICE_FAILED {
                            return Err(device_reason(reason));
                        }
                    }
                    Some(signal) = active_changes.next() => {
                        let Ok((state, reason)) = signal.body().deserialize::<(u32, u32)>() else { continue };
                        if state == ACTIVE_ACTIVATED {
                            return Ok(());
                        }
                        if state == ACTIVE_DEACTIVATED {
                            return Err(format!("the connection was deactivated (reason {reason})"));
                        }
                    }
                    else => return Err("NetworkManager went away".to_string()),
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(active),
            Ok(Err(reason)) => Err(NetError::Join { reason }),
            Err(_) => Err(NetError::Join {
                reason: format!("not connected within {} s (timeout)", ACTIVATION_TIMEOUT.as_secs()),
            }),
        }
    }

    async fn ipv4_address(&self, active: &OwnedObjectPath) -> Option<IpAddr> {
        let active = proxy(&self.conn, active, ACTIVE).await.ok()?;
        let config: OwnedObjectPath = active.get_property("Ip4Config").await.ok()?;
        let ip4 = proxy(&self.conn, &config, "org.freedesktop.NetworkManager.IP4Config").await.ok()?;
        let data: Vec<HashMap<String, OwnedValue>> = ip4.get_property("AddressData").await.ok()?;
        let address = String::try_from(data.first()?.get("address")?.clone()).ok()?;
        address.parse().ok()
    }
}

async fn proxy<'a>(
    conn: &zbus::Connection,
    path: &'a str,
    interface: &'a str,
) -> Result<zbus::Proxy<'a>, NetError> {
    zbus::proxy::Builder::new(conn)
        .destination(NM)
        .and_then(|b| b.path(path))
        .and_then(|b| b.interface(interface))
        .map_err(dbus(interface))?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(dbus(interface))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hotspot_is_what_nmcli_makes_with_the_pop_passphrase() {
        let ap =
            AccessPoint { interface: "wlan0".into(), ssid: "fleetd-gw-1".into(), passphrase: "P".repeat(24) };
        let s = hotspot_settings(&ap);
        let get = |section: &str, key: &str| s[section][key].to_string();
        assert_eq!(get("802-11-wireless", "mode"), "\"ap\"");
        assert_eq!(get("802-11-wireless", "band"), "\"bg\"");
        assert_eq!(s["802-11-wireless"]["channel"], Value::from(HOTSPOT_CHANNEL));
        assert_eq!(s["802-11-wireless"]["ssid"], Value::from(b"fleetd-gw-1".to_vec()));
        assert_eq!(get("802-11-wireless-security", "key-mgmt"), "\"wpa-psk\"");
        assert_eq!(get("802-11-wireless-security", "proto"), "[\"rsn\"]");
        assert_eq!(get("802-11-wireless-security", "pairwise"), "[\"ccmp\"]");
        assert_eq!(get("802-11-wireless-security", "group"), "[\"ccmp\"]");
        assert_eq!(s["802-11-wireless-security"]["pmf"], Value::from(1i32));
        assert_eq!(get("ipv4", "method"), "\"shared\"");
        assert_eq!(get("ipv6", "method"), "\"ignore\"");
        assert_eq!(s["connection"]["autoconnect"], Value::from(false));
    }

    #[test]
    fn reasons_and_security_read_as_names() {
        assert!(device_reason(7).starts_with("no-secrets"));
        assert!(device_reason(53).starts_with("ssid-not-found"));
        assert_eq!(device_reason(999), "device-state-reason 999");
        assert_eq!(security(0, 0, 0x100), "wpa2");
        assert_eq!(security(0, 0, 0x400 | 0x100), "wpa3");
        assert_eq!(security(1, 0, 0), "wep");
        assert_eq!(security(0, 0, 0), "open");
        assert_eq!(security(0, 0x200, 0), "enterprise");
    }

    #[test]
    fn scan_results_merge_by_ssid_strongest_first() {
        let n = |ssid: &str, signal| Network { ssid: ssid.into(), signal, security: "wpa2".into() };
        let merged = networks_by_ssid(vec![n("b", 40), n("a", 30), n("b", 70), n("", 99), n("a", 20)]);
        assert_eq!(merged, vec![n("b", 70), n("a", 30)]);
    }
}
