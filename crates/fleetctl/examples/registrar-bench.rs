//! Enrollments per second and `/v1/enroll` latency of a real
//! `fleetctl registrar serve` (scripts/bench-registrar runs it on SQLite and
//! on PostgreSQL). Not a test: it measures and prints.
//!
//! `registrar-bench --fleetctl PATH --database URL [--devices N] [--concurrency C]`
//!
//! It makes an issuing CA, a registrar.toml on a loopback port, an admin,
//! and N registry rows with pop_keys; starts the registrar; takes one claim
//! per device; makes every CSR and MAC beforehand; then enrolls all N devices
//! from C client threads (one connection per request, as devices do) and
//! prints throughput and latency percentiles.

use fleetd_core::provision::enroll::{ClaimCode, EnrollmentKey};
use fleetd_core::provision::identity::DeviceKey;
use fleetd_core::provision::pop::Pop;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    fleetctl: PathBuf,
    database: String,
    devices: usize,
    concurrency: usize,
}

fn args() -> Args {
    let mut a = Args { fleetctl: PathBuf::new(), database: String::new(), devices: 2000, concurrency: 50 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--fleetctl" => a.fleetctl = value.into(),
            "--database" => a.database = value,
            "--devices" => a.devices = value.parse().expect("--devices N"),
            "--concurrency" => a.concurrency = value.parse().expect("--concurrency C"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!a.database.is_empty() && a.fleetctl.is_file(), "--fleetctl PATH --database URL");
    a
}

fn main() {
    let args = args();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_setup(dir.path(), &args.database);

    let t = Instant::now();
    let pops: Vec<(String, Pop)> =
        (0..args.devices).map(|i| (format!("bench-{i:06}"), Pop::generate().expect("rng"))).collect();
    let mut csv = String::from("serial,project,hardware,groups,pop_key\n");
    for (serial, pop) in &pops {
        csv.push_str(&format!(
            "{serial},bench,rpi4-gw,field,{}\n",
            EnrollmentKey::derive(pop, serial).to_text()
        ));
    }
    std::fs::write(dir.path().join("rows.csv"), csv).expect("csv");
    cli(&args.fleetctl, &config, &["user", "add", "admin", "--role", "admin"], "bench password 123\n");
    let import = Instant::now();
    cli(&args.fleetctl, &config, &["import", dir.path().join("rows.csv").to_str().expect("path")], "");
    let import_s = import.elapsed().as_secs_f64();

    let mut server = serve(&args.fleetctl, &config, dir.path());
    let addr: SocketAddr = LISTEN.parse().expect("addr");
    let (status, body) = post(addr, "/v1/login", None, r#"{"user":"admin","password":"bench password 123"}"#);
    assert_eq!(status, 200, "login: {body}");
    let token = json(&body)["token"].as_str().expect("token").to_string();

    // One claim per device, then each device's request, made beforehand.
    let claims = Instant::now();
    let requests: Vec<String> = pops
        .iter()
        .map(|(serial, pop)| {
            let (status, body) =
                post(addr, "/v1/claims", Some(&token), &format!(r#"{{"serial":"{serial}"}}"#));
            assert_eq!(status, 200, "claim: {body}");
            let code = json(&body)["claim"].as_str().expect("claim").to_string();
            let claim = ClaimCode::parse(&code).expect("claim code");
            let csr = DeviceKey::generate().expect("key").csr_pem(serial).expect("csr");
            let mac = EnrollmentKey::derive(pop, serial).mac(&claim, &csr);
            serde_json::json!({"claim": code, "csr_pem": csr, "mac": mac}).to_string()
        })
        .collect();
    let claims_s = claims.elapsed().as_secs_f64();
    eprintln!("prepared {} devices in {:.1} s", args.devices, t.elapsed().as_secs_f64());

    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.devices)));
    let start = Instant::now();
    let threads: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (requests, next, latencies) = (requests.clone(), next.clone(), latencies.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = requests.get(i) else { return };
                let t = Instant::now();
                let (status, answer) = post(addr, "/v1/enroll", None, body);
                let took = t.elapsed();
                assert_eq!(status, 200, "enroll: {answer}");
                latencies.lock().unwrap_or_else(|e| e.into_inner()).push(took);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let total = start.elapsed().as_secs_f64();
    stop(&mut server);

    let mut l = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    l.sort();
    let pct = |p: f64| l[((l.len() as f64 * p).ceil() as usize).saturating_sub(1).min(l.len() - 1)];
    let backend = args.database.split(':').next().unwrap_or("?");
    println!(
        "{backend}: {} enrollments from {} clients in {total:.2} s: {:.0}/s; /v1/enroll p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; import {} rows {import_s:.2} s; claims {:.0}/s (sequential, with CSR making)",
        l.len(),
        args.concurrency,
        l.len() as f64 / total,
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(*l.last().expect("a latency")),
        args.devices,
        args.devices as f64 / claims_s,
    );
}

const LISTEN: &str = "127.0.0.1:18443";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn write_setup(dir: &Path, database: &str) -> PathBuf {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "bench issuing CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("CA");
    std::fs::write(dir.join("ca.pem"), cert.pem()).expect("ca");
    write_private(&dir.join("ca.key.pem"), &key.serialize_pem());
    let config = dir.join("registrar.toml");
    let text = format!(
        "listen = \"{LISTEN}\"\ndatabase = \"{database}\"\npublic_url = \"http://{LISTEN}\"\ncrl_file = \"{crl}\"\n\n[ca]\ncert = \"{ca}\"\nkey = \"{key}\"\n\n[mqtt]\nhost = \"broker.example.com\"\nport = 8883\nca_file = \"{ca}\"\n",
        crl = dir.join("crl.pem").display(),
        ca = dir.join("ca.pem").display(),
        key = dir.join("ca.key.pem").display(),
    );
    std::fs::write(&config, text).expect("config");
    config
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("key");
    f.write_all(text.as_bytes()).expect("key");
}

fn cli(fleetctl: &Path, config: &Path, args: &[&str], stdin: &str) {
    let (sub, rest) = args.split_first().expect("subcommand");
    let mut cmd = Command::new(fleetctl);
    cmd.args(["registrar", sub]);
    if *sub == "user" {
        cmd.arg(rest[0]).arg("--config").arg(config).args(&rest[1..]);
    } else {
        cmd.arg("--config").arg(config).args(rest);
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).spawn().expect("fleetctl");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("stdin");
    assert!(child.wait().expect("fleetctl").success(), "fleetctl registrar {args:?}");
}

fn serve(fleetctl: &Path, config: &Path, dir: &Path) -> Child {
    let log = dir.join("serve.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut child = Command::new(fleetctl)
        .args(["registrar", "serve", "--config"])
        .arg(config)
        .stderr(file)
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("registrar: listening on") {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited ({status}):\n{text}");
        }
        assert!(Instant::now() < deadline, "serve not listening:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: &mut Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        tcp,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut reader = BufReader::new(tcp);
    let mut line = String::new();
    reader.read_line(&mut line).expect("status");
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    (status, rest.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}
