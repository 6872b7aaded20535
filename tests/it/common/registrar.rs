//! `fleetctl registrar serve` as a child process for one test, its config
//! and CLI, and the HTTP calls an installer or a device makes (curl, so
//! that TLS and namespaces are a third party's).

use super::cloud::{Net, Pki};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long `serve` may take to print that it listens: migrations on a
/// fresh database and the first CRL. Bounds a broken start, not a slow one.
const LISTENING_WITHIN: Duration = Duration::from_secs(60);

/// What a registrar is set up with; `config` writes registrar.toml.
pub struct Setup {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub database: String,
    /// The issuing CA (the broker trusts it): certificate and 0600 key.
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub mqtt: (String, u16, PathBuf),
    /// `[tls]`: none on loopback.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub on_crl_change: Option<String>,
    /// Extra top-level or `[ca]` lines (e.g. a short validity for renewal tests).
    pub extra_top: String,
    pub extra_ca: String,
}

impl Setup {
    /// A registrar on `listen` that issues with the test PKI's CA and
    /// tells devices about the broker at `mqtt`.
    pub fn new(dir: &Path, pki: &Pki, listen: SocketAddr, database: String, mqtt: (String, u16)) -> Setup {
        std::fs::create_dir_all(dir).expect("registrar dir");
        let tls = if listen.ip().is_loopback() {
            None
        } else {
            Some(pki.server("registrar", &[&listen.ip().to_string()]))
        };
        Setup {
            dir: dir.to_path_buf(),
            listen,
            database,
            ca_cert: pki.ca_pem.clone(),
            ca_key: pki.ca_key(),
            mqtt: (mqtt.0, mqtt.1, pki.ca_pem.clone()),
            tls,
            on_crl_change: None,
            extra_top: String::new(),
            extra_ca: String::new(),
        }
    }

    pub fn sqlite(dir: &Path) -> String {
        format!("sqlite://{}", dir.join("registrar.db").display())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("registrar.toml")
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.listen)
    }

    /// Writes registrar.toml (interfaces.md's keys).
    pub fn write(&self) -> PathBuf {
        let mut text = format!(
            "listen = \"{}\"\ndatabase = \"{}\"\npublic_url = \"{}\"\ncrl_file = \"{}\"\n",
            self.listen,
            self.database,
            self.url(),
            self.crl_path().display()
        );
        if let Some(cmd) = &self.on_crl_change {
            text.push_str(&format!("on_crl_change = {}\n", toml_string(cmd)));
        }
        text.push_str(&self.extra_top);
        text.push_str(&format!(
            "\n[ca]\ncert = \"{}\"\nkey = \"{}\"\n{}\n[mqtt]\nhost = \"{}\"\nport = {}\nca_file = \"{}\"\n",
            self.ca_cert.display(),
            self.ca_key.display(),
            self.extra_ca,
            self.mqtt.0,
            self.mqtt.1,
            self.mqtt.2.display()
        ));
        if let Some((cert, key)) = &self.tls {
            text.push_str(&format!("\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display()));
        }
        std::fs::write(self.config_path(), text).expect("registrar.toml");
        self.config_path()
    }

    /// `fleetctl registrar ARGS --config C` (in the cloud namespace when
    /// given), `stdin` fed to it.
    pub fn cli(&self, net: Option<&Net>, args: &[&str], stdin: &str) -> Output {
        let mut cmd = match net {
            Some(net) => net.in_cloud(super::fleetctl_bin()),
            None => Command::new(super::fleetctl_bin()),
        };
        let (sub, rest) = args.split_first().expect("a registrar subcommand");
        let config = self.config_path();
        let config = config.to_str().expect("utf-8 path");
        let mut words: Vec<&str> = vec!["registrar", sub];
        if *sub == "user" {
            // `user add --config C NAME ...`
            words.push(rest[0]);
            words.extend(["--config", config]);
            words.extend(&rest[1..]);
        } else {
            words.extend(["--config", config]);
            words.extend(rest);
        }
        cmd.args(&words).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("fleetctl registrar");
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
        child.wait_with_output().expect("fleetctl registrar")
    }

    pub fn add_user(&self, net: Option<&Net>, name: &str, role: &str, password: &str) {
        let out = self.cli(net, &["user", "add", name, "--role", role], &format!("{password}\n"));
        assert!(out.status.success(), "user add {name}: {}", super::stderr(&out));
    }

    /// Imports `csv` (header included); the CLI's output.
    pub fn import(&self, net: Option<&Net>, csv: &str, extra: &[&str]) -> Output {
        let file = self.dir.join(format!("import-{}.csv", std::process::id()));
        std::fs::write(&file, csv).expect("csv");
        let mut args = vec!["import", file.to_str().expect("utf-8 path")];
        args.extend(extra);
        self.cli(net, &args, "")
    }
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A running `fleetctl registrar serve`; SIGTERM on drop.
pub struct Registrar {
    child: Option<Child>,
    pub log: PathBuf,
    pub url: String,
    ca: Option<PathBuf>,
    cloud_ns: Option<String>,
}

impl Registrar {
    pub fn start(setup: &Setup, net: Option<&Net>) -> Registrar {
        setup.write();
        let log = setup.dir.join(format!("serve-{}.log", setup.listen.port()));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log");
        let mut cmd = match net {
            Some(net) => net.in_cloud(super::fleetctl_bin()),
            None => Command::new(super::fleetctl_bin()),
        };
        let child = cmd
            .args(["registrar", "serve", "--config"])
            .arg(setup.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("fleetctl registrar serve");
        let mut registrar = Registrar {
            child: Some(child),
            log,
            url: setup.url(),
            ca: setup.tls.as_ref().map(|_| setup.ca_cert.clone()),
            cloud_ns: net.map(|n| n.cloud_ns().to_string()),
        };
        registrar.wait_listening();
        registrar
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + LISTENING_WITHIN;
        loop {
            let text = self.log_text();
            if text.contains("registrar: listening on") {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("registrar exited ({status}) before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "registrar not listening within {LISTENING_WITHIN:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One JSON call with curl: (status, body as JSON or `Null`).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let (status, text) = self.call_raw(method, path, token, body.map(str::as_bytes));
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    /// One call with curl: (status, body text). The body goes through a
    /// file, so a large one needs no argument list.
    pub fn call_raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> (u16, String) {
        let mut cmd = match &self.cloud_ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "curl"]);
                c
            }
            None => Command::new("curl"),
        };
        cmd.args(["-sS", "--max-time", "30", "-X", method, "-w", "\n%{http_code}"]);
        if let Some(ca) = &self.ca {
            cmd.arg("--cacert").arg(ca);
        }
        if let Some(token) = token {
            cmd.args(["-H", &format!("authorization: Bearer {token}")]);
        }
        let body_file = tempfile::NamedTempFile::new().expect("body file");
        if let Some(body) = body {
            std::fs::write(body_file.path(), body).expect("body");
            cmd.args(["-H", "content-type: application/json", "--data-binary"])
                .arg(format!("@{}", body_file.path().display()));
        }
        let out = cmd.arg(format!("{}{path}", self.url)).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub fn login(&self, user: &str, password: &str) -> String {
        let body = serde_json::json!({"user": user, "password": password}).to_string();
        let (status, answer) = self.call("POST", "/v1/login", None, Some(&body));
        assert_eq!(status, 200, "login {user}: {answer}");
        answer["token"].as_str().expect("token").to_string()
    }

    /// `POST /v1/claims`: (status, answer).
    pub fn claim(&self, token: &str, serial: &str) -> (u16, serde_json::Value) {
        let body = serde_json::json!({ "serial": serial }).to_string();
        self.call("POST", "/v1/claims", Some(token), Some(&body))
    }

    pub fn device(&self, token: &str, serial: &str) -> serde_json::Value {
        let (status, answer) = self.call("GET", &format!("/v1/devices/{serial}"), Some(token), None);
        assert_eq!(status, 200, "device {serial}: {answer}");
        answer
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One plain-HTTP JSON exchange on loopback without a process per call
/// (for many concurrent clients): (status, body).
pub fn plain_post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    write!(
        tcp,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut reader = BufReader::new(tcp);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    let body = rest.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
