//! fleetd against a real mosquitto (TLS, client certificates, per-device
//! ACLs) in a `cloud` namespace, with the device in a `device` namespace
//! joined by veth: end to end, faults (broker killed, link down, crash
//! before the ack), and security. Needs root; CI runs as root.

use crate::common;
use common::cloud::{self, Broker, Net, Pki};
use common::gateway::*;
use common::imageserver::ImageServer;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const PROJECT: &str = "acme-gateways";
const SLOT: u64 = 8 << 20;

fn runs(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn can_run() -> bool {
    can_run_netns()
}

struct World {
    net: Net,
    pki: Pki,
    broker: Broker,
    server: ImageServer,
    g: Gateway,
    daemon: Option<Child>,
    daemon_log: PathBuf,
}

enum To<'a> {
    Device(&'a str),
    Group(&'a str),
}

impl World {
    fn new(device_cert: Option<(PathBuf, PathBuf)>) -> World {
        let net = Net::new();
        let mut g = Gateway::new(Bootloader::Grub, SLOT);
        let pki = Pki::new(&g.path().join("pki"), net.cloud_ip());
        let broker = Broker::start(&net, &pki, &g.path().join("broker"), &[("gw-0042", PROJECT, "pilot")]);
        let ip = net.cloud_ip();
        let server =
            cloud::run_in_netns(net.cloud_ns(), move || ImageServer::start_on(&format!("{ip}:8080")));
        let (cert, key) = device_cert.unwrap_or_else(|| pki.client("gw-0042"));
        let (host, port) = broker.url();
        g.extra_config = format!(
            "stall_timeout_s = 5\nmin_rate_bps = 0\n\n[mqtt]\nhost = \"{host}\"\nport = {port}\nca_file = \"{}\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\nkeep_alive_s = 5\nreconnect_spread_s = 2\n",
            pki.ca_pem.display(),
            cert.display(),
            key.display()
        );
        // Ride out the 30 s link-down test's outage.
        g.give_up_after_s = 120;
        g.write_config();
        let daemon_log = g.path().join("fleetd.log");
        World { net, pki, broker, server, g, daemon: None, daemon_log }
    }

    fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.daemon_log).unwrap();
        let child = self
            .net
            .in_device(crate::common::fleetd_bin())
            .args(["run", "--config"])
            .arg(self.g.dev.config())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
    }

    fn signal_daemon(&mut self, signal: i32) {
        if let Some(mut child) = self.daemon.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    fn stop_daemon(&mut self) {
        self.signal_daemon(libc::SIGTERM);
    }

    fn kill_daemon(&mut self) {
        self.signal_daemon(libc::SIGKILL);
    }

    fn connection(&self) -> serde_json::Value {
        std::fs::read(self.g.path().join("state/connection.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- fleetd\n{}\n--- mosquitto\n{}",
                self.log(),
                self.broker.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_connected(&self) {
        self.wait_for("the MQTT connection", Duration::from_secs(20), || {
            self.connection()["connected"] == true
        });
    }

    fn wait_state(&self, state: &str, timeout: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        self.wait_for(&format!("state {state}"), timeout, || {
            last = self.g.status();
            last["state"] == state
        });
        last
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }

    fn fleet_args(&self) -> Vec<String> {
        let (host, port) = self.broker.url();
        let (cert, key) = self.pki.client("fleet-server");
        vec![
            "--host".into(),
            host,
            "--port".into(),
            port.to_string(),
            "--ca".into(),
            self.pki.ca_pem.display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ]
    }

    /// `fleetctl publish` from the cloud side; returns when the broker acked.
    fn publish(&self, message: &Path, to: To) -> Instant {
        let mut cmd = self.net.in_cloud(crate::common::fleetctl_bin());
        cmd.arg("publish").args(self.fleet_args()).args(["--project", PROJECT]);
        match to {
            To::Device(d) => cmd.args(["--device", d]),
            To::Group(g) => cmd.args(["--group", g]),
        };
        ok(cmd.arg(message));
        Instant::now()
    }

    /// `mosquitto_pub` in the cloud as the fleet server, with `args` after
    /// the connection options; returns its output.
    fn mosquitto_pub(&self, args: &[&str], stdin: Option<&Path>) -> std::process::Output {
        let (host, port) = self.broker.url();
        let (cert, key) = self.pki.client("fleet-server");
        let mut cmd = self.net.in_cloud("mosquitto_pub");
        cmd.args(["-h", &host, "-p", &port.to_string(), "--cafile"])
            .arg(&self.pki.ca_pem)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["-i", "fleet-server-raw"])
            .args(args);
        if let Some(file) = stdin {
            cmd.stdin(std::fs::File::open(file).unwrap());
        }
        cmd.output().unwrap()
    }

    /// `mosquitto_sub -d` in the cloud as the fleet server, subscribed
    /// (its SUBACK seen) when this returns; the lines it prints after that.
    fn subscribe(&self, topic: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
        let (host, port) = self.broker.url();
        let (cert, key) = self.pki.client("fleet-server");
        let mut child = self
            .net
            .in_cloud("stdbuf")
            .args(["-oL", "mosquitto_sub", "-h", &host, "-p", &port.to_string(), "--cafile"])
            .arg(&self.pki.ca_pem)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["-d", "-i", "fleet-server-sub", "-q", "1", "-t", topic])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("SUBACK") => return (child, rx),
                Ok(_) => {}
                Err(e) => panic!("mosquitto_sub never subscribed: {e}\n{}", self.broker.log()),
            }
        }
    }

    /// The retained status document of gw-0042 as the fleet sees it.
    fn retained_status(&self) -> serde_json::Value {
        let mut cmd = self.net.in_cloud(crate::common::fleetctl_bin());
        cmd.arg("watch").args(self.fleet_args()).args(["--project", PROJECT, "--timeout", "2"]);
        let out = ok(&mut cmd);
        out.lines()
            .rev()
            .filter_map(|l| l.strip_prefix("fleet/acme-gateways/devices/gw-0042/status "))
            .find_map(|doc| serde_json::from_str(doc).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    fn message(&self, name: &str, version: u64, image: &[u8], extra: &[&str]) -> PathBuf {
        let file = self.g.path().join(format!("{name}.img"));
        std::fs::write(&file, image).unwrap();
        let url = self.server.add(&format!("/{name}.img"), image.to_vec());
        let mut args = vec!["--url", url.as_str(), "--image", file.to_str().unwrap()];
        let v = version.to_string();
        args.extend(["--version", v.as_str()]);
        args.extend_from_slice(extra);
        self.g.dev.cosigned(name, &args)
    }

    /// Simulated reboot: the daemon stops, the bootloader picks, it starts again.
    fn reboot(&mut self) {
        self.stop_daemon();
        self.g.power_on(&|_| true).expect("a slot boots");
        self.start_daemon();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill_daemon();
    }
}

fn full_cycle(to: To) {
    let mut w = World::new(None);
    w.start_daemon();
    w.wait_connected();
    let image = image_bytes(3 << 20, 11);
    let msg = w.message("v8", 8, &image, &[]);
    let started = Instant::now();
    let acked = w.publish(&msg, to);
    w.wait_for("the first image request", Duration::from_secs(20), || !w.server.log().is_empty());
    let first = w.server.log()[0].at;
    eprintln!(
        "publish → first image byte requested: {:?} after fleetctl started, {:?} after its PUBACK",
        first.saturating_duration_since(started),
        first.saturating_duration_since(acked)
    );
    let st = w.wait_state("reboot-pending", Duration::from_secs(30));
    assert_eq!(st["primary_slot"], "B");
    // RebootPending is persisted before the reboot is asked for (the
    // crash-safe order), so the request follows the state, not with it.
    w.wait_for("the reboot request", Duration::from_secs(10), || w.g.reboot_requested().is_some());
    assert_eq!(w.g.reboot_requested().as_deref(), Some(""), "fleetd asked for the reboot");
    w.reboot();
    let st = w.wait_state("committed", Duration::from_secs(30));
    assert_eq!(st["installed_version"], 8);
    assert_eq!(st["booted_slot"], "B");
    // The fleet sees the same in the retained status.
    let mut retained = serde_json::Value::Null;
    w.wait_for("the retained status to show v8", Duration::from_secs(10), || {
        retained = w.retained_status();
        retained["installed_version"] == 8
    });
    assert_eq!(retained["state"], "committed", "{retained}");
    assert_eq!(retained["slots"]["B"]["version"], 8, "{retained}");
}

#[test]
fn update_on_the_device_topic_is_installed_and_committed() {
    if can_run() {
        full_cycle(To::Device("gw-0042"));
    }
}

#[test]
fn update_on_the_group_topic_is_installed_and_committed() {
    if can_run() {
        full_cycle(To::Group("pilot"));
    }
}

/// Exactly once: one job, one commit-ready slot, no second download.
fn assert_done_once(w: &World, image: &[u8]) {
    let st = w.wait_state("reboot-pending", Duration::from_secs(120));
    assert_eq!(st["job"]["version"], 8);
    let slot = std::fs::read(w.g.slot("B")).unwrap();
    assert!(slot[..image.len()] == image[..], "slot B holds the image");
    // A second run would need a second acceptance, which the replay cache and
    // the duplicate check forbid: at most one acceptance is logged (a kill can
    // fall between persisting the job and logging it), and no delivery was
    // mistaken for a replay attack.
    let accepted = w.log().matches("accepted v8").count();
    assert!(accepted <= 1, "the job started more than once:\n{}", w.log());
    assert!(!st["last_error"].as_str().unwrap_or("").starts_with("replayed"), "{st}");
}

#[test]
fn broker_killed_and_restarted_mid_download() {
    if !can_run() {
        return;
    }
    let n = runs("FLEETD_FAULT_RUNS", 3);
    for run in 0..n {
        let mut w = World::new(None);
        w.server.set_rate(Some(2 << 20));
        w.start_daemon();
        w.wait_connected();
        let image = image_bytes(6 << 20, run as u64 + 1);
        let msg = w.message("v8", 8, &image, &["--name", "v8"]);
        w.publish(&msg, To::Device("gw-0042"));
        w.wait_for("the download", Duration::from_secs(20), || w.g.status()["state"] == "downloading");
        w.broker.kill();
        w.wait_for("the disconnect", Duration::from_secs(20), || w.connection()["connected"] == false);
        // Odd runs: the broker comes back without its database, so the
        // session (and its subscriptions) are gone and fleetd must resubscribe.
        let session_lost = run % 2 == 1;
        if session_lost {
            let _ = std::fs::remove_file(w.broker.db_path());
        }
        std::thread::sleep(Duration::from_secs(1));
        w.broker.restart();
        w.wait_for("the reconnect", Duration::from_secs(30), || {
            w.log().matches("mqtt: connected").count() >= 2
        });
        assert_done_once(&w, &image);
        let subscriptions = w.log().matches("mqtt: subscribed to").count();
        if session_lost {
            assert!(
                w.log().contains("mqtt: connected (session present: false)\n") && subscriptions == 2,
                "{}",
                w.log()
            );
        } else {
            assert_eq!(subscriptions, 1, "the session kept the subscriptions:\n{}", w.log());
        }
        // Subscriptions were restored (or kept by the session): a second message arrives.
        let msg9 = w.message("v9", 9, &image_bytes(1 << 20, 99), &["--name", "v9"]);
        w.publish(&msg9, To::Device("gw-0042"));
        w.wait_for("the next message to be handled", Duration::from_secs(20), || {
            w.log().contains("busy: update")
        });
        eprintln!("broker-kill run {run}: ok");
    }
    eprintln!("broker killed mid-download: {n}/{n} runs completed exactly once");
}

#[test]
fn link_down_for_30_seconds_mid_download() {
    if !can_run() {
        return;
    }
    let n = runs("FLEETD_LINK_RUNS", 1);
    for run in 0..n {
        let mut w = World::new(None);
        w.server.set_rate(Some(2 << 20));
        w.start_daemon();
        w.wait_connected();
        let image = image_bytes(6 << 20, run as u64 + 7);
        let msg = w.message("v8", 8, &image, &["--name", "v8"]);
        w.publish(&msg, To::Device("gw-0042"));
        // Cut the link once bytes have landed in the slot (a checkpoint).
        w.wait_for("a checkpoint", Duration::from_secs(20), || {
            w.g.status()["job"]["progress"].as_u64().unwrap_or(0) >= 16
        });
        w.net.link_down();
        std::thread::sleep(Duration::from_secs(30));
        assert_eq!(w.connection()["connected"], false, "a 30 s outage is noticed (keep-alive 5 s)");
        w.net.link_up();
        // The link coming back is a network change: fleetd reconnects at
        // once rather than sleeping out its backoff. The wait is the
        // product's own bound for that.
        let up = Instant::now();
        let bound = fleetd::mqtt::reconnect_after_network_change();
        w.wait_for("the reconnect after the link came back", bound, || w.connection()["connected"] == true);
        eprintln!(
            "link-down run {run}: reconnected {:?} after the link came up (bound {bound:?})",
            up.elapsed()
        );
        assert_done_once(&w, &image);
        let log = w.server.log();
        assert!(
            log.len() >= 2 && log.last().unwrap().range_start > 0,
            "resumed with Range: {log:?}\n{}",
            w.log()
        );
        eprintln!("link-down run {run}: ok, {} requests", log.len());
    }
    eprintln!("link down 30 s mid-download: {n}/{n} runs completed exactly once");
}

/// `systemctl stop` sends SIGTERM: the daemon leaves within this, even
/// mid-download (the unit's TimeoutStopSec must allow it).
const STOP_WITHIN: Duration = Duration::from_secs(5);

#[test]
fn sigterm_mid_download_stops_at_once_and_the_next_start_resumes_with_range() {
    if !can_run() {
        return;
    }
    let mut w = World::new(None);
    w.server.set_rate(Some(1 << 20));
    w.start_daemon();
    w.wait_connected();
    let image = image_bytes(6 << 20, 21);
    let msg = w.message("v8", 8, &image, &["--name", "v8"]);
    w.publish(&msg, To::Device("gw-0042"));
    w.wait_for("a checkpoint", Duration::from_secs(20), || {
        w.g.status()["job"]["progress"].as_u64().unwrap_or(0) >= 20
    });
    let mut child = w.daemon.take().unwrap();
    let asked = Instant::now();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(asked.elapsed() < STOP_WITHIN, "still running {STOP_WITHIN:?} after SIGTERM:\n{}", w.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("SIGTERM mid-download: exited ({status}) after {:?}", asked.elapsed());
    assert!(status.success(), "{status}\n{}", w.log());
    let st = w.g.status();
    assert_eq!(st["state"], "downloading", "the job waits for the next start: {st}");
    let requests_before = w.server.log().len();
    w.start_daemon();
    assert_done_once(&w, &image);
    let log = w.server.log();
    assert!(log.len() > requests_before, "{log:?}");
    assert!(log.last().unwrap().range_start > 0, "resumed with Range: {log:?}\n{}", w.log());
}

/// While a download runs, every other message is answered at once (busy),
/// so the MQTT task never waits on the worker: more messages than the
/// worker's queue holds, all refused while the download still runs, and
/// the connection stays up.
#[test]
fn messages_during_a_download_are_answered_at_once() {
    if !can_run() {
        return;
    }
    let mut w = World::new(None);
    w.server.set_rate(Some(256 << 10));
    let flood = fleetd::daemon::WORKER_QUEUE + 4;
    let others: Vec<PathBuf> = (0..flood)
        .map(|i| w.message(&format!("other{i}"), 9 + i as u64, &image_bytes(1 << 20, 50 + i as u64), &[]))
        .collect();
    w.start_daemon();
    w.wait_connected();
    let image = image_bytes(6 << 20, 22);
    let msg = w.message("v8", 8, &image, &["--name", "v8"]);
    w.publish(&msg, To::Device("gw-0042"));
    w.wait_for("the download", Duration::from_secs(20), || w.g.status()["state"] == "downloading");
    for other in &others {
        w.publish(other, To::Device("gw-0042"));
    }
    // Each publish returned at its PUBACK from the broker; the device's
    // answers follow within the broker's delivery, long before the
    // download (6 MiB at 256 KiB/s) ends.
    w.wait_for("every message answered", Duration::from_secs(10), || {
        w.log().matches("update refused: busy: update").count() >= flood
    });
    let st = w.g.status();
    assert_eq!(st["state"], "downloading", "answered while the download still runs: {st}\n{}", w.log());
    assert_eq!(w.connection()["connected"], true, "{}", w.log());
    assert_done_once(&w, &image);
}

#[test]
fn a_message_unacked_at_a_crash_is_redelivered_and_run_once() {
    if !can_run() {
        return;
    }
    let n = runs("FLEETD_FAULT_RUNS", 3);
    let mut x = now() | 1;
    for run in 0..n {
        let mut w = World::new(None);
        w.start_daemon();
        w.wait_connected();
        let image = image_bytes(2 << 20, run as u64 + 3);
        let msg = w.message("v8", 8, &image, &["--name", "v8"]);
        // Freeze the daemon so the message sits unacknowledged in its socket,
        // then kill it at a random moment after it wakes.
        let pid = w.daemon.as_ref().unwrap().id() as i32;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        w.publish(&msg, To::Device("gw-0042"));
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        unsafe { libc::kill(pid, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(x % 40));
        w.kill_daemon();
        w.start_daemon();
        assert_done_once(&w, &image);
        eprintln!("redelivery run {run}: ok");
    }
    eprintln!("crash before/after the ack: {n}/{n} runs ran the update exactly once");
}

#[test]
fn a_certificate_from_another_ca_is_refused_with_a_clear_tls_error() {
    if !can_run() {
        return;
    }
    // The device presents a certificate from a CA the broker does not trust.
    let mut w = World::new(None);
    let (cert, key) = w.pki.foreign_client("gw-0042");
    let (host, port) = w.broker.url();
    w.g.extra_config = format!(
        "stall_timeout_s = 5\n\n[mqtt]\nhost = \"{host}\"\nport = {port}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        w.pki.ca_pem.display(),
        cert.display(),
        key.display()
    );
    w.g.write_config();
    w.start_daemon();
    w.wait_for("a connection error", Duration::from_secs(20), || w.connection()["error"].is_string());
    let error = w.connection()["error"].as_str().unwrap().to_string();
    assert!(error.starts_with("mqtt-tls: ") && error.contains("UnknownCA"), "{error}");
    assert_ne!(w.connection()["connected"], true);
    eprintln!("foreign-CA device: {error}");
}

#[test]
fn a_device_never_receives_another_devices_update() {
    if !can_run() {
        return;
    }
    let w = {
        let mut w = World::new(None);
        w.start_daemon();
        w.wait_connected();
        w
    };
    // A valid message for gw-0043, on gw-0043's topic: gw-0042 must not see it.
    let msg = w.message("other", 8, &image_bytes(1 << 20, 5), &["--device", "gw-0042"]);
    w.publish(&msg, To::Device("gw-0043"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.g.status()["state"], "idle");
    assert!(w.server.log().is_empty(), "nothing was downloaded");
    // And gw-0042 cannot even subscribe its way to it: the broker withholds delivery.
    let (cert, key) = w.pki.client("gw-0042");
    let (host, port) = w.broker.url();
    let sub = w
        .net
        .in_device("mosquitto_sub")
        .args(["-h", &host, "-p", &port.to_string(), "--cafile"])
        .arg(&w.pki.ca_pem)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["-i", "gw-0042-spy", "-t", "fleet/acme-gateways/devices/gw-0043/update", "-C", "1", "-W", "3"])
        .output()
        .unwrap();
    w.publish(&msg, To::Device("gw-0043"));
    assert!(sub.stdout.is_empty(), "gw-0042 received gw-0043's message");
}

#[test]
fn forged_replayed_and_expired_messages_are_refused_and_reported() {
    if !can_run() {
        return;
    }
    let mut w = World::new(None);
    w.start_daemon();
    w.wait_connected();
    let image = image_bytes(1 << 20, 8);

    let forged = {
        let file = w.g.path().join("forged.img");
        std::fs::write(&file, &image).unwrap();
        let url = w.server.add("/forged.img", image.clone());
        w.g.dev.sign("forged", "fleet", "fleet", &["--url", &url, "--image", file.to_str().unwrap()])
    };
    w.publish(&forged, To::Device("gw-0042"));
    w.wait_for("the forged message to be refused", Duration::from_secs(20), || {
        w.g.status()["last_error"].as_str().is_some_and(|e| e.starts_with("signature-missing"))
    });
    let mut retained = serde_json::Value::Null;
    w.wait_for("the refusal in the retained status", Duration::from_secs(10), || {
        retained = w.retained_status();
        retained["last_error"].as_str().is_some_and(|e| e.starts_with("signature-missing"))
    });

    let expired = w.message("expired", 8, &image, &["--not-before", "1736000000", "--valid-for", "3600"]);
    w.publish(&expired, To::Device("gw-0042"));
    w.wait_for("the expired message to be refused", Duration::from_secs(20), || {
        w.g.status()["last_error"].as_str().is_some_and(|e| e.starts_with("expired"))
    });

    // A genuine message, installed; the same message again is a replay.
    let genuine = w.message("v8", 8, &image, &[]);
    w.publish(&genuine, To::Device("gw-0042"));
    w.wait_state("reboot-pending", Duration::from_secs(30));
    w.reboot();
    w.wait_state("committed", Duration::from_secs(30));
    w.publish(&genuine, To::Device("gw-0042"));
    w.wait_for("the replay to be recognised", Duration::from_secs(20), || {
        w.log().contains("a second delivery of a message already handled")
    });
    assert_eq!(w.g.status()["installed_version"], 8);
    assert!(w.server.log().len() == 1, "the replay downloaded nothing");
    assert!(w.g.status()["state"] == "committed");
}

/// A double of the AWS IoT Jobs service (no AWS here), speaking the Jobs
/// MQTT protocol over the real broker: it answers start-next, announces new
/// jobs on notify-next, and records every status update. It drops the
/// response to the first final status, so the device must retry.
struct JobsService {
    state: std::sync::Arc<std::sync::Mutex<JobsState>>,
    client: rumqttc::Client,
}

#[derive(Default)]
struct JobsState {
    jobs: Vec<(String, serde_json::Value, String)>,
    updates: Vec<(String, String, serde_json::Value)>,
    dropped_a_final: bool,
}

impl JobsService {
    fn start(w: &World) -> JobsService {
        let (host, port) = w.broker.url();
        let tls = w.pki.rustls_client("aws-jobs");
        let mut options = rumqttc::MqttOptions::new("aws-jobs", host, port);
        options
            .set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls)))
            .set_max_packet_size(128 << 10, 128 << 10);
        let state = std::sync::Arc::new(std::sync::Mutex::new(JobsState::default()));
        let shared = state.clone();
        let (client, mut connection) =
            cloud::run_in_netns(w.net.cloud_ns(), move || rumqttc::Client::new(options, 16));
        let responder = client.clone();
        cloud::spawn_in_netns(w.net.cloud_ns(), move || {
            for event in connection.iter() {
                let Ok(rumqttc::Event::Incoming(packet)) = event else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                match packet {
                    rumqttc::Packet::ConnAck(_) => {
                        let _ =
                            responder.subscribe("$aws/things/+/jobs/start-next", rumqttc::QoS::AtLeastOnce);
                        let _ = responder.subscribe("$aws/things/+/jobs/+/update", rumqttc::QoS::AtLeastOnce);
                    }
                    rumqttc::Packet::Publish(p) => {
                        let parts: Vec<&str> = p.topic.split('/').collect();
                        let thing = parts.get(2).copied().unwrap_or_default().to_string();
                        let mut s = shared.lock().unwrap();
                        if p.topic.ends_with("/jobs/start-next") {
                            let next = s.jobs.iter_mut().find(|j| j.2 == "QUEUED" || j.2 == "IN_PROGRESS");
                            let body = match next {
                                Some(job) => {
                                    job.2 = "IN_PROGRESS".into();
                                    serde_json::json!({"execution": {"jobId": job.0, "status": "IN_PROGRESS", "jobDocument": job.1, "versionNumber": 1}})
                                }
                                None => serde_json::json!({}),
                            };
                            let topic = format!("$aws/things/{thing}/jobs/start-next/accepted");
                            let _ =
                                responder.publish(topic, rumqttc::QoS::AtLeastOnce, false, body.to_string());
                        } else if p.topic.ends_with("/update") {
                            let job_id = parts.get(4).copied().unwrap_or_default().to_string();
                            let body: serde_json::Value =
                                serde_json::from_slice(&p.payload).unwrap_or_default();
                            let status = body["status"].as_str().unwrap_or_default().to_string();
                            s.updates.push((job_id.clone(), status.clone(), body["statusDetails"].clone()));
                            let is_final = status != "IN_PROGRESS";
                            if is_final && !s.dropped_a_final {
                                s.dropped_a_final = true;
                                continue;
                            }
                            if let Some(job) = s.jobs.iter_mut().find(|j| j.0 == job_id) {
                                job.2 = status;
                            }
                            let topic = format!("$aws/things/{thing}/jobs/{job_id}/update/accepted");
                            let _ = responder.publish(topic, rumqttc::QoS::AtLeastOnce, false, "{}");
                        }
                    }
                    _ => {}
                }
            }
        });
        JobsService { state, client }
    }

    fn add_job(&self, job_id: &str, message: &Path) {
        let document: serde_json::Value = serde_json::from_slice(&std::fs::read(message).unwrap()).unwrap();
        self.state.lock().unwrap().jobs.push((job_id.into(), document.clone(), "QUEUED".into()));
        let body = serde_json::json!({"execution": {"jobId": job_id, "status": "QUEUED", "jobDocument": document, "versionNumber": 1}});
        self.client
            .publish(
                "$aws/things/gw-0042/jobs/notify-next",
                rumqttc::QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .unwrap();
    }

    fn updates(&self, job_id: &str) -> Vec<(String, serde_json::Value)> {
        let s = self.state.lock().unwrap();
        s.updates.iter().filter(|u| u.0 == job_id).map(|u| (u.1.clone(), u.2.clone())).collect()
    }

    fn status(&self, job_id: &str) -> String {
        let s = self.state.lock().unwrap();
        s.jobs.iter().find(|j| j.0 == job_id).map(|j| j.2.clone()).unwrap_or_default()
    }
}

#[test]
fn aws_iot_jobs_profile_runs_a_job_reports_it_and_rejects_a_forged_one() {
    if !can_run() {
        return;
    }
    let mut w = World::new(None);
    let config = std::fs::read_to_string(w.g.dev.config()).unwrap();
    let config = config.replace("keep_alive_s = 5\n", "keep_alive_s = 5\nprofile = \"aws-iot-jobs\"\n");
    assert!(config.contains("aws-iot-jobs"));
    w.g.extra_config =
        w.g.extra_config.replace("keep_alive_s = 5\n", "keep_alive_s = 5\nprofile = \"aws-iot-jobs\"\n");
    w.g.write_config();
    let jobs = JobsService::start(&w);
    std::thread::sleep(Duration::from_millis(300));
    w.start_daemon();
    w.wait_connected();

    let genuine = w.message("v8", 8, &image_bytes(3 << 20, 21), &[]);
    jobs.add_job("job-1", &genuine);
    w.wait_state("reboot-pending", Duration::from_secs(30));
    w.wait_for("IN_PROGRESS reports", Duration::from_secs(10), || {
        jobs.updates("job-1").iter().any(|(s, d)| s == "IN_PROGRESS" && d["step"].is_string())
    });
    w.reboot();
    w.wait_state("committed", Duration::from_secs(30));
    // The first SUCCEEDED got no answer: fleetd repeats it until accepted.
    w.wait_for("SUCCEEDED, accepted", Duration::from_secs(40), || jobs.status("job-1") == "SUCCEEDED");
    let finals = jobs.updates("job-1").iter().filter(|(s, _)| s == "SUCCEEDED").count();
    assert!(finals >= 2, "the final report was retried: {:?}", jobs.updates("job-1"));

    let forged = {
        let file = w.g.path().join("forged.img");
        std::fs::write(&file, b"evil").unwrap();
        let url = w.server.add("/forged.img", b"evil".to_vec());
        w.g.dev.sign(
            "forged",
            "fleet",
            "fleet",
            &["--url", &url, "--image", file.to_str().unwrap(), "--version", "9"],
        )
    };
    jobs.add_job("job-2", &forged);
    w.wait_for("REJECTED", Duration::from_secs(30), || jobs.status("job-2") == "REJECTED");
    let (_, details) = jobs.updates("job-2").into_iter().find(|(s, _)| s == "REJECTED").unwrap();
    assert!(details["reason"].as_str().unwrap().starts_with("signature-missing"), "{details}");
    assert_eq!(w.g.status()["installed_version"], 8);
}

#[test]
fn a_certificate_for_another_device_id_is_refused_at_start() {
    // No namespace needed: fleetd refuses before it connects.
    let mut g = Gateway::new(Bootloader::Grub, SLOT);
    let pki = Pki::new(&g.path().join("pki"), "127.0.0.1".parse().unwrap());
    let (cert, key) = pki.client("gw-9999");
    g.extra_config = format!(
        "\n[mqtt]\nhost = \"127.0.0.1\"\nport = 1\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.ca_pem.display(),
        cert.display(),
        key.display()
    );
    g.write_config();
    let out = g.fleetd(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("CN is \"gw-9999\" but the device id is \"gw-0042\""), "{err}");
}

/// When the connection last changed, as the daemon recorded it.
fn connected_since(w: &World) -> serde_json::Value {
    let c = w.connection();
    assert_eq!(c["connected"], true, "{c}\n{}", w.log());
    c["since"].clone()
}

/// A message far over 64 KiB that the broker still accepts, on the device
/// topic and retained on the group topic: each is refused by name,
/// acknowledged and reported, the connection never drops, and the next
/// valid update runs. (rumqttc's old 68 KiB limit dropped the connection
/// and the broker redelivered the message at every reconnect.) A packet
/// over the shipped broker's max_packet_size never reaches the device.
#[test]
fn an_oversized_message_is_refused_by_name_and_the_device_stays_connected() {
    if !can_run() {
        return;
    }
    let mut w = World::new(None);
    w.start_daemon();
    w.wait_connected();
    let since = connected_since(&w);
    let oversized = w.g.path().join("oversized.json");
    std::fs::write(&oversized, format!("{{\"payload\":\"{}\"}}", "A".repeat(70 << 10))).unwrap();
    let file = oversized.to_str().unwrap();
    let device_topic = "fleet/acme-gateways/devices/gw-0042/update";
    let group_topic = "fleet/acme-gateways/groups/pilot/update";
    let out = w.mosquitto_pub(&["-t", device_topic, "-q", "1", "-f", file], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = w.mosquitto_pub(&["-t", group_topic, "-q", "1", "-r", "-f", file], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.wait_for("both refusals", Duration::from_secs(20), || {
        w.log().matches("update refused: message-too-large").count() >= 2
    });
    let mut retained = serde_json::Value::Null;
    w.wait_for("the refusal in the retained status", Duration::from_secs(10), || {
        retained = w.retained_status();
        retained["last_error"].as_str().is_some_and(|e| e.starts_with("message-too-large"))
    });

    // Over the broker's limit: the broker drops the sender, not the device.
    let limit: usize =
        cloud::shipped_setting("max_packet_size").split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        limit <= fleetd::mqtt::MAX_INCOMING_PACKET,
        "the shipped broker accepts what the device cannot read"
    );
    let huge = w.g.path().join("huge.json");
    std::fs::write(&huge, vec![b'B'; limit + 1]).unwrap();
    let _ = w.mosquitto_pub(&["-t", device_topic, "-q", "1", "-f", huge.to_str().unwrap()], None);

    let image = image_bytes(1 << 20, 70);
    let msg = w.message("v8", 8, &image, &[]);
    w.publish(&msg, To::Device("gw-0042"));
    w.wait_state("reboot-pending", Duration::from_secs(30));
    assert_eq!(connected_since(&w), since, "the connection never dropped:\n{}", w.log());
    assert!(!w.log().contains("reconnecting"), "{}", w.log());
    w.reboot();
    w.wait_state("committed", Duration::from_secs(30));
}

/// 1,000 QoS 1 messages of about 1 KB with a valid update as message 501:
/// every one is seen and answered (no acknowledgement is lost, none is
/// refused unseen for a full queue), the fleet gets a report for each
/// refusal, and the valid update runs.
#[test]
fn a_burst_of_a_thousand_messages_loses_nothing_and_the_valid_update_runs() {
    if !can_run() {
        return;
    }
    let mut w = World::new(None);
    w.start_daemon();
    w.wait_connected();
    let image = image_bytes(2 << 20, 71);
    let valid = w.message("v8", 8, &image, &["--name", "v8"]);
    let valid: serde_json::Value = serde_json::from_slice(&std::fs::read(&valid).unwrap()).unwrap();
    let (count, valid_at) = (1000, 500);
    let mut lines = String::new();
    for i in 0..count {
        if i == valid_at {
            lines.push_str(&valid.to_string());
        } else {
            lines.push_str(&format!("{{\"junk\":{i},\"pad\":\"{}\"}}", "x".repeat(1000)));
        }
        lines.push('\n');
    }
    let burst = w.g.path().join("burst.txt");
    std::fs::write(&burst, lines).unwrap();
    let (mut sub, reports) = w.subscribe("fleet/acme-gateways/devices/gw-0042/progress");
    let started = Instant::now();
    let out =
        w.mosquitto_pub(&["-t", "fleet/acme-gateways/devices/gw-0042/update", "-q", "1", "-l"], Some(&burst));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut refused_reports = 0;
    w.wait_for("a report for every refusal", Duration::from_secs(120), || {
        while let Ok(line) = reports.try_recv() {
            if line.contains("\"step\":\"refused\"") {
                refused_reports += 1;
            }
        }
        refused_reports >= count - 1
    });
    eprintln!("burst: {count} messages answered and reported in {:?}", started.elapsed());
    let _ = sub.kill();
    let _ = sub.wait();
    let log = w.log();
    assert_eq!(log.matches("update refused:").count(), count - 1, "{log}");
    assert!(!log.contains("queue is full"), "{log}");
    assert_done_once(&w, &image);
    assert_eq!(w.connection()["connected"], true);
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The state directory on a full 64 KiB tmpfs: a valid update can be
/// neither stored nor refused on record, so it is not acknowledged and no
/// job exists in memory either (no phantom `downloading`); once space is
/// freed, the same delivery runs, without a restart.
#[test]
fn a_full_state_disk_never_acknowledges_and_the_update_runs_once_space_is_free() {
    if !can_run() {
        return;
    }
    let mut w = World::new(None);
    let state = w.g.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let saved = w.g.path().join("state.saved");
    ok(std::process::Command::new("cp").arg("-a").arg(&state).arg(&saved));
    ok(std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"]).arg(&state));
    let mounted = Mounted(state.clone());
    ok(std::process::Command::new("sh").arg("-c").arg(format!(
        "cp -a {}/. {}/",
        saved.display(),
        state.display()
    )));
    w.start_daemon();
    w.wait_connected();
    let filler = state.join("filler");
    let _ = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=1k", "count=64"])
        .stderr(Stdio::null())
        .status();
    let image = image_bytes(1 << 20, 72);
    let msg = w.message("v8", 8, &image, &[]);
    w.publish(&msg, To::Device("gw-0042"));
    // Two failed saves: the first delivery, and the same message again
    // after RETRY_UNSAVED (an acknowledged one would never come back).
    let retry = fleetd::mqtt::RETRY_UNSAVED;
    w.wait_for("a save to fail twice", retry * 2 + Duration::from_secs(10), || {
        w.log().matches("No space left on device").count() >= 2
    });
    let st = w.g.status();
    assert_ne!(st["state"], "downloading", "{st}");
    assert!(st["job"].is_null(), "no job on disk: {st}");
    assert!(w.server.log().is_empty(), "nothing was downloaded");
    assert!(!w.log().contains("accepted v8"), "{}", w.log());
    std::fs::remove_file(&filler).unwrap();
    let st = w.wait_state("reboot-pending", retry + Duration::from_secs(30));
    assert_eq!(st["job"]["version"], 8);
    assert_eq!(w.server.log().len(), 1, "downloaded once");
    w.kill_daemon();
    drop(mounted);
}
