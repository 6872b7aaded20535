//! A NetworkManager stand-in served with zbus on a private bus: the part of
//! NM's D-Bus API fleetd uses, with NM's own object paths, interfaces,
//! property types and signals (python-dbusmock's NM template cannot make
//! hotspots). It models:
//! - one Wi-Fi device, its access points, `RequestScan` → `LastScan`;
//! - `AddAndActivateConnection2`: Activating, then Activated, or Failed
//!   with NM's reason (7, no-secrets, for a wrong passphrase), with the
//!   `Device.StateChanged` and `Connection.Active.StateChanged` signals;
//! - `persist=volatile` (the profile goes with the activation) and
//!   `bind-activation=dbus-client` (the activation ends when its client
//!   leaves the bus);
//! - saved profiles (`Settings.ListConnections`, `GetSettings`, `Delete`).
//!
//! Every `AddAndActivateConnection2` call is recorded for the test.

use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

pub type Settings = HashMap<String, HashMap<String, OwnedValue>>;

const DEVICE_PATH: &str = "/org/freedesktop/NetworkManager/Devices/1";

/// One `AddAndActivateConnection2` call.
#[derive(Debug, Clone)]
pub struct Activation {
    pub settings: Settings,
    pub options: HashMap<String, OwnedValue>,
    pub sender: String,
}

impl Activation {
    pub fn get(&self, section: &str, key: &str) -> Option<&OwnedValue> {
        self.settings.get(section)?.get(key)
    }

    pub fn str(&self, section: &str, key: &str) -> Option<String> {
        String::try_from(self.get(section, key)?.try_clone().ok()?).ok()
    }

    pub fn option(&self, key: &str) -> Option<String> {
        String::try_from(self.options.get(key)?.try_clone().ok()?).ok()
    }

    pub fn mode(&self) -> String {
        self.str("802-11-wireless", "mode").unwrap_or_default()
    }

    pub fn ssid(&self) -> String {
        let bytes: Vec<u8> = self
            .get("802-11-wireless", "ssid")
            .and_then(|v| v.try_clone().ok()?.try_into().ok())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[derive(Default)]
struct Model {
    /// The address the hotspot's IPv4 config reports.
    ap_address: String,
    /// Networks in range: (ssid, strength, rsn flags), and the passphrase
    /// each accepts.
    in_range: Vec<(String, u8, u32)>,
    passphrases: HashMap<String, String>,
    device_state: u32,
    device_active: String,
    last_scan: i64,
    activations: Vec<Activation>,
    /// Active connection path → (state, id, profile path, volatile, client).
    active: HashMap<String, (u32, String, String, bool, Option<String>)>,
    /// Profile path → settings.
    profiles: HashMap<String, Settings>,
    next: u32,
    events: Vec<String>,
}

#[derive(Clone)]
pub struct NmDouble {
    model: Arc<Mutex<Model>>,
    stop: Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
}

fn path(p: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(p.to_string()).expect("an object path")
}

fn owned(v: Value<'_>) -> OwnedValue {
    OwnedValue::try_from(v).expect("an owned value")
}

impl NmDouble {
    /// Serves on the bus at `address` as org.freedesktop.NetworkManager.
    /// `in_range` are (ssid, strength, passphrase) networks near the device.
    pub fn start(address: &str, ap_address: &str, in_range: &[(&str, u8, &str)]) -> NmDouble {
        Self::start_with(address, ap_address, in_range, None)
    }

    /// As `start`, with the device already up on a network it knows (`id`,
    /// not fleetd's).
    pub fn start_on_known_network(
        address: &str,
        ap_address: &str,
        in_range: &[(&str, u8, &str)],
        id: &str,
    ) -> NmDouble {
        Self::start_with(address, ap_address, in_range, Some(id))
    }

    fn start_with(
        address: &str,
        ap_address: &str,
        in_range: &[(&str, u8, &str)],
        known: Option<&str>,
    ) -> NmDouble {
        let model = Model {
            ap_address: ap_address.to_string(),
            in_range: in_range.iter().map(|(s, st, _)| (s.to_string(), *st, 0x100 | 0x8 | 0x80)).collect(),
            passphrases: in_range.iter().map(|(s, _, p)| (s.to_string(), p.to_string())).collect(),
            device_state: 30,
            device_active: "/".into(),
            ..Default::default()
        };
        let double = NmDouble { model: Arc::new(Mutex::new(model)), stop: Arc::new(Mutex::new(None)) };
        if let Some(id) = known {
            double.set_known_network_active(id);
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        *double.stop.lock().unwrap() = Some(stop_tx);
        let address = address.to_string();
        let served = double.clone();
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async move {
                let conn = served.serve(&address).await;
                let _ = ready_tx.send(());
                let _ = stop_rx.await;
                drop(conn);
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("the NM stand-in is up");
        double
    }

    async fn serve(&self, address: &str) -> zbus::Connection {
        let conn = zbus::connection::Builder::address(address)
            .expect("bus address")
            .serve_at("/org/freedesktop/NetworkManager", Root { double: self.clone() })
            .unwrap()
            .serve_at(DEVICE_PATH, Device { double: self.clone() })
            .unwrap()
            .serve_at(DEVICE_PATH, Wireless { double: self.clone() })
            .unwrap()
            .serve_at("/org/freedesktop/NetworkManager/Settings", SettingsRoot { double: self.clone() })
            .unwrap()
            .name("org.freedesktop.NetworkManager")
            .unwrap()
            .build()
            .await
            .expect("connect the stand-in to the bus");
        let known: Vec<String> = self.model.lock().unwrap().active.keys().cloned().collect();
        for p in known {
            let ip4 = path("/");
            conn.object_server().at(p.clone(), Active { double: self.clone(), path: p, ip4 }).await.unwrap();
        }
        let aps: Vec<_> = self.model.lock().unwrap().in_range.clone();
        for (i, (ssid, strength, rsn)) in aps.into_iter().enumerate() {
            let p = format!("/org/freedesktop/NetworkManager/AccessPoint/{}", i + 1);
            conn.object_server().at(p, AccessPoint { ssid, strength, rsn }).await.unwrap();
        }
        // bind-activation=dbus-client: an activation ends with its client.
        let watcher = conn.clone();
        let double = self.clone();
        tokio::spawn(async move {
            let dbus = zbus::fdo::DBusProxy::new(&watcher).await.unwrap();
            let mut owners = dbus.receive_name_owner_changed().await.unwrap();
            while let Some(change) = owners.next().await {
                let Ok(args) = change.args() else { continue };
                if args.new_owner().is_none() {
                    let gone = args.name().to_string();
                    let bound: Vec<String> = {
                        let m = double.model.lock().unwrap();
                        m.active
                            .iter()
                            .filter(|(_, a)| a.4.as_deref() == Some(gone.as_str()))
                            .map(|(p, _)| p.clone())
                            .collect()
                    };
                    for p in bound {
                        double.event(format!("client {gone} left: deactivating {p}"));
                        double.deactivate(&watcher, &p, 2).await;
                    }
                }
            }
        });
        conn
    }

    fn event(&self, e: String) {
        self.model.lock().unwrap().events.push(e);
    }

    /// What happened, for assertion messages.
    pub fn events(&self) -> Vec<String> {
        self.model.lock().unwrap().events.clone()
    }

    pub fn activations(&self) -> Vec<Activation> {
        self.model.lock().unwrap().activations.clone()
    }

    /// Active connections by id and state (2 activated).
    pub fn active(&self) -> Vec<(String, u32)> {
        self.model.lock().unwrap().active.values().map(|a| (a.1.clone(), a.0)).collect()
    }

    /// The ids of the saved profiles.
    pub fn profiles(&self) -> Vec<String> {
        self.model
            .lock()
            .unwrap()
            .profiles
            .values()
            .filter_map(|s| String::try_from(s.get("connection")?.get("id")?.try_clone().ok()?).ok())
            .collect()
    }

    fn set_known_network_active(&self, id: &str) {
        let mut m = self.model.lock().unwrap();
        let p = "/org/freedesktop/NetworkManager/ActiveConnection/99".to_string();
        m.active.insert(p.clone(), (2, id.to_string(), "/".into(), false, None));
        m.device_state = 100;
        m.device_active = p;
    }

    async fn set_device_state(&self, conn: &zbus::Connection, new: u32, reason: u32, active: &str) {
        let old = {
            let mut m = self.model.lock().unwrap();
            let old = m.device_state;
            m.device_state = new;
            m.device_active = active.to_string();
            old
        };
        let emitter = SignalEmitter::new(conn, DEVICE_PATH).unwrap();
        let _ = Device::state_changed_signal(&emitter, new, old, reason).await;
    }

    async fn set_active_state(&self, conn: &zbus::Connection, p: &str, state: u32, reason: u32) {
        if let Some(a) = self.model.lock().unwrap().active.get_mut(p) {
            a.0 = state;
        }
        let emitter = SignalEmitter::new(conn, p.to_string()).unwrap();
        let _ = Active::state_changed_signal(&emitter, state, reason).await;
    }

    async fn deactivate(&self, conn: &zbus::Connection, p: &str, reason: u32) {
        self.set_active_state(conn, p, 4, reason).await;
        self.set_device_state(conn, 30, 39, "/").await;
        let removed = self.model.lock().unwrap().active.remove(p);
        if let Some((_, _, profile, volatile, _)) = removed {
            if volatile {
                self.model.lock().unwrap().profiles.remove(&profile);
            }
        }
        let _ = conn.object_server().remove::<Active, _>(p.to_string()).await;
    }

    /// Activating now; Activated (or Failed) a moment later, as NM does.
    async fn activate(
        &self,
        conn: zbus::Connection,
        activation: Activation,
    ) -> (OwnedObjectPath, OwnedObjectPath) {
        let (n, profile, active) = {
            let mut m = self.model.lock().unwrap();
            m.next += 1;
            let n = m.next;
            (
                n,
                format!("/org/freedesktop/NetworkManager/Settings/{n}"),
                format!("/org/freedesktop/NetworkManager/ActiveConnection/{n}"),
            )
        };
        let id = activation.str("connection", "id").unwrap_or_default();
        let volatile = activation.option("persist").as_deref() == Some("volatile");
        let client = (activation.option("bind-activation").as_deref() == Some("dbus-client"))
            .then(|| activation.sender.clone());
        {
            let mut m = self.model.lock().unwrap();
            m.profiles.insert(profile.clone(), activation.settings.clone());
            m.active.insert(active.clone(), (1, id.clone(), profile.clone(), volatile, client));
            m.activations.push(activation.clone());
        }
        let ip4 = format!("/org/freedesktop/NetworkManager/IP4Config/{n}");
        let address = self.model.lock().unwrap().ap_address.clone();
        conn.object_server().at(ip4.clone(), Ip4Config { address }).await.unwrap();
        conn.object_server()
            .at(active.clone(), Active { double: self.clone(), path: active.clone(), ip4: path(&ip4) })
            .await
            .unwrap();
        let double = self.clone();
        let active_path = active.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            double.set_device_state(&conn, 40, 0, &active_path).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let ssid = activation.ssid();
            let outcome = if activation.mode() == "ap" {
                Ok(())
            } else {
                let psk = activation.str("802-11-wireless-security", "psk").unwrap_or_default();
                let expected = double.model.lock().unwrap().passphrases.get(&ssid).cloned();
                match expected {
                    None => Err(53),
                    Some(p) if p == psk => Ok(()),
                    Some(_) => Err(7),
                }
            };
            match outcome {
                Ok(()) => {
                    double.event(format!("activated {id} ({ssid})"));
                    double.set_device_state(&conn, 100, 0, &active_path).await;
                    double.set_active_state(&conn, &active_path, 2, 0).await;
                }
                Err(reason) => {
                    double.event(format!("failed {id} ({ssid}): reason {reason}"));
                    double.set_device_state(&conn, 120, reason, &active_path).await;
                    double.deactivate(&conn, &active_path, 9).await;
                }
            }
        });
        (path(&profile), path(&active))
    }
}

impl Drop for NmDouble {
    fn drop(&mut self) {
        if Arc::strong_count(&self.stop) == 1 {
            if let Some(stop) = self.stop.lock().unwrap().take() {
                let _ = stop.send(());
            }
        }
    }
}

struct Root {
    double: NmDouble,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager")]
impl Root {
    async fn get_device_by_ip_iface(&self, iface: &str) -> zbus::fdo::Result<OwnedObjectPath> {
        if iface == "wlan0" {
            Ok(path(DEVICE_PATH))
        } else {
            Err(zbus::fdo::Error::UnknownObject(format!("No device found for the requested iface {iface}")))
        }
    }

    #[zbus(name = "AddAndActivateConnection2")]
    async fn add_and_activate_connection2(
        &self,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        connection: Settings,
        device: OwnedObjectPath,
        _specific_object: OwnedObjectPath,
        options: HashMap<String, OwnedValue>,
    ) -> zbus::fdo::Result<(OwnedObjectPath, OwnedObjectPath, HashMap<String, OwnedValue>)> {
        if device.as_str() != DEVICE_PATH {
            return Err(zbus::fdo::Error::InvalidArgs(format!("no device {device}")));
        }
        let sender = header.sender().map(|s| s.to_string()).unwrap_or_default();
        let (profile, active) =
            self.double.activate(conn.clone(), Activation { settings: connection, options, sender }).await;
        Ok((profile, active, HashMap::new()))
    }

    async fn deactivate_connection(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        active: OwnedObjectPath,
    ) -> zbus::fdo::Result<()> {
        let known = self.double.model.lock().unwrap().active.contains_key(active.as_str());
        if !known {
            return Err(zbus::fdo::Error::Failed(format!("{active} is not active")));
        }
        self.double.event(format!("deactivated {active}"));
        self.double.deactivate(conn, active.as_str(), 2).await;
        Ok(())
    }
}

struct Device {
    double: NmDouble,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.Device")]
impl Device {
    #[zbus(property)]
    async fn state(&self) -> u32 {
        self.double.model.lock().unwrap().device_state
    }

    #[zbus(property)]
    async fn active_connection(&self) -> OwnedObjectPath {
        path(&self.double.model.lock().unwrap().device_active)
    }

    #[zbus(property)]
    async fn interface(&self) -> String {
        "wlan0".into()
    }

    #[zbus(signal, name = "StateChanged")]
    async fn state_changed_signal(
        emitter: &SignalEmitter<'_>,
        new: u32,
        old: u32,
        reason: u32,
    ) -> zbus::Result<()>;
}

struct Wireless {
    double: NmDouble,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.Device.Wireless")]
impl Wireless {
    async fn request_scan(
        &self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        _options: HashMap<String, OwnedValue>,
    ) -> zbus::fdo::Result<()> {
        let emitter = emitter.into_owned();
        let double = self.double.clone();
        let conn = emitter.connection().clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            double.model.lock().unwrap().last_scan += 1000;
            double.event("scanned".into());
            let iface = conn.object_server().interface::<_, Wireless>(DEVICE_PATH).await.unwrap();
            let _ = iface.get().await.last_scan_changed(iface.signal_emitter()).await;
        });
        Ok(())
    }

    async fn get_all_access_points(&self) -> Vec<OwnedObjectPath> {
        let n = self.double.model.lock().unwrap().in_range.len();
        (1..=n).map(|i| path(&format!("/org/freedesktop/NetworkManager/AccessPoint/{i}"))).collect()
    }

    #[zbus(property)]
    async fn last_scan(&self) -> i64 {
        self.double.model.lock().unwrap().last_scan
    }
}

struct AccessPoint {
    ssid: String,
    strength: u8,
    rsn: u32,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.AccessPoint")]
impl AccessPoint {
    #[zbus(property)]
    async fn ssid(&self) -> Vec<u8> {
        self.ssid.as_bytes().to_vec()
    }
    #[zbus(property)]
    async fn strength(&self) -> u8 {
        self.strength
    }
    #[zbus(property)]
    async fn flags(&self) -> u32 {
        1
    }
    #[zbus(property)]
    async fn wpa_flags(&self) -> u32 {
        0
    }
    #[zbus(property)]
    async fn rsn_flags(&self) -> u32 {
        self.rsn
    }
}

struct Active {
    double: NmDouble,
    path: String,
    ip4: OwnedObjectPath,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.Connection.Active")]
impl Active {
    #[zbus(property)]
    async fn state(&self) -> u32 {
        self.double.model.lock().unwrap().active.get(&self.path).map(|a| a.0).unwrap_or(4)
    }

    #[zbus(property)]
    async fn id(&self) -> String {
        self.double.model.lock().unwrap().active.get(&self.path).map(|a| a.1.clone()).unwrap_or_default()
    }

    #[zbus(property)]
    async fn ip4_config(&self) -> OwnedObjectPath {
        self.ip4.clone()
    }

    #[zbus(signal, name = "StateChanged")]
    async fn state_changed_signal(emitter: &SignalEmitter<'_>, state: u32, reason: u32) -> zbus::Result<()>;
}

struct Ip4Config {
    address: String,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.IP4Config")]
impl Ip4Config {
    #[zbus(property)]
    async fn address_data(&self) -> Vec<HashMap<String, OwnedValue>> {
        vec![HashMap::from([
            ("address".to_string(), owned(Value::from(self.address.clone()))),
            ("prefix".to_string(), owned(Value::from(24u32))),
        ])]
    }
}

struct SettingsRoot {
    double: NmDouble,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.Settings")]
impl SettingsRoot {
    async fn list_connections(&self, #[zbus(connection)] conn: &zbus::Connection) -> Vec<OwnedObjectPath> {
        let paths: Vec<String> = self.double.model.lock().unwrap().profiles.keys().cloned().collect();
        for p in &paths {
            let _ = conn.object_server().at(p.clone(), Profile { double: self.double.clone() }).await;
        }
        paths.iter().map(|p| path(p)).collect()
    }
}

struct Profile {
    double: NmDouble,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.Settings.Connection")]
impl Profile {
    async fn get_settings(
        &self,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> zbus::fdo::Result<Settings> {
        let p = header.path().map(|p| p.to_string()).unwrap_or_default();
        let m = self.double.model.lock().unwrap();
        let s = m.profiles.get(&p).ok_or_else(|| zbus::fdo::Error::UnknownObject(p.clone()))?;
        // Secrets are never in GetSettings, as in NM.
        let mut copy = Settings::new();
        for (section, keys) in s {
            let keys = keys
                .iter()
                .filter(|(k, _)| k.as_str() != "psk")
                .map(|(k, v)| (k.clone(), v.try_clone().unwrap()))
                .collect();
            copy.insert(section.clone(), keys);
        }
        Ok(copy)
    }

    async fn delete(&self, #[zbus(header)] header: zbus::message::Header<'_>) -> zbus::fdo::Result<()> {
        let p = header.path().map(|p| p.to_string()).unwrap_or_default();
        self.double.event(format!("deleted profile {p}"));
        self.double.model.lock().unwrap().profiles.remove(&p);
        Ok(())
    }
}
