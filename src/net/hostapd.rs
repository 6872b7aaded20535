//! The hostapd backend, for images that run hostapd and their own DHCP
//! server instead of NetworkManager. The access point is configured and
//! switched through hostapd's control socket (`wpa_ctrl.rs`); joining the
//! Wi-Fi afterwards goes through wpa_supplicant's, which speaks the same
//! protocol. hostapd's events (a phone joined; a phone tried a wrong
//! passphrase) are logged from the attached socket.
//!
//! hostapd cannot scan, so the portal's network list is empty with this
//! backend (the phone's user types the SSID).

use super::wpa_ctrl::{parse_key_values, Ctrl, Events};
use super::{AccessPoint, NetError};
use crate::config::Provision;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How long wpa_supplicant may take to associate and authenticate.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

fn ctrl_error(e: super::wpa_ctrl::CtrlError) -> NetError {
    NetError::Backend(e.to_string())
}

/// hostapd refused a step of raising the access point.
fn ap_error(e: super::wpa_ctrl::CtrlError) -> NetError {
    NetError::Ap(e.to_string())
}

/// The `SET` commands that make the access point: WPA2-PSK, CCMP only,
/// PMF off (brcmfmac clients), the PoP-derived passphrase. Pure.
pub fn ap_commands(ap: &AccessPoint) -> Vec<String> {
    vec![
        format!("SET ssid {}", ap.ssid),
        "SET wpa 2".into(),
        "SET wpa_key_mgmt WPA-PSK".into(),
        "SET rsn_pairwise CCMP".into(),
        "SET ieee80211w 0".into(),
        format!("SET wpa_passphrase {}", ap.passphrase),
    ]
}

/// A passphrase for `SET_NETWORK … psk`: 64 hex digits are a raw key and
/// go bare; anything else is a passphrase and goes quoted (wpa_supplicant
/// ends the value at the last quote, so one inside needs no escape). Pure.
pub fn psk_value(psk: &str) -> String {
    if psk.len() == 64 && psk.bytes().all(|b| b.is_ascii_hexdigit()) {
        psk.to_string()
    } else {
        format!("\"{psk}\"")
    }
}

/// An SSID for `SET_NETWORK … ssid`: quoted when plain printable ASCII,
/// else as hex (wpa_supplicant reads both). Pure.
pub fn network_value(text: &str) -> String {
    if text.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"') {
        format!("\"{text}\"")
    } else {
        crate::trust::hex(text.as_bytes())
    }
}

pub struct Hostapd {
    hostapd: PathBuf,
    supplicant: PathBuf,
    client_dir: PathBuf,
    address: IpAddr,
    events: Option<tokio::task::JoinHandle<()>>,
}

impl Hostapd {
    pub fn new(settings: &Provision, client_dir: PathBuf) -> Self {
        Self {
            hostapd: settings.hostapd_ctrl_dir.join(&settings.interface),
            supplicant: settings.wpa_supplicant_ctrl_dir.join(&settings.interface),
            client_dir,
            address: IpAddr::V4(settings.ap_address),
            events: None,
        }
    }

    fn ctrl(&self) -> Result<Ctrl, NetError> {
        Ctrl::open(&self.hostapd, &self.client_dir).map_err(ctrl_error)
    }

    pub async fn start_ap(&mut self, ap: &AccessPoint) -> Result<IpAddr, NetError> {
        let ctrl = self.ctrl()?;
        let pong = ctrl.request("PING").await.map_err(ctrl_error)?;
        if pong.trim_end() != "PONG" {
            return Err(NetError::Ap(format!("hostapd answered PING with {:?}", pong.trim_end())));
        }
        // Attached before ENABLE, so no early event is missed.
        let mut events = Events::attach(&self.hostapd, &self.client_dir).await.map_err(ctrl_error)?;
        for command in ap_commands(ap) {
            ctrl.ok(&command).await.map_err(ap_error)?;
        }
        let state = parse_key_values(&ctrl.request("STATUS").await.map_err(ctrl_error)?);
        let command =
            if state.get("state").map(String::as_str) == Some("ENABLED") { "RELOAD" } else { "ENABLE" };
        ctrl.ok(command).await.map_err(ap_error)?;
        // With `start_disabled=1` (packaging/hostapd) an ENABLE after a
        // DISABLE sets the interface up but sends no beacons: phones see
        // nothing. UPDATE_BEACON starts them, and is harmless otherwise.
        ctrl.ok("UPDATE_BEACON").await.map_err(ap_error)?;
        if let Some(old) = self.events.take() {
            old.abort();
        }
        self.events = Some(tokio::spawn(async move {
            while let Ok(event) = events.next().await {
                let mac = event.text.split_whitespace().nth(1).unwrap_or("?").to_string();
                match event.name() {
                    "AP-STA-CONNECTED" => crate::logging::log(&format!("provisioning: {mac} joined the access point")),
                    "AP-STA-POSSIBLE-PSK-MISMATCH" => crate::logging::log(&format!(
                        "provisioning: {mac} tried a wrong access-point passphrase (the one derived from the label's code is needed)"
                    )),
                    "AP-STA-DISCONNECTED" => crate::logging::log(&format!("provisioning: {mac} left the access point")),
                    _ => {}
                }
            }
        }));
        Ok(self.address)
    }

    pub async fn stop_ap(&mut self) -> Result<(), NetError> {
        if let Some(events) = self.events.take() {
            events.abort();
        }
        self.ctrl()?.ok("DISABLE").await.map_err(ctrl_error)
    }

    /// Joins through wpa_supplicant; the network is saved on success and
    /// removed on failure.
    pub async fn join(&mut self, ssid: &str, psk: &str) -> Result<(), NetError> {
        let supplicant = Ctrl::open(&self.supplicant, &self.client_dir).map_err(ctrl_error)?;
        let mut events = Events::attach(&self.supplicant, &self.client_dir).await.map_err(ctrl_error)?;
        let id = supplicant.request("ADD_NETWORK").await.map_err(ctrl_error)?.trim().to_string();
        if id.parse::<u32>().is_err() {
            return Err(NetError::Backend(format!("wpa_supplicant answered ADD_NETWORK with {id:?}")));
        }
        let configured = async {
            supplicant.ok(&format!("SET_NETWORK {id} ssid {}", network_value(ssid))).await?;
            supplicant.ok(&format!("SET_NETWORK {id} psk {}", psk_value(psk))).await?;
            supplicant.ok(&format!("SET_NETWORK {id} key_mgmt WPA-PSK")).await?;
            supplicant.ok(&format!("SELECT_NETWORK {id}")).await
        }
        .await;
        let outcome = match configured {
            Err(e) => Err(NetError::Join { reason: e.to_string() }),
            Ok(()) => match tokio::time::timeout(JOIN_TIMEOUT, wait_connected(&mut events)).await {
                Ok(result) => result,
                Err(_) => Err(NetError::Join {
                    reason: format!("not connected within {} s (timeout)", JOIN_TIMEOUT.as_secs()),
                }),
            },
        };
        match outcome {
            Ok(()) => {
                // Kept for the next boots; a read-only config is not fatal.
                if let Err(e) = supplicant.ok("SAVE_CONFIG").await {
                    crate::logging::log(&format!("provisioning: wpa_supplicant SAVE_CONFIG: {e}"));
                }
                Ok(())
            }
            Err(e) => {
                // DISCONNECT first: a supplicant still trying the network
                // keeps the radio a station, and the access point raised
                // again would send no beacons (seen on mac80211_hwsim:
                // hostapd said AP-ENABLED, no phone could see it).
                let _ = supplicant.ok("DISCONNECT").await;
                let _ = supplicant.ok(&format!("REMOVE_NETWORK {id}")).await;
                Err(e)
            }
        }
    }
}

/// A daemon stopped while its access point is up leaves it disabled: NM
/// does that by itself (bind-activation), hostapd needs telling.
impl Drop for Hostapd {
    fn drop(&mut self) {
        let Some(events) = self.events.take() else { return };
        events.abort();
        let local = self.client_dir.join(format!("fleetd-ctrl-{}-drop", std::process::id()));
        let _ = std::fs::remove_file(&local);
        if let Ok(socket) = std::os::unix::net::UnixDatagram::bind(&local) {
            let _ = socket.set_read_timeout(Some(Duration::from_secs(1)));
            if socket.connect(&self.hostapd).is_ok() && socket.send(b"DISABLE").is_ok() {
                let mut reply = [0u8; 64];
                let _ = socket.recv(&mut reply);
            }
        }
        let _ = std::fs::remove_file(&local);
    }
}

impl Hostapd {
    /// `fleetd reset --factory`: the networks wpa_supplicant saved for `ssid`.
    pub async fn forget(&mut self, ssid: &str) -> Result<(), NetError> {
        let supplicant = Ctrl::open(&self.supplicant, &self.client_dir).map_err(ctrl_error)?;
        let list = supplicant.request("LIST_NETWORKS").await.map_err(ctrl_error)?;
        for line in list.lines().skip(1) {
            let mut fields = line.split('\t');
            if let (Some(id), Some(name)) = (fields.next(), fields.next()) {
                if name == ssid {
                    supplicant.ok(&format!("REMOVE_NETWORK {id}")).await.map_err(ctrl_error)?;
                }
            }
        }
        supplicant.ok("SAVE_CONFIG").await.map_err(ctrl_error)
    }
}

async fn wait_connected(events: &mut Events) -> Result<(), NetError> {
    loop {
        let event = events.next().await.map_err(ctrl_error)?;
        match event.name() {
            "CTRL-EVENT-CONNECTED" => return Ok(()),
            "CTRL-EVENT-SSID-TEMP-DISABLED" if event.text.contains("reason=WRONG_KEY") => {
                return Err(NetError::Join { reason: "wrong-key: the passphrase is wrong".into() })
            }
            "CTRL-EVENT-SSID-TEMP-DISABLED" => {
                return Err(NetError::Join { reason: format!("ssid-disabled: {}", event.text) })
            }
            "CTRL-EVENT-NETWORK-NOT-FOUND" => {
                return Err(NetError::Join { reason: "ssid-not-found: the network is not in range".into() })
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_point_is_wpa2_ccmp_without_pmf() {
        let ap =
            AccessPoint { interface: "wlan0".into(), ssid: "fleetd-gw-1".into(), passphrase: "K".repeat(24) };
        let c = ap_commands(&ap);
        assert_eq!(c[0], "SET ssid fleetd-gw-1");
        for expected in ["SET wpa 2", "SET wpa_key_mgmt WPA-PSK", "SET rsn_pairwise CCMP", "SET ieee80211w 0"]
        {
            assert!(c.contains(&expected.to_string()), "{expected}");
        }
        assert!(c.contains(&format!("SET wpa_passphrase {}", "K".repeat(24))));
    }

    #[test]
    fn a_raw_key_goes_bare_and_a_passphrase_quoted() {
        assert_eq!(psk_value(&"ab".repeat(32)), "ab".repeat(32));
        assert_eq!(psk_value("correct horse"), "\"correct horse\"");
        assert_eq!(psk_value("say \"hi\" now"), "\"say \"hi\" now\"");
    }

    #[test]
    fn network_values_are_quoted_or_hex() {
        assert_eq!(network_value("home"), "\"home\"");
        assert_eq!(network_value("say \"hi\""), "7361792022686922");
        assert_eq!(network_value("caf\u{e9}"), "636166c3a9");
    }
}
