//! A private PostgreSQL server for one test: Debian's postgresql binaries,
//! a cluster made with initdb in a temp dir, listening on a free loopback
//! port, stopped and removed when dropped. scripts/setup installs it.
//!
//! PostgreSQL refuses to run as root: as root the cluster belongs to the
//! `postgres` user (which the package creates), otherwise to the caller.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh cluster may take to accept connections: initdb and the
/// first checkpoint on a loaded 2-core CI machine take a few seconds; this
/// bounds a broken install, not a slow one.
const READY_WITHIN: Duration = Duration::from_secs(120);

pub struct Postgres {
    dir: tempfile::TempDir,
    server: Child,
    pub port: u16,
    owner: Option<(u32, u32)>,
}

/// The newest installed server's bin folder (`/usr/lib/postgresql/N/bin`).
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn id_of(flag: &str, user: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, user]).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

impl Postgres {
    /// Starts a cluster. `durable = false` turns fsync off (correctness
    /// tests); benchmarks keep PostgreSQL's defaults.
    pub fn start(durable: bool) -> Postgres {
        let bin = bin_dir().expect("PostgreSQL's server is not installed: run scripts/setup");
        let owner = if super::is_root() {
            let uid = id_of("-u", "postgres").expect("the postgresql package's `postgres` user");
            let gid = id_of("-g", "postgres").expect("the postgres group");
            Some((uid, gid))
        } else {
            None
        };
        let dir = tempfile::Builder::new().prefix("fleetd-pg-").tempdir().expect("temp dir");
        let data = dir.path().join("data");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the cluster's dir");
        }
        let status = as_owner(Command::new(bin.join("initdb")), owner)
            .args(["--auth=trust", "--username=fleetd", "--encoding=UTF8", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        let port = super::free_port();
        let log = dir.path().join("server.log");
        let log_file = std::fs::File::create(&log).expect("server log");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&log, Some(uid), Some(gid)).expect("chown the log");
        }
        let mut server = as_owner(Command::new(bin.join("postgres")), owner);
        server
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "max_connections=200", "-c", "shared_buffers=64MB"])
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file);
        if !durable {
            server.args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]);
        }
        let server = server.spawn().expect("postgres");
        let mut pg = Postgres { dir, server, port, owner };
        pg.wait_ready(&log);
        pg
    }

    fn wait_ready(&mut self, log: &Path) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(log) {
                let _ = f.read_to_string(&mut text);
            }
            if text.contains("database system is ready to accept connections") {
                return;
            }
            if let Ok(Some(status)) = self.server.try_wait() {
                panic!("postgres exited ({status}):\n{text}");
            }
            assert!(Instant::now() < deadline, "postgres not ready within {READY_WITHIN:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A new empty database, and its URL.
    pub fn database(&self, name: &str) -> String {
        let bin = bin_dir().expect("postgres bin");
        let status = as_owner(Command::new(bin.join("createdb")), self.owner)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "fleetd", name])
            .status()
            .expect("createdb");
        assert!(status.success(), "createdb {name}");
        self.url(name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://fleetd@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL over the server's Unix socket: it reaches the server from
    /// any network namespace (a registrar in a test's cloud namespace).
    pub fn socket_url(&self, database: &str) -> String {
        format!(
            "postgres://fleetd@localhost/{database}?host={}&port={}",
            self.dir.path().display(),
            self.port
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn as_owner(mut cmd: Command, owner: Option<(u32, u32)>) -> Command {
    if let Some((uid, gid)) = owner {
        // std drops root's supplementary groups along with the uid.
        cmd.uid(uid).gid(gid).env("HOME", "/");
    }
    cmd
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown (clients disconnected, no wait).
        unsafe { libc::kill(self.server.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.server.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
