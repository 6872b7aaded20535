//! The co-signer service end to end on loopback: register → sign → cosign →
//! `fleetd verify` accepts; revoke → refused (403) and nothing audited.

mod common;
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
    let mut child = fleetctl()
        .args(["cosigner", "serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    Cosigner { child, url, config, audit: d.path().join("cosigner-state/audit.jsonl") }
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

fn audit_lines(c: &Cosigner) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&c.audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
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
    assert_eq!(audit_lines(&c).len(), 1, "nothing new in the audit log");
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
