//! The hostapd backend against stand-ins that speak the real control-socket
//! protocol (Unix datagrams, `ctrl_interface/IFNAME`, ATTACH for events):
//! hostapd for the access point and wpa_supplicant for the join. Like the
//! real daemons, they send events to attached sockets between replies, so
//! the backend has to keep the two apart. No root needed.

use crate::common;
use common::gateway::*;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEVICE: &str = "gw-0042";

/// One control-socket daemon: records every command, answers as `answer`
/// says, sends events to attached clients (one before each reply to them).
struct CtrlDaemon {
    commands: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Answer = dyn Fn(&str) -> (String, Vec<String>) + Send;

impl CtrlDaemon {
    fn start(socket: &Path, answer: Box<Answer>) -> CtrlDaemon {
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let server = UnixDatagram::bind(socket).unwrap();
        server.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (commands.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut attached: Vec<PathBuf> = Vec::new();
            let mut buf = [0u8; 4096];
            while !stopping.load(Ordering::Relaxed) {
                let Ok((n, from)) = server.recv_from(&mut buf) else { continue };
                let Some(from) = from.as_pathname().map(Path::to_path_buf) else { continue };
                let command = String::from_utf8_lossy(&buf[..n]).to_string();
                seen.lock().unwrap().push(command.clone());
                let (reply, events) = if command == "ATTACH" {
                    attached.push(from.clone());
                    ("OK\n".to_string(), vec!["<2>CTRL-EVENT-STATE-CHANGE attached".to_string()])
                } else {
                    answer(&command)
                };
                // An event first to every attached client, the asker too:
                // its reply comes after an event it did not ask for.
                for client in &attached {
                    let _ = server.send_to(b"<1>CTRL-EVENT-HEARTBEAT noise", client);
                }
                let _ = server.send_to(reply.as_bytes(), &from);
                for event in events {
                    for client in &attached {
                        let _ = server.send_to(event.as_bytes(), client);
                    }
                }
            }
        });
        CtrlDaemon { commands, stop, thread: Some(thread) }
    }

    fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap().clone()
    }
}

impl Drop for CtrlDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn hostapd(socket: &Path) -> CtrlDaemon {
    let enabled = Arc::new(AtomicBool::new(false));
    CtrlDaemon::start(
        socket,
        Box::new(move |command| {
            let ok = |events: Vec<&str>| ("OK\n".to_string(), events.into_iter().map(String::from).collect());
            match command {
                "PING" => ("PONG\n".into(), vec![]),
                "STATUS" => {
                    let state = if enabled.load(Ordering::Relaxed) { "ENABLED" } else { "DISABLED" };
                    (format!("state={state}\nphy=phy0\nfreq=2412\n"), vec![])
                }
                // As hostapd with `start_disabled=1`: ENABLE brings the
                // interface up, beacons (and so phones) come with UPDATE_BEACON.
                "ENABLE" | "RELOAD" => {
                    enabled.store(true, Ordering::Relaxed);
                    ok(vec!["<3>AP-ENABLED"])
                }
                "UPDATE_BEACON" if enabled.load(Ordering::Relaxed) => ok(vec![
                    "<3>AP-STA-POSSIBLE-PSK-MISMATCH 02:00:00:00:09:00",
                    "<3>AP-STA-CONNECTED 02:00:00:00:01:00",
                ]),
                "DISABLE" => {
                    enabled.store(false, Ordering::Relaxed);
                    ok(vec!["<3>AP-DISABLED"])
                }
                c if c.starts_with("SET ") => ok(vec![]),
                _ => ("UNKNOWN COMMAND\n".into(), vec![]),
            }
        }),
    )
}

fn wpa_supplicant(socket: &Path, right_psk: &'static str) -> CtrlDaemon {
    let psk = Arc::new(Mutex::new(String::new()));
    CtrlDaemon::start(
        socket,
        Box::new(move |command| {
            let ok = |events: Vec<String>| ("OK\n".to_string(), events);
            let words: Vec<&str> = command.splitn(4, ' ').collect();
            match words.as_slice() {
                ["ADD_NETWORK"] => ("0\n".into(), vec![]),
                ["SET_NETWORK", _, "psk", value] => {
                    *psk.lock().unwrap() = value.to_string();
                    ok(vec![])
                }
                ["SET_NETWORK", ..] => ok(vec![]),
                ["SELECT_NETWORK", _] => {
                    let event = if *psk.lock().unwrap() == format!("\"{right_psk}\"") {
                        "<3>CTRL-EVENT-CONNECTED - Connection to 02:00:00:00:00:01 completed [id=0 id_str=]"
                            .to_string()
                    } else {
                        "<3>CTRL-EVENT-SSID-TEMP-DISABLED id=0 ssid=\"home\" auth_failures=1 duration=10 reason=WRONG_KEY"
                            .to_string()
                    };
                    ok(vec!["<3>CTRL-EVENT-SCAN-RESULTS".into(), event])
                }
                ["SAVE_CONFIG"] | ["REMOVE_NETWORK", _] | ["DISCONNECT"] => ok(vec![]),
                ["LIST_NETWORKS"] => {
                    ("network id / ssid / bssid / flags\n0\thome\tany\t[CURRENT]\n".into(), vec![])
                }
                _ => ("UNKNOWN COMMAND\n".into(), vec![]),
            }
        }),
    )
}

fn wait_for(what: &str, log: &Path, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_hostapd_backend_raises_the_ap_joins_through_wpa_supplicant_and_reports_a_wrong_key() {
    let mut g = Gateway::new(Bootloader::Grub, 1 << 20);
    let ctrl = g.path().join("run");
    let right_psk = "correct horse battery";
    let hostapd = hostapd(&ctrl.join("hostapd/wlan0"));
    let supplicant = wpa_supplicant(&ctrl.join("wpa_supplicant/wlan0"), right_psk);
    g.extra_config = format!(
        "\n[mqtt]\nkeep_alive_s = 5\n\n[provision]\nbackend = \"hostapd\"\nlisten = \"127.0.0.1:0\"\n\
         hostapd_ctrl_dir = \"{}\"\nwpa_supplicant_ctrl_dir = \"{}\"\n",
        ctrl.join("hostapd").display(),
        ctrl.join("wpa_supplicant").display()
    );
    g.write_config();
    let pki = common::cloud::Pki::new(&g.path().join("pki"), "127.0.0.1".parse().unwrap());
    let (cert, key) = pki.client(DEVICE);
    let pop = stdout(&g.fleetd(&["status", "--pop"])).lines().last().unwrap().to_string();
    let log = g.path().join("fleetd.log");
    let mut daemon = Daemon::start(&g.dev.config(), None, &[], &log);
    let mut url = String::new();
    wait_for("the portal", &log, Duration::from_secs(20), || {
        url = g.status()["network"]["portal"].as_str().unwrap_or_default().to_string();
        !url.is_empty()
    });
    assert_eq!(g.status()["network"]["mode"], "access-point");

    // The access point, command by command.
    let passphrase = fleetd::provision::pop::Pop::parse(&pop).unwrap().ap_passphrase(DEVICE);
    let commands = hostapd.commands();
    for expected in [
        format!("SET ssid fleetd-{DEVICE}"),
        "SET wpa 2".into(),
        "SET wpa_key_mgmt WPA-PSK".into(),
        "SET rsn_pairwise CCMP".into(),
        "SET ieee80211w 0".into(),
        format!("SET wpa_passphrase {passphrase}"),
        "ENABLE".into(),
        "UPDATE_BEACON".into(),
    ] {
        assert!(commands.contains(&expected), "{expected:?} in {commands:?}");
    }
    assert_eq!(commands.first().map(String::as_str), Some("PING"));
    // Events from the attached socket, in between replies, reach the log.
    wait_for("the hostapd events", &log, Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("02:00:00:00:09:00 tried a wrong access-point passphrase")
            && text.contains("02:00:00:00:01:00 joined the access point")
    });

    let provision = |psk: &str| {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        run(Command::new(crate::common::fleetctl_bin())
            .args(["provision", "--url", &url, "--pop", &pop, "--broker", "127.0.0.1:8883", "--broker-ca"])
            .arg(&pki.ca_pem)
            .args(["--cert", &cert, "--key", &key, "--ssid", "home", "--psk", psk, "--wait-s", "10"]))
    };
    let out = provision("wrong passphrase");
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("wrong-key"), "{}", stderr(&out));
    let sup = supplicant.commands();
    let disconnect = sup.iter().position(|c| c == "DISCONNECT");
    let remove = sup.iter().position(|c| c == "REMOVE_NETWORK 0");
    assert!(remove.is_some(), "the failed network is removed: {sup:?}");
    assert!(disconnect < remove && disconnect.is_some(), "the radio is released first: {sup:?}");
    let beacons = hostapd.commands().iter().filter(|c| *c == "UPDATE_BEACON").count();
    assert_eq!(beacons, 2, "the access point came back: {:?}", hostapd.commands());

    let out = provision(right_psk);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let sup = supplicant.commands();
    assert!(sup.contains(&"SET_NETWORK 0 ssid \"home\"".to_string()), "{sup:?}");
    assert_eq!(sup.last().map(String::as_str), Some("SAVE_CONFIG"), "{sup:?}");
    let h = hostapd.commands();
    assert_eq!(h.last().map(String::as_str), Some("DISABLE"), "the access point is down: {h:?}");
    wait_for("provisioned", &log, Duration::from_secs(10), || g.status()["provisioned"] == true);
    assert_eq!(g.status()["network"]["mode"], "station");

    // SIGTERM, then reset: the saved network goes.
    daemon.stop();
    ok(fleetd().args(["reset", "--factory", "--config"]).arg(g.dev.config()));
    let sup = supplicant.commands();
    assert!(
        sup.ends_with(&["LIST_NETWORKS".into(), "REMOVE_NETWORK 0".into(), "SAVE_CONFIG".into()]),
        "{sup:?}"
    );

    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [right_psk, "wrong passphrase", pop.as_str(), passphrase.as_str()] {
        assert!(!text.contains(secret), "a secret in the log: {secret:?}\n{text}");
    }
}
