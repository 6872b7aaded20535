//! A private "cloud" for integration tests: two network namespaces joined by
//! a veth pair ([`Net`]), a test PKI made with rcgen ([`Pki`]), a real
//! mosquitto broker with TLS client certificates and per-device ACLs inside
//! the cloud namespace ([`Broker`]), and [`run_in_netns`] to run test code
//! (an HTTP server, a TLS client) inside a namespace from the test process.
//!
//! Everything here needs root (`ip netns`, `setns`). Call [`available`]
//! first: it returns false with a printed reason when the test cannot run,
//! and panics instead when `CI` is set.
//!
//! Traffic only ever flows inside the namespaces made here: 10.231.N.1 (cloud)
//! and 10.231.N.2 (device) on a /24 that exists nowhere else.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// The DNS name in the broker certificate; [`Net`] maps it to the cloud
/// address in both namespaces' `/etc/hosts` (seen by `ip netns exec` only).
pub const BROKER_HOST: &str = "broker.test";
/// The broker's MQTT-over-TLS port inside the cloud namespace.
pub const MQTT_TLS_PORT: u16 = 8883;
/// The MQTT identity (certificate CN) of the fleet side.
pub const FLEET_SERVER: &str = "fleet-server";

const NS_PREFIX: &str = "fdt";

// ---------------------------------------------------------------------------
// Environment

/// Finds a program in `PATH`, `/usr/sbin` or `/sbin` (root's tools are there
/// even when `PATH` lacks them).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| panic!("{name} not found (scripts/setup installs it)"))
}

/// Whether this process can build the cloud: root, and `ip` plus every tool
/// named in `tools`. When it cannot, prints why and returns false, or panics
/// when `CI` is set (CI runs as root with scripts/setup done, so it must run).
pub fn available(tools: &[&str]) -> bool {
    let mut missing: Vec<String> = std::iter::once(&"ip")
        .chain(tools)
        .filter(|name| find_tool(name).is_none())
        .map(|name| format!("`{name}` (scripts/setup installs it)"))
        .collect();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.insert(0, "root (for network namespaces)".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let reason = format!("needs {}", missing.join(", "));
    assert!(std::env::var_os("CI").is_none(), "CI is set but the cloud harness cannot run: {reason}");
    eprintln!("skipping: {reason}");
    false
}

/// Runs `cmd`, panicking with its output unless it succeeds.
fn checked(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

fn write_file(path: &Path, contents: &[u8], mode: u32) {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.set_permissions(fs::Permissions::from_mode(mode)).expect("chmod");
    file.write_all(contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------
// PKI

/// A test PKI: a CA, a broker (server) certificate, client certificates whose
/// CN is the MQTT identity, and a second unrelated CA for "wrong CA" tests.
/// All keys are ECDSA P-256 in PKCS#8 PEM, written 0600; certificates 0644.
pub struct Pki {
    pub dir: PathBuf,
    /// The CA that brokers and clients trust.
    pub ca_pem: PathBuf,
    /// Broker certificate: SAN IP = the cloud address, SAN DNS = [`BROKER_HOST`].
    pub broker_cert: PathBuf,
    pub broker_key: PathBuf,
    /// The unrelated CA behind [`Pki::foreign_client`]; nothing trusts it.
    pub foreign_ca_pem: PathBuf,
    ca: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    foreign: Issuer<'static, KeyPair>,
    issued: Mutex<BTreeMap<String, (PathBuf, PathBuf)>>,
}

impl Pki {
    /// Makes the CAs and the broker certificate for `cloud_ip` in `dir`.
    /// (The broker address is in the certificate, so it is needed here:
    /// `Pki::new(dir, net.cloud_ip())`.)
    pub fn new(dir: &Path, cloud_ip: IpAddr) -> Pki {
        fs::create_dir_all(dir).expect("pki dir");
        let (ca, ca_der) = new_ca("fleetd test CA");
        let (foreign, foreign_der) = new_ca("unrelated test CA");
        let ca_pem = dir.join("ca.pem");
        let foreign_ca_pem = dir.join("foreign-ca.pem");
        write_file(&ca_pem, pem("CERTIFICATE", &ca_der).as_bytes(), 0o644);
        write_file(&foreign_ca_pem, pem("CERTIFICATE", &foreign_der).as_bytes(), 0o644);
        let mut pki = Pki {
            dir: dir.to_path_buf(),
            ca_pem,
            broker_cert: PathBuf::new(),
            broker_key: PathBuf::new(),
            foreign_ca_pem,
            ca,
            ca_der,
            foreign,
            issued: Mutex::new(BTreeMap::new()),
        };
        let (cert, key) = pki.server("broker", &[&cloud_ip.to_string(), BROKER_HOST]);
        pki.broker_cert = cert;
        pki.broker_key = key;
        pki
    }

    /// A client certificate and key (`<cn>.pem`, `<cn>.key`) signed by the CA;
    /// `common_name` is the MQTT username (`gw-0042`, [`FLEET_SERVER`]).
    /// Made on the first call for a name; later calls return the same files,
    /// so programs already reading them are never raced.
    pub fn client(&self, common_name: &str) -> (PathBuf, PathBuf) {
        self.once(common_name, || issue(&self.ca, common_name, &[], false))
    }

    /// The CA's key (`ca.key`, 0600), for a fleet side that signs CSRs.
    pub fn ca_key(&self) -> PathBuf {
        let path = self.dir.join("ca.key");
        write_file(&path, self.ca.key().serialize_pem().as_bytes(), 0o600);
        path
    }

    /// Signs a device's CSR (PEM) as a client certificate, as a fleet CA does.
    pub fn sign_csr(&self, csr_pem: &str) -> String {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("a CSR");
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.signed_by(&self.ca).expect("sign the CSR").pem()
    }

    /// A client certificate valid only from `not_before` to `not_after`
    /// (years), e.g. an expired one (`<stem>.pem`, `<stem>.key`).
    pub fn client_valid(&self, stem: &str, common_name: &str, years: (i32, i32)) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let mut params = CertificateParams::default();
        params.distinguished_name = name_with_cn(common_name);
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let cert = params.signed_by(&key, &self.ca).expect("sign certificate");
        self.write_pair(stem, cert.der(), &key)
    }

    /// A client certificate with the same shape as [`Pki::client`] but signed
    /// by the unrelated CA (`foreign-<cn>.pem`, `foreign-<cn>.key`).
    pub fn foreign_client(&self, common_name: &str) -> (PathBuf, PathBuf) {
        self.once(&format!("foreign-{common_name}"), || issue(&self.foreign, common_name, &[], false))
    }

    /// A server certificate (`<stem>.pem`, `<stem>.key`) for other servers in
    /// the cloud namespace; each SAN is an IP address or a DNS name.
    pub fn server(&self, stem: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = issue(&self.ca, stem, sans, true);
        self.write_pair(stem, &cert, &key)
    }

    /// A client certificate and key in memory, for in-process rustls clients.
    pub fn client_der(&self, common_name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let (cert, key) = issue(&self.ca, common_name, &[], false);
        (cert, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// Like [`Pki::client_der`], signed by the unrelated CA.
    pub fn foreign_client_der(&self, common_name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let (cert, key) = issue(&self.foreign, common_name, &[], false);
        (cert, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// The CA certificate in DER, for in-process rustls trust stores.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// A rustls client config that trusts the CA and presents a client
    /// certificate for `common_name`.
    pub fn rustls_client(&self, common_name: &str) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der()).expect("CA into trust store");
        let (cert, key) = self.client_der(common_name);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .expect("client auth cert");
        Arc::new(config)
    }

    fn once(
        &self,
        stem: &str,
        make: impl FnOnce() -> (CertificateDer<'static>, KeyPair),
    ) -> (PathBuf, PathBuf) {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pair) = issued.get(stem) {
            return pair.clone();
        }
        let (cert, key) = make();
        let pair = self.write_pair(stem, &cert, &key);
        issued.insert(stem.to_string(), pair.clone());
        pair
    }

    fn write_pair(&self, stem: &str, cert: &CertificateDer<'_>, key: &KeyPair) -> (PathBuf, PathBuf) {
        assert!(
            !stem.is_empty() && !stem.contains(['/', '\0']) && stem != "." && stem != "..",
            "not a file name: {stem:?}"
        );
        let cert_path = self.dir.join(format!("{stem}.pem"));
        let key_path = self.dir.join(format!("{stem}.key"));
        write_file(&cert_path, pem("CERTIFICATE", cert).as_bytes(), 0o644);
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600);
        (cert_path, key_path)
    }
}

fn name_with_cn(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn new_ca(common_name: &str) -> (Issuer<'static, KeyPair>, CertificateDer<'static>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let mut params = CertificateParams::default();
    params.distinguished_name = name_with_cn(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).expect("self-sign CA");
    (Issuer::new(params, key), cert.der().clone())
}

fn issue(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    sans: &[&str],
    server: bool,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("SANs");
    params.distinguished_name = name_with_cn(common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).expect("sign certificate");
    (cert.der().clone(), key)
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

// ---------------------------------------------------------------------------
// Namespaces

/// The path `ip netns` mounts a named namespace at.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// Runs `f` on a new thread that first joins the network namespace `ns`, and
/// returns its result (a panic in `f` is re-raised here). Sockets made in `f`
/// stay in `ns` wherever they are used later, so the usual pattern is to bind
/// a listener here and serve it from any thread or runtime. Threads that `f`
/// spawns are in `ns` too. Only the network namespace changes: files and
/// `/etc/hosts` are the test process's own.
pub fn run_in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in_netns(ns, f).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Like [`run_in_netns`] but returns at once with the thread's handle.
pub fn spawn_in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = netns_path(ns);
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            enter_netns(&path);
            f()
        })
        .expect("spawn netns thread")
}

fn enter_netns(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: a valid open namespace fd; setns only affects the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {}: {}", path.display(), io::Error::last_os_error());
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// Two network namespaces, cloud and device, joined by a veth pair (`veth0`
/// on each side) with 10.231.N.1/24 (cloud) and 10.231.N.2/24 (device),
/// loopback up in both. Names are `fdt<pid>n<k>c` / `fdt<pid>n<k>d`, unique
/// per Net. Dropping it (also while unwinding) kills what still runs in the
/// namespaces and deletes them, which removes the veth pair.
pub struct Net {
    cloud_ns: String,
    device_ns: String,
    cloud_ip: Ipv4Addr,
    device_ip: Ipv4Addr,
    ip: PathBuf,
}

impl Net {
    pub fn new() -> Net {
        SWEEP.call_once(sweep_stale);
        let pid = std::process::id();
        let k = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        // Within a process N differs for 254 Nets in a row; across processes
        // equal N do not matter: every pair of namespaces is its own network.
        let n = 1 + ((pid.wrapping_mul(7)).wrapping_add(k) % 254) as u8;
        let ip = tool("ip");
        let net = Net {
            cloud_ns: format!("{NS_PREFIX}{pid}n{k}c"),
            device_ns: format!("{NS_PREFIX}{pid}n{k}d"),
            cloud_ip: Ipv4Addr::new(10, 231, n, 1),
            device_ip: Ipv4Addr::new(10, 231, n, 2),
            ip,
        };
        // From here on Drop cleans up whatever part was made.
        for ns in [&net.cloud_ns, &net.device_ns] {
            checked(Command::new(&net.ip).args(["netns", "add", ns]));
            net.write_hosts(ns);
        }
        let (c, d) = (net.cloud_ns.as_str(), net.device_ns.as_str());
        // Made inside the cloud namespace, so no interface ever appears in the
        // host's namespace and the same name can be used by every Net.
        net.ip_in(c, &["link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", d]);
        net.ip_in(c, &["addr", "add", &format!("{}/24", net.cloud_ip), "dev", "veth0"]);
        net.ip_in(d, &["addr", "add", &format!("{}/24", net.device_ip), "dev", "veth0"]);
        for ns in [c, d] {
            net.ip_in(ns, &["link", "set", "lo", "up"]);
            net.ip_in(ns, &["link", "set", "veth0", "up"]);
        }
        net
    }

    pub fn cloud_ip(&self) -> IpAddr {
        IpAddr::V4(self.cloud_ip)
    }

    pub fn device_ip(&self) -> IpAddr {
        IpAddr::V4(self.device_ip)
    }

    pub fn cloud_ns(&self) -> &str {
        &self.cloud_ns
    }

    pub fn device_ns(&self) -> &str {
        &self.device_ns
    }

    /// `ip netns exec <device ns> program`: add arguments and run.
    pub fn in_device(&self, program: impl AsRef<OsStr>) -> Command {
        self.exec_in(&self.device_ns, program)
    }

    /// `ip netns exec <cloud ns> program`: add arguments and run.
    pub fn in_cloud(&self, program: impl AsRef<OsStr>) -> Command {
        self.exec_in(&self.cloud_ns, program)
    }

    /// Takes both ends of the veth down: new connections fail at once
    /// (network unreachable) and established ones stall without FIN or RST,
    /// as when the uplink dies.
    pub fn link_down(&self) {
        for ns in [&self.cloud_ns, &self.device_ns] {
            self.ip_in(ns, &["link", "set", "veth0", "down"]);
        }
    }

    /// Brings both ends back up; the on-link routes return with them.
    pub fn link_up(&self) {
        for ns in [&self.cloud_ns, &self.device_ns] {
            self.ip_in(ns, &["link", "set", "veth0", "up"]);
        }
    }

    fn exec_in(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(&self.ip);
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    fn ip_in(&self, ns: &str, args: &[&str]) {
        checked(Command::new(&self.ip).args(["-n", ns]).args(args));
    }

    /// `ip netns exec` bind-mounts `/etc/netns/<ns>/hosts` over `/etc/hosts`,
    /// so programs run with [`Net::in_device`] resolve [`BROKER_HOST`].
    fn write_hosts(&self, ns: &str) {
        let dir = Path::new("/etc/netns").join(ns);
        fs::create_dir_all(&dir).expect("/etc/netns/<ns>");
        let hosts = format!("127.0.0.1 localhost\n{} {BROKER_HOST}\n", self.cloud_ip);
        write_file(&dir.join("hosts"), hosts.as_bytes(), 0o644);
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.cloud_ns, &self.device_ns] {
            remove_netns(&self.ip, ns);
        }
    }
}

/// Kills the processes left in `ns` (started in it by this harness), deletes
/// it and its `/etc/netns` entry. Errors are ignored: it may be half made.
fn remove_netns(ip: &Path, ns: &str) {
    if let Ok(out) = Command::new(ip).args(["netns", "pids", ns]).stderr(Stdio::null()).output() {
        let me = std::process::id() as i32;
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()) {
            if pid != me && pid > 1 {
                // SAFETY: plain kill(2) on a pid listed as living in our namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new(ip).args(["netns", "delete", ns]).stderr(Stdio::null()).status();
    let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
}

/// Removes namespaces of earlier test processes that died without dropping
/// their Net (SIGKILL, timeouts): ours by name, their pid no longer running.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir("/run/netns") else { return };
    let Some(ip) = find_tool("ip") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        let Some((pid, tail)) = rest.split_once('n') else { continue };
        let shaped = tail.len() > 1
            && tail[..tail.len() - 1].bytes().all(|b| b.is_ascii_digit())
            && (tail.ends_with('c') || tail.ends_with('d'));
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if shaped && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_netns(&ip, &name);
        }
    }
}

// ---------------------------------------------------------------------------
// Broker

/// A real mosquitto 2.0 in the cloud namespace on port 8883, TLS only:
/// client certificates required and their CN used as the username, no
/// anonymous access, per-device ACLs, persistence in `dir/persist/`.
///
/// Files in `dir`: `mosquitto.conf`, `acl`, `mosquitto.log` (the broker's
/// log, all types, appended across restarts), `persist/mosquitto.db`.
/// It runs as root (`user root` in the config): the keys stay 0600 root and
/// the test's temporary directory needs no opening up.
pub struct Broker {
    /// None: on the host's loopback ([`Broker::start_local`]).
    cloud_ns: Option<String>,
    ip: IpAddr,
    port: u16,
    dir: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    db: PathBuf,
    child: Option<Child>,
    probe: Arc<rustls::ClientConfig>,
}

impl Broker {
    /// Writes the config and ACL and starts mosquitto; returns once the port
    /// completes a TLS handshake. `groups` are `(device, project, group)`:
    /// each lets that device read `fleet/<project>/groups/<group>/update`.
    pub fn start(net: &Net, pki: &Pki, dir: &Path, groups: &[(&str, &str, &str)]) -> Broker {
        Self::start_with_crl(net, pki, dir, groups, None)
    }

    /// Like [`Broker::start`], checking client certificates against `crl`
    /// (`crlfile`, as packaging/mosquitto/mosquitto.conf ships it), which
    /// mosquitto re-reads on [`Broker::hup`].
    pub fn start_with_crl(
        net: &Net,
        pki: &Pki,
        dir: &Path,
        groups: &[(&str, &str, &str)],
        crl: Option<&Path>,
    ) -> Broker {
        let place = (Some(net.cloud_ns().to_string()), net.cloud_ip(), MQTT_TLS_PORT);
        Self::start_at(place, pki, dir, groups, crl)
    }

    /// A broker for a fleet of simulated devices: saved every 30 s and on
    /// a clean stop rather than after each change (a thousand status
    /// documents would rewrite the database a thousand times), connection
    /// messages only in the log, stamped in epoch seconds.
    pub fn start_for_fleet(net: &Net, pki: &Pki, dir: &Path, groups: &[(&str, &str, &str)]) -> Broker {
        let mut broker = Self::start_with_crl(net, pki, dir, groups, None);
        broker.stop();
        let conf = fs::read_to_string(&broker.conf)
            .expect("broker config")
            .replace("autosave_on_changes true\n", "autosave_on_changes false\n")
            .replace("autosave_interval 1\n", "autosave_interval 30\n")
            .replace(
                "log_type all\n",
                "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
            )
            .replace("log_timestamp_format %H:%M:%S\n", "log_timestamp_format %s\n");
        write_file(&broker.conf, conf.as_bytes(), 0o644);
        let _ = fs::remove_file(&broker.log);
        broker.spawn();
        broker
    }

    /// SIGTERM (the broker saves its database), then start again.
    pub fn restart_cleanly(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The same broker on the host's loopback (127.0.0.1:`port`), for tests
    /// that need no namespaces (a browser on the host); `pki` must be made
    /// for 127.0.0.1.
    pub fn start_local(
        pki: &Pki,
        dir: &Path,
        port: u16,
        groups: &[(&str, &str, &str)],
        crl: Option<&Path>,
    ) -> Broker {
        let place = (None, IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        Self::start_at(place, pki, dir, groups, crl)
    }

    fn start_at(
        (cloud_ns, ip, port): (Option<String>, IpAddr, u16),
        pki: &Pki,
        dir: &Path,
        groups: &[(&str, &str, &str)],
        crl: Option<&Path>,
    ) -> Broker {
        let persist = dir.join("persist");
        fs::create_dir_all(&persist).expect("persistence dir");
        let acl = dir.join("acl");
        write_file(&acl, acl_text(groups).as_bytes(), 0o644);
        let conf = dir.join("mosquitto.conf");
        let mut config = conf_text(&pki.ca_pem, &pki.broker_cert, &pki.broker_key, &acl, &persist, port);
        if cloud_ns.is_none() {
            config = config.replace(&format!("listener {port}\n"), &format!("listener {port} {ip}\n"));
        }
        if let Some(crl) = crl {
            config.push_str(&format!("crlfile {}\n", crl.display()));
        }
        write_file(&conf, config.as_bytes(), 0o644);
        let mut broker = Broker {
            cloud_ns,
            ip,
            port,
            dir: dir.to_path_buf(),
            conf,
            log: dir.join("mosquitto.log"),
            db: persist.join("mosquitto.db"),
            child: None,
            probe: pki.rustls_client("harness-probe"),
        };
        broker.spawn();
        broker
    }

    /// The address clients use: the cloud IP (as in the certificate) and 8883.
    pub fn url(&self) -> (String, u16) {
        (self.ip.to_string(), self.port)
    }

    /// SIGKILL, like a crash: state not yet autosaved is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: mosquitto saves its database and exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same config and persistence (killing it first
    /// if it still runs); returns once TLS is served again.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGHUP (`systemctl reload`): mosquitto 2.0 re-reads its config, ACL,
    /// server key and CRL, not its CA.
    pub fn hup(&self) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        }
    }

    /// The running broker's pid (`ip netns exec` execs it in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn db_path(&self) -> &Path {
        &self.db
    }

    /// Waits until the persistence database holds `needle` (payloads are
    /// stored as-is), so that a [`Broker::kill`] after it cannot lose it.
    /// Panics after `timeout`.
    pub fn wait_persisted(&self, needle: &[u8], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let db = fs::read(&self.db).unwrap_or_default();
            if db.windows(needle.len().max(1)).any(|w| w == needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} not in {} after {timeout:?}",
                String::from_utf8_lossy(needle),
                self.db.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new().create(true).append(true).open(&self.log).expect("broker log");
        let mut cmd = match &self.cloud_ns {
            Some(ns) => {
                let mut cmd = Command::new(tool("ip"));
                cmd.args(["netns", "exec", ns]).arg(tool("mosquitto"));
                cmd
            }
            None => Command::new(tool("mosquitto")),
        };
        cmd.arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn mosquitto"));
        self.wait_ready(Duration::from_secs(15));
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last_error;
        loop {
            let child = self.child.as_mut().expect("broker child");
            if let Some(status) = child.try_wait().expect("wait broker") {
                self.child = None;
                panic!(
                    "mosquitto exited ({status}) before serving; log {}:\n{}",
                    self.log.display(),
                    self.log()
                );
            }
            let (ip, port, probe) = (self.ip, self.port, self.probe.clone());
            let handshake = match &self.cloud_ns {
                Some(ns) => run_in_netns(ns, move || tls_handshake(ip, port, probe)),
                None => tls_handshake(ip, port, probe),
            };
            match handshake {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "mosquitto gave no TLS handshake on {ip}:{port} in {timeout:?} ({last_error}); log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One TLS handshake with a client certificate, then close_notify.
fn tls_handshake(ip: IpAddr, port: u16, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let mut tcp = TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let mut tls = rustls::ClientConnection::new(config, ServerName::from(ip)).map_err(|e| e.to_string())?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp).map_err(|e| format!("handshake: {e}"))?;
    }
    tls.send_close_notify();
    let _ = tls.complete_io(&mut tcp);
    Ok(())
}

fn acl_text(groups: &[(&str, &str, &str)]) -> String {
    let mut by_device: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for &(device, project, group) in groups {
        for part in [device, project, group] {
            assert!(
                !part.is_empty() && !part.contains(['/', '+', '#', ' ', '\t', '\n']),
                "not a topic level: {part:?}"
            );
        }
        by_device
            .entry(device)
            .or_default()
            .push(format!("topic read fleet/{project}/groups/{group}/update"));
    }
    let mut text = String::from(
        "# Generated by tests/common/cloud.rs (see packaging/mosquitto/acl).\n\
         # %u is the client certificate's CN (use_identity_as_username); never %c,\n\
         # which a client chooses freely.\n\
         pattern read fleet/+/devices/%u/update\n\
         pattern write fleet/+/devices/%u/status\n\
         pattern write fleet/+/devices/%u/progress\n\
                  pattern write fleet/+/devices/%u/online\n\
         # AWS IoT Jobs profile: a thing's own job topics.\n\
         pattern readwrite $aws/things/%u/jobs/#\n\n",
    );
    text.push_str(&format!("user {FLEET_SERVER}\ntopic readwrite fleet/#\n"));
    text.push_str("\n# The AWS IoT Jobs service double in tests.\nuser aws-jobs\ntopic readwrite $aws/#\n");
    for (device, topics) in by_device {
        text.push_str(&format!("\nuser {device}\n"));
        for topic in topics {
            text.push_str(&topic);
            text.push('\n');
        }
    }
    text
}

fn conf_text(ca: &Path, cert: &Path, key: &Path, acl: &Path, persist: &Path, port: u16) -> String {
    format!(
        "# Generated by tests/common/cloud.rs (see packaging/mosquitto/mosquitto.conf).\n\
         # Test instances run as root so that 0600 root keys and the test's\n\
         # private temporary directory work without changes.\n\
         user root\n\
         per_listener_settings false\n\
         {max_packet_size}\n\
         allow_anonymous false\n\
         acl_file {acl}\n\
         persistence true\n\
         persistence_location {persist}/\n\
         persistence_file mosquitto.db\n\
         # Save after every change, so that a SIGKILL loses as little as it can.\n\
         autosave_on_changes true\n\
         autosave_interval 1\n\
         log_dest stderr\n\
         log_type all\n\
         log_timestamp_format %H:%M:%S\n\
         connection_messages true\n\
         \n\
         listener {port}\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate true\n\
         use_identity_as_username true\n",
        max_packet_size = shipped_setting("max_packet_size"),
        acl = acl.display(),
        persist = persist.display(),
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    )
}

/// A setting's line as packaging/mosquitto/mosquitto.conf ships it, so the
/// test broker enforces the same limits as a deployed one.
pub fn shipped_setting(name: &str) -> String {
    let path = crate::common::root().join("packaging/mosquitto/mosquitto.conf");
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("{} sets no {name}", path.display()))
        .to_string()
}
