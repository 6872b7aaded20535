//! From the factory to the field with the registrar, end to end: a real
//! `fleetctl registrar serve` (SQLite, then a private PostgreSQL), a real
//! mosquitto checking the registrar's CRL, the device daemon with backend
//! `none` in its own namespace, and `fleetctl provision --registrar` as the
//! installer's phone.
//!
//! import → user → login → claim → provision → the device enrolls itself →
//! MQTT with the registrar's certificate and the registry's groups; then the
//! refusals (unknown serial, used claim, wrong MAC), a factory reset and a
//! second enrollment whose old certificate lands in the CRL, and the broker,
//! restarted by on_crl_change, refusing it while another device connects.
//! Needs root (namespaces); CI runs as root.

use crate::common;
use common::cloud::{Broker, Net, Pki};
use common::gateway::*;
use common::postgres::Postgres;
use common::registrar::{Registrar, Setup};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PROJECT: &str = "acme-gateways";
const DEVICE: &str = "gw-0042";
const SECOND: &str = "gw-0043";
const INSTALLER_PASSWORD: &str = "correct horse battery staple";
const ADMIN_PASSWORD: &str = "admin horse battery staple";

/// The device: backend none, its portal on the device side of the veth.
struct Field {
    g: Gateway,
    daemon: Option<Daemon>,
    log: PathBuf,
}

impl Field {
    fn new(listen: &str) -> Field {
        let mut g = Gateway::new(Bootloader::Grub, 1 << 20);
        g.extra_config = format!(
            "\n[mqtt]\nkeep_alive_s = 5\n\n[provision]\nbackend = \"none\"\nlisten = \"{listen}\"\nap_timeout_s = 600\n"
        );
        g.write_config();
        let log = g.path().join("fleetd.log");
        Field { g, daemon: None, log }
    }

    fn start(&mut self, net: &Net) {
        self.daemon = Some(Daemon::start(&self.g.dev.config(), Some(net), &[], &self.log));
    }

    fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pop(&self) -> String {
        let out = self.g.fleetd(&["status", "--pop"]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).lines().last().unwrap_or_default().to_string()
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n--- fleetd\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_portal(&self) -> String {
        let mut last = serde_json::Value::Null;
        self.wait_for("the portal", Duration::from_secs(20), || {
            last = self.g.status();
            last["state"] == "provisioning" && last["network"]["portal"].is_string()
        });
        last["network"]["portal"].as_str().unwrap().to_string()
    }

    fn connected(&self) -> bool {
        std::fs::read(self.g.path().join("state/connection.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|c| c["connected"] == true)
    }

    fn identity(&self, file: &str) -> PathBuf {
        self.g.path().join("state/identity").join(file)
    }
}

/// `fleetctl provision --registrar` as the installer, in the cloud namespace.
fn provision_with_registrar(
    net: &Net,
    portal: &str,
    pop: &str,
    registrar: &Setup,
    user: &str,
) -> std::process::Output {
    let mut cmd = net.in_cloud(fleetctl_bin());
    cmd.args(["provision", "--url", portal, "--pop", pop, "--registrar", &registrar.url(), "--registrar-ca"])
        .arg(&registrar.ca_cert)
        .args(["--user", user, "--serial", DEVICE, "--wait-s", "30"])
        .env("FLEETCTL_PASSWORD", INSTALLER_PASSWORD);
    run(&mut cmd)
}

/// A CSR for `cn` made by the test (a second device, or an attacker).
fn csr_for(cn: &str) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (csr, key)
}

/// Whether mosquitto lets `cert`/`key` connect (mosquitto_pub from the cloud side).
fn broker_accepts(net: &Net, broker: &Broker, ca: &Path, cert: &Path, key: &Path, topic: &str) -> bool {
    let (host, port) = broker.url();
    let out = net
        .in_cloud("mosquitto_pub")
        .args(["-h", &host, "-p", &port.to_string(), "--cafile"])
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["-t", topic, "-m", "{}", "-q", "1"])
        .output()
        .expect("mosquitto_pub");
    out.status.success()
}

/// The serials (hex, upper case, as openssl prints them) a CRL lists.
fn crl_serials(crl: &Path, ca: &Path) -> Vec<String> {
    let out = Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(crl)
        .arg("-CAfile")
        .arg(ca)
        .output()
        .expect("openssl crl");
    assert!(out.status.success(), "openssl crl: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("verify OK"),
        "the CRL's signature: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Serial Number: "))
        .map(|s| s.trim().to_ascii_uppercase())
        .collect()
}

fn cert_serial(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .expect("openssl x509");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.trim().strip_prefix("serial=").unwrap_or(&text).trim().to_ascii_uppercase()
}

/// A cloud namespace with the registrar (TLS, issuing with the test CA),
/// mosquitto checking its CRL, an installer and an admin, and the device in
/// its namespace with its registry row imported (groups canary and field)
/// beside a second device's row without pop_key.
struct World {
    net: Net,
    device: Field,
    dir: PathBuf,
    pki: Pki,
    setup: Setup,
    registrar: Registrar,
    broker: Broker,
}

impl World {
    fn new(database: impl FnOnce(&Path) -> String, extra_ca: &str) -> World {
        let net = Net::new();
        let device = Field::new(&format!("{}:8080", net.device_ip()));
        let dir = device.g.path().to_path_buf();
        let pki = Pki::new(&dir.join("pki"), net.cloud_ip());
        let listen = std::net::SocketAddr::new(net.cloud_ip(), 8443);
        let mut setup = Setup::new(
            &dir.join("registrar"),
            &pki,
            listen,
            database(&dir),
            (net.cloud_ip().to_string(), 8883),
        );
        setup.extra_ca = extra_ca.to_string();

        // on_crl_change reloads the broker as Debian's unit does
        // (`ExecReload=/bin/kill -HUP $MAINPID`); the registrar writes the
        // CRL first, since mosquitto refuses every client of a CA without one.
        let broker_pid = dir.join("mosquitto.pid");
        setup.on_crl_change = Some(format!("kill -HUP \"$(cat '{}')\"", broker_pid.display()));
        setup.write();
        setup.add_user(Some(&net), "installer", "installer", INSTALLER_PASSWORD);
        setup.add_user(Some(&net), "admin", "admin", ADMIN_PASSWORD);
        let registrar = Registrar::start(&setup, Some(&net));
        assert!(setup.crl_path().exists(), "serve writes the CRL at start\n{}", registrar.log_text());
        let broker = Broker::start_with_crl(
            &net,
            &pki,
            &dir.join("broker"),
            &[(DEVICE, PROJECT, "canary"), (DEVICE, PROJECT, "field")],
            Some(&setup.crl_path()),
        );
        std::fs::write(&broker_pid, broker.pid().expect("broker pid").to_string()).unwrap();

        // The factory: the device's row (its pop_key from its PoP), imported.
        let row = device.g.fleetd(&["factory-row", "--groups", "canary;field"]);
        assert!(row.status.success(), "{}", stderr(&row));
        let row = stdout(&row).trim().to_string();
        assert!(row.starts_with(&format!("{DEVICE},{PROJECT},")), "{row}");
        let csv =
            format!("serial,project,hardware,groups,pop_key\n{row}\n{SECOND},{PROJECT},rpi4-gw,field,\n");
        let out = setup.import(Some(&net), &csv, &[]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).contains("created"), "{}", stdout(&out));
        World { net, device, dir, pki, setup, registrar, broker }
    }

    /// The installer provisions the started device with a claim; it enrolls
    /// and connects. The PoP.
    fn provision(&mut self) -> String {
        let portal = self.device.wait_portal();
        let pop = self.device.pop();
        let out = provision_with_registrar(&self.net, &portal, &pop, &self.setup, "installer");
        assert!(
            out.status.success(),
            "{}{}\n--- fleetd\n{}\n--- registrar\n{}",
            stdout(&out),
            stderr(&out),
            self.device.log(),
            self.registrar.log_text()
        );
        self.device.wait_for("MQTT with the registrar's certificate", Duration::from_secs(60), || {
            self.device.connected()
        });
        pop
    }
}

/// The whole flow against the database `database` gives (SQLite or PostgreSQL).
fn whole_flow(database: impl FnOnce(&Path) -> String) {
    if !can_run_netns() {
        return;
    }
    let mut world = World::new(database, "");
    // An unknown serial: 403 serial-unknown, the designed backend's
    // "Invalid device serial number".
    let installer = world.registrar.login("installer", INSTALLER_PASSWORD);
    let (status, answer) = world.registrar.claim(&installer, "gw-9999");
    assert_eq!((status, answer["error"].as_str()), (403, Some("serial-unknown")), "{answer}");

    // The installer provisions the device with a claim; the device enrolls.
    world.device.start(&world.net);
    let pop = world.provision();
    let World { net, device, dir, pki, setup, registrar, broker } = &mut world;
    let (net, dir, pki, setup, registrar, broker) = (&*net, &*dir, &*pki, &*setup, &*registrar, &*broker);
    let status = device.g.status();
    assert_eq!(status["provisioned"], true, "{status}");
    let first_cert = dir.join("first-cert.pem");
    let first_key = dir.join("first-key.pem");
    std::fs::copy(device.identity("cert.pem"), &first_cert).unwrap();
    std::fs::copy(device.identity("key.pem"), &first_key).unwrap();
    let first_serial = cert_serial(&first_cert);
    assert!(status["identity"]["not_after"].as_u64().is_some(), "{status}");
    // The registry's groups, not the image's ("pilot"), are subscribed.
    let group_topic = format!("fleet/{PROJECT}/groups/canary/update");
    device.wait_for("the registry's group subscription", Duration::from_secs(20), || {
        broker.log().contains(&group_topic)
    });
    assert!(!broker.log().contains(&format!("fleet/{PROJECT}/groups/pilot/update")));

    let admin = registrar.login("admin", ADMIN_PASSWORD);
    let record = registrar.device(&admin, DEVICE);
    let active: Vec<_> =
        record["certificates"].as_array().unwrap().iter().filter(|c| c["state"] == "active").collect();
    assert_eq!(active.len(), 1, "{record}");

    // A used claim is refused. The claim is what the installer got: read
    // it back from the audit trail is not possible (stored by digest), so
    // get a fresh one, use it, and use it again.
    let (status, claim) = registrar.claim(&installer, SECOND);
    assert_eq!(status, 200, "{claim}");
    let code = claim["claim"].as_str().unwrap().to_string();
    let (second_csr, second_key) = csr_for(SECOND);
    let body = serde_json::json!({"claim": code, "csr_pem": second_csr}).to_string();
    let (status, second) = registrar.call("POST", "/v1/enroll", None, Some(&body));
    assert_eq!(status, 200, "{second}");
    let (status, again) = registrar.call("POST", "/v1/enroll", None, Some(&body));
    assert_eq!((status, again["error"].as_str()), (403, Some("claim-invalid")), "a used claim: {again}");
    let second_cert = dir.join("second.pem");
    let second_key_file = dir.join("second.key");
    std::fs::write(&second_cert, second["cert_pem"].as_str().unwrap()).unwrap();
    std::fs::write(&second_key_file, second_key.serialize_pem()).unwrap();

    // A claim with a wrong MAC (the device's row has a pop_key): refused,
    // and nothing issued.
    let (_, claim) = registrar.claim(&installer, DEVICE);
    let (csr, _) = csr_for(DEVICE);
    let body = serde_json::json!({"claim": claim["claim"], "csr_pem": csr, "mac": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}).to_string();
    let (status, answer) = registrar.call("POST", "/v1/enroll", None, Some(&body));
    assert_eq!((status, answer["error"].as_str()), (403, Some("claim-invalid")), "{answer}");
    let body = serde_json::json!({"claim": claim["claim"], "csr_pem": csr}).to_string();
    let (status, answer) = registrar.call("POST", "/v1/enroll", None, Some(&body));
    assert_eq!((status, answer["error"].as_str()), (403, Some("claim-invalid")), "no MAC: {answer}");
    assert_eq!(
        registrar.device(&admin, DEVICE)["certificates"].as_array().unwrap().len(),
        1,
        "nothing issued"
    );

    // Factory reset, a new claim: a new certificate, the old one in the CRL.
    device.stop();
    let out = device.g.fleetd(&["reset", "--factory"]);
    assert!(out.status.success(), "{}", stderr(&out));
    device.start(net);
    let portal = device.wait_portal();
    let reloads_before = broker.log().matches("Reloading config.").count();
    let out = provision_with_registrar(net, &portal, &pop, setup, "installer");
    assert!(out.status.success(), "{}{}\n{}", stdout(&out), stderr(&out), device.log());
    device.wait_for("MQTT with the new certificate", Duration::from_secs(60), || {
        device.connected() && cert_serial(&device.identity("cert.pem")) != first_serial
    });
    // The registrar gathers revocations for a second into one CRL.
    device.wait_for("the superseded certificate in the CRL", Duration::from_secs(20), || {
        crl_serials(&setup.crl_path(), &pki.ca_pem).contains(&first_serial)
    });
    let crl = crl_serials(&setup.crl_path(), &pki.ca_pem);
    assert!(!crl.contains(&cert_serial(&device.identity("cert.pem"))));
    let record = registrar.device(&admin, DEVICE);
    let states: Vec<_> = record["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states.iter().filter(|s| *s == "active").count(), 1, "{record}");

    // on_crl_change reloaded the broker: the old certificate is refused at
    // the handshake, the second device and the re-enrolled one connect.
    device.wait_for("the broker's reload", Duration::from_secs(20), || {
        broker.log().matches("Reloading config.").count() > reloads_before
    });
    let status_topic = |id: &str| format!("fleet/{PROJECT}/devices/{id}/status");
    assert!(
        !broker_accepts(net, broker, &pki.ca_pem, &first_cert, &first_key, &status_topic(DEVICE)),
        "the superseded certificate still connects\n{}",
        broker.log()
    );
    assert!(broker.log().contains("certificate verify failed"), "{}", broker.log());
    assert!(
        broker_accepts(net, broker, &pki.ca_pem, &second_cert, &second_key_file, &status_topic(SECOND)),
        "{}",
        broker.log()
    );
    device.wait_for("the re-enrolled device on MQTT", Duration::from_secs(60), || device.connected());

    // The audit trail holds it all and verifies.
    let out = setup.cli(Some(net), &["audit", "--verify"], "");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = setup.cli(Some(net), &["audit"], "");
    let actions: Vec<String> =
        stdout(&out).lines().filter_map(|l| l.split_whitespace().nth(3).map(str::to_string)).collect();
    for action in ["user-add", "import", "login", "claim", "enroll", "enroll-refused"] {
        assert!(actions.iter().any(|a| a == action), "{action} not audited:\n{}", stdout(&out));
    }
    device.stop();
    let log = device.log();
    assert!(!log.contains(&pop) && !log.contains(&pop.replace('-', "")), "the PoP in the log");
}

#[test]
fn sqlite_factory_to_field_and_revocation_reaches_the_broker() {
    whole_flow(Setup::sqlite);
}

#[test]
fn postgres_factory_to_field_and_revocation_reaches_the_broker() {
    if !can_run_netns() {
        return;
    }
    let pg = Postgres::start(false);
    pg.database("registrar");
    let url = pg.socket_url("registrar");
    whole_flow(move |_| url);
    drop(pg);
}

/// Renewal end to end: certificates of 60 s, renewed by the running daemon
/// at two thirds of their life with a new key, over one reconnect that keeps
/// the MQTT session; then the device is revoked, and its next renewal is
/// refused by name and reported, and renewing stops.
#[test]
fn the_daemon_renews_before_expiry_over_one_reconnect_and_a_revoked_device_is_refused() {
    if !can_run_netns() {
        return;
    }
    const LIFE: Duration = Duration::from_secs(60);
    let mut world = World::new(Setup::sqlite, &format!("validity_s = {}\n", LIFE.as_secs()));
    world.device.start(&world.net);
    world.provision();
    let World { net, device, setup, registrar, broker, .. } = &world;
    let first_serial = cert_serial(&device.identity("cert.pem"));
    let first_key = std::fs::read(device.identity("key.pem")).unwrap();
    let status = device.g.status();
    let (not_after, renew_at) =
        (status["identity"]["not_after"].as_u64().unwrap(), status["identity"]["renew_at"].as_u64().unwrap());
    assert!(renew_at < not_after && renew_at > now(), "{status}");
    let connects = |b: &Broker| b.log().matches(&format!("as {DEVICE} (")).count();
    let connects_before = connects(broker);

    // Renewed before the old certificate expires: a new serial, a new key.
    device.wait_for("the renewal", LIFE, || {
        std::fs::read_to_string(device.identity("cert.pem"))
            .is_ok_and(|_| cert_serial(&device.identity("cert.pem")) != first_serial)
    });
    assert!(now() < not_after, "renewed only after expiry");
    assert_ne!(std::fs::read(device.identity("key.pem")).unwrap(), first_key, "a new key");
    device.wait_for("the reconnection with the new certificate", Duration::from_secs(20), || {
        device.connected() && connects(broker) > connects_before
    });
    // One reconnect, and the broker kept the session (CONNACK's session
    // present flag is 1).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(connects(broker), connects_before + 1, "{}", broker.log());
    assert!(broker.log().contains(&format!("Sending CONNACK to {DEVICE} (1, 0)")), "{}", broker.log());
    let admin = registrar.login("admin", ADMIN_PASSWORD);
    let record = registrar.device(&admin, DEVICE);
    let states: Vec<&str> =
        record["certificates"].as_array().unwrap().iter().map(|c| c["state"].as_str().unwrap()).collect();
    assert_eq!(states.iter().filter(|s| **s == "active").count(), 1, "{record}");
    assert_eq!(states.iter().filter(|s| **s == "superseded").count(), 1, "{record}");

    // Revoked: the next renewal is refused by name, reported, and not retried.
    let out = setup.cli(Some(net), &["revoke", DEVICE], "");
    assert!(out.status.success(), "{}", stderr(&out));
    device.wait_for("the refused renewal in the status", LIFE, || {
        device.g.status()["identity"]["last_renewal_error"].as_str().is_some_and(|e| e.contains("revoked"))
    });
    let status = device.g.status();
    assert!(status["last_error"].as_str().is_some_and(|e| e.contains("revoked")), "{status}");
    let out = setup.cli(Some(net), &["audit"], "");
    let refusals = stdout(&out).lines().filter(|l| l.contains("renew-refused")).count();
    assert_eq!(refusals, 1, "{}", stdout(&out));
    assert!(device.log().contains("revoked"), "{}", device.log());
}

/// The installer's phone, without an app, in headless Chromium at a phone's
/// viewport: the registrar's installer page (log in, the serial, the claim
/// code and its QR code), then the device's portal of an image that names
/// its registrar (PoP, no Wi-Fi on a wired device, the claim code); the
/// device enrolls and connects to mosquitto with the registrar's
/// certificate. Everything on loopback (plain HTTP is allowed there).
/// Screenshots: target/registrar-claim.png, target/portal-claim.png,
/// target/portal-enrolled.png.
#[test]
fn a_phone_gets_a_claim_code_from_the_installer_page_and_enrolls_the_device_at_its_portal() {
    let Some(browser) = common::webdriver::Browser::start() else {
        assert!(std::env::var_os("CI").is_none(), "CI must run the browser test (chromium, chromium-driver)");
        eprintln!("SKIP: needs chromium and chromium-driver (scripts/setup)");
        return;
    };
    let localhost: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let registrar_addr = std::net::SocketAddr::new(localhost, free_port());
    let broker_port = free_port();
    let mut device = Field::new("127.0.0.1:0");
    device.g.extra_config.push_str(&format!("registrar = \"http://{registrar_addr}\"\n"));
    device.g.write_config();
    let dir = device.g.path().to_path_buf();
    let pki = Pki::new(&dir.join("pki"), localhost);
    let setup = Setup::new(
        &dir.join("registrar"),
        &pki,
        registrar_addr,
        Setup::sqlite(&dir),
        ("127.0.0.1".into(), broker_port),
    );
    setup.write();
    setup.add_user(None, "installer", "installer", INSTALLER_PASSWORD);
    let row = device.g.fleetd(&["factory-row", "--groups", "canary"]);
    let csv = format!("serial,project,hardware,groups,pop_key\n{}", stdout(&row));
    let out = setup.import(None, &csv, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let registrar = Registrar::start(&setup, None);
    let broker = Broker::start_local(
        &pki,
        &dir.join("broker"),
        broker_port,
        &[(DEVICE, PROJECT, "canary")],
        Some(&setup.crl_path()),
    );
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("..");

    // The installer page: log in, type the serial, get the code.
    browser.goto(&format!("{}/", registrar.url));
    browser.type_into("#user", "installer");
    browser.type_into("#password", INSTALLER_PASSWORD);
    browser.click("#login");
    browser.wait_until("the serial field", Duration::from_secs(10), |b| {
        b.execute(
            "return !document.getElementById('claim-section').classList.contains('hidden')",
            serde_json::json!([]),
        ) == true
    });
    browser.type_into("#serial", "gw-9999");
    browser.click("#claim-request");
    browser
        .wait_until("the refusal", Duration::from_secs(10), |b| b.text("#error").contains("serial-unknown"));
    browser.type_into("#serial", DEVICE);
    browser.click("#claim-request");
    browser.wait_until("the claim code", Duration::from_secs(10), |b| b.text("#claim-code").len() == 19);
    let code = browser.text("#claim-code");
    assert!(
        browser.execute("return document.querySelector('#claim-qr svg') !== null", serde_json::json!([]))
            == true,
        "a QR code"
    );
    browser.full_page_screenshot(&shots.join("registrar-claim.png"));

    // The device's portal: the PoP and the claim code (a wired device has
    // no Wi-Fi to give).
    device.daemon = Some(Daemon::start(&device.g.dev.config(), None, &[], &device.log));
    let portal = device.wait_portal();
    let pop = device.pop();
    browser.goto(&portal);
    browser.wait_until("the claim box", Duration::from_secs(10), |b| {
        b.execute("return !document.getElementById('claimbox').hidden", serde_json::json!([])) == true
    });
    browser.type_into("#pop", &pop);
    browser.type_into("#claim", &code.to_lowercase().replace('-', " "));
    browser.full_page_screenshot(&shots.join("portal-claim.png"));
    browser.click("#submit");
    browser
        .wait_until("the enrollment", Duration::from_secs(60), |b| b.text("#result").starts_with("Enrolled"));
    browser.screenshot(&shots.join("portal-enrolled.png"));
    device.wait_for("MQTT with the registrar's certificate", Duration::from_secs(60), || device.connected());
    assert!(broker.log().contains(&format!("u'{DEVICE}'")), "{}", broker.log());
    assert_eq!(device.g.status()["groups"], serde_json::json!(["canary"]));
    device.stop();
    let log = device.log();
    assert!(!log.contains(&pop) && !log.contains(&code), "a secret in the log:\n{log}");
}
