//! `fleetctl keygen/sign/cosign` and `fleetd verify` as people run them.

use crate::common;
use common::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn keygen_writes_0600_private_key_and_refuses_to_overwrite() {
    let d = Device::new();
    let mode = std::fs::metadata(d.key("fleet")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = std::fs::read(d.key("fleet")).unwrap();
    let out = run(fleetctl().args(["keygen", "--out"]).arg(d.keys()).args(["--name", "fleet"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refusing to overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read(d.key("fleet")).unwrap(), before);
}

#[test]
fn a_cosigned_message_is_accepted_and_verify_is_read_only() {
    let d = Device::new();
    let msg = d.cosigned("m", &[]);
    let (code, out) = d.verify(&msg, false);
    assert_eq!((code, out.trim()), (0, "accepted: 2026.11.1 v8"));
    // Verifying again still accepts: verify does not record the jti.
    assert_eq!(d.verify(&msg, false).0, 0);
    assert!(!d.state_dir().join("state.json").exists());

    let (code, out) = d.verify(&msg, true);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["accepted"], true);
    assert_eq!(v["version"], 8);
}

#[test]
fn single_signature_is_rejected_with_its_name() {
    let d = Device::new();
    let msg = d.sign("m", "fleet", "fleet", &[]);
    let (code, out) = d.verify(&msg, false);
    assert_eq!(code, 1);
    assert!(out.starts_with("rejected: signature-missing: "), "{out}");
    let (code, out) = d.verify(&msg, true);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"], "signature-missing");
}

#[test]
fn stdin_and_fleetd_config_env() {
    let d = Device::new();
    let msg = d.cosigned("m", &[]);
    let out = run(fleetd()
        .args(["verify", "-"])
        .env("FLEETD_CONFIG", d.config())
        .stdin(std::fs::File::open(&msg).unwrap()));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn config_and_usage_errors_exit_2_with_the_key_named() {
    let d = Device::new();
    let msg = d.cosigned("m", &[]);
    std::fs::write(
        d.config(),
        std::fs::read_to_string(d.config()).unwrap().replace("[trust]", "[trust]\nleeway_s = -5"),
    )
    .unwrap();
    let (code, out) = d.verify(&msg, false);
    assert_eq!(code, 2);
    assert!(out.contains("fleetd.toml: key `trust.leeway_s`"), "{out}");

    let out = run(fleetd().args(["verify", "--bogus"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn image_larger_than_the_smallest_slot_is_rejected() {
    let d = Device::with_slot_size(1024 * 1024);
    let fits = d.cosigned("fits", &[]);
    assert_eq!(d.verify(&fits, false).0, 0);
    let msg = d.cosigned("big", &["--size", "1048577"]);
    let (code, out) = d.verify(&msg, false);
    assert_eq!(code, 1);
    assert!(out.starts_with("rejected: image-too-large"), "{out}");
}

#[test]
fn http_urls_only_when_the_policy_allows() {
    let d = Device::new();
    let msg = d.sign("m", "fleet", "fleet", &["--url", "http://updates.example.com/x.img"]);
    let msg = d.cosign(&msg, "cosigner", "cosigner");
    assert!(d.verify(&msg, false).1.starts_with("rejected: url-scheme-rejected"));
    d.write_config("allow_http = true");
    assert_eq!(d.verify(&msg, false).0, 0);
}

#[test]
fn hostile_inputs_are_named_and_do_not_crash() {
    let d = Device::new();
    let big = d.path().join("big.json");
    std::fs::write(&big, vec![b' '; 20 * 1024 * 1024]).unwrap();
    let (code, out) = d.verify(&big, false);
    assert_eq!(code, 1);
    assert!(out.starts_with("rejected: message-too-large"), "{out}");

    let nested = d.path().join("nested.json");
    std::fs::write(&nested, format!("{}{}", "[".repeat(200_000), "]".repeat(200_000))).unwrap();
    let (code, out) = d.verify(&nested, false);
    assert_eq!(code, 1);
    assert!(out.starts_with("rejected: message-too-large"), "{out}");

    let nested = d.path().join("nested-small.json");
    std::fs::write(&nested, format!("{}{}", "{\"a\":".repeat(10_000), "}".repeat(10_000))).unwrap();
    let (code, out) = d.verify(&nested, false);
    assert_eq!(code, 1);
    assert!(out.starts_with("rejected: malformed"), "{out}");
}

#[test]
fn replay_and_version_come_from_the_stored_state() {
    let d = Device::new();
    let msg = d.cosigned("m", &[]);
    let jti = {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&msg).unwrap()).unwrap();
        let payload = v["payload"].as_str().unwrap().to_string();
        let claims = fleetd::trust::b64url_decode(&payload).unwrap();
        let c: serde_json::Value = serde_json::from_slice(&claims).unwrap();
        c["jti"].as_str().unwrap().to_string()
    };
    std::fs::create_dir_all(d.state_dir()).unwrap();
    let state =
        |body: serde_json::Value| std::fs::write(d.state_dir().join("state.json"), body.to_string()).unwrap();

    state(serde_json::json!({"installed_version": 8}));
    assert!(d.verify(&msg, false).1.starts_with("rejected: version-not-newer"));

    state(serde_json::json!({"installed_version": 7, "replay_cache": {jti: now() + 3600}}));
    assert!(d.verify(&msg, false).1.starts_with("rejected: replayed"));

    std::fs::write(d.state_dir().join("state.json"), "{broken").unwrap();
    let (code, out) = d.verify(&msg, false);
    assert_eq!(code, 2);
    assert!(out.contains("state-corrupt"), "{out}");
}

#[test]
fn clock_floor_from_state_refuses_a_message_expired_by_the_floor() {
    // The system clock reads "now"; the floor remembers a later time, as after
    // the clock was reset. A message valid by the wrong clock is refused.
    let d = Device::new();
    let msg = d.cosigned("m", &["--valid-for", "3600"]);
    assert_eq!(d.verify(&msg, false).0, 0);
    std::fs::create_dir_all(d.state_dir()).unwrap();
    std::fs::write(
        d.state_dir().join("state.json"),
        serde_json::json!({"clock_floor": now() + 86400}).to_string(),
    )
    .unwrap();
    let (code, out) = d.verify(&msg, false);
    assert_eq!(code, 1);
    assert!(out.starts_with("rejected: expired"), "{out}");
}

/// With the process clock really set back (libfaketime), an old message that
/// the wrong clock thinks is current is refused because of the floor.
#[test]
fn clock_floor_with_the_system_clock_set_back() {
    let faketime = ["/usr/bin/faketime"].into_iter().find(|p| std::path::Path::new(p).exists());
    let Some(faketime) = faketime else {
        assert!(std::env::var_os("CI").is_none(), "faketime must be installed in CI (scripts/setup)");
        eprintln!("SKIP: faketime not installed");
        return;
    };
    let d = Device::new();
    // Issued and valid for a day in January 2025: long expired in reality.
    let nbf = 1_736_000_000u64;
    let msg = d.cosigned("old", &["--not-before", &nbf.to_string(), "--valid-for", "86400"]);
    let run_at = |date: &str| {
        let out = run(std::process::Command::new(faketime)
            .arg(date)
            .arg(crate::common::fleetd_bin())
            .args(["verify", "--config"])
            .arg(d.config())
            .arg(&msg));
        (out.status.code(), stdout(&out))
    };
    let (code, out) = run_at("@1736000600");
    // The wrong clock says the message is current; the build-time floor refuses it.
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("rejected: expired"), "{out}");

    // A current message under the set-back clock: the floor stands in for now,
    // so it is accepted...
    // Valid from 6 days ago to tomorrow: the binary's build time (its lowest
    // clock floor) lies inside, however long ago within a week it was built.
    let fresh =
        d.cosigned("fresh", &["--not-before", &(now() - 6 * 86400).to_string(), "--valid-for", "604800"]);
    let run_fresh = |date: &str| {
        let out = run(std::process::Command::new(faketime)
            .arg(date)
            .arg(crate::common::fleetd_bin())
            .args(["verify", "--config"])
            .arg(d.config())
            .arg(&fresh));
        (out.status.code(), stdout(&out))
    };
    assert_eq!(run_fresh("@1736000600"), (Some(0), "accepted: 2026.11.1 v8\n".to_string()));
    // ...until the stored floor (the largest iat ever accepted) is past its exp.
    std::fs::create_dir_all(d.state_dir()).unwrap();
    let floor = now() + 3 * 86400;
    std::fs::write(d.state_dir().join("state.json"), serde_json::json!({"clock_floor": floor}).to_string())
        .unwrap();
    let (code, out) = run_fresh("@1736000600");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("now {floor}")), "the floor stood in for the clock: {out}");
    // Proof that faketime moves this binary's clock: set it later than the floor.
    let later = now() + 10 * 86400;
    let (code, out) = run_fresh(&format!("@{later}"));
    assert_eq!(code, Some(1), "{out}");
    // faketime starts the clock at `later` and lets it tick: the process
    // reads it a moment (a second, on a slow machine more) after.
    let seen: u64 = out.rsplit("now ").next().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
    assert!((later..later + 30).contains(&seen), "the faked clock was used: {out}");
}

#[test]
fn iat_in_the_future_or_after_exp_is_refused_and_a_month_old_iat_is_fine() {
    let d = Device::new();
    let now = now();
    let future = d.cosigned("future", &["--issued-at", "4102444800"]);
    let (code, out) = d.verify(&future, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("rejected: iat-invalid: "), "{out}");
    let after_exp = (now + 2 * 86_400).to_string();
    let late = d.cosigned("late", &["--issued-at", &after_exp, "--valid-for", "3600"]);
    let (code, out) = d.verify(&late, true);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"], "iat-invalid");
    let month_ago = (now - 30 * 86_400).to_string();
    let old = d.cosigned("old", &["--issued-at", &month_ago]);
    let (code, out) = d.verify(&old, false);
    assert_eq!((code, out.trim()), (0, "accepted: 2026.11.1 v8"));
}

/// A command that may hang is killed after `timeout`: (exit code, output), or
/// None when it had not ended.
fn run_for(cmd: &mut std::process::Command, timeout: std::time::Duration) -> Option<(i32, String)> {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Some((out.status.code().unwrap_or(-1), stdout(&out) + &stderr(&out)))
}

/// A trust key that is a FIFO no one writes, or `/dev/zero`, is refused at
/// once by its type: no hang, no reading until memory runs out.
#[test]
fn trust_key_files_that_are_not_regular_files_are_refused_at_once() {
    let d = Device::new();
    let msg = d.cosigned("m", &[]);
    let key = d.keys().join("fleet.pub.pem");
    std::fs::remove_file(&key).unwrap();
    nix::unistd::mkfifo(&key, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let verify = || {
        let mut cmd = fleetd();
        cmd.arg("verify").arg("--config").arg(d.config()).arg(&msg);
        run_for(&mut cmd, std::time::Duration::from_secs(10))
    };
    let (code, out) = verify().expect("fleetd verify hung on a FIFO as a trust key");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not-regular-file"), "{out}");
    std::fs::remove_file(&key).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &key).unwrap();
    let (code, out) = verify().expect("fleetd verify read /dev/zero");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not-regular-file"), "{out}");
}

/// Like ssh, fleetctl refuses a signing key others can read, by name.
#[test]
fn a_signing_key_others_can_read_is_refused() {
    let d = Device::new();
    std::fs::set_permissions(d.key("fleet"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(fleetctl()
        .args(["sign", "--kid", "fleet", "--key"])
        .arg(d.key("fleet"))
        .args(["--project", "p", "--hardware", "h", "--device", "d", "--url", "https://h/x", "--size", "1"])
        .args(["--sha256", &"ab".repeat(32), "--name", "n", "--version", "8"]));
    assert!(!out.status.success(), "signed with a world-readable key");
    assert!(stderr(&out).contains("key-permissions"), "{}", stderr(&out));
}

/// `openssl ecparam -genkey -name prime256v1 -noout` writes SEC1
/// (`BEGIN EC PRIVATE KEY`); fleetctl signs with it as with PKCS#8.
#[test]
fn a_sec1_key_from_openssl_signs() {
    let d = Device::new();
    let key = d.keys().join("sec1.key.pem");
    let made = std::process::Command::new("openssl")
        .args(["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out"])
        .arg(&key)
        .status();
    if !made.is_ok_and(|s| s.success()) {
        assert!(std::env::var_os("CI").is_none(), "CI has openssl");
        eprintln!("SKIP: no openssl");
        return;
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(std::fs::read_to_string(&key).unwrap().contains("BEGIN EC PRIVATE KEY"));
    ok(std::process::Command::new("openssl")
        .args(["ec", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(d.keys().join("fleet.pub.pem")));
    let one = d.path().join("sec1-signed.json");
    ok(fleetctl()
        .args(["sign", "--kid", "fleet", "--key"])
        .arg(&key)
        .args(["--project", "acme-gateways", "--hardware", "rpi4-gw", "--device", "gw-0042"])
        .args(["--url", "https://updates.example.com/x.img", "--size", "1048576"])
        .args(["--sha256", "c7be90c1253943c94f256c17c430305e300d117d8a70adaf749bf2488913b184"])
        .args(["--name", "sec1", "--version", "8", "--out"])
        .arg(&one));
    let both = d.cosign(&one, "cosigner", "cosigner");
    let (code, out) = d.verify(&both, false);
    assert_eq!((code, out.trim()), (0, "accepted: sec1 v8"));
}
