//! A fleet on one machine: N real `fleetd` daemons in the device namespace,
//! each with its own state directory, file-backed slots, a GRUB environment
//! read and written by the real tools, and its own client certificate for a
//! real mosquitto (TLS, per-device ACLs) in the cloud namespace. The image
//! server counts bytes and concurrent downloads; a real co-signer service
//! co-signs halts; `fleetctl rollout` drives it all.
//!
//! A supervisor plays the hardware: when a daemon asks for a reboot it is
//! stopped, the simulated GRUB picks a slot, the health check is set to
//! fail when the booted slot holds a "bad" image, and the daemon starts
//! again.

use super::cloud::{Broker, Net, Pki, FLEET_SERVER};
use super::imageserver::ImageServer;
use super::{fleetctl_bin, fleetd_bin, ok, NO_BUS};
use fleetd::status::UpdateState;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PROJECT: &str = "acme-gateways";
pub const HARDWARE: &str = "rpi4-gw";
pub const GROUP: &str = "field";
/// A bad image starts with this; a device booted into it fails its health check.
pub const BAD_MARKER: &[u8] = b"BAD-IMAGE";
const SLOT_SIZE: u64 = 1 << 20;
const COSIGNER_LISTEN: &str = "127.0.0.1:8700";

pub struct FleetOptions {
    pub devices: usize,
    pub reconnect_spread_s: u64,
    /// Each image response is sent at about this many bytes per second.
    pub image_rate: Option<u64>,
}

/// What the supervisor saw of one device, by time.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Whether `connection.json` said connected, and when it turned so.
    pub connected: bool,
    pub connects: Vec<Instant>,
    /// The job of this jti: when it was first seen downloading (or later),
    /// and when it ended, with its end state.
    pub jobs: BTreeMap<String, JobSeen>,
}

#[derive(Debug, Clone, Default)]
pub struct JobSeen {
    pub downloading_at: Option<Instant>,
    pub ended_at: Option<Instant>,
    pub state: Option<UpdateState>,
    pub bytes_fetched: u64,
}

pub struct SimDevice {
    pub id: String,
    pub dir: PathBuf,
    booted: String,
    boots: u32,
    mqtt: String,
    child: Option<Child>,
    rebooting: bool,
}

pub struct Fleet {
    pub net: Net,
    pub pki: Pki,
    pub broker: Broker,
    pub server: ImageServer,
    pub dir: tempfile::TempDir,
    pub devices: Vec<Arc<Mutex<SimDevice>>>,
    pub seen: Arc<Mutex<BTreeMap<String, Seen>>>,
    pub fleet_config: PathBuf,
    cosigner: Child,
    stop: Arc<AtomicBool>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

fn keys_dir(dir: &Path) -> PathBuf {
    dir.join("keys")
}

impl Fleet {
    /// Makes everything and starts every daemon; returns once all are connected.
    pub fn start(options: FleetOptions) -> Fleet {
        raise_open_files();
        let dir = tempfile::tempdir().unwrap();
        let net = Net::new();
        let pki = Pki::new(&dir.path().join("pki"), net.cloud_ip());
        let ids: Vec<String> = (1..=options.devices).map(|i| format!("gw-{i:04}")).collect();
        let groups: Vec<(&str, &str, &str)> = ids.iter().map(|id| (id.as_str(), PROJECT, GROUP)).collect();
        let broker = Broker::start_for_fleet(&net, &pki, &dir.path().join("broker"), &groups);
        let ip = net.cloud_ip();
        let server =
            super::cloud::run_in_netns(net.cloud_ns(), move || ImageServer::start_on(&format!("{ip}:8080")));
        server.set_rate(options.image_rate);
        let keys = keys_dir(dir.path());
        for name in ["fleet", "cosigner", "fs1"] {
            ok(Command::new(fleetctl_bin()).args(["keygen", "--out"]).arg(&keys).args(["--name", name]));
        }
        let cosigner = start_cosigner(&net, dir.path());
        let fleet_config = write_fleet_config(dir.path(), &pki, &broker);
        let (host, port) = broker.url();
        let mut devices = Vec::new();
        for id in &ids {
            let (cert, key) = pki.client(id);
            let mqtt = format!(
                "host = \"{host}\"\nport = {port}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
                 reconnect_spread_s = {}\n",
                pki.ca_pem.display(),
                cert.display(),
                key.display(),
                options.reconnect_spread_s
            );
            let device = SimDevice::create(dir.path(), id, mqtt);
            devices.push(Arc::new(Mutex::new(device)));
        }
        let mut fleet = Fleet {
            net,
            pki,
            broker,
            server,
            dir,
            devices,
            seen: Default::default(),
            fleet_config,
            cosigner,
            stop: Arc::new(AtomicBool::new(false)),
            supervisor: None,
        };
        for d in &fleet.devices {
            d.lock().unwrap().start(fleet.net.device_ns());
        }
        fleet.start_supervisor();
        fleet.wait_all_connected(Duration::from_secs(60 + options.devices as u64 / 10));
        fleet
    }

    fn start_supervisor(&mut self) {
        let devices = self.devices.clone();
        let seen = self.seen.clone();
        let stop = self.stop.clone();
        let ns = self.net.device_ns().to_string();
        self.supervisor = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for d in &devices {
                    let (id, dir, rebooting) = {
                        let d = d.lock().unwrap();
                        (d.id.clone(), d.dir.clone(), d.rebooting)
                    };
                    observe(&id, &dir, &seen);
                    if !rebooting && dir.join("reboot-request").exists() {
                        d.lock().unwrap().rebooting = true;
                        let (d, ns) = (d.clone(), ns.clone());
                        std::thread::spawn(move || {
                            let mut d = d.lock().unwrap();
                            d.reboot(&ns);
                            d.rebooting = false;
                        });
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }

    pub fn connected_count(&self) -> usize {
        self.devices.iter().filter(|d| connected(&d.lock().unwrap().dir)).count()
    }

    pub fn wait_all_connected(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let n = self.connected_count();
            if n == self.devices.len() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} of {} devices connected after {within:?}\n{}",
                self.devices.len(),
                self.broker.log().lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn ids(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.lock().unwrap().id.clone()).collect()
    }

    /// Serves `image` and signs a rollout message for the group, co-signed:
    /// `waves` as `fleetctl sign --wave` takes them.
    pub fn rollout_message(
        &self,
        name: &str,
        jti: &str,
        version: u64,
        image: &[u8],
        waves: &[String],
        spread_s: u64,
    ) -> PathBuf {
        let file = self.dir.path().join(format!("{name}.img"));
        std::fs::write(&file, image).unwrap();
        let url = self.server.add(&format!("/{name}.img"), image.to_vec());
        let keys = keys_dir(self.dir.path());
        let signed = self.dir.path().join(format!("{name}.fleet.json"));
        let mut cmd = Command::new(fleetctl_bin());
        cmd.args(["sign", "--kid", "fleet", "--key"])
            .arg(keys.join("fleet.key.pem"))
            .args(["--project", PROJECT, "--hardware", HARDWARE, "--group", GROUP, "--jti", jti])
            .args(["--version", &version.to_string(), "--name", name, "--url", &url, "--image"])
            .arg(&file)
            .args(["--spread-s", &spread_s.to_string()]);
        for wave in waves {
            cmd.args(["--wave", wave]);
        }
        ok(cmd.arg("--out").arg(&signed));
        let message = self.dir.path().join(format!("{name}.json"));
        ok(Command::new(fleetctl_bin())
            .args(["cosign", "--kid", "cosigner", "--key"])
            .arg(keys.join("cosigner.key.pem"))
            .arg("--out")
            .arg(&message)
            .arg(&signed));
        message
    }

    /// `fleetctl rollout ARGS --config <the fleet's>` in the cloud namespace.
    pub fn rollout(&self, args: &[&str]) -> Command {
        let mut cmd = self.net.in_cloud(fleetctl_bin());
        cmd.arg("rollout").args(&args[..1]).arg("--config").arg(&self.fleet_config).args(&args[1..]);
        cmd
    }

    /// The job for `jti` as each device's supervisor saw it.
    pub fn jobs(&self, jti: &str) -> BTreeMap<String, JobSeen> {
        let seen = self.seen.lock().unwrap();
        self.ids()
            .into_iter()
            .map(|id| {
                let job = seen.get(&id).and_then(|s| s.jobs.get(jti)).cloned().unwrap_or_default();
                (id, job)
            })
            .collect()
    }

    /// Waits until every device's job for `jti` ended (by `within`).
    pub fn wait_all_ended(&self, jti: &str, within: Duration) -> BTreeMap<String, JobSeen> {
        let deadline = Instant::now() + within;
        loop {
            let jobs = self.jobs(jti);
            let open: Vec<_> =
                jobs.iter().filter(|(_, j)| j.ended_at.is_none()).map(|(id, j)| (id, j.state)).collect();
            if open.is_empty() {
                return jobs;
            }
            assert!(
                Instant::now() < deadline,
                "{} devices not ended after {within:?}: {:?}",
                open.len(),
                &open[..open.len().min(10)]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Summed resident memory of the running daemons, in bytes.
    pub fn daemons_rss(&self) -> u64 {
        self.devices
            .iter()
            .filter_map(|d| d.lock().unwrap().child.as_ref().map(Child::id))
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("VmRSS:")
                        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
                })
            })
            .sum::<u64>()
            * 1024
    }

    /// Connection attempts the broker logged (`New connection from`), per
    /// epoch second, from `since` (epoch seconds) on.
    pub fn connection_attempts_per_second(&self, since: u64) -> BTreeMap<u64, usize> {
        let mut per_second = BTreeMap::new();
        for line in self.broker.log().lines().filter(|l| l.contains("New connection from")) {
            let Some(at) = line.split(':').next().and_then(|t| t.trim().parse::<u64>().ok()) else {
                continue;
            };
            if at >= since {
                *per_second.entry(at).or_default() += 1;
            }
        }
        per_second
    }

    /// When each device turned connected, from `since` on.
    pub fn connects_since(&self, since: Instant) -> BTreeMap<String, Vec<Instant>> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .map(|(id, s)| (id.clone(), s.connects.iter().copied().filter(|t| *t >= since).collect()))
            .collect()
    }

    /// A device's log.
    pub fn device_log(&self, id: &str) -> String {
        let dir = self.dir.path().join("devices").join(id);
        std::fs::read_to_string(dir.join("fleetd.log")).unwrap_or_default()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        for d in &self.devices {
            if let Ok(mut d) = d.lock() {
                if let Some(mut c) = d.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        let _ = self.cosigner.kill();
        let _ = self.cosigner.wait();
    }
}

/// A thousand daemons, their connections at the broker and their logs
/// need more open files than the usual soft limit.
fn raise_open_files() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn connected(dir: &Path) -> bool {
    fleetd::mqtt::read_connection_file(&dir.join("state")).is_some_and(|m| m.connected)
}

/// Records when the device's jobs were first seen downloading and ended.
fn observe(id: &str, dir: &Path, seen: &Mutex<BTreeMap<String, Seen>>) {
    let now = Instant::now();
    let is_connected = connected(dir);
    {
        let mut seen = seen.lock().unwrap();
        let device = seen.entry(id.to_string()).or_default();
        if is_connected && !device.connected {
            device.connects.push(now);
        }
        device.connected = is_connected;
    }
    let Some(state) = std::fs::read(dir.join("state/state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<fleetd::update::State>(&b).ok())
    else {
        return;
    };
    let Some(job) = &state.job else { return };
    let step = job.phase.status_name();
    let mut seen = seen.lock().unwrap();
    let entry = seen.entry(id.to_string()).or_default().jobs.entry(job.jti.clone()).or_default();
    if !matches!(step, UpdateState::Scheduled | UpdateState::Idle) && entry.downloading_at.is_none() {
        // A halt while scheduled never downloaded.
        if !(step == UpdateState::Halted && job.transfer.bytes_fetched == 0) {
            entry.downloading_at = Some(now);
        }
    }
    if job.phase.is_terminal() && entry.ended_at.is_none() {
        entry.ended_at = Some(now);
    }
    entry.state = Some(step);
    entry.bytes_fetched = job.transfer.bytes_fetched;
}

impl SimDevice {
    fn create(root: &Path, id: &str, mqtt: String) -> SimDevice {
        let dir = root.join("devices").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        for slot in ["a", "b"] {
            let f = std::fs::File::create(dir.join(format!("slot-{slot}.img"))).unwrap();
            f.set_len(SLOT_SIZE).unwrap();
        }
        fleetd::boot::grub::GrubEnv::initialize(&dir.join("grubenv"), &["A".into(), "B".into()]).unwrap();
        let device = SimDevice {
            id: id.to_string(),
            dir,
            booted: "A".into(),
            boots: 1,
            mqtt,
            child: None,
            rebooting: false,
        };
        device.set_health(true);
        device.write_boot_id();
        device.write_config(root);
        device
    }

    fn write_config(&self, root: &Path) {
        let keys = keys_dir(root);
        let text = fleetd_fixture::DeviceConfig {
            id: self.id.clone(),
            project: PROJECT.into(),
            hardware: HARDWARE.into(),
            groups: vec![GROUP.into()],
            trust: "allow_http = true".into(),
            keys: vec![
                ("fleet".into(), keys.join("fleet.pub.pem").display().to_string()),
                ("cosigner".into(), keys.join("cosigner.pub.pem").display().to_string()),
            ],
            boot: format!(
                "backend = \"grub\"\ngrubenv = \"grubenv\"\nbooted_slot = \"{}\"\nboot_id_file = \"boot_id\"",
                self.booted
            ),
            mqtt: Some(self.mqtt.clone()),
            update: Some(format!(
                "reboot = \"command\"\nreboot_command = \"printf '%s' \\\"$FLEETD_REBOOT_ARG\\\" > '{}'\"\n\
                 retry_base_ms = 200\ncheckpoint_mib = 1\n",
                self.dir.join("reboot-request").display()
            )),
            health: Some("command = \"health-check\"\ntimeout_s = 20".into()),
            ..Default::default()
        }
        .to_toml();
        std::fs::write(self.dir.join("fleetd.toml"), text).unwrap();
    }

    fn set_health(&self, healthy: bool) {
        use std::os::unix::fs::PermissionsExt;
        let script = self.dir.join("health-check");
        std::fs::write(&script, format!("#!/bin/sh\nexit {}\n", if healthy { 0 } else { 3 })).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn write_boot_id(&self) {
        std::fs::write(self.dir.join("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
    }

    /// `fleetd run` in the device namespace, its log appended to `fleetd.log`.
    fn start(&mut self, device_ns: &str) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("fleetd.log")).unwrap();
        let ip = super::cloud::find_tool("ip").expect("ip");
        let child = Command::new(ip)
            .args(["netns", "exec", device_ns])
            .arg(fleetd_bin())
            .env(NO_BUS.0, NO_BUS.1)
            .args(["run", "--config"])
            .arg(self.dir.join("fleetd.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// The daemon stops (SIGTERM), GRUB picks a slot, and it starts again.
    fn reboot(&mut self, device_ns: &str) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("reboot-request"));
        let booted =
            super::bootsim_grub::power_on(&self.dir.join("grubenv"), &|_| true).expect("a slot boots");
        self.boots += 1;
        self.write_boot_id();
        let slot =
            std::fs::read(self.dir.join(format!("slot-{}.img", booted.to_lowercase()))).unwrap_or_default();
        self.set_health(!slot.starts_with(BAD_MARKER));
        self.booted = booted;
        let root = self.dir.parent().and_then(Path::parent).unwrap().to_path_buf();
        self.write_config(&root);
        self.start(device_ns);
    }
}

fn start_cosigner(net: &Net, dir: &Path) -> Child {
    let keys = keys_dir(dir);
    let config = dir.join("cosigner.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{COSIGNER_LISTEN}\"\nkey = \"{}\"\nstate_dir = \"{}\"\nprojects = [\"{PROJECT}\"]\nallow_http = true\n",
            keys.join("cosigner.key.pem").display(),
            dir.join("cosigner").display()
        ),
    )
    .unwrap();
    ok(Command::new(fleetctl_bin())
        .args(["cosigner", "register", "--config"])
        .arg(&config)
        .arg("--key")
        .arg(keys.join("fs1.pub.pem"))
        .arg("fs1"));
    let mut child = net
        .in_cloud(fleetctl_bin())
        .args(["cosigner", "serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // It prints its address once it listens; the rest is drained.
    use std::io::BufRead;
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "co-signer: {line:?}");
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

fn write_fleet_config(dir: &Path, pki: &Pki, broker: &Broker) -> PathBuf {
    let (cert, key) = pki.client(FLEET_SERVER);
    let (host, port) = broker.url();
    let keys = keys_dir(dir);
    let path = dir.join("fleetctl.toml");
    std::fs::write(
        &path,
        format!(
            "project = \"{PROJECT}\"\ndatabase = \"sqlite://rollouts.db\"\n\n[broker]\nhost = \"{host}\"\nport = {port}\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[signing]\nserver = \"fs1\"\nserver_key = \"{}\"\n\
             fleet_key = \"{}\"\ncosigner_url = \"http://{COSIGNER_LISTEN}\"\n",
            pki.ca_pem.display(),
            cert.display(),
            key.display(),
            keys.join("fs1.key.pem").display(),
            keys.join("fleet.key.pem").display(),
        ),
    )
    .unwrap();
    path
}
