//! Shared helpers for the integration tests: temp dirs, binaries, keys, config.
#![allow(dead_code)]

pub mod bootsim_grub;
pub mod bootsim_tryboot;
pub mod bootsim_uboot;
pub mod cloud;
pub mod dbus;
pub mod gateway;
pub mod imageserver;
pub mod nm_double;
pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The systemd variables a test runner may have: a test opts in to them.
pub const SYSTEMD_ENV: &[&str] = &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"];

/// Where the fleetd under test looks for the system bus unless a test sets
/// its own: nowhere, so no test touches the machine's bus (fleetd runs on
/// without D-Bus, and the CLI reads the state on disk).
pub const NO_BUS: (&str, &str) =
    ("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/fleetd-tests-have-no-system-bus");

pub fn fleetd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetd"));
    SYSTEMD_ENV.iter().for_each(|v| {
        cmd.env_remove(v);
    });
    cmd.env(NO_BUS.0, NO_BUS.1);
    cmd
}

pub fn fleetctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fleetctl"))
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs and asserts success, returning stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}\n{}", stderr(&out), stdout(&out));
    stdout(&out)
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A device directory with fleet and cosigner keys, two file slots and a config.
pub struct Device {
    pub dir: tempfile::TempDir,
}

impl Device {
    pub fn new() -> Self {
        Self::with_slot_size(64 * 1024 * 1024)
    }

    pub fn with_slot_size(slot_size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = Self { dir };
        for name in ["fleet", "cosigner"] {
            ok(fleetctl().args(["keygen", "--out"]).arg(d.keys()).args(["--name", name]));
        }
        for slot in ["a", "b"] {
            let f = std::fs::File::create(d.path().join(format!("slot-{slot}.img"))).unwrap();
            f.set_len(slot_size).unwrap();
        }
        d.write_config("");
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn keys(&self) -> PathBuf {
        self.path().join("keys")
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.keys().join(format!("{name}.key.pem"))
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("fleetd.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    /// Writes the config; `trust_extra` goes into the [trust] table.
    pub fn write_config(&self, trust_extra: &str) {
        let text =
            fleetd::fixture::DeviceConfig { trust: trust_extra.into(), ..Default::default() }.to_toml();
        std::fs::write(self.config(), text).unwrap();
    }

    /// `fleetctl sign` with sensible claims plus `extra` flags; returns the file.
    pub fn sign(&self, name: &str, key: &str, kid: &str, extra: &[&str]) -> PathBuf {
        let out = self.path().join(format!("{name}.json"));
        let defaults = [
            ("--project", "acme-gateways"),
            ("--hardware", "rpi4-gw"),
            ("--device", "gw-0042"),
            ("--url", "https://updates.example.com/x.img"),
            ("--size", "1048576"),
            ("--sha256", "c7be90c1253943c94f256c17c430305e300d117d8a70adaf749bf2488913b184"),
            ("--name", "2026.11.1"),
            ("--version", "8"),
        ];
        let mut cmd = fleetctl();
        cmd.args(["sign", "--kid", kid, "--key"]).arg(self.key(key));
        let from_image = extra.contains(&"--image");
        for (flag, value) in defaults {
            let computed = from_image && (flag == "--size" || flag == "--sha256");
            if !extra.contains(&flag) && !computed {
                cmd.args([flag, value]);
            }
        }
        cmd.args(extra).arg("--out").arg(&out);
        ok(&mut cmd);
        out
    }

    pub fn cosign(&self, file: &Path, key: &str, kid: &str) -> PathBuf {
        let out = file.with_extension(format!("{kid}.json"));
        ok(fleetctl()
            .args(["cosign", "--kid", kid, "--key"])
            .arg(self.key(key))
            .arg("--out")
            .arg(&out)
            .arg(file));
        out
    }

    /// A message signed by both required keys.
    pub fn cosigned(&self, name: &str, extra: &[&str]) -> PathBuf {
        let one = self.sign(name, "fleet", "fleet", extra);
        self.cosign(&one, "cosigner", "cosigner")
    }

    /// `fleetd verify`: (exit code, stdout).
    pub fn verify(&self, file: &Path, json: bool) -> (i32, String) {
        let mut cmd = fleetd();
        cmd.arg("verify").arg("--config").arg(self.config());
        if json {
            cmd.arg("--json");
        }
        let out = run(cmd.arg(file));
        (out.status.code().unwrap_or(-1), stdout(&out) + &stderr(&out))
    }
}

/// One HTTP/1.1 exchange with a portal (`ADDR:PORT`), optionally signed
/// with the proof-of-possession `key` (a fresh nonce from /api/v1/info):
/// the status and the body.
pub fn portal_call(addr: &str, method: &str, path: &str, key: Option<&ring::hmac::Key>) -> (u16, String) {
    let authorization = key.map(|key| {
        let (_, info) = portal_call(addr, "GET", "/api/v1/info", None);
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        let nonce = info["nonce"].as_str().unwrap().to_string();
        fleetd::provision::auth::authorization(key, method, path, &nonce, b"")
    });
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Whether the namespace tests can run (root, iproute2, mosquitto). Under
/// CI they must: there a skip is a failure.
pub fn can_run_netns() -> bool {
    let ok = is_root() && cloud::available(&["ip", "mosquitto"]);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the namespace tests (root, mosquitto, iproute2)"
        );
        eprintln!("SKIP: needs root, iproute2 and mosquitto (scripts/setup)");
    }
    ok
}

/// `fleetd run` as a child process (in the device namespace when given),
/// its standard error appended to `log`; SIGTERM on drop.
pub struct Daemon {
    child: Option<std::process::Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, net: Option<&cloud::Net>, env: &[(&str, &str)], log: &Path) -> Daemon {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut cmd = match net {
            Some(net) => net.in_device(env!("CARGO_BIN_EXE_fleetd")),
            None => Command::new(env!("CARGO_BIN_EXE_fleetd")),
        };
        SYSTEMD_ENV.iter().for_each(|v| {
            cmd.env_remove(v);
        });
        let child = cmd
            .env(NO_BUS.0, NO_BUS.1)
            .envs(env.iter().copied())
            .args(["run", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Daemon { child: Some(child), log: log.to_path_buf() }
    }

    /// Sends `signal` and waits for the exit.
    pub fn signal(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
    }

    /// Still running (not exited, not stopped by us).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
