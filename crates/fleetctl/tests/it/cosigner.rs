//! The co-signer service end to end on loopback: register → sign → cosign →
//! `fleetd verify` accepts; revoke → refused (403) and nothing audited.

use crate::common;
use common::*;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

struct Cosigner {
    child: Child,
    url: String,
    config: PathBuf,
    audit: PathBuf,
}

impl Drop for Cosigner {
    fn drop(&mut self) {
        // Under strace the service is the child's child: stop it first, or a
        // killed strace leaves it running (and holding our output pipe).
        let pid = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for grandchild in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: signalling a process this test started.
            unsafe { libc::kill(grandchild, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_cosigner(d: &Device, per_minute: u32, burst: u32) -> Cosigner {
    let config = d.path().join("cosigner.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nkey = \"keys/cosigner.key.pem\"\nstate_dir = \"cosigner-state\"\n\
             projects = [\"acme-gateways\"]\nmax_validity_s = 86400\n\
             rate_limit_per_minute = {per_minute}\nrate_limit_burst = {burst}\n"
        ),
    )
    .unwrap();
    restart_cosigner(d, &config)
}

fn register(d: &Device, c: &Cosigner, server: &str) {
    ok(fleetctl().args(["keygen", "--out"]).arg(d.keys()).args(["--name", server]));
    ok(fleetctl()
        .args(["cosigner", "register", "--config"])
        .arg(&c.config)
        .arg("--key")
        .arg(d.keys().join(format!("{server}.pub.pem")))
        .arg(server));
}

/// `fleetctl cosigner request`: Ok(path of the answer) or Err(stderr).
fn request(c: &Cosigner, file: &Path) -> Result<PathBuf, String> {
    let out_path = file.with_extension("cosigned.json");
    let out =
        run(fleetctl().args(["cosigner", "request", "--url", &c.url, "--out"]).arg(&out_path).arg(file));
    if out.status.success() {
        Ok(out_path)
    } else {
        Err(stderr(&out))
    }
}

fn all_audit_lines(c: &Cosigner) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&c.audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The signings in the audit log.
fn audit_lines(c: &Cosigner) -> Vec<serde_json::Value> {
    all_audit_lines(c).into_iter().filter(|l| l["outcome"] == "signed").collect()
}

fn refusal_lines(c: &Cosigner) -> Vec<serde_json::Value> {
    all_audit_lines(c).into_iter().filter(|l| l["outcome"] == "refused").collect()
}

#[test]
fn register_sign_cosign_verify_then_revoke() {
    let d = Device::new();
    let c = start_cosigner(&d, 600, 20);
    register(&d, &c, "fs1");

    let server_signed = d.sign("m1", "fs1", "server:fs1", &["--valid-for", "3600"]);
    // The server signature alone is not enough for a device.
    assert!(d.verify(&server_signed, false).1.starts_with("rejected: kid-unknown"));

    let cosigned = request(&c, &server_signed).expect("co-signed");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cosigned).unwrap()).unwrap();
    assert_eq!(v["signatures"].as_array().unwrap().len(), 1, "server signature replaced");
    assert!(d
        .verify(&cosigned, false)
        .1
        .starts_with("rejected: signature-missing: no signature by required key \"fleet\""));

    let full = d.cosign(&cosigned, "fleet", "fleet");
    let (code, out) = d.verify(&full, false);
    assert_eq!((code, out.trim()), (0, "accepted: 2026.11.1 v8"));

    let audit = audit_lines(&c);
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["server"], "fs1");
    assert_eq!(audit[0]["version"], 8);

    // Revocation applies to the very next request, with the service still running.
    ok(fleetctl().args(["cosigner", "revoke", "--config"]).arg(&c.config).arg("fs1"));
    let again = d.sign("m2", "fs1", "server:fs1", &["--valid-for", "3600"]);
    let err = request(&c, &again).unwrap_err();
    assert!(err.contains("(403)") && err.contains("revoked"), "{err}");
    assert_eq!(audit_lines(&c).len(), 1, "no new signing in the audit log");
}

#[test]
fn refusals_are_json_errors_with_4xx() {
    let d = Device::new();
    let c = start_cosigner(&d, 600, 20);
    register(&d, &c, "fs1");
    ok(fleetctl().args(["keygen", "--out"]).arg(d.keys()).args(["--name", "stranger"]));

    let unknown = d.sign("u", "stranger", "server:stranger", &["--valid-for", "3600"]);
    let err = request(&c, &unknown).unwrap_err();
    assert!(err.contains("(403)") && err.contains("not registered"), "{err}");

    // Right kid, wrong key.
    let forged = d.sign("f", "stranger", "server:fs1", &["--valid-for", "3600"]);
    let err = request(&c, &forged).unwrap_err();
    assert!(err.contains("(401)"), "{err}");

    let too_long = d.sign("l", "fs1", "server:fs1", &["--valid-for", "172800"]);
    let err = request(&c, &too_long).unwrap_err();
    assert!(err.contains("(422)") && err.contains("validity-too-long"), "{err}");

    let other_project = d.sign("p", "fs1", "server:fs1", &["--valid-for", "3600", "--project", "other"]);
    let err = request(&c, &other_project).unwrap_err();
    assert!(err.contains("(403)") && err.contains("project-refused"), "{err}");

    let expired = d.sign("e", "fs1", "server:fs1", &["--not-before", "1736000000", "--valid-for", "3600"]);
    let err = request(&c, &expired).unwrap_err();
    assert!(err.contains("(422)") && err.contains("expired"), "{err}");

    // Already signed by the fleet key as well: exactly one signature is expected.
    let two = d.cosign(&d.sign("t", "fs1", "server:fs1", &["--valid-for", "3600"]), "fleet", "fleet");
    let err = request(&c, &two).unwrap_err();
    assert!(err.contains("(400)"), "{err}");

    // Raw HTTP: the body is a JSON error object.
    let raw = raw_post(&c.url, "{not json");
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    let body = raw.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"], "malformed");

    assert!(audit_lines(&c).is_empty(), "no refusal is audited as a signing");
}

#[test]
fn requests_are_rate_limited_per_server() {
    let d = Device::new();
    let c = start_cosigner(&d, 1, 3);
    register(&d, &c, "fs1");
    register(&d, &c, "fs2");
    let msg = d.sign("m", "fs1", "server:fs1", &["--valid-for", "3600"]);
    for i in 0..3 {
        request(&c, &msg).unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
    let err = request(&c, &msg).unwrap_err();
    assert!(err.contains("(429)"), "{err}");
    let other = d.sign("o", "fs2", "server:fs2", &["--valid-for", "3600"]);
    request(&c, &other).expect("another server has its own budget");
    assert_eq!(audit_lines(&c).len(), 4);
}

#[test]
fn iat_and_urls_are_checked_as_a_device_would() {
    let d = Device::new();
    let c = start_cosigner(&d, 600, 20);
    register(&d, &c, "fs1");
    let now = now();
    // An iat in 2100 would lock every device's clock floor past all later messages.
    let future = d.sign("f", "fs1", "server:fs1", &["--valid-for", "3600", "--issued-at", "4102444800"]);
    let err = request(&c, &future).unwrap_err();
    assert!(err.contains("(422)") && err.contains("iat-invalid"), "{err}");
    // An iat far behind the co-signer's clock: a stored message, not a fresh request.
    let old_iat = (now - 2 * 86_400).to_string();
    let stale = d.sign("s", "fs1", "server:fs1", &["--valid-for", "3600", "--issued-at", &old_iat]);
    let err = request(&c, &stale).unwrap_err();
    assert!(err.contains("(422)") && err.contains("iat-invalid"), "{err}");
    for (name, url) in [("h", "http://updates.example.com/x.img"), ("file", "file:///dev/mmcblk0p3")] {
        let msg = d.sign(name, "fs1", "server:fs1", &["--valid-for", "3600", "--url", url]);
        let err = request(&c, &msg).unwrap_err();
        assert!(err.contains("(422)") && err.contains("url-scheme-rejected"), "{url}: {err}");
    }
    assert!(audit_lines(&c).is_empty(), "nothing was signed");
    // The same claims with a fresh iat and an https URL are signed.
    let fine = d.sign("ok", "fs1", "server:fs1", &["--valid-for", "3600"]);
    request(&c, &fine).expect("co-signed");
}

#[test]
fn an_unauthenticated_flood_is_limited_per_peer_before_any_signature_check() {
    let d = Device::new();
    let config = d.path().join("cosigner.toml");
    let c = start_cosigner(&d, 600, 20);
    // A tight per-peer budget, then restart with it.
    let text = std::fs::read_to_string(&config).unwrap()
        + "peer_rate_limit_per_minute = 1\npeer_rate_limit_burst = 5\n";
    drop(c);
    std::fs::write(&config, text).unwrap();
    let c = restart_cosigner(&d, &config);
    register(&d, &c, "fs1");
    // Well-formed but forged: each would cost an ECDSA verify (401).
    ok(fleetctl().args(["keygen", "--out"]).arg(d.keys()).args(["--name", "stranger"]));
    let forged = d.sign("f", "stranger", "server:fs1", &["--valid-for", "3600"]);
    let body = std::fs::read_to_string(&forged).unwrap();
    let statuses: Vec<String> =
        (0..8).map(|_| raw_post(&c.url, &body).split(' ').nth(1).unwrap_or("").to_string()).collect();
    assert_eq!(&statuses[..5], &["401"; 5], "{statuses:?}");
    assert_eq!(&statuses[5..], &["429"; 3], "{statuses:?}");
    // The body of a peer refusal is a named JSON error.
    let raw = raw_post(&c.url, &body);
    let v: serde_json::Value = serde_json::from_str(raw.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(v["error"], "rate-limited");
}

#[test]
fn registering_a_revoked_server_again_needs_reinstate() {
    let d = Device::new();
    let c = start_cosigner(&d, 600, 20);
    register(&d, &c, "fs1");
    ok(fleetctl().args(["cosigner", "revoke", "--config"]).arg(&c.config).arg("fs1"));
    let register_again = || {
        let mut cmd = fleetctl();
        cmd.args(["cosigner", "register", "--config"])
            .arg(&c.config)
            .arg("--key")
            .arg(d.keys().join("fs1.pub.pem"));
        cmd
    };
    let out = run(register_again().arg("fs1"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("server-revoked") && stderr(&out).contains("--reinstate"),
        "{}",
        stderr(&out)
    );
    let msg = d.sign("m", "fs1", "server:fs1", &["--valid-for", "3600"]);
    let err = request(&c, &msg).unwrap_err();
    assert!(err.contains("(403)") && err.contains("revoked"), "still revoked: {err}");
    ok(register_again().args(["--reinstate", "fs1"]));
    request(&c, &msg).expect("reinstated");
}

/// strace shows the audit log's directory fsynced when the log is created.
#[test]
fn creating_the_audit_log_fsyncs_its_directory() {
    if !tool_available("strace") {
        assert!(std::env::var_os("CI").is_none(), "CI must have strace (scripts/setup)");
        eprintln!("SKIP: needs strace (scripts/setup)");
        return;
    }
    let d = Device::new();
    let config = d.path().join("cosigner.toml");
    drop(start_cosigner(&d, 600, 20));
    let trace = d.path().join("strace.log");
    let c = restart_cosigner_with(&d, &config, Some(&trace));
    register(&d, &c, "fs1");
    let msg = d.sign("m", "fs1", "server:fs1", &["--valid-for", "3600"]);
    request(&c, &msg).expect("co-signed");
    drop(c);
    let log = std::fs::read_to_string(&trace).unwrap();
    let state_dir = d.path().join("cosigner-state");
    let dir_fd = log
        .lines()
        .filter(|l| l.contains("openat(") && l.contains(&format!("\"{}\"", state_dir.display())))
        .filter_map(|l| l.rsplit("= ").next()?.trim().parse::<u32>().ok())
        .collect::<Vec<_>>();
    let audit_at = log.lines().position(|l| l.contains("audit.jsonl") && l.contains("O_CREAT")).expect(&log);
    let synced =
        log.lines().skip(audit_at).any(|l| dir_fd.iter().any(|fd| l.contains(&format!("fsync({fd})"))));
    assert!(synced, "no fsync of {} after creating the audit log:\n{log}", state_dir.display());
}

fn restart_cosigner(d: &Device, config: &Path) -> Cosigner {
    restart_cosigner_with(d, config, None)
}

fn restart_cosigner_with(d: &Device, config: &Path, trace: Option<&Path>) -> Cosigner {
    spawn_cosigner(d, config, trace, None)
}

/// `open_files`: the service's file limit (the distributions' default
/// soft limit is 1,024).
fn spawn_cosigner(d: &Device, config: &Path, trace: Option<&Path>, open_files: Option<u64>) -> Cosigner {
    let mut cmd = match trace {
        Some(trace) => {
            let mut c = std::process::Command::new("strace");
            c.args(["-f", "-e", "trace=openat,fsync,fdatasync", "-o"])
                .arg(trace)
                .arg(crate::common::fleetctl_bin());
            c
        }
        None => fleetctl(),
    };
    if let Some(limit) = open_files {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(move || {
                let l = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child =
        cmd.args(["cosigner", "serve", "--config"]).arg(config).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    Cosigner { child, url, config: config.to_path_buf(), audit: d.path().join("cosigner-state/audit.jsonl") }
}

fn tool_available(name: &str) -> bool {
    std::process::Command::new(name).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

fn raw_post(url: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/cosign HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A version that ends every later update (2^64 - 1), or one beyond what
/// JSON tools represent exactly, is not signed; nor is an image URL
/// without a host, which a device would accept and then fail to fetch
/// after spending the message's jti.
#[test]
fn versions_past_the_bound_and_urls_without_a_host_are_not_signed() {
    let d = Device::new();
    let c = start_cosigner(&d, 600, 20);
    register(&d, &c, "fs1");
    for version in [u64::MAX.to_string(), (1u64 << 53).to_string()] {
        let msg = d.sign(
            &format!("v{version}"),
            "fs1",
            "server:fs1",
            &["--valid-for", "3600", "--version", &version],
        );
        let err = request(&c, &msg).unwrap_err();
        assert!(err.contains("(422)") && err.contains("version-out-of-range"), "{version}: {err}");
    }
    let msg = d.sign("nohost", "fs1", "server:fs1", &["--valid-for", "3600", "--url", "https://:443/x"]);
    let err = request(&c, &msg).unwrap_err();
    assert!(err.contains("(422)") && err.contains("url-scheme-rejected"), "{err}");
    assert!(audit_lines(&c).is_empty(), "nothing was signed");
    let largest = ((1u64 << 53) - 1).to_string();
    let fine = d.sign("largest", "fs1", "server:fs1", &["--valid-for", "3600", "--version", &largest]);
    request(&c, &fine).expect("the largest version allowed is signed");
}

/// Like ssh: a private key others can read is refused, by name, at start.
#[test]
fn the_service_refuses_a_key_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let d = Device::new();
    std::fs::set_permissions(d.key("cosigner"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = d.path().join("cosigner.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nkey = \"keys/cosigner.key.pem\"\nstate_dir = \"cosigner-state\"\nprojects = [\"acme-gateways\"]\n",
    )
    .unwrap();
    let mut child = fleetctl()
        .args(["cosigner", "serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the co-signer started with a world-readable key");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("key-permissions"), "{}", stderr(&out));
}

/// A POST from `source` with a bound on the answer: `Err` when none came.
fn post_from(source: [u8; 4], url: &str, body: &str, wait: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = connect_from(source.into(), addr.parse().map_err(std::io::Error::other)?)?;
    s.set_read_timeout(Some(wait))?;
    write!(
        s,
        "POST /v1/cosign HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn status_of(answer: &str) -> &str {
    answer.split(' ').nth(1).unwrap_or("")
}

use std::time::{Duration, Instant};

/// Issue 17, item 6: a request that stops half-way is cut (408 for a body,
/// closed for a head) within the service's own bounds, and 1,200 idle
/// connections from six addresses, more than the service's file limit,
/// keep a fleet server at another address out for none of its requests.
#[test]
fn slow_requests_are_cut_and_idle_connections_keep_nobody_out() {
    let d = Device::new();
    let config = d.path().join("cosigner.toml");
    drop(start_cosigner(&d, 600, 20));
    let c = spawn_cosigner(&d, &config, None, Some(1024));
    register(&d, &c, "fs1");
    let addr: std::net::SocketAddr = c.url.trim_start_matches("http://").parse().unwrap();
    let limits = fleetctl::cosigner::LIMITS;
    let body_bound = fleetctl::cosigner::BODY_TIMEOUT;

    use std::io::{Read, Write};
    let started = Instant::now();
    let mut half_body = connect_from([127, 0, 0, 5].into(), addr).unwrap();
    write!(half_body, "POST /v1/cosign HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"payload\"")
        .unwrap();
    let mut half_head = connect_from([127, 0, 0, 6].into(), addr).unwrap();
    write!(half_head, "POST /v1/cosign HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();

    // The flood of idle connections.
    let mut idle = Vec::new();
    for source in 0..6u8 {
        for _ in 0..200 {
            if let Ok(s) = connect_from([127, 0, 3, 10 + source].into(), addr) {
                idle.push(s);
            }
        }
    }
    let msg = d.sign("m", "fs1", "server:fs1", &["--valid-for", "3600"]);
    let body = std::fs::read_to_string(&msg).unwrap();
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(
            post_from([127, 0, 0, 1], &c.url, &body, limits.idle() + body_bound)
                .map(|a| status_of(&a).to_string()),
        );
    }
    eprintln!("{} idle connections open; the fleet server's answers: {answers:?}", idle.len());
    assert!(answers.iter().all(|a| matches!(a.as_deref(), Ok("200"))), "{answers:?}");

    // The half-sent requests end within their bounds (both start at the
    // accept; the margin is for a loaded machine).
    let margin = Duration::from_secs(3);
    half_body.set_read_timeout(Some(body_bound + margin)).unwrap();
    let mut answer = String::new();
    let read = half_body.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{read:?} after {:?}: {answer:?}", started.elapsed());
    assert!(answer.contains("request-timeout"), "{answer}");
    half_head.set_read_timeout(Some(limits.header_read.max(limits.idle()) + margin)).unwrap();
    let mut rest = Vec::new();
    let read = half_head.read_to_end(&mut rest);
    assert!(read.is_ok(), "the half-sent head is closed: {read:?} after {:?}", started.elapsed());
    assert!(started.elapsed() < limits.header_read.max(body_bound) + margin);
    let refused = refusal_lines(&c);
    assert!(refused.iter().any(|l| l["error"] == "request-timeout" && l["peer"].as_str().unwrap().starts_with("127.0.0.5:")), "{refused:?}");
}

/// Issue 17, item 10: refusals reach the audit log with the peer's
/// address, a revoked server's attempts included; signings carry the peer
/// too.
#[test]
fn refusals_are_audited_with_the_peer_and_a_revoked_servers_attempts_too() {
    let d = Device::new();
    let c = start_cosigner(&d, 600, 20);
    register(&d, &c, "fs1");
    let msg = d.sign("m", "fs1", "server:fs1", &["--valid-for", "3600"]);
    request(&c, &msg).expect("co-signed");
    let signed = audit_lines(&c);
    assert_eq!(signed.len(), 1);
    assert!(signed[0]["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{signed:?}");

    ok(fleetctl().args(["cosigner", "revoke", "--config"]).arg(&c.config).arg("fs1"));
    let again = d.sign("m2", "fs1", "server:fs1", &["--valid-for", "3600"]);
    let answer =
        post_from([127, 0, 0, 7], &c.url, &std::fs::read_to_string(&again).unwrap(), Duration::from_secs(10))
            .unwrap();
    assert_eq!(status_of(&answer), "403", "{answer}");
    ok(fleetctl().args(["keygen", "--out"]).arg(d.keys()).args(["--name", "stranger"]));
    let unknown = d.sign("u", "stranger", "server:stranger", &["--valid-for", "3600"]);
    let answer = post_from(
        [127, 0, 0, 8],
        &c.url,
        &std::fs::read_to_string(&unknown).unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status_of(&answer), "403", "{answer}");
    let answer = post_from([127, 0, 0, 9], &c.url, "{not json", Duration::from_secs(10)).unwrap();
    assert_eq!(status_of(&answer), "400", "{answer}");

    let refused = refusal_lines(&c);
    let find = |error: &str| {
        refused
            .iter()
            .find(|l| l["error"] == error)
            .unwrap_or_else(|| panic!("no {error} in {refused:?}"))
            .clone()
    };
    let revoked = find("server-revoked");
    assert!(revoked["peer"].as_str().unwrap().starts_with("127.0.0.7:"), "{revoked}");
    assert_eq!((&revoked["server"], &revoked["verified"]), (&"fs1".into(), &false.into()), "{revoked}");
    let unknown = find("server-unknown");
    assert!(unknown["peer"].as_str().unwrap().starts_with("127.0.0.8:"), "{unknown}");
    assert_eq!(unknown["server"], "stranger");
    assert!(find("malformed")["peer"].as_str().unwrap().starts_with("127.0.0.9:"));
    assert_eq!(audit_lines(&c).len(), 1, "still one signing");
}

/// Issue 17, item 10: strangers from more addresses than the per-peer map
/// holds cannot take a fleet server's admission. The server's bucket has
/// refilled (the old limiter then forgot it and refused it as a newcomer).
#[test]
fn a_flood_from_many_addresses_does_not_lock_out_a_fleet_server() {
    let d = Device::new();
    let config = d.path().join("cosigner.toml");
    drop(start_cosigner(&d, 600, 20));
    // One token per 20 s and no burst: each stranger's bucket stays empty
    // for the whole flood.
    let per_minute = 3;
    let text = std::fs::read_to_string(&config).unwrap()
        + &format!("peer_rate_limit_per_minute = {per_minute}\npeer_rate_limit_burst = 1\n");
    std::fs::write(&config, text).unwrap();
    let c = restart_cosigner(&d, &config);
    register(&d, &c, "fs1");
    let msg = d.sign("m", "fs1", "server:fs1", &["--valid-for", "3600"]);
    let body = std::fs::read_to_string(&msg).unwrap();
    let first = post_from([127, 0, 0, 1], &c.url, &body, Duration::from_secs(10)).unwrap();
    assert_eq!(status_of(&first), "200", "{first}");
    // Until the server's own bucket is full again.
    std::thread::sleep(Duration::from_secs(60 / per_minute) + Duration::from_millis(500));

    let strangers = fleetctl::cosigner::MAX_PEER_BUCKETS + 256;
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..8usize)
        .map(|t| {
            let (url, refused) = (c.url.clone(), refused.clone());
            std::thread::spawn(move || {
                for i in (t..strangers).step_by(8) {
                    let source = [127, 1, (i / 250) as u8, (i % 250) as u8 + 1];
                    if let Ok(answer) = post_from(source, &url, "{}", Duration::from_secs(10)) {
                        if status_of(&answer) == "429" {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{strangers} strangers in {:?}: {refused} refused", started.elapsed());
    assert!(refused > 0, "the strangers' map filled up (else this test shows nothing)");
    let answer = post_from([127, 0, 0, 1], &c.url, &body, Duration::from_secs(10)).unwrap();
    assert_eq!(status_of(&answer), "200", "the fleet server is admitted: {answer}");
}

/// A halt (`fleetd.halt.v1`) is co-signed like an update and audited with
/// the rollout it stops; it is checked by its own rules (project, window,
/// a fresh iat), and a device accepts it with the fleet key's signature.
#[test]
fn halts_are_cosigned_within_the_same_policy() {
    use fleetd::trust::halt::{HaltClaims, HALT_TYPE};
    let d = Device::new();
    let c = start_cosigner(&d, 600, 20);
    register(&d, &c, "fs1");
    let key = |name: &str| {
        fleetd::trust::SigningKey::from_pem(&std::fs::read_to_string(d.key(name)).unwrap()).unwrap()
    };
    let halt = |project: &str, iat: u64| {
        let claims = HaltClaims {
            typ: HALT_TYPE.into(),
            jti: "halt-0000001".into(),
            iat,
            nbf: now(),
            exp: now() + 3600,
            project: project.into(),
            target: fleetd::trust::Target {
                hardware: "rpi4-gw".into(),
                devices: vec!["gw-0042".into()],
                groups: vec![],
            },
            halts: "rollout-0000001".into(),
        };
        let mut envelope = fleetd::trust::Envelope::new(&claims.to_json());
        envelope.add_signature(&key("fs1"), "server:fs1").unwrap();
        let path = d.path().join(format!("halt-{project}-{iat}.json"));
        std::fs::write(&path, envelope.to_json()).unwrap();
        path
    };
    let cosigned = request(&c, &halt("acme-gateways", now())).expect("co-signed");
    let full = d.cosign(&cosigned, "fleet", "fleet");
    let bytes = std::fs::read(&full).unwrap();
    assert_eq!(fleetd::trust::halt::peek_type(&bytes).as_deref(), Some(HALT_TYPE));
    let audit = audit_lines(&c);
    assert_eq!(
        (audit[0]["typ"].as_str(), audit[0]["halts"].as_str()),
        (Some(HALT_TYPE), Some("rollout-0000001"))
    );
    // Another project, and a stored halt (an old iat), are refused by name.
    let err = request(&c, &halt("other", now())).unwrap_err();
    assert!(err.contains("(403)") && err.contains("project-refused"), "{err}");
    let err = request(&c, &halt("acme-gateways", now() - 3600)).unwrap_err();
    assert!(err.contains("iat-invalid"), "{err}");
    assert_eq!(audit_lines(&c).len(), 1, "only the one halt signed");
}
