//! The NetworkManager backend against a stand-in that speaks NM's D-Bus API
//! on a private dbus-daemon (tests/common/nm_double.rs).
//!
//! - The full cycle runs the device in one network namespace and the phone
//!   and a real mosquitto in another (veth): unprovisioned → hotspot up with
//!   nmcli's settings → a wrong Wi-Fi passphrase (NM's reason 7) → back to
//!   the hotspot with the reason → provisioned → hotspot down → station up
//!   → MQTT connected with the new identity. Needs root; CI runs as root.
//! - The others need only dbus-daemon: a crashed fleetd leaves no hotspot
//!   behind (bind-activation), and a known network is never taken over.

use crate::common;
use common::cloud::{Broker, Net, Pki};
use common::dbus::PrivateBus;
use common::gateway::*;
use common::nm_double::NmDouble;
use common::*;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

const DEVICE: &str = "gw-0042";

fn bus(dir: &std::path::Path) -> Option<PrivateBus> {
    let bus = PrivateBus::start(dir);
    if bus.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must run the D-Bus tests (dbus-daemon)");
        eprintln!("SKIP: needs dbus-daemon (scripts/setup)");
    }
    bus
}

struct Unit {
    g: Gateway,
    daemon: Option<Daemon>,
    log: PathBuf,
    bus: String,
}

impl Unit {
    fn new(bus: &str, listen: &str) -> Unit {
        let mut g = Gateway::new(Bootloader::Grub, 1 << 20);
        g.extra_config = format!(
            "\n[mqtt]\nkeep_alive_s = 5\n\n[provision]\nbackend = \"networkmanager\"\ninterface = \"wlan0\"\n\
             listen = \"{listen}\"\n"
        );
        g.write_config();
        let log = g.path().join("fleetd.log");
        Unit { g, daemon: None, log, bus: bus.to_string() }
    }

    fn start(&mut self, net: Option<&Net>) {
        let env = [("DBUS_SYSTEM_BUS_ADDRESS", self.bus.as_str())];
        self.daemon = Some(Daemon::start(&self.g.dev.config(), net, &env, &self.log));
    }

    fn signal(&mut self, signal: i32) {
        if let Some(mut d) = self.daemon.take() {
            d.signal(signal);
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for(&self, what: &str, nm: &NmDouble, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- fleetd\n{}\n--- NM stand-in\n{:#?}",
                self.log(),
                nm.events()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pop(&self) -> String {
        let out = self.g.fleetd(&["status", "--pop"]);
        stdout(&out).lines().last().unwrap_or_default().to_string()
    }

    fn hotspot_up(nm: &NmDouble) -> bool {
        nm.active().iter().any(|(id, state)| id == "fleetd-hotspot" && *state == 2)
    }
}

fn provision(net: &Net, url: &str, pop: &str, pki: &Pki, broker: &str, wifi: (&str, &str)) -> Output {
    let ca_key = pki.ca_key();
    run(net
        .in_cloud(crate::common::fleetctl_bin())
        .args(["provision", "--url", url, "--pop", pop, "--broker", broker, "--broker-ca"])
        .arg(&pki.ca_pem)
        .arg("--ca-cert")
        .arg(&pki.ca_pem)
        .arg("--ca-key")
        .arg(ca_key)
        .args(["--ssid", wifi.0, "--psk", wifi.1, "--wait-s", "10"]))
}

#[test]
fn unprovisioned_to_mqtt_through_networkmanager_with_a_wrong_passphrase_first() {
    if !can_run_netns() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(bus) = bus(dir.path()) else { return };
    let net = Net::new();
    // The stand-in's hotspot address is the device's veth address, so the
    // portal ("auto": the hotspot's address, port 80) is reachable from the
    // phone's namespace.
    let device_ip = net.device_ip().to_string();
    let home_psk = "correct horse battery";
    let nm = NmDouble::start(&bus.address, &device_ip, &[("home", 80, home_psk), ("neighbour", 40, "x")]);
    let mut unit = Unit::new(&bus.address, "auto");
    let pki = Pki::new(&unit.g.path().join("pki"), net.cloud_ip());
    let mut broker =
        Broker::start(&net, &pki, &unit.g.path().join("broker"), &[(DEVICE, "acme-gateways", "pilot")]);
    let (host, port) = broker.url();
    let broker_arg = format!("{host}:{port}");
    let pop = unit.pop();

    unit.start(Some(&net));
    unit.wait_for("the hotspot", &nm, Duration::from_secs(20), || Unit::hotspot_up(&nm));
    let events = nm.events();
    let scanned = events.iter().position(|e| e == "scanned").expect("a scan");
    let raised = events.iter().position(|e| e.starts_with("activated")).expect("an activation");
    assert!(scanned < raised, "scanned before the hotspot: {events:?}");

    // The hotspot, key by key, as `nmcli dev wifi hotspot` makes it.
    let ap = &nm.activations()[0];
    let passphrase = fleetd::provision::pop::Pop::parse(&pop).unwrap().ap_passphrase(DEVICE);
    assert_eq!(ap.mode(), "ap");
    assert_eq!(ap.ssid(), format!("fleetd-{DEVICE}"));
    assert_eq!(ap.str("802-11-wireless", "band").as_deref(), Some("bg"));
    let channel = ap.get("802-11-wireless", "channel").and_then(|v| u32::try_from(v.try_clone().ok()?).ok());
    assert_eq!(channel, Some(fleetd::net::networkmanager::HOTSPOT_CHANNEL), "a channel every domain allows");
    assert_eq!(ap.str("802-11-wireless-security", "key-mgmt").as_deref(), Some("wpa-psk"));
    assert_eq!(ap.str("802-11-wireless-security", "psk"), Some(passphrase.clone()));
    // The label shows what a phone needs to join.
    let label = stdout(&unit.g.fleetd(&["status", "--pop"]));
    assert!(label.contains(&format!("access point fleetd-{DEVICE}, passphrase {passphrase}")), "{label}");
    assert!(label.contains(&format!("WIFI:T:WPA;S:fleetd-{DEVICE};P:{passphrase};;")), "{label}");
    for key in ["proto", "pairwise", "group"] {
        let list: Vec<String> =
            ap.get("802-11-wireless-security", key).unwrap().try_clone().unwrap().try_into().unwrap();
        assert_eq!(list, vec![if key == "proto" { "rsn" } else { "ccmp" }], "{key}");
    }
    let pmf: i32 =
        ap.get("802-11-wireless-security", "pmf").unwrap().try_clone().unwrap().try_into().unwrap();
    assert_eq!(pmf, 1, "PMF disabled");
    assert_eq!(ap.str("ipv4", "method").as_deref(), Some("shared"));
    assert_eq!(ap.str("ipv6", "method").as_deref(), Some("ignore"));
    let autoconnect: bool =
        ap.get("connection", "autoconnect").unwrap().try_clone().unwrap().try_into().unwrap();
    assert!(!autoconnect);
    assert_eq!(ap.option("persist").as_deref(), Some("volatile"));
    assert_eq!(ap.option("bind-activation").as_deref(), Some("dbus-client"));

    let url = format!("http://{device_ip}/");
    // The networks the scan saw, strongest first, through the API.
    let out = run(net.in_cloud("curl").args(["-s", &format!("{url}api/v1/info")]));
    assert!(stdout(&out).contains("\"state\":\"provisioning\""), "{}", stdout(&out));

    // A wrong passphrase: NM fails the device with reason 7; the hotspot
    // comes back and the reason is at /api/v1/info.
    let out = provision(&net, &url, &pop, &pki, &broker_arg, ("home", "wrong passphrase"));
    assert_eq!(out.status.code(), Some(1), "{}{}\n{}", stdout(&out), stderr(&out), unit.log());
    assert!(stderr(&out).contains("no-secrets"), "{}", stderr(&out));
    assert!(Unit::hotspot_up(&nm), "the hotspot is back: {:?}", nm.events());
    assert!(
        !nm.profiles().iter().any(|p| p.starts_with("fleetd-wifi-")),
        "the failed profile is deleted: {:?}",
        nm.profiles()
    );
    let info = run(net.in_cloud("curl").args(["-s", &format!("{url}api/v1/info")]));
    assert!(stdout(&info).contains("no-secrets"), "{}", stdout(&info));
    assert!(stdout(&info).contains("reason 7"), "{}", stdout(&info));

    // The right one: hotspot down, station up with a kept profile, MQTT.
    let out = provision(&net, &url, &pop, &pki, &broker_arg, ("home", home_psk));
    assert!(out.status.success(), "{}{}\n{}", stdout(&out), stderr(&out), unit.log());
    unit.wait_for("the MQTT connection", &nm, Duration::from_secs(30), || {
        let doc = std::fs::read(unit.g.path().join("state/connection.json")).unwrap_or_default();
        serde_json::from_slice::<serde_json::Value>(&doc).map(|v| v["connected"] == true).unwrap_or(false)
    });
    assert!(!Unit::hotspot_up(&nm), "the hotspot is down: {:?}", nm.active());
    assert!(nm.active().contains(&("fleetd-wifi-home".to_string(), 2)), "{:?}", nm.active());
    assert!(nm.profiles().contains(&"fleetd-wifi-home".to_string()), "kept on disk: {:?}", nm.profiles());
    let station = nm.activations().into_iter().rev().find(|a| a.mode() == "infrastructure").unwrap();
    assert_eq!(station.option("persist").as_deref(), Some("disk"));
    let status = unit.g.status();
    assert_eq!(status["provisioned"], true, "{status}");
    assert_eq!(status["network"]["mode"], "station", "{status}");
    assert_eq!(status["network"]["ssid"], "home", "{status}");

    // reset --factory removes the Wi-Fi profile fleetd made.
    unit.signal(libc::SIGTERM);
    let out = run(fleetd()
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .args(["reset", "--factory", "--config"])
        .arg(unit.g.dev.config()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!nm.profiles().contains(&"fleetd-wifi-home".to_string()), "{:?}", nm.profiles());
    broker.stop();

    let log = unit.log();
    for secret in [home_psk, "wrong passphrase", pop.as_str(), passphrase.as_str()] {
        assert!(!log.contains(secret), "a secret in the log: {secret:?}\n{log}");
    }
}

/// `bind-activation=dbus-client`: when fleetd dies (SIGKILL), NM takes the
/// hotspot down, so a crash never leaves an open door behind.
#[test]
fn a_killed_fleetd_leaves_no_hotspot_behind() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bus) = bus(dir.path()) else { return };
    let nm = NmDouble::start(&bus.address, "127.0.0.1", &[("home", 80, "correct horse")]);
    let mut unit = Unit::new(&bus.address, "127.0.0.1:0");
    unit.start(None);
    unit.wait_for("the hotspot", &nm, Duration::from_secs(20), || Unit::hotspot_up(&nm));

    // A rescan, when asked: the hotspot drops, NM scans, the hotspot returns.
    let key = fleetd::provision::pop::Pop::parse(&unit.pop()).unwrap().request_key(DEVICE);
    let mut portal = String::new();
    unit.wait_for("the portal", &nm, Duration::from_secs(20), || {
        portal = unit.g.status()["network"]["portal"].as_str().unwrap_or_default().to_string();
        !portal.is_empty()
    });
    let addr = portal.trim_start_matches("http://").trim_end_matches('/').to_string();
    let (status, networks) = portal_call(&addr, "GET", "/api/v1/networks", Some(&key));
    assert_eq!((status, networks.as_str()), (200, r#"[{"ssid":"home","signal":80,"security":"wpa2"}]"#));
    assert_eq!(portal_call(&addr, "POST", "/api/v1/rescan", None).0, 401);
    assert_eq!(portal_call(&addr, "POST", "/api/v1/rescan", Some(&key)).0, 202);
    unit.wait_for("the hotspot back after a rescan", &nm, Duration::from_secs(20), || {
        nm.activations().len() == 2 && Unit::hotspot_up(&nm)
    });
    let events = nm.events();
    let scans: Vec<_> = events.iter().enumerate().filter(|(_, e)| *e == "scanned").map(|(i, _)| i).collect();
    let down = events.iter().position(|e| e.starts_with("deactivated")).expect("the hotspot dropped");
    assert!(scans.len() == 2 && scans[1] > down, "scanned again after the hotspot dropped: {events:?}");

    unit.signal(libc::SIGKILL);
    unit.wait_for("NM to drop the hotspot", &nm, Duration::from_secs(10), || nm.active().is_empty());
    assert!(nm.events().iter().any(|e| e.contains("left: deactivating")), "{:?}", nm.events());
    assert!(nm.profiles().is_empty(), "volatile: the profile went with it: {:?}", nm.profiles());
}

/// A device already on a network it knows gets no hotspot over it; with an
/// explicit `listen`, the portal is served there instead.
#[test]
fn a_known_network_is_never_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bus) = bus(dir.path()) else { return };
    let nm = NmDouble::start_on_known_network(&bus.address, "127.0.0.1", &[("office", 70, "x")], "office");
    let mut unit = Unit::new(&bus.address, "127.0.0.1:0");
    unit.start(None);
    unit.wait_for("the portal", &nm, Duration::from_secs(20), || {
        unit.g.status()["network"]["portal"].is_string()
    });
    assert!(nm.activations().is_empty(), "no hotspot: {:?}", nm.activations());
    assert!(unit.log().contains("known network"), "{}", unit.log());
    assert_eq!(unit.g.status()["network"]["mode"], "station");
}

/// Stopped between joining the Wi-Fi and recording it (a power cut, say):
/// at the next start the network provisioning asked for is up, so the
/// device counts as provisioned and goes on, instead of waiting for a
/// known network to go away for ever.
#[test]
fn a_join_that_was_never_recorded_is_completed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bus) = bus(dir.path()) else { return };
    let nm =
        NmDouble::start_on_known_network(&bus.address, "127.0.0.1", &[("home", 80, "x")], "fleetd-wifi-home");
    let mut unit = Unit::new(&bus.address, "auto");
    let pki = Pki::new(&unit.g.path().join("pki"), "127.0.0.1".parse().unwrap());
    let (cert, key) = pki.client(DEVICE);
    let identity = unit.g.path().join("state/identity");
    std::fs::create_dir_all(&identity).unwrap();
    std::fs::copy(&cert, identity.join("cert.pem")).unwrap();
    std::fs::copy(&key, identity.join("key.pem")).unwrap();
    std::fs::copy(&pki.ca_pem, identity.join("ca.pem")).unwrap();
    let record = unit.g.path().join("state/provisioning.json");
    std::fs::write(
        &record,
        r#"{"broker_host":"127.0.0.1","broker_port":8883,"wifi_ssid":"home","network_up":false,"provisioned_at":1}"#,
    )
    .unwrap();
    assert_eq!(unit.g.status()["provisioned"], false);
    unit.start(None);
    unit.wait_for("the recovered provisioning", &nm, Duration::from_secs(20), || {
        unit.g.status()["provisioned"] == true
    });
    assert!(nm.activations().is_empty(), "no hotspot over the joined network: {:?}", nm.activations());
    assert!(unit.log().contains("the Wi-Fi provisioning joined is up"), "{}", unit.log());
}
