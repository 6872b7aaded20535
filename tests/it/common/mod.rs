//! Shared helpers for the integration tests: temp dirs, binaries, keys, config.
#![allow(dead_code)]

pub mod bootsim_grub;
pub mod bootsim_tryboot;
pub mod bootsim_uboot;
pub mod cloud;
pub mod dbus;
pub mod fleet;
pub mod gateway;
pub mod imageserver;
pub mod nm_double;
pub mod postgres;
pub mod registrar;
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

/// The project's root (the workspace's), whichever crate's tests include
/// this harness: the folder with `packaging/` above the crate's manifest.
pub fn root() -> &'static Path {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.ancestors().find(|dir| dir.join("packaging").is_dir()).unwrap_or(manifest)
}

/// The binary under test: cargo names its own package's binaries; the other
/// package's sits beside it in the same target folder (`cargo test` at the
/// root builds both, since both packages have integration tests).
fn binary(own: Option<&'static str>, beside: Option<&'static str>, name: &str) -> PathBuf {
    if let Some(path) = own {
        return PathBuf::from(path);
    }
    let sibling = Path::new(beside.expect("one of the two binaries is this package's")).with_file_name(name);
    assert!(
        sibling.is_file(),
        "{} is not built: run the workspace's tests (`cargo test` at the root)",
        sibling.display()
    );
    sibling
}

pub fn fleetd_bin() -> PathBuf {
    binary(option_env!("CARGO_BIN_EXE_fleetd"), option_env!("CARGO_BIN_EXE_fleetctl"), "fleetd")
}

pub fn fleetctl_bin() -> PathBuf {
    binary(option_env!("CARGO_BIN_EXE_fleetctl"), option_env!("CARGO_BIN_EXE_fleetd"), "fleetctl")
}

/// A test's full name in this binary, for running it again (`--exact`):
/// `test_name(module_path!(), "x")` in tests/it/dbus.rs is `dbus::x`.
pub fn test_name(module_path: &str, test: &str) -> String {
    let module = module_path.split_once("::").map_or(module_path, |(_crate, path)| path);
    format!("{module}::{test}")
}

pub fn fleetd() -> Command {
    let mut cmd = Command::new(fleetd_bin());
    SYSTEMD_ENV.iter().for_each(|v| {
        cmd.env_remove(v);
    });
    cmd.env(NO_BUS.0, NO_BUS.1);
    cmd
}

pub fn fleetctl() -> Command {
    Command::new(fleetctl_bin())
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
/// `sh -c CMD`, which must succeed: its stdout.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

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
        let text = fleetd_fixture::DeviceConfig { trust: trust_extra.into(), ..Default::default() }.to_toml();
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
    let client = PortalClient::new(addr);
    match key {
        Some(key) => client.signed(key, method, path, &client.nonce().unwrap()),
        None => client.call(method, path, None),
    }
    .unwrap()
}

/// A client of the portal from a chosen loopback address (all of
/// 127.0.0.0/8 is loopback: to the server, another party on its network),
/// sending a chosen `Host`. Errors instead of panics, for counting attempts
/// that a server under attack drops.
#[derive(Clone)]
pub struct PortalClient {
    pub source: std::net::Ipv4Addr,
    pub addr: String,
    pub host: String,
}

impl PortalClient {
    pub fn new(addr: &str) -> Self {
        Self { source: std::net::Ipv4Addr::LOCALHOST, addr: addr.to_string(), host: addr.to_string() }
    }

    pub fn from(self, source: [u8; 4]) -> Self {
        Self { source: source.into(), ..self }
    }

    pub fn with_host(self, host: &str) -> Self {
        Self { host: host.to_string(), ..self }
    }

    pub fn connect(&self) -> std::io::Result<std::net::TcpStream> {
        connect_from(self.source, self.addr.parse().map_err(std::io::Error::other)?)
    }

    /// `(status, body)`; status 0 when the connection closed before an answer.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        authorization: Option<String>,
    ) -> std::io::Result<(u16, String)> {
        self.call_with(method, path, authorization, b"")
    }

    /// `call` with a body.
    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        authorization: Option<String>,
        body: &[u8],
    ) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = self.connect()?;
        // Bounded by the portal's own idle bound: it answers or closes by then.
        stream.set_read_timeout(Some(fleetd::provision::server::LIMITS.idle() * 2))?;
        let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.host,
            body.len()
        )?;
        stream.write_all(body)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let response = String::from_utf8_lossy(&response);
        let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    }

    /// A nonce from /api/v1/info.
    pub fn nonce(&self) -> std::io::Result<String> {
        let (status, info) = self.call("GET", "/api/v1/info", None)?;
        let info: serde_json::Value = serde_json::from_str(&info).unwrap_or_default();
        info["nonce"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| std::io::Error::other(format!("no nonce ({status}): {info}")))
    }

    pub fn signed(
        &self,
        key: &ring::hmac::Key,
        method: &str,
        path: &str,
        nonce: &str,
    ) -> std::io::Result<(u16, String)> {
        self.call(method, path, Some(fleetd::provision::auth::authorization(key, method, path, nonce, b"")))
    }

    /// A signed POST of `body` to `path`, with a fresh nonce.
    pub fn post_signed(
        &self,
        key: &ring::hmac::Key,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, String)> {
        let nonce = self.nonce()?;
        let authorization = fleetd::provision::auth::authorization(key, "POST", path, &nonce, body);
        self.call_with("POST", path, Some(authorization), body)
    }
}

/// A TCP connection to `to` from `source` (bound before connecting).
pub fn connect_from(
    source: std::net::Ipv4Addr,
    to: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let check = |rc: libc::c_int| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) };
    // SAFETY: a new socket, owned by the OwnedFd at once; the addresses
    // are valid sockaddr_in values that outlive the calls.
    unsafe {
        let fd = check(libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0))?;
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let from = sockaddr(std::net::SocketAddrV4::new(source, 0));
        check(libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&from as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        let to = sockaddr(to);
        check(libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&to as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        Ok(std::net::TcpStream::from(fd))
    }
}

/// A port free on loopback now (for a portal that must keep its address
/// across a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
            Some(net) => net.in_device(crate::common::fleetd_bin()),
            None => Command::new(crate::common::fleetd_bin()),
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
