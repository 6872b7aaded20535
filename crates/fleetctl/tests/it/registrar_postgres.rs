//! The registrar on a real PostgreSQL server (a private cluster that the
//! test starts, tests/it/common/postgres.rs):
//! - every store check that runs on SQLite (`fleetd_registrar::testing`),
//!   rollouts' included;
//! - two `fleetctl registrar serve` instances sharing one database: 1,000
//!   concurrent enrollments of 500 devices (two claims each) spread over
//!   both leave exactly one active certificate per device, every other one
//!   superseded and in the CRL, and no serial issued twice.

use crate::common;
use common::postgres::Postgres;
use common::registrar::{Registrar, Setup};
use fleetd_core::provision::enroll::{ClaimCode, EnrollmentKey};
use fleetd_core::provision::identity::DeviceKey;
use fleetd_core::provision::pop::Pop;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

const DEVICES: usize = 500;
const CLAIMS_PER_DEVICE: usize = 2;

#[test]
fn every_store_check_holds_on_postgres() {
    let pg = Postgres::start(false);
    let url = pg.database("checks");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        use fleetd_registrar::testing;
        testing::check_import(&url).await;
        testing::check_claims(&url).await;
        testing::check_enroll(&url).await;
        testing::check_renew(&url).await;
        testing::check_login(&url).await;
        testing::check_bad_input(&url).await;
        testing::check_crl(&url).await;
        testing::check_rollouts(&url).await;
        // Last: it tampers with the trail.
        testing::check_audit(&url).await;
    });
}

/// A test PKI without namespaces: the issuing CA (keyCertSign, cRLSign).
fn issuing_ca(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let (cert, key) = fleetd_registrar::ca::test_ca::make_ca();
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert_path, key_path)
}

fn setup_on(
    dir: &std::path::Path,
    listen: SocketAddr,
    database: &str,
    ca: &(std::path::PathBuf, std::path::PathBuf),
) -> Setup {
    let (ca_cert, ca_key) = ca.clone();
    std::fs::create_dir_all(dir).unwrap();
    Setup {
        dir: dir.to_path_buf(),
        listen,
        database: database.to_string(),
        ca_cert: ca_cert.clone(),
        ca_key,
        mqtt: ("broker.test".into(), 8883, ca_cert),
        tls: None,
        on_crl_change: None,
        extra_top: String::new(),
        extra_ca: String::new(),
    }
}

fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    // Bounded by the registrar's own pool wait (30 s) plus the work.
    tcp.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        tcp,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(tcp);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    let body = rest.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

fn psql(pg: &Postgres, database: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([&pg.url(database), "-At", "-c", sql])
        .output()
        .expect("psql (postgresql-client)");
    assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn two_instances_on_one_postgres_issue_one_active_certificate_per_device() {
    let pg = Postgres::start(false);
    let url = pg.database("shared");
    let dir = tempfile::tempdir().unwrap();
    let listen = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (a_port, b_port) = (common::free_port(), common::free_port());
    let ca = issuing_ca(dir.path());
    let a = setup_on(&dir.path().join("a"), listen(a_port), &url, &ca);
    let b = setup_on(&dir.path().join("b"), listen(b_port), &url, &ca);
    a.write();
    a.add_user(None, "admin", "admin", "admin password 1");

    let pops: Vec<(String, Pop)> =
        (0..DEVICES).map(|i| (format!("pg-{i:04}"), Pop::generate().unwrap())).collect();
    let mut csv = String::from("serial,project,hardware,groups,pop_key\n");
    for (serial, pop) in &pops {
        csv.push_str(&format!(
            "{serial},acme,rpi4-gw,field,{}\n",
            EnrollmentKey::derive(pop, serial).to_text()
        ));
    }
    let out = a.import(None, &csv, &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));

    let ra = Registrar::start(&a, None);
    let rb = Registrar::start(&b, None);
    let token = ra.login("admin", "admin password 1");
    let addrs = [listen(a_port), listen(b_port)];

    // Two claims per device, taken from both instances; each device's
    // enrollment request made beforehand (its own key, CSR and MAC).
    let mut requests = Vec::with_capacity(DEVICES * CLAIMS_PER_DEVICE);
    for (i, (serial, pop)) in pops.iter().enumerate() {
        for k in 0..CLAIMS_PER_DEVICE {
            let (status, claim) =
                post(addrs[(i + k) % 2], "/v1/claims", Some(&token), &format!(r#"{{"serial":"{serial}"}}"#));
            assert_eq!(status, 200, "{claim}");
            let code = claim["claim"].as_str().unwrap().to_string();
            let csr = DeviceKey::generate().unwrap().csr_pem(serial).unwrap();
            let mac = EnrollmentKey::derive(pop, serial).mac(&ClaimCode::parse(&code).unwrap(), &csr);
            let body = serde_json::json!({"claim": code, "csr_pem": csr, "mac": mac}).to_string();
            requests.push((addrs[(i + k + 1) % 2], body));
        }
    }

    // All 1,000 at once, spread over both instances.
    let barrier = Arc::new(Barrier::new(requests.len()));
    let threads: Vec<_> = requests
        .into_iter()
        .map(|(addr, body)| {
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    barrier.wait();
                    post(addr, "/v1/enroll", None, &body)
                })
                .unwrap()
        })
        .collect();
    let answers: Vec<(u16, serde_json::Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let failed: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} refused, e.g. {:?}\n--- a\n{}\n--- b\n{}",
        failed.len(),
        answers.len(),
        failed.first(),
        ra.log_text(),
        rb.log_text()
    );

    // One active certificate per device; every serial issued once.
    let total = DEVICES * CLAIMS_PER_DEVICE;
    assert_eq!(psql(&pg, "shared", "SELECT count(*) FROM certificates"), total.to_string());
    assert_eq!(psql(&pg, "shared", "SELECT count(DISTINCT serial_hex) FROM certificates"), total.to_string());
    assert_eq!(
        psql(&pg, "shared", "SELECT count(*) FROM certificates WHERE state = 'active'"),
        DEVICES.to_string()
    );
    assert_eq!(
        psql(&pg, "shared", "SELECT count(*) FROM (SELECT device FROM certificates WHERE state = 'active' GROUP BY device HAVING count(*) <> 1) t"),
        "0"
    );
    assert_eq!(
        psql(&pg, "shared", "SELECT count(*) FROM certificates WHERE state = 'superseded'"),
        DEVICES.to_string()
    );
    // The serials the devices were handed are the ones recorded.
    let handed: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(_, a)| {
            let pem = a["cert_pem"].as_str().unwrap();
            let der = rustls_pemfile_cert(pem);
            hex_serial(&der)
        })
        .collect();
    assert_eq!(handed.len(), total, "a serial handed out twice");

    // The audit chain, appended by both instances at once, holds.
    let out = a.cli(None, &["audit", "--verify"], "");
    assert!(out.status.success(), "{}{}", common::stdout(&out), common::stderr(&out));
}

fn rustls_pemfile_cert(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("a certificate").to_vec()
}

/// The certificate's serial, from the DER (tbsCertificate's first INTEGER
/// after the version), as hex.
fn hex_serial(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).expect("a certificate");
    cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect()
}
