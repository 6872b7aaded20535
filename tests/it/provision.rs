//! Provisioning end to end with backend `none` (the portal only): the
//! daemon's portal, `fleetctl provision` as the phone, and a real mosquitto
//! (TLS, per-device ACLs) reached with the identity provisioning stored.
//!
//! - The netns test puts the phone and the broker in the cloud namespace and
//!   the device in its own, joined by veth. Needs root; CI runs as root.
//! - The refusal tests run the portal on loopback and need no root.

use crate::common;
use common::cloud::{Broker, Net, Pki};
use common::gateway::*;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const PROJECT: &str = "acme-gateways";
const DEVICE: &str = "gw-0042";

/// A device whose config has `[provision]` (backend none) and no `[mqtt]`.
struct NewDevice {
    g: Gateway,
    daemon: Option<Daemon>,
    log: PathBuf,
}

impl NewDevice {
    fn new(listen: &str) -> NewDevice {
        Self::with_ap_timeout(listen, 600)
    }

    fn with_ap_timeout(listen: &str, ap_timeout_s: u64) -> NewDevice {
        let mut g = Gateway::new(Bootloader::Grub, 1 << 20);
        g.extra_config = format!(
            "\n[mqtt]\nkeep_alive_s = 5\n\n[provision]\nbackend = \"none\"\nlisten = \"{listen}\"\nap_timeout_s = {ap_timeout_s}\n"
        );
        g.write_config();
        let log = g.path().join("fleetd.log");
        NewDevice { g, daemon: None, log }
    }

    fn start(&mut self, net: Option<&Net>) {
        self.daemon = Some(Daemon::start(&self.g.dev.config(), net, &[], &self.log));
    }

    fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        self.g.status()
    }

    fn pop(&self) -> String {
        let out = self.g.fleetd(&["status", "--pop"]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).lines().last().unwrap_or_default().to_string()
    }

    /// Waits until the portal is up; returns its URL (from the status).
    fn wait_portal(&self) -> String {
        let mut last = serde_json::Value::Null;
        self.wait_for("the portal", Duration::from_secs(20), || {
            last = self.status();
            last["state"] == "provisioning" && last["network"]["portal"].is_string()
        });
        last["network"]["portal"].as_str().unwrap().to_string()
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n--- fleetd\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn identity(&self, file: &str) -> PathBuf {
        self.g.path().join("state/identity").join(file)
    }

    fn connection(&self) -> serde_json::Value {
        std::fs::read(self.g.path().join("state/connection.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

fn provision(net: Option<&Net>, url: &str, pop: &str, broker: &str, ca: &Path, identity: &[&str]) -> Output {
    let mut cmd = match net {
        Some(net) => net.in_cloud(crate::common::fleetctl_bin()),
        None => Command::new(crate::common::fleetctl_bin()),
    };
    cmd.args(["provision", "--url", url, "--pop", pop, "--broker", broker, "--broker-ca"])
        .arg(ca)
        .args(identity)
        .args(["--wait-s", "20"]);
    run(&mut cmd)
}

fn paths(p: &[&Path]) -> Vec<String> {
    p.iter().map(|p| p.display().to_string()).collect()
}

/// The whole cycle: unprovisioned → portal → a wrong PoP (401, nothing
/// stored) → a Wi-Fi the backend cannot join (refused by name) →
/// provisioned with the device's own key, signed by the fleet's CA → MQTT
/// connected to the real broker with that identity → the portal is gone →
/// `reset --factory` brings it back.
#[test]
fn backend_none_provisions_over_veth_and_the_device_reaches_the_broker() {
    if !can_run_netns() {
        return;
    }
    let net = Net::new();
    let mut device = NewDevice::new(&format!("{}:8080", net.device_ip()));
    let pki = Pki::new(&device.g.path().join("pki"), net.cloud_ip());
    let mut broker =
        Broker::start(&net, &pki, &device.g.path().join("broker"), &[(DEVICE, PROJECT, "pilot")]);
    assert_eq!(device.status()["state"], "unprovisioned");
    assert_eq!(device.status()["provisioned"], false);
    let pop = device.pop();
    assert_eq!(pop.len(), 19, "XXXX-XXXX-XXXX-XXXX: {pop:?}");
    assert_eq!(
        std::fs::metadata(device.g.path().join("state/pop")).unwrap().permissions().mode() & 0o777,
        0o600
    );

    device.start(Some(&net));
    let url = device.wait_portal();
    assert_eq!(url, format!("http://{}:8080/", net.device_ip()));
    let (host, port) = broker.url();
    let broker_arg = format!("{host}:{port}");
    let ca_key = pki.ca_key();
    let own_key = [
        "--ca-cert".to_string(),
        pki.ca_pem.display().to_string(),
        "--ca-key".into(),
        ca_key.display().to_string(),
    ];
    let own_key: Vec<&str> = own_key.iter().map(String::as_str).collect();

    // A wrong PoP: 401, and nothing stored.
    let wrong = "0000-0000-0000-0000";
    let out = provision(Some(&net), &url, wrong, &broker_arg, &pki.ca_pem, &own_key);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("pop-wrong"), "{}", stderr(&out));
    assert!(!device.identity("cert.pem").exists());

    // Wi-Fi on a device without any: refused at once, by name.
    let psk = "correct horse battery";
    let mut with_wifi = own_key.clone();
    with_wifi.extend(["--ssid", "home", "--psk", psk]);
    let out = provision(Some(&net), &url, &pop, &broker_arg, &pki.ca_pem, &with_wifi);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("refused (400): wifi-unsupported"), "{}", stderr(&out));
    let status = device.status();
    assert_eq!(status["state"], "provisioning");
    assert!(!device.identity("cert.pem").exists());

    // Now as a wired device: provisioned, and MQTT connects.
    let out = provision(Some(&net), &url, &pop, &broker_arg, &pki.ca_pem, &own_key);
    assert!(out.status.success(), "{}{}\n{}", stdout(&out), stderr(&out), device.log());
    assert!(stdout(&out).contains("provisioned"), "{}", stdout(&out));
    device.wait_for("the MQTT connection", Duration::from_secs(30), || {
        device.connection()["connected"] == true
    });
    let status = device.status();
    assert_eq!(status["provisioned"], true, "{status}");
    assert_eq!(status["state"], "idle", "{status}");
    for file in ["cert.pem", "key.pem"] {
        let mode = std::fs::metadata(device.identity(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    assert_eq!(
        std::fs::read(device.identity("key.pem")).unwrap(),
        std::fs::read(device.identity("device-key.pem")).unwrap(),
        "the key stored is the one the device made"
    );
    // The broker saw gw-0042 by its certificate.
    assert!(broker.log().contains(DEVICE), "{}", broker.log());

    // The portal closed; after a restart the device goes straight to MQTT.
    device.stop();
    assert_eq!(device.connection()["connected"], false, "a stopped daemon says so");
    device.start(Some(&net));
    device.wait_for("the reconnection", Duration::from_secs(30), || device.connection()["connected"] == true);
    let out = provision(Some(&net), &url, &pop, &broker_arg, &pki.ca_pem, &own_key);
    assert_eq!(out.status.code(), Some(1), "a provisioned device takes no second provisioning");

    // Reset: the portal is back, the device's own key is kept.
    let held = device.g.fleetd(&["reset", "--factory"]);
    assert_eq!(held.status.code(), Some(1), "refused while the daemon holds the lock");
    assert!(stderr(&held).contains("busy"), "{}", stderr(&held));
    device.stop();
    let out = device.g.fleetd(&["reset", "--factory"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!device.identity("cert.pem").exists());
    assert!(device.identity("device-key.pem").exists());
    assert_eq!(device.status()["provisioned"], false);
    device.start(Some(&net));
    device.wait_portal();
    device.stop();
    broker.stop();

    let log = device.log();
    for secret in [psk, pop.as_str(), pop.replace('-', "").as_str()] {
        assert!(!log.contains(secret), "a secret in the log: {secret:?}\n{log}");
    }
}

/// Refusals by name, each with nothing stored: a certificate for another
/// key, an expired one, one from a foreign CA, garbage PEM; then 1,000
/// wrong guesses lock their address out (and the lock-out is logged).
#[test]
fn bad_identities_are_refused_by_name_and_guessing_locks_the_portal() {
    let mut device = NewDevice::new("127.0.0.1:0");
    let pki = Pki::new(&device.g.path().join("pki"), "127.0.0.1".parse().unwrap());
    device.start(None);
    let url = device.wait_portal();
    let pop = device.pop();
    let broker = "127.0.0.1:8883";

    let (cert, key) = pki.client(DEVICE);
    let (_, other_key) = pki.client("someone-else");
    let (expired, expired_key) = pki.client_valid("expired", DEVICE, (2020, 2021));
    let (foreign, foreign_key) = pki.foreign_client(DEVICE);
    let garbage = device.g.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
        .unwrap();
    for (identity, name) in [
        (paths(&[&cert, &other_key]), "cert-key-mismatch"),
        (paths(&[&expired, &expired_key]), "cert-expired"),
        (paths(&[&foreign, &foreign_key]), "cert-untrusted"),
        (paths(&[&garbage, &key]), "pem-invalid"),
    ] {
        let args = ["--cert", &identity[0], "--key", &identity[1]];
        let out = provision(None, &url, &pop, broker, &pki.ca_pem, &args);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("refused (400): {name}")), "{name}: {}", stderr(&out));
        assert!(!device.identity("cert.pem").exists(), "{name}: nothing stored");
    }

    // 1,000 guesses, each with a fresh nonce and a MAC under a wrong key.
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let wrong = fleetd::provision::pop::Pop::parse("0000-0000-0000-0001").unwrap().request_key(DEVICE);
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..1000 {
        let (status, _) = portal_call(&addr, "GET", "/api/v1/csr", Some(&wrong));
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&401), Some(&5), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&995), "{statuses:?}");
    let (cert_pem, key_pem) = (cert.display().to_string(), key.display().to_string());
    let out = provision(None, &url, &pop, broker, &pki.ca_pem, &["--cert", &cert_pem, "--key", &key_pem]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("locked-out"),
        "the right PoP from the same address waits too: {}",
        stderr(&out)
    );
    device.stop();
    let log = device.log();
    assert_eq!(log.matches("locked-out").count(), 1, "one lock-out, logged once:\n{log}");
    assert!(!log.contains(&pop), "{log}");
}

/// The page in a real browser (headless Chromium, phone-sized): a captive
/// probe lands on it, a wrong code is named, the device's CSR comes back
/// for the fleet CA to sign, and the submitted form provisions the device.
/// Screenshots go to target/portal-*.png.
#[test]
fn the_portal_page_provisions_the_device_from_a_phone_sized_browser() {
    let Some(browser) = common::webdriver::Browser::start() else {
        assert!(std::env::var_os("CI").is_none(), "CI must run the browser test (chromium, chromium-driver)");
        eprintln!("SKIP: needs chromium and chromium-driver (scripts/setup)");
        return;
    };
    let mut device = NewDevice::new("127.0.0.1:0");
    let pki = Pki::new(&device.g.path().join("pki"), "127.0.0.1".parse().unwrap());
    device.start(None);
    let url = device.wait_portal();
    let pop = device.pop();

    // What Android asks first; the redirect opens the page.
    browser.goto(&format!("{url}generate_204"));
    assert_eq!(browser.current_url(), url);
    assert_eq!(browser.title(), format!("Set up {DEVICE}"));
    browser.wait_until("the state line", Duration::from_secs(10), |b| b.text("#state") == "provisioning");

    let result = |b: &common::webdriver::Browser| b.text("#result");
    browser.type_into("#pop", "0000-0000-0000-0000");
    browser.click("#getcsr");
    browser.wait_until("the wrong-code message", Duration::from_secs(10), |b| !result(b).is_empty());
    assert!(result(&browser).contains("The code is not right (pop-wrong)"), "{}", result(&browser));

    browser.type_into("#pop", &pop.to_lowercase());
    browser.click("#scan");
    browser.wait_until("the scan answer", Duration::from_secs(10), |b| result(b).contains("networks found"));
    assert_eq!(result(&browser), "No Wi-Fi networks found (a wired device needs none).");
    browser.click("#getcsr");
    browser.wait_until("the CSR", Duration::from_secs(10), |b| {
        b.value("#csr").contains("BEGIN CERTIFICATE REQUEST")
    });
    let cert = pki.sign_csr(&browser.value("#csr"));
    browser.type_into("#host", "127.0.0.1");
    browser.paste_into("#ca", &std::fs::read_to_string(&pki.ca_pem).unwrap());
    browser.paste_into("#cert", &cert);
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("..");
    browser.full_page_screenshot(&shots.join("portal-filled.png"));
    browser.click("#submit");
    browser.wait_until("the outcome", Duration::from_secs(15), |b| result(b).starts_with("Provisioned"));
    browser.screenshot(&shots.join("portal-done.png"));

    assert_eq!(std::fs::read_to_string(device.identity("cert.pem")).unwrap(), cert);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(device.g.path().join("state/provisioning.json")).unwrap())
            .unwrap();
    assert_eq!(record["broker_host"], "127.0.0.1");
    assert_eq!(record["broker_port"], 8883);
    device.wait_for("provisioned", Duration::from_secs(10), || device.status()["provisioned"] == true);
    device.stop();
    assert!(!device.log().contains(&pop));
}

/// `ap_timeout_s`: nobody came, so the portal closes, the status says why,
/// and the daemon waits (for a restart) without spinning.
#[test]
fn the_portal_closes_after_ap_timeout_and_says_so() {
    let mut device = NewDevice::with_ap_timeout("127.0.0.1:0", 3);
    device.start(None);
    let url = device.wait_portal();
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    device.wait_for("the timeout", Duration::from_secs(10), || {
        device.status()["last_error"].as_str().unwrap_or("").starts_with("ap-timeout")
    });
    let status = device.status();
    assert_eq!(status["state"], "unprovisioned", "{status}");
    assert_eq!(status["network"]["mode"], "none", "{status}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the portal is closed");
    assert!(device.daemon.as_mut().unwrap().running(), "the daemon still runs");
    let started = Instant::now();
    device.stop();
    assert!(started.elapsed() < Duration::from_secs(5), "and stops at SIGTERM");
}

/// Something posing as the portal (it knows the device id, not the PoP)
/// hands out its own CSR: fleetctl refuses it before the CA signs anything,
/// because the answer lacks the device's MAC.
#[test]
fn fleetctl_signs_nothing_for_a_portal_that_cannot_prove_the_pop() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let someone = fleetd::provision::identity::DeviceKey::generate().unwrap();
    let csr = someone.csr_pem(DEVICE).unwrap();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        for stream in listener.incoming().flatten().take(8) {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).map(|n| n == 0 || header == "\r\n").unwrap_or(true) {
                    break;
                }
            }
            let body = if line.contains("/api/v1/csr") {
                serde_json::json!({"csr_pem": csr}).to_string()
            } else {
                serde_json::json!({"device": DEVICE, "hardware": "x", "fleetd_version": "0", "state": "provisioning",
                    "provisioned": false, "last_error": null, "nonce": "AAAAAAAAAAAAAAAAAAAAAA"}).to_string()
            };
            let mut stream = stream;
            let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "127.0.0.1".parse().unwrap());
    let ca_key = pki.ca_key();
    let out = run(Command::new(crate::common::fleetctl_bin())
        .args(["provision", "--url", &format!("http://{addr}/"), "--pop", "0000-0000-0000-0000"])
        .args(["--broker", "127.0.0.1:8883", "--broker-ca"])
        .arg(&pki.ca_pem)
        .arg("--ca-cert")
        .arg(&pki.ca_pem)
        .arg("--ca-key")
        .arg(&ca_key));
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("not from the device that holds this code"), "{}", stderr(&out));
}

/// The installer's address; every attacker below is another 127.x address.
const INSTALLER: [u8; 4] = [127, 0, 0, 1];

/// A portal at a fixed loopback address (kept across a restart), up.
fn portal_device() -> (NewDevice, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut device = NewDevice::new(&addr);
    device.start(None);
    device.wait_portal();
    wait_answering(&device, &addr);
    (device, addr)
}

/// Until the portal at `addr` answers /api/v1/info (after a restart the
/// status file still names it before the new portal listens).
fn wait_answering(device: &NewDevice, addr: &str) {
    let client = PortalClient::new(addr);
    device.wait_for("the portal to answer", Duration::from_secs(20), || {
        matches!(client.call("GET", "/api/v1/info", None), Ok((200, _)))
    });
}

fn error_name(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap_or_default()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Issue 17, item 5: a neighbour's wrong guesses lock the neighbour's
/// address out, not the installer's; the count survives a restart.
#[test]
fn a_neighbour_guessing_cannot_lock_the_installer_out_and_a_restart_keeps_the_count() {
    let (mut device, addr) = portal_device();
    let pop = device.pop();
    let right = fleetd::provision::pop::Pop::parse(&pop).unwrap().request_key(DEVICE);
    let wrong = fleetd::provision::pop::Pop::parse("0000-0000-0000-0001").unwrap().request_key(DEVICE);
    let neighbour = PortalClient::new(&addr).from([127, 0, 0, 66]);
    let installer = PortalClient::new(&addr).from(INSTALLER);

    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..50 {
        let (status, _) =
            neighbour.signed(&wrong, "GET", "/api/v1/csr", &neighbour.nonce().unwrap()).unwrap();
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!((statuses.get(&401), statuses.get(&429)), (Some(&5), Some(&45)), "{statuses:?}");
    let (status, body) = installer.signed(&right, "GET", "/api/v1/csr", &installer.nonce().unwrap()).unwrap();
    assert_eq!(status, 200, "the installer, at another address, is not locked out: {body}");

    // A restart does not hand the neighbour fresh attempts.
    device.stop();
    device.start(None);
    wait_answering(&device, &addr);
    let (status, body) = neighbour.signed(&wrong, "GET", "/api/v1/csr", &neighbour.nonce().unwrap()).unwrap();
    assert_eq!((status, error_name(&body).as_str()), (429, "locked-out"), "after the restart: {body}");
    let (status, _) = installer.signed(&right, "GET", "/api/v1/csr", &installer.nonce().unwrap()).unwrap();
    assert_eq!(status, 200);
    let guard = device.g.path().join("state/portal-guard.json");
    assert_eq!(std::fs::metadata(&guard).unwrap().permissions().mode() & 0o777, 0o600);
    device.stop();
    let log = device.log();
    assert!(log.contains("locked-out") && log.contains("127.0.0.66"), "{log}");
    assert!(!log.contains(&pop), "{log}");
}

/// Attackers on their own threads until dropped; `done` counts what they did.
struct Attack {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Attack {
    fn new() -> Attack {
        Attack { stop: Default::default(), done: Default::default(), threads: Vec::new() }
    }

    fn spawn(&mut self, attacker: impl FnOnce(&dyn Fn() -> bool, &dyn Fn()) + Send + 'static) {
        let (stop, done) = (self.stop.clone(), self.done.clone());
        self.threads.push(std::thread::spawn(move || {
            let running = || !stop.load(std::sync::atomic::Ordering::Relaxed);
            let count = || {
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            };
            attacker(&running, &count)
        }));
    }

    fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Slowloris from one address: up to 40 connections that never finish
/// their request head (a byte a second), each one reopened as soon as the
/// portal closes it.
fn slowloris(client: PortalClient) -> impl FnOnce(&dyn Fn() -> bool, &dyn Fn()) + Send + 'static {
    move |running, opened| {
        use std::io::{Read, Write};
        let mut open: Vec<std::net::TcpStream> = Vec::new();
        let mut last_drip = Instant::now();
        while running() {
            if open.len() < 40 {
                if let Ok(mut s) = client.connect() {
                    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").is_ok()
                        && s.set_nonblocking(true).is_ok()
                    {
                        open.push(s);
                        opened();
                    }
                }
            }
            let mut buf = [0u8; 64];
            open.retain_mut(|s| match s.read(&mut buf) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            });
            if last_drip.elapsed() >= Duration::from_secs(1) {
                open.retain_mut(|s| s.write_all(b"a").is_ok());
                last_drip = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The installer's attempts: a nonce, then the CSR with it. `between` runs
/// in between (the nonce test lets the flood run there).
fn installer_attempts(addr: &str, pop: &str, attempts: u32, between: &dyn Fn()) -> (u32, Vec<String>) {
    let key = fleetd::provision::pop::Pop::parse(pop).unwrap().request_key(DEVICE);
    let installer = PortalClient::new(addr).from(INSTALLER);
    let mut failures = Vec::new();
    for _ in 0..attempts {
        let outcome = installer.nonce().and_then(|nonce| {
            between();
            installer.signed(&key, "GET", "/api/v1/csr", &nonce)
        });
        match outcome {
            Ok((200, _)) => {}
            Ok((status, body)) => failures.push(format!("{status} {}", error_name(&body))),
            Err(e) => failures.push(e.to_string()),
        }
    }
    (attempts - failures.len() as u32, failures)
}

/// Issue 17, item 5: idle connections from twelve addresses (more than
/// all the slots) keep nobody out: each address holds its share, and a
/// newcomer takes an idle slot of the largest holder.
#[test]
fn slowloris_from_many_addresses_does_not_keep_the_installer_out() {
    let (mut device, addr) = portal_device();
    let pop = device.pop();
    let mut attack = Attack::new();
    let started = Instant::now();
    for a in 0..12u8 {
        attack.spawn(slowloris(PortalClient::new(&addr).from([127, 0, 1, 10 + a])));
    }
    // Until the attackers hold every slot: more opened than there are.
    let limits = fleetd::provision::server::LIMITS;
    device.wait_for("the slowloris to fill the portal", Duration::from_secs(20), || {
        attack.done() > 2 * limits.slots.max_total as u64
    });
    let (ok, failures) = installer_attempts(&addr, &pop, 30, &|| {});
    let rate = attack.done() as f64 / started.elapsed().as_secs_f64();
    eprintln!("slowloris: {ok}/30 installer attempts succeeded; 12 addresses opened {rate:.0} connections/s");
    assert_eq!(ok, 30, "{failures:?}");
    drop(attack);
    device.stop();
}

/// Issue 17, item 5: a flood of unauthenticated /api/v1/info from other
/// addresses, hundreds of nonces between the installer's nonce and its
/// use, evicts nothing.
#[test]
fn an_info_flood_does_not_evict_the_installers_nonce() {
    let (mut device, addr) = portal_device();
    let pop = device.pop();
    let mut attack = Attack::new();
    for a in 0..4u8 {
        let flooder = PortalClient::new(&addr).from([127, 0, 2, 10 + a]);
        attack.spawn(move |running, asked| {
            while running() {
                if let Ok((200, _)) = flooder.call("GET", "/api/v1/info", None) {
                    asked();
                }
            }
        });
    }
    // The old store held 64 nonces: let the flood ask for 200 between the
    // installer's nonce and its use (bounded by the nonce's lifetime).
    let lifetime = Duration::from_millis(fleetd::provision::portal::NONCE_TTL_MS);
    let between = || {
        let (from, deadline) = (attack.done(), Instant::now() + lifetime / 4);
        while attack.done() < from + 200 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let (ok, failures) = installer_attempts(&addr, &pop, 20, &between);
    eprintln!(
        "info flood: {ok}/20 installer attempts succeeded; {} nonces handed to the flood",
        attack.done()
    );
    assert_eq!(ok, 20, "{failures:?}");
    drop(attack);
    device.stop();
}

/// Issue 17, item 5: DNS rebinding. A page on another site whose name now
/// resolves to the portal sends that name as `Host`: no API answers it. A
/// captive probe for another site's name still lands on the portal.
#[test]
fn the_api_refuses_a_foreign_host_and_captive_probes_are_redirected() {
    let (mut device, addr) = portal_device();
    let url = format!("http://{addr}/");
    let rebound = PortalClient::new(&addr).with_host("rebind.attacker.example");
    for (method, path) in
        [("GET", "/api/v1/info"), ("GET", "/api/v1/networks"), ("POST", "/api/v1/provision")]
    {
        let (status, body) = rebound.call(method, path, None).unwrap();
        assert_eq!((status, error_name(&body).as_str()), (421, "host-refused"), "{method} {path}: {body}");
    }
    let (status, _) = rebound.call("GET", "/", None).unwrap();
    assert_eq!(status, 302, "the page is served only at the portal's own address");
    for (host, probe) in [
        ("connectivitycheck.gstatic.com", "/generate_204"),
        ("captive.apple.com", "/hotspot-detect.html"),
        ("www.msftconnecttest.com", "/connecttest.txt"),
    ] {
        let mut stream = PortalClient::new(&addr).with_host(host).connect().unwrap();
        use std::io::{Read, Write};
        write!(stream, "GET {probe} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 302"), "{host}{probe}: {answer}");
        assert!(answer.to_lowercase().contains(&format!("location: {url}\r\n")), "{answer}");
    }
    let (status, _) = PortalClient::new(&addr).call("GET", "/api/v1/info", None).unwrap();
    assert_eq!(status, 200, "its own address");
    device.stop();
}

/// Issue 17, item 11: backend `none` has no Wi-Fi: a request carrying one
/// is refused at once, by name, and nothing is stored.
#[test]
fn backend_none_refuses_a_request_with_wifi_at_once() {
    let (mut device, addr) = portal_device();
    let url = format!("http://{addr}/");
    let pki = Pki::new(&device.g.path().join("pki"), "127.0.0.1".parse().unwrap());
    let (cert, key) = pki.client(DEVICE);
    let identity = paths(&[&cert, &key]);
    let args = [
        "--cert",
        &identity[0],
        "--key",
        &identity[1],
        "--ssid",
        "home-net",
        "--psk",
        "correct horse battery",
    ];
    let started = Instant::now();
    let out = provision(None, &url, &device.pop(), "127.0.0.1:8883", &pki.ca_pem, &args);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("refused (400): wifi-unsupported"), "{}", stderr(&out));
    assert!(started.elapsed() < fleetd::provision::server::BODY_TIMEOUT, "at once, not after a join");
    assert!(!device.identity("cert.pem").exists(), "nothing stored");
    let status = device.status();
    assert_eq!(status["state"], "provisioning", "{status}");
    assert_eq!(status["last_error"], serde_json::Value::Null, "{status}");
    // The same without the Wi-Fi provisions the device.
    let out = provision(None, &url, &device.pop(), "127.0.0.1:8883", &pki.ca_pem, &args[..4]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    // The status shows the certificate's expiry; without a registrar the
    // device does not renew, so no renewal time.
    let expected =
        fleetd::provision::identity::certificate_validity(&std::fs::read_to_string(&cert).unwrap());
    device.wait_for("the identity in the status", Duration::from_secs(10), || {
        device.status()["identity"]["not_after"].as_u64() == expected.map(|(_, not_after)| not_after)
    });
    assert!(device.status()["identity"].get("renew_at").is_none(), "{}", device.status());
    device.stop();
}

/// `enroll` in place of `identity`: refused by name when it breaks a rule
/// (nothing stored), else accepted, and the device enrolls right after the
/// answer (backend none). A registrar that cannot be reached (nothing
/// listens at its address) sends it back to the portal with the reason at
/// `/api/v1/info` and in the status, as a failed Wi-Fi join does; the
/// claim is forgotten and never logged, and the portal takes a new request.
#[test]
fn an_enrollment_that_cannot_reach_its_registrar_returns_to_the_portal_by_name() {
    let (mut device, addr) = portal_device();
    let key = fleetd::provision::pop::Pop::parse(&device.pop()).unwrap().request_key(DEVICE);
    let client = PortalClient::new(&addr);
    let claim = "7K2M-9Q4R-XW3T-H8VN";
    let post = |body: serde_json::Value| {
        client.post_signed(&key, "/api/v1/provision", body.to_string().as_bytes()).unwrap()
    };
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    for (body, name) in [
        (
            serde_json::json!({"enroll": {"url": "http://192.0.2.1:8443", "claim": claim}}),
            "enroll-url-invalid",
        ),
        (
            serde_json::json!({"enroll": {"url": "http://127.0.0.1:1", "claim": "7K2M-9Q4R"}}),
            "claim-malformed",
        ),
        (serde_json::json!({"enroll": {"url": "https://registrar.example", "claim": claim}}), "pem-invalid"),
        (
            serde_json::json!({"mqtt": {"host": "b", "ca_pem": pem}, "identity": {"cert_pem": pem},
                "enroll": {"url": "http://127.0.0.1:1", "claim": claim}}),
            "identity-conflict",
        ),
        (serde_json::json!({"identity": {"cert_pem": pem}}), "mqtt-missing"),
    ] {
        let (status, answer) = post(body);
        assert_eq!((status, error_name(&answer)), (400, name.to_string()), "{answer}");
    }
    assert!(!device.g.path().join("state/enroll.json").exists(), "nothing stored");

    let url = format!("http://127.0.0.1:{}", free_port());
    let (status, answer) = post(serde_json::json!({"enroll": {"url": url, "claim": claim.to_lowercase()}}));
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("enrolling with the registrar"), "{answer}");
    let mut info = serde_json::Value::Null;
    device.wait_for("the enrollment to fail", Duration::from_secs(90), || {
        let (_, text) = client.call("GET", "/api/v1/info", None).unwrap();
        info = serde_json::from_str(&text).unwrap_or_default();
        info["last_error"].is_string()
    });
    let reason = info["last_error"].as_str().unwrap();
    assert!(reason.starts_with("registrar-unreachable: "), "{info}");
    assert_eq!((&info["state"], &info["provisioned"]), (&"provisioning".into(), &false.into()), "{info}");
    let status = device.status();
    assert_eq!(status["state"], "provisioning", "{status}");
    assert!(
        status["last_error"].as_str().unwrap_or_default().starts_with("registrar-unreachable"),
        "{status}"
    );
    assert!(!device.g.path().join("state/enroll.json").exists(), "the used request is forgotten");
    assert!(!device.identity("cert.pem").exists());
    let log = device.log();
    assert!(log.contains("enrollment: registrar-unreachable"), "{log}");
    assert!(!log.to_uppercase().contains("7K2M"), "the claim is never logged:\n{log}");

    // Open again: the next request is taken.
    let (status, answer) = post(serde_json::json!({"enroll": {"url": url, "claim": claim}}));
    assert_eq!(status, 200, "{answer}");
    device.stop();
}

/// An image that names its registrar (`[provision] registrar`): the page
/// asks for the PoP, the Wi-Fi and a claim code only, and sends `{enroll:
/// {claim}}`; the device fills in the registrar from its config. Nothing
/// listens at that registrar's address (no fake registrar), so the page
/// ends by showing the named reason the device gives.
#[test]
fn the_portal_page_enrolls_with_a_claim_code_when_the_image_names_its_registrar() {
    let Some(browser) = common::webdriver::Browser::start() else {
        assert!(std::env::var_os("CI").is_none(), "CI must run the browser test (chromium, chromium-driver)");
        eprintln!("SKIP: needs chromium and chromium-driver (scripts/setup)");
        return;
    };
    let mut device = NewDevice::new("127.0.0.1:0");
    device.g.extra_config.push_str(&format!("registrar = \"http://127.0.0.1:{}\"\n", free_port()));
    device.g.write_config();
    device.start(None);
    let url = device.wait_portal();
    let pop = device.pop();
    browser.goto(&url);
    let shown = |b: &common::webdriver::Browser, id: &str| {
        b.execute(&format!("return !document.getElementById('{id}').hidden"), serde_json::json!([])) == true
    };
    browser.wait_until("the claim code", Duration::from_secs(10), |b| {
        shown(b, "enrollment") && shown(b, "claimbox")
    });
    assert!(!shown(&browser, "broker") && !shown(&browser, "identity"), "no broker or identity to give");

    let result = |b: &common::webdriver::Browser| b.text("#result");
    browser.type_into("#pop", &pop.to_lowercase());
    browser.type_into("#claim", "7k2m 9q4r-xw3t-h8vn");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("..");
    browser.screenshot(&shots.join("portal-claim.png"));
    browser.click("#submit");
    browser
        .wait_until("the outcome", Duration::from_secs(90), |b| result(b).starts_with("Enrollment failed"));
    assert!(
        result(&browser).starts_with("Enrollment failed: registrar-unreachable: "),
        "{}",
        result(&browser)
    );
    device.stop();
    let log = device.log();
    assert!(log.contains("enrolling with http://127.0.0.1:"), "{log}");
    assert!(!log.contains(&pop) && !log.to_uppercase().contains("7K2M"), "{log}");
}

/// A power cut after an enrollment was accepted: its request was stored
/// (0600: the claim is a secret) before the answer, so the next start makes
/// it again before opening the portal, and the outcome is shown there.
#[test]
fn an_enrollment_cut_short_is_made_again_at_the_next_start() {
    let (mut device, addr) = portal_device();
    let key = fleetd::provision::pop::Pop::parse(&device.pop()).unwrap().request_key(DEVICE);
    let client = PortalClient::new(&addr);
    let body = serde_json::json!({"enroll": {"url": format!("http://127.0.0.1:{}", free_port()),
        "claim": "7K2M-9Q4R-XW3T-H8VN"}});
    let (status, answer) =
        client.post_signed(&key, "/api/v1/provision", body.to_string().as_bytes()).unwrap();
    assert_eq!(status, 200, "{answer}");
    if let Some(mut daemon) = device.daemon.take() {
        daemon.signal(libc::SIGKILL);
    }
    let pending = device.g.path().join("state/enroll.json");
    assert_eq!(std::fs::metadata(&pending).unwrap().permissions().mode() & 0o777, 0o600);

    device.start(None);
    device.wait_for("the enrollment made again", Duration::from_secs(90), || {
        device.log().contains("resuming the enrollment") && device.status()["last_error"].is_string()
    });
    wait_answering(&device, &addr);
    let (_, info) = client.call("GET", "/api/v1/info", None).unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(info["last_error"].as_str().unwrap_or_default().starts_with("registrar-unreachable"), "{info}");
    assert!(!pending.exists(), "forgotten once it ended");
    device.stop();
}
