//! `tracing` as the facade: `fleetd run` connected to a real mosquitto logs
//! rumqttc's `log` records into the journal (the test's stand-in socket)
//! with `RUST_LOG=debug`, and keeps them out at the default level.
//! Needs root (namespaces); without it the test skips, except under CI.

use crate::common::cloud::{Broker, Net, Pki};
use crate::common::gateway::{Bootloader, Gateway};
use crate::common::{can_run_netns, Daemon};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Entry = Vec<(String, String)>;

fn get<'a>(e: &'a Entry, key: &str) -> Option<&'a str> {
    e.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The datagrams one `fleetd run` sent, from its start until it stopped
/// once connected (rumqttc logs the goodbye's PUBLISH and DISCONNECT).
fn journal_of_a_run(g: &Gateway, net: &Net, rust_log: &str) -> Vec<Entry> {
    let path = g.path().join(format!("journal-{}", rust_log.len()));
    let journal = UnixDatagram::bind(&path).unwrap();
    journal.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let received = Arc::new(Mutex::new(Vec::<Entry>::new()));
    let (sink, stop) = (received.clone(), Arc::new(AtomicBool::new(false)));
    let stopping = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stopping.load(Ordering::Relaxed) {
            if let Ok(n) = journal.recv(&mut buf) {
                sink.lock().unwrap().push(fleetd::logging::decode(&buf[..n]).expect("native protocol"));
            }
        }
    });
    let log = g.path().join("fleetd.log");
    let env = [("FLEETD_JOURNAL_SOCKET", path.to_str().unwrap()), ("RUST_LOG", rust_log)];
    let mut daemon = Daemon::start(&g.dev.config(), Some(net), &env, &log);
    let deadline = Instant::now() + Duration::from_secs(20);
    let connected = || {
        received
            .lock()
            .unwrap()
            .iter()
            .any(|e| get(e, "MESSAGE").is_some_and(|m| m.starts_with("mqtt: connected")))
    };
    while !connected() {
        assert!(
            Instant::now() < deadline,
            "not connected:\n{}\n{:?}",
            daemon.log(),
            received.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.stop();
    std::thread::sleep(Duration::from_millis(200)); // the reader's last datagrams
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let entries = std::mem::take(&mut *received.lock().unwrap());
    entries
}

#[test]
fn rumqttc_reaches_the_journal_at_debug_only() {
    if !can_run_netns() {
        return;
    }
    let net = Net::new();
    let mut g = Gateway::new(Bootloader::Grub, 8 << 20);
    let pki = Pki::new(&g.path().join("pki"), net.cloud_ip());
    let broker =
        Broker::start(&net, &pki, &g.path().join("broker"), &[("gw-0042", "acme-gateways", "pilot")]);
    let (cert, key) = pki.client("gw-0042");
    let (host, port) = broker.url();
    g.extra_config = format!(
        "\n[mqtt]\nhost = \"{host}\"\nport = {port}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.ca_pem.display(),
        cert.display(),
        key.display()
    );
    g.write_config();

    let rumqttc = |entries: &[Entry]| -> Vec<Entry> {
        entries
            .iter()
            .filter(|e| get(e, "TARGET").is_some_and(|t| t.starts_with("rumqttc")))
            .cloned()
            .collect()
    };

    let debug = journal_of_a_run(&g, &net, "debug");
    let records = rumqttc(&debug);
    assert!(!records.is_empty(), "no rumqttc record at RUST_LOG=debug: {debug:?}");
    eprintln!("one rumqttc record in the journal: {:?}", records[0]);
    for e in &records {
        assert_eq!(get(e, "PRIORITY"), Some("7"), "{e:?}");
        assert_eq!(get(e, "SYSLOG_IDENTIFIER"), Some("fleetd"), "{e:?}");
        assert!(get(e, "MESSAGE").is_some_and(|m| !m.is_empty()), "{e:?}");
    }

    // An empty RUST_LOG is the default: [log] level = "info".
    let default = journal_of_a_run(&g, &net, "");
    assert!(rumqttc(&default).is_empty(), "rumqttc chatter at the default level: {default:?}");
    assert!(
        default.iter().all(|e| get(e, "PRIORITY").is_some_and(|p| p <= "6")),
        "debug records at the default level: {default:?}"
    );
}
