//! The cloud harness itself (tests/common/cloud.rs): namespaces, the veth
//! link, run_in_netns, and a real mosquitto with TLS client certificates and
//! per-device ACLs, exercised with the real mosquitto_pub/mosquitto_sub
//! (Debian's mosquitto-clients) running in the device namespace.
//!
//! Needs root; without it (or the tools) the tests skip with a message,
//! except under CI (`CI` set), where they fail.

use crate::common::cloud;

use cloud::{Broker, Net, Pki, BROKER_HOST, FLEET_SERVER};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const TOOLS: &[&str] = &["mosquitto", "mosquitto_pub", "mosquitto_sub", "curl", "stdbuf"];

fn update_topic(device: &str) -> String {
    format!("fleet/acme/devices/{device}/update")
}

/// A namespace pair, a PKI and a running broker, dropped in the right order.
struct Cloud {
    broker: Broker,
    pki: Pki,
    net: Net,
    _dir: tempfile::TempDir,
}

impl Cloud {
    fn start(groups: &[(&str, &str, &str)]) -> Option<Cloud> {
        if !cloud::available(TOOLS) {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let net = Net::new();
        let pki = Pki::new(&dir.path().join("pki"), net.cloud_ip());
        let broker = Broker::start(&net, &pki, &dir.path().join("broker"), groups);
        Some(Cloud { broker, pki, net, _dir: dir })
    }

    /// `program` with TLS options for identity `cn`: run in the device
    /// namespace, or in the cloud namespace for the fleet server.
    fn client(&self, program: &str, cn: &str, host: Option<&str>) -> Command {
        let (cert, key) = self.pki.client(cn);
        self.client_with(program, &cert, &key, host, cn == FLEET_SERVER)
    }

    fn client_with(
        &self,
        program: &str,
        cert: &std::path::Path,
        key: &std::path::Path,
        host: Option<&str>,
        in_cloud: bool,
    ) -> Command {
        let (ip, port) = self.broker.url();
        let mut cmd = if in_cloud { self.net.in_cloud("stdbuf") } else { self.net.in_device("stdbuf") };
        cmd.args(["-oL", "-eL", program, "-h", host.unwrap_or(&ip), "-p", &port.to_string()])
            .arg("--cafile")
            .arg(&self.pki.ca_pem)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key);
        cmd
    }

    /// Publishes as `cn`, asserting mosquitto_pub succeeded.
    fn publish(&self, cn: &str, topic: &str, message: &str, qos: &str) {
        let out =
            run_for(self.client("mosquitto_pub", cn, None).args(["-t", topic, "-m", message, "-q", qos]));
        assert!(
            out.status.success(),
            "publish as {cn} on {topic}: {}\nbroker log:\n{}",
            text(&out),
            self.broker.log()
        );
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs a client with a hard 20 s limit (kill on expiry; `-W` is the
/// clients' own, gentler limit).
fn run_for(cmd: &mut Command) -> Output {
    let child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(out) => out.expect("wait client"),
        Err(_) => {
            // SAFETY: kill(2) on the child spawned above, still unreaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} still ran after 20 s");
        }
    }
}

/// A running mosquitto_sub (`-d -v`): its output, line by line.
struct Sub {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Sub {
    fn spawn(cmd: &mut Command) -> Sub {
        let mut child = cmd
            .arg("-d")
            .arg("-v")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto_sub");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Sub { child, lines, seen: Vec::new() }
    }

    /// The next line matching `want`, or None after `timeout` or at the end.
    fn wait_for(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits for the SUBACK of all `n` subscriptions (one SUBSCRIBE each).
    fn subscribed(&mut self, n: usize, broker: &Broker) {
        for _ in 0..n {
            let ack = self.wait_for(Duration::from_secs(10), |l| l.starts_with("Subscribed (mid"));
            assert!(ack.is_some(), "no SUBACK; client said:\n{}\nbroker log:\n{}", self.said(), broker.log());
        }
    }

    /// The next application message as "topic payload".
    fn message(&mut self, timeout: Duration) -> Option<String> {
        self.wait_for(timeout, |l| l.starts_with("fleet/"))
    }

    fn said(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pki_writes_pkcs8_keys_0600_and_a_broker_certificate_with_ip_and_dns_names() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "10.231.7.1".parse().unwrap());
    let (cert, key) = pki.client("gw-0042");
    let (fcert, fkey) = pki.foreign_client("gw-0042");
    for key in [&key, &fkey, &pki.broker_key] {
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
        assert!(std::fs::read_to_string(key).unwrap().starts_with("-----BEGIN PRIVATE KEY-----\n"));
    }
    for cert in [&cert, &fcert, &pki.broker_cert, &pki.ca_pem, &pki.foreign_ca_pem] {
        assert!(std::fs::read_to_string(cert).unwrap().starts_with("-----BEGIN CERTIFICATE-----\n"));
    }
    assert_ne!(std::fs::read(&cert).unwrap(), std::fs::read(&fcert).unwrap());
    // Cross-check with OpenSSL when it is here (it is not a dependency).
    let Some(openssl) = cloud::find_tool("openssl") else {
        eprintln!("openssl not found: PEM shape checked only");
        return;
    };
    let show = |path: &std::path::Path| {
        let out = Command::new(&openssl).args(["x509", "-noout", "-text", "-in"]).arg(path).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let broker = show(&pki.broker_cert);
    assert!(broker.contains("IP Address:10.231.7.1"), "{broker}");
    assert!(broker.contains(&format!("DNS:{BROKER_HOST}")), "{broker}");
    assert!(broker.contains("TLS Web Server Authentication"), "{broker}");
    assert!(broker.contains("ASN1 OID: prime256v1"), "{broker}");
    let client = show(&cert);
    assert!(client.contains("Subject: CN=gw-0042") || client.contains("Subject: CN = gw-0042"), "{client}");
    assert!(client.contains("TLS Web Client Authentication"), "{client}");
    let verify = |ca: &std::path::Path, cert: &std::path::Path| {
        Command::new(&openssl)
            .arg("verify")
            .arg("-CAfile")
            .arg(ca)
            .arg(cert)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(verify(&pki.ca_pem, &cert));
    assert!(verify(&pki.ca_pem, &pki.broker_cert));
    assert!(!verify(&pki.ca_pem, &fcert), "the foreign client must not chain to the CA");
    assert!(verify(&pki.foreign_ca_pem, &fcert));
}

#[test]
fn run_in_netns_serves_http_in_the_cloud_namespace_to_the_device() {
    if !cloud::available(&["curl"]) {
        return;
    }
    let net = Net::new();
    let cloud_ip = net.cloud_ip();
    // The cloud address exists only inside the cloud namespace.
    let err = TcpListener::bind((cloud_ip, 0)).expect_err("the cloud address must not exist here");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrNotAvailable, "{err}");
    let listener = cloud::run_in_netns(net.cloud_ns(), move || TcpListener::bind((cloud_ip, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    // Served from an ordinary thread: the socket stays in the namespace.
    let server = std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..2 {
            let (mut stream, peer) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "request cut short");
                request.extend_from_slice(&buf[..n]);
            }
            let body = format!("hello {}", peer.ip());
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            peers.push(peer);
        }
        peers
    });
    let out = net
        .in_device("curl")
        .args(["-sS", "--max-time", "10", &format!("http://{addr}/")])
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("hello {}", net.device_ip()));
    // And from a second run_in_netns thread, in the device namespace.
    let reply = cloud::run_in_netns(net.device_ns(), move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    });
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.ends_with(&format!("hello {}", net.device_ip())), "{reply}");
    let peers = server.join().unwrap();
    assert!(peers.iter().all(|p| p.ip() == net.device_ip()), "{peers:?}");
    // A panic inside the namespace thread reaches the caller.
    let caught = std::panic::catch_unwind(|| cloud::run_in_netns(net.device_ns(), || panic!("inside")));
    assert!(caught.is_err());
}

#[test]
fn a_device_receives_a_qos1_update_from_the_fleet_server() {
    let Some(c) = Cloud::start(&[]) else { return };
    // By name this time: broker.test resolves in the namespaces and is in the certificate.
    let mut sub = Sub::spawn(c.client("mosquitto_sub", "gw-0042", Some(BROKER_HOST)).args([
        "-q",
        "1",
        "-t",
        &update_topic("gw-0042"),
    ]));
    sub.subscribed(1, &c.broker);
    c.publish(FLEET_SERVER, &update_topic("gw-0042"), "release-7", "1");
    let got = sub.message(Duration::from_secs(10));
    assert_eq!(got.as_deref(), Some("fleet/acme/devices/gw-0042/update release-7"), "{}", sub.said());
    let qos1 = sub.seen.iter().any(|l| l.contains("received PUBLISH (d0, q1"));
    assert!(qos1, "not delivered at QoS 1:\n{}", sub.said());
}

#[test]
fn a_device_never_receives_another_devices_update() {
    let Some(c) = Cloud::start(&[]) else { return };
    // Subscribing to the neighbour's topic is acknowledged (mosquitto 2.0)
    // but nothing is delivered; the device's own topic is the control.
    let mut sub = Sub::spawn(c.client("mosquitto_sub", "gw-0042", None).args([
        "-q",
        "1",
        "-t",
        &update_topic("gw-0043"),
        "-t",
        "fleet/+/devices/+/update",
        "-t",
        &update_topic("gw-0042"),
    ]));
    sub.subscribed(1, &c.broker);
    c.publish(FLEET_SERVER, &update_topic("gw-0043"), "not-for-you", "1");
    c.publish(FLEET_SERVER, &update_topic("gw-0042"), "yours", "1");
    // In order from one publisher: were the first delivered, it came first.
    let first = sub.message(Duration::from_secs(10));
    assert_eq!(first.as_deref(), Some("fleet/acme/devices/gw-0042/update yours"), "{}", sub.said());
    c.publish(FLEET_SERVER, &update_topic("gw-0043"), "still-not-for-you", "1");
    let leaked = sub.wait_for(Duration::from_secs(2), |l| l.contains("not-for-you"));
    assert_eq!(leaked, None, "{}", sub.said());
}

#[test]
fn a_group_update_reaches_members_only_and_devices_publish_only_their_own_status() {
    let Some(c) = Cloud::start(&[("gw-0042", "acme", "canary")]) else { return };
    let group = "fleet/acme/groups/canary/update";
    let mut member = Sub::spawn(c.client("mosquitto_sub", "gw-0042", None).args(["-q", "1", "-t", group]));
    let mut other = Sub::spawn(c.client("mosquitto_sub", "gw-0043", None).args(["-q", "1", "-t", group]));
    let mut fleet =
        Sub::spawn(c.client("mosquitto_sub", FLEET_SERVER, None).args(["-q", "1", "-t", "fleet/#"]));
    for sub in [&mut member, &mut other, &mut fleet] {
        sub.subscribed(1, &c.broker);
    }
    c.publish(FLEET_SERVER, group, "canary-9", "1");
    assert_eq!(member.message(Duration::from_secs(10)).as_deref(), Some(&*format!("{group} canary-9")));
    assert_eq!(fleet.message(Duration::from_secs(10)).as_deref(), Some(&*format!("{group} canary-9")));
    // A device writes its own status, never a neighbour's, never an update.
    c.publish("gw-0043", "fleet/acme/devices/gw-0042/status", "forged", "1");
    c.publish("gw-0043", &update_topic("gw-0042"), "forged-update", "1");
    c.publish("gw-0043", "fleet/acme/devices/gw-0043/status", "idle", "1");
    let got = fleet.message(Duration::from_secs(10));
    assert_eq!(got.as_deref(), Some("fleet/acme/devices/gw-0043/status idle"), "{}", fleet.said());
    assert_eq!(other.message(Duration::from_secs(2)), None, "{}", other.said());
}

#[test]
fn a_client_certificate_from_a_foreign_ca_is_refused() {
    let Some(c) = Cloud::start(&[]) else { return };
    let status = "fleet/acme/devices/gw-0042/status";
    // Same CN as a real device, wrong issuer. mosquitto_pub names the TLS
    // failure in one of three ways, depending on when the broker's alert
    // arrives ("... alert unknown ca", "Protocol error", "connection was
    // lost"); it never gets as far as an MQTT CONNACK.
    let (cert, key) = c.pki.foreign_client("gw-0042");
    let out = run_for(
        c.client_with("mosquitto_pub", &cert, &key, None, false).args(["-d", "-t", status, "-m", "x"]),
    );
    let said = text(&out);
    assert!(!out.status.success(), "a foreign certificate got in:\n{said}");
    let named = ["unknown ca", "Protocol error", "The connection was lost"].iter().any(|m| said.contains(m));
    assert!(named, "the client should name the TLS failure:\n{said}");
    assert!(!said.contains("CONNACK"), "{said}");
    let log = c.broker.log();
    assert!(log.contains("certificate verify failed"), "{log}");
    // A TLS 1.2 handshake from the device namespace fails in the handshake
    // itself, with the broker's "unknown CA" alert.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.pki.ca_der()).unwrap();
    let (fcert, fkey) = c.pki.foreign_client_der("gw-0042");
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![fcert], fkey)
    .unwrap();
    let addr = SocketAddr::new(c.net.cloud_ip(), c.broker.url().1);
    let refused = cloud::run_in_netns(c.net.device_ns(), move || {
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let name = rustls::pki_types::ServerName::from(addr.ip());
        let mut tls = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut result = Ok(());
        while tls.is_handshaking() && result.is_ok() {
            result = tls.complete_io(&mut tcp).map(drop);
        }
        result
    });
    let err = refused.expect_err("the TLS 1.2 handshake succeeded with a foreign certificate");
    assert!(err.to_string().contains("UnknownCA"), "{err}");
    // The control: the same command with the CA's certificate gets in.
    let (cert, key) = c.pki.client("gw-0042");
    let out = run_for(
        c.client_with("mosquitto_pub", &cert, &key, None, false).args(["-d", "-t", status, "-m", "x"]),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("received CONNACK (0)"), "{}", text(&out));
}

#[test]
fn link_down_cuts_the_device_off_and_link_up_restores_it() {
    let Some(c) = Cloud::start(&[]) else { return };
    let status = "fleet/acme/devices/gw-0042/status";
    let publish = || {
        let started = Instant::now();
        let out =
            run_for(c.client("mosquitto_pub", "gw-0042", None).args(["-t", status, "-m", "up", "-q", "1"]));
        (out, started.elapsed())
    };
    let (out, _) = publish();
    assert!(out.status.success(), "before: {}", text(&out));
    c.net.link_down();
    let (out, took) = publish();
    assert!(!out.status.success(), "published with the link down:\n{}", text(&out));
    assert!(text(&out).contains("unreachable"), "{}", text(&out));
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The broker itself kept running; only the link was gone.
    assert!(c.broker.pid().is_some());
    c.net.link_up();
    let (out, _) = publish();
    assert!(out.status.success(), "after link_up: {}", text(&out));
}

#[test]
fn a_persistent_session_gets_a_qos1_message_published_while_offline_across_a_broker_crash() {
    let Some(mut c) = Cloud::start(&[]) else { return };
    let topic = update_topic("gw-0042");
    let session = |c: &Cloud| {
        Sub::spawn(c.client("mosquitto_sub", "gw-0042", None).args([
            "-c",
            "-i",
            "gw-0042-session",
            "-q",
            "1",
            "-t",
            &topic,
        ]))
    };
    let mut first = session(&c);
    first.subscribed(1, &c.broker);
    drop(first); // killed: the session stays on the broker
    c.publish(FLEET_SERVER, &topic, "sent-while-offline", "1");
    c.broker.wait_persisted(b"sent-while-offline", Duration::from_secs(10));
    let before = c.broker.pid();
    c.broker.kill();
    assert_eq!(c.broker.pid(), None);
    c.broker.restart();
    assert!(c.broker.pid().is_some() && c.broker.pid() != before);
    let mut again = session(&c);
    let got = again.message(Duration::from_secs(10));
    assert_eq!(got.as_deref(), Some(&*format!("{topic} sent-while-offline")), "{}", again.said());
    // The control: a clean session with another id gets nothing queued.
    let mut clean = Sub::spawn(c.client("mosquitto_sub", "gw-0042", None).args(["-q", "1", "-t", &topic]));
    clean.subscribed(1, &c.broker);
    assert_eq!(clean.message(Duration::from_secs(1)), None, "{}", clean.said());
}
