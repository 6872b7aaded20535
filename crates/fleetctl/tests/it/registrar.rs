//! `fleetctl registrar` as a process: user add, import (its result lines
//! and exit codes), serve (ready line, an answer, SIGTERM), revoke, retire,
//! audit --verify.

use crate::common;
use common::*;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::Stdio;

fn setup(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let (ca_cert, ca_key) = fleetd_registrar::ca::test_ca::make_ca();
    std::fs::write(dir.join("ca.pem"), ca_cert).unwrap();
    std::fs::write(dir.join("ca.key.pem"), ca_key).unwrap();
    std::fs::set_permissions(dir.join("ca.key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.join("mqtt-ca.pem"), "MQTT CA\n").unwrap();
    let config = dir.join("registrar.toml");
    let hook = dir.join("crl-hook.log");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"sqlite://registrar.db\"\npublic_url = \"http://127.0.0.1\"\n\
             crl_file = \"crl.pem\"\non_crl_change = \"echo changed >> '{}'\"\n\
             [ca]\ncert = \"ca.pem\"\nkey = \"ca.key.pem\"\n\
             [mqtt]\nhost = \"broker.test\"\nport = 8883\nca_file = \"mqtt-ca.pem\"\n",
            hook.display()
        ),
    )
    .unwrap();
    config
}

fn with_stdin(cmd: &mut std::process::Command, input: &str) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn registrar_commands_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let c = config.to_str().unwrap();

    let out = with_stdin(
        fleetctl().args(["registrar", "user", "add", "--config", c, "alice", "--role", "installer"]),
        "short\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("password-too-short"), "{}", stderr(&out));
    let out = with_stdin(
        fleetctl().args(["registrar", "user", "add", "--config", c, "alice", "--role", "installer"]),
        "password123\n",
    );
    assert_eq!(stdout(&out), "added user alice (installer)\n", "{}", stderr(&out));
    let out = with_stdin(
        fleetctl().args(["registrar", "user", "add", "--config", c, "alice", "--role", "admin"]),
        "password123\n",
    );
    assert!(stderr(&out).contains("user-exists"), "{}", stderr(&out));

    let csv = dir.path().join("devices.csv");
    std::fs::write(
        &csv,
        "serial,project,hardware,groups,pop_key\ngw-1,p,h,a;b,\ngw-2,p,h,,\ngw-1,p,other,,\ngw;3,p,h,,\n",
    )
    .unwrap();
    let csv = csv.to_str().unwrap();
    let expected = "2 gw-1 created\n3 gw-2 created\n4 gw-1 conflict\n";
    let out = run(fleetctl().args(["registrar", "import", "--config", c, "--dry-run", csv]));
    assert_eq!(out.status.code(), Some(1), "a row is invalid");
    assert!(stdout(&out).starts_with(expected), "{}", stdout(&out));
    assert!(stdout(&out).contains("5 - invalid: serial"), "{}", stdout(&out));
    // The dry run wrote nothing: the same answers again.
    let out = run(fleetctl().args(["registrar", "import", "--config", c, csv]));
    assert!(stdout(&out).starts_with(expected), "{}", stdout(&out));
    std::fs::write(dir.path().join("ok.csv"), "serial,project,hardware,groups,pop_key\ngw-1,p,h,a;b,\n")
        .unwrap();
    let out = run(fleetctl().args([
        "registrar",
        "import",
        "--config",
        c,
        dir.path().join("ok.csv").to_str().unwrap(),
    ]));
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "2 gw-1 unchanged\n"));

    // serve: the ready line, an answer, SIGTERM.
    let mut child = fleetctl()
        .args(["registrar", "serve", "--config", c])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    let addr =
        ready.strip_prefix("registrar: listening on ").unwrap_or_else(|| panic!("{ready}")).to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.write_all(b"GET /v1/crl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    assert!(answer.contains("BEGIN X509 CRL"), "{answer}");
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());

    let out = run(fleetctl().args(["registrar", "revoke", "--config", c, "gw-1"]));
    assert_eq!(stdout(&out), "revoked 0 certificate(s) of gw-1 (keyCompromise)\n", "{}", stderr(&out));
    let out = run(fleetctl().args(["registrar", "retire", "--config", c, "gw-2"]));
    assert_eq!(stdout(&out), "retired gw-2: revoked 0 certificate(s)\n", "{}", stderr(&out));
    let out = run(fleetctl().args(["registrar", "revoke", "--config", c, "gw-9"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("serial-unknown"), "{}", stderr(&out));
    let hook = std::fs::read_to_string(dir.path().join("crl-hook.log")).unwrap();
    assert_eq!(hook.lines().count(), 3, "serve's start, revoke, retire");

    let out = run(fleetctl().args(["registrar", "audit", "--config", c]));
    let text = stdout(&out);
    let actions: Vec<&str> = text.lines().map(|l| l.split(' ').nth(3).unwrap_or("")).collect();
    assert_eq!(actions, ["user-add", "import", "import", "revoke", "retire"], "{text}");
    let out = run(fleetctl().args(["registrar", "audit", "--config", c, "--verify"]));
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "audit: 5 rows, the chain holds\n"));
}
