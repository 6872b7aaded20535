//! The D-Bus API (`org.fleetd.Daemon1`) on a private dbus-daemon: fleetd
//! run as the daemon, the test as a client (zbus) and `fleetd`'s CLI, which
//! uses the bus while the daemon runs. One ordered stream of the object's
//! signals shows that Progress never says 100 before the boot slot is
//! switched and that Completed follows every ending. A second test runs
//! the shipped bus policy on a bus with the system bus's default policy,
//! and `busctl` as users inside and outside the `fleetd` group.

use crate::common;
use common::gateway::*;
use common::*;
use futures_util::StreamExt;
use std::path::Path;
use std::time::{Duration, Instant};
use zbus::zvariant::OwnedValue;

const NAME: &str = "org.fleetd.Daemon1";
const PATH: &str = "/org/fleetd/Daemon1";

/// A device configured by hand (no provisioning) whose broker refuses
/// connections: the API must not depend on MQTT. The health check waits
/// for a connection that never comes, so a trial lasts until its 20 s
/// timeout unless MarkGood ends it.
fn device() -> Gateway {
    let mut g = Gateway::new(Bootloader::Grub, 4 << 20);
    let pki = common::cloud::Pki::new(&g.path().join("pki"), std::net::Ipv4Addr::LOCALHOST.into());
    let (cert, key) = pki.client("gw-0042");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    g.extra_config = format!(
        "\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.ca_pem, cert, key
    );
    g.write_config();
    g
}

/// What the object emitted, in the order the bus delivered it.
#[derive(Debug, Clone, PartialEq)]
enum Signal {
    Changed(Vec<(String, String)>),
    Completed(i32, String),
}

struct Client {
    conn: zbus::Connection,
    proxy: zbus::Proxy<'static>,
    signals: std::sync::Arc<std::sync::Mutex<Vec<Signal>>>,
}

impl Client {
    async fn connect(address: &str) -> Client {
        let conn = zbus::connection::Builder::address(address).unwrap().build().await.unwrap();
        let rule =
            zbus::MatchRule::builder().msg_type(zbus::message::Type::Signal).path(PATH).unwrap().build();
        let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, None).await.unwrap();
        let signals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = signals.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let header = message.header();
                let member = header.member().map(|m| m.to_string()).unwrap_or_default();
                let signal = match member.as_str() {
                    "PropertiesChanged" => {
                        let (_iface, changed, _): (
                            String,
                            std::collections::HashMap<String, OwnedValue>,
                            Vec<String>,
                        ) = message.body().deserialize().unwrap();
                        let mut list: Vec<(String, String)> =
                            changed.into_iter().map(|(k, v)| (k, describe(&v))).collect();
                        list.sort();
                        Signal::Changed(list)
                    }
                    "Completed" => {
                        let (result, detail): (i32, String) = message.body().deserialize().unwrap();
                        Signal::Completed(result, detail)
                    }
                    _ => continue,
                };
                sink.lock().unwrap().push(signal);
            }
        });
        let proxy = daemon_proxy(&conn).await;
        Client { conn, proxy, signals }
    }

    /// Until the daemon owns its name (it does before READY=1).
    async fn wait_for_daemon(&self, daemon: &Daemon) {
        let dbus = zbus::fdo::DBusProxy::new(&self.conn).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dbus.name_has_owner(NAME.try_into().unwrap()).await.unwrap() {
            assert!(Instant::now() < deadline, "the daemon never owned {NAME}:\n{}", daemon.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn get<T>(&self, name: &str) -> T
    where
        T: TryFrom<OwnedValue>,
        T::Error: Into<zbus::Error>,
    {
        self.proxy.get_property::<T>(name).await.unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Waits until `done` holds over the signals seen so far.
    async fn until(&self, what: &str, timeout: Duration, done: impl Fn(&[Signal]) -> bool) -> Vec<Signal> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.signals.lock().unwrap().clone();
            if done(&seen) {
                return seen;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; saw {seen:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn take(&self) -> Vec<Signal> {
        std::mem::take(&mut *self.signals.lock().unwrap())
    }
}

/// A property value as text: `45 downloading` for Progress, the string
/// for strings, else its Debug form.
fn describe(v: &OwnedValue) -> String {
    if let Ok((percent, step)) =
        v.try_clone().map(<(i32, String)>::try_from).unwrap_or(Err(zbus::zvariant::Error::IncorrectType))
    {
        return format!("{percent} {step}");
    }
    if let Ok(text) = v.try_clone().map(String::try_from).unwrap_or(Err(zbus::zvariant::Error::IncorrectType))
    {
        return text;
    }
    format!("{v:?}")
}

fn completed(seen: &[Signal]) -> Option<(i32, String)> {
    seen.iter().find_map(|s| match s {
        Signal::Completed(r, d) => Some((*r, d.clone())),
        _ => None,
    })
}

/// The Progress values in `seen`, with whether State had reached
/// reboot-pending by then.
fn progress_values(seen: &[Signal]) -> Vec<(i32, bool)> {
    let mut pending = false;
    let mut out = Vec::new();
    for s in seen {
        let Signal::Changed(list) = s else { continue };
        for (k, v) in list {
            if k == "State" && v == "reboot-pending" {
                pending = true;
            }
        }
        for (k, v) in list {
            if k == "Progress" {
                let percent = v.split(' ').next().and_then(|p| p.parse().ok());
                out.push((percent.unwrap_or_else(|| panic!("Progress {v:?}")), pending));
            }
        }
    }
    out
}

fn slot_facts(
    slots: &[(String, std::collections::HashMap<String, OwnedValue>)],
    name: &str,
    key: &str,
) -> String {
    let (_, facts) =
        slots.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no slot {name}: {slots:?}"));
    describe(facts.get(key).unwrap_or_else(|| panic!("no {key} for {name}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_progress_completed_mark_good_and_cancel() {
    let bus_dir = tempfile::tempdir().unwrap();
    let Some(bus) = common::dbus::PrivateBus::start(bus_dir.path()) else {
        assert!(std::env::var_os("CI").is_none(), "CI must run the D-Bus tests (dbus-daemon, scripts/setup)");
        eprintln!("SKIP: needs dbus-daemon (scripts/setup)");
        return;
    };
    let mut g = device();
    let env = [("DBUS_SYSTEM_BUS_ADDRESS", bus.address.as_str())];
    let log = g.path().join("fleetd.log");
    let mut daemon = Daemon::start(&g.dev.config(), None, &env, &log);
    let client = Client::connect(&bus.address).await;
    client.wait_for_daemon(&daemon).await;

    // The properties, as on disk: nothing installed, A booted and primary.
    assert_eq!(client.get::<String>("State").await, "idle");
    assert_eq!(client.get::<(i32, String)>("Progress").await, (0, "idle".to_string()));
    assert_eq!(client.get::<String>("BootedSlot").await, "A");
    assert_eq!(client.get::<String>("PrimarySlot").await, "A");
    assert!(client.get::<bool>("Provisioned").await, "configured by hand: provisioned");
    assert!(!client.get::<bool>("Connected").await, "the broker refuses connections");
    let before = client.get::<u64>("InstalledVersion").await;
    let slots: Vec<(String, std::collections::HashMap<String, OwnedValue>)> =
        client.proxy.call("GetSlotStatus", &()).await.unwrap();
    assert!(slot_facts(&slots, "A", "booted").contains("Bool(true)"), "{slots:?}");
    assert!(slot_facts(&slots, "B", "booted").contains("Bool(false)"), "{slots:?}");
    assert!(slot_facts(&slots, "B", "device").contains("slot-b.img"));

    // `fleetd status` asks the daemon.
    let status =
        fleetd().env(env[0].0, env[0].1).args(["status", "--config"]).arg(g.dev.config()).output().unwrap();
    let text = stdout(&status);
    assert!(text.contains("the running daemon (D-Bus)"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("mqtt") && l.ends_with("disconnected")), "{text}");

    // Install through the CLI, which hands the message to the daemon and
    // follows it (2 MiB/s: a couple of seconds of progress).
    let server = common::imageserver::ImageServer::start();
    server.set_rate(Some(2 << 20));
    let image = image_bytes(4 << 20, 2);
    let file = g.path().join("v2.img");
    std::fs::write(&file, &image).unwrap();
    let v2 = g.message("v2", &server.add("/v2.img", image), &file, before + 2);
    let out = fleetd()
        .env(env[0].0, env[0].1)
        .args(["install", "--config"])
        .arg(g.dev.config())
        .arg(&v2)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stderr(&out), daemon.log());
    assert!(stderr(&out).contains("the daemon takes the update"), "{}", stderr(&out));
    let seen = client.until("Completed", Duration::from_secs(30), |s| completed(s).is_some()).await;
    let (result, detail) = completed(&seen).unwrap();
    assert_eq!(result, 0, "{detail}");
    let progress = progress_values(&seen);
    assert!(
        progress.iter().filter(|(p, _)| *p > 0 && *p < 90).count() >= 3,
        "download progress: {progress:?}"
    );
    assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0), "never backwards: {progress:?}");
    for (percent, pending) in &progress {
        assert!(*percent < 100 || *pending, "100 before the slot switch: {progress:?}");
    }
    assert_eq!(progress.last().map(|p| p.0), Some(100), "{progress:?}");
    let last_progress = seen
        .iter()
        .rposition(|s| matches!(s, Signal::Changed(l) if l.iter().any(|(k, _)| k == "Progress")))
        .unwrap();
    let completed_at = seen.iter().position(|s| matches!(s, Signal::Completed(..))).unwrap();
    assert!(last_progress < completed_at, "Completed comes after the last Progress: {seen:#?}");
    assert_eq!(client.get::<String>("State").await, "reboot-pending");
    assert_eq!(client.get::<String>("PrimarySlot").await, "B");
    // Completed comes at reboot-pending; the reboot command runs right after it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.reboot_requested().is_none() {
        assert!(Instant::now() < deadline, "the daemon never asked for the reboot:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The reboot: B comes up on trial; MarkGood (the CLI, over the bus)
    // commits it before the health timeout would roll it back.
    daemon.stop();
    assert_eq!(g.power_on(&|_| true).as_deref(), Some("B"));
    client.take();
    let mut daemon = Daemon::start(&g.dev.config(), None, &env, &log);
    client.wait_for_daemon(&daemon).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get::<String>("State").await != "testing" {
        assert!(Instant::now() < deadline, "no trial:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = fleetd()
        .env(env[0].0, env[0].1)
        .args(["mark-good", "--config"])
        .arg(g.dev.config())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "slot B marked good");
    let seen =
        client.until("Completed after MarkGood", Duration::from_secs(10), |s| completed(s).is_some()).await;
    assert_eq!(completed(&seen).map(|c| c.0), Some(0), "{seen:#?}");
    assert_eq!(client.get::<String>("State").await, "committed");
    assert_eq!(client.get::<u64>("InstalledVersion").await, before + 2);

    // Cancel: a slow download, given up half-way. A second install while
    // it runs is refused as busy, with its own Completed.
    server.set_rate(Some(256 << 10));
    let image = image_bytes(4 << 20, 3);
    let file = g.path().join("v3.img");
    std::fs::write(&file, &image).unwrap();
    let v3 = g.message("v3", &server.add("/v3.img", image), &file, before + 3);
    let v4 = g.message("v4", &server.add("/v4.img", vec![0; 16]), &file, before + 4);
    client.take();
    let () = client.proxy.call("Install", &(v3.to_str().unwrap(),)).await.unwrap();
    client
        .until("download progress", Duration::from_secs(20), |s| {
            progress_values(s).iter().any(|(p, _)| *p > 0)
        })
        .await;
    let busy = client.proxy.call::<_, _, String>("InstallMessage", &(std::fs::read(&v4).unwrap(),)).await;
    match busy {
        Err(zbus::Error::MethodError(name, Some(text), _)) => {
            assert_eq!(name.as_str(), "org.fleetd.Daemon1.Error.Busy");
            assert!(text.starts_with("busy:"), "{text}");
        }
        other => panic!("a second install while one runs: {other:?}"),
    }
    let seen =
        client.until("Completed for the refusal", Duration::from_secs(5), |s| completed(s).is_some()).await;
    assert_eq!(completed(&seen).map(|c| c.0), Some(4));
    client.take();
    let () = client.proxy.call("Cancel", &()).await.unwrap();
    let seen =
        client.until("Completed after Cancel", Duration::from_secs(10), |s| completed(s).is_some()).await;
    let (result, detail) = completed(&seen).unwrap();
    assert_eq!(result, 2, "{detail}");
    assert!(detail.contains("cancelled"), "{detail}");
    assert_eq!(client.get::<String>("State").await, "failed");
    assert!(client.get::<String>("LastError").await.contains("cancelled"));
    let slots: Vec<(String, std::collections::HashMap<String, OwnedValue>)> =
        client.proxy.call("GetSlotStatus", &()).await.unwrap();
    assert!(slot_facts(&slots, "A", "state").contains("bad"), "the half-written slot stays bad: {slots:?}");
    assert_eq!(client.get::<String>("PrimarySlot").await, "B");
    // Nothing to cancel now: a named error.
    match client.proxy.call::<_, _, ()>("Cancel", &()).await {
        Err(zbus::Error::MethodError(name, _, _)) => {
            assert_eq!(name.as_str(), "org.fleetd.Daemon1.Error.NoJob")
        }
        other => panic!("{other:?}"),
    }
    daemon.stop();
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

/// fleetd's object on `conn`, with no property cache (each read asks).
async fn daemon_proxy(conn: &zbus::Connection) -> zbus::Proxy<'static> {
    zbus::proxy::Builder::new(conn)
        .destination(NAME)
        .unwrap()
        .path(PATH)
        .unwrap()
        .interface(NAME)
        .unwrap()
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
}

/// The group the policy tests give the shipped policy's `fleetd`.
const GID: u32 = 64_990;

/// A private bus with the system bus's defaults and the shipped policy, in
/// `dir`; `None` (after saying why) where the test cannot run, which CI
/// as root never allows.
/// A device's daemon on `bus` (its system bus), logging beside its config.
fn daemon_on(bus: &common::dbus::PrivateBus) -> (Gateway, Daemon) {
    let g = device();
    let log = g.path().join("fleetd.log");
    let daemon =
        Daemon::start(&g.dev.config(), None, &[("DBUS_SYSTEM_BUS_ADDRESS", bus.address.as_str())], &log);
    (g, daemon)
}

fn shipped_policy_bus(dir: &tempfile::TempDir) -> Option<common::dbus::PrivateBus> {
    let policy = crate::common::root().join("packaging/dbus/org.fleetd.Daemon1.conf");
    // The bus's socket must be reachable by the unprivileged clients.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bus = common::dbus::PrivateBus::system_like(dir.path(), &policy, "fleetd", GID);
    if bus.is_none() {
        assert!(
            std::env::var_os("CI").is_none() || !is_root(),
            "CI must run the policy test (root, dbus-daemon)"
        );
        eprintln!("SKIP: the policy test needs root (other users, a mount namespace) and dbus-daemon");
    }
    bus
}

/// The shipped policy on a bus with the system bus's defaults: root owns
/// the name; a member of `fleetd` reads and calls; anyone else is refused
/// reads, calls and the name.
#[test]
fn the_shipped_policy_lets_only_root_and_the_group_in() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bus) = shipped_policy_bus(&dir) else { return };
    let (g, daemon) = daemon_on(&bus);
    let busctl = |groups: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534"]);
        match groups {
            "" => cmd.arg("--clear-groups"),
            list => cmd.arg(format!("--groups={list}")),
        };
        let out = cmd.arg("busctl").arg(format!("--address={}", bus.address)).args(args).output().unwrap();
        (out.status.success(), format!("{}{}", stdout(&out), stderr(&out)))
    };
    let get_state = ["get-property", NAME, PATH, NAME, "State"];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, text) = busctl(&GID.to_string(), &get_state);
        if ok {
            assert_eq!(text.trim(), "s \"idle\"");
            break;
        }
        assert!(Instant::now() < deadline, "a member of fleetd cannot read State: {text}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, text) = busctl("", &get_state);
    assert!(!ok && text.contains("Access denied"), "an outsider read State: {text}");
    let env_before = g.boot_env();
    let (ok, text) = busctl("", &["call", NAME, PATH, NAME, "MarkBad"]);
    assert!(!ok && text.contains("Access denied"), "an outsider called MarkBad: {text}");
    assert_eq!(g.boot_env(), env_before, "the refused call changed the boot environment");
    let request_name = [
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "RequestName",
        "su",
        NAME,
        "4",
    ];
    let (ok, text) = busctl("", &request_name);
    assert!(!ok && text.contains("Access denied"), "an outsider asked for the name: {text}");
    let (ok, text) = busctl(&GID.to_string(), &["call", NAME, PATH, NAME, "MarkGood"]);
    assert!(ok, "a member of fleetd calls MarkGood: {text}");
    assert_eq!(text.trim(), "s \"slot A marked good\"");
    drop(daemon);
}

/// A bus listener run as another user: `dbus-monitor` with a plain match
/// rule on the daemon's object (no eavesdropping: what any user may ask
/// for), its output in a file.
struct Listener {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Listener {
    fn start(address: &str, groups: &str, out: std::path::PathBuf) -> Listener {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534"]);
        match groups {
            "" => cmd.arg("--clear-groups"),
            list => cmd.arg(format!("--groups={list}")),
        };
        let file = std::fs::File::create(&out).unwrap();
        let child = cmd
            .args(["stdbuf", "-oL", "dbus-monitor", "--address", address])
            .arg(format!("type='signal',path='{PATH}'"))
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Listener { child, out }
    }

    fn seen(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 17, item 7. On the shipped policy: a member of `fleetd` cannot make
/// the daemon read a file it cannot read itself (Install(s) is root's; the
/// member passes an open file with InstallFd); a FIFO is refused without
/// blocking; no refusal quotes what a file holds; and a user outside the
/// group receives none of the daemon's signals.
#[test]
fn install_reads_only_what_the_caller_can_and_outsiders_see_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bus) = shipped_policy_bus(&dir) else { return };
    use std::os::unix::fs::PermissionsExt;
    let (g, daemon) = daemon_on(&bus);
    let member = GID.to_string();
    let as_nobody = |groups: &str| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534"]);
        match groups {
            "" => cmd.arg("--clear-groups"),
            list => cmd.arg(format!("--groups={list}")),
        };
        cmd
    };
    // busctl as uid 65534, in the group or not.
    let busctl = |groups: &str, args: &[&str]| {
        let mut cmd = as_nobody(groups);
        let out = cmd.arg("busctl").arg(format!("--address={}", bus.address)).args(args).output().unwrap();
        (out.status.success(), format!("{}{}", stdout(&out), stderr(&out)))
    };
    // InstallFd as uid 65534 in the group: this test binary again, running
    // `install_fd_as_the_caller`, which opens `file` as that user.
    let install_fd = |file: &Path| {
        let mut cmd = as_nobody(&member);
        cmd.arg(std::env::current_exe().unwrap())
            .args(["--exact", &crate::common::test_name(module_path!(), "install_fd_as_the_caller")])
            .args(["--nocapture", "--test-threads=1"])
            .env("FLEETD_TEST_BUS", &bus.address)
            .env("FLEETD_TEST_MESSAGE", file)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("InstallFd did not return (a daemon thread blocked?):\n{}", daemon.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let text = stdout(&out);
        // The harness may print its test line first, on the same line.
        let answer = text.lines().find_map(|l| l.split_once("answer: ").map(|(_, a)| a.to_string()));
        answer.unwrap_or_else(|| panic!("no answer from the helper:\n{text}\n{}", stderr(&out)))
    };
    let get = ["get-property", NAME, PATH, NAME, "LastError"];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !busctl(&member, &get).0 {
        assert!(Instant::now() < deadline, "the daemon never answered:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let inside = Listener::start(&bus.address, &member, dir.path().join("member-signals.txt"));
    let outside = Listener::start(&bus.address, "", dir.path().join("outsider-signals.txt"));
    // Both listen: a marker signal on the same path from another sender
    // (root's busctl) reaches each; until it does, it is sent again.
    let emit = |n: u32| {
        let out = std::process::Command::new("busctl")
            .arg(format!("--address={}", bus.address))
            .args(["emit", PATH, "org.fleetd.Test", "Marker", "u"])
            .arg(n.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "busctl emit: {}", stderr(&out));
    };
    let both_heard = |n: u32| [&inside, &outside].iter().all(|l| l.seen().contains(&format!("uint32 {n}")));
    let mut marker = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while marker == 0 || !both_heard(marker) {
        assert!(Instant::now() < deadline, "a listener never heard:\n{}\n{}", inside.seen(), outside.seen());
        marker += 1;
        emit(marker);
        std::thread::sleep(Duration::from_millis(200));
    }

    // A file only root may read: the member must not get the daemon to read it.
    const SECRET: &str = "TOPSECRET-api-token-9f8e7d";
    let root_only = dir.path().join("root-only.json");
    std::fs::write(&root_only, format!("{{\"payload\": \"x\", \"signatures\": \"{SECRET}\"}}")).unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = root_only.to_str().unwrap();
    let (ok, text) = busctl(&member, &["call", NAME, PATH, NAME, "Install", "s", path]);
    assert!(!ok, "a member made the daemon install from a root-only file: {text}");
    assert!(!text.contains(SECRET), "the refusal quotes root's file: {text}");
    assert!(text.contains("access-denied"), "{text}");
    // A file that is not a message, which the member may read: refused,
    // and nothing of it in the answer, the signals or LastError.
    let readable = dir.path().join("readable.json");
    std::fs::write(&readable, format!("{{\"payload\": 7, \"api_token\": \"{SECRET}\"}}")).unwrap();
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = install_fd(&readable);
    assert!(text.starts_with("org.fleetd.Daemon1.Error.Refused: malformed:"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    // A FIFO nobody writes is refused at once; again and again, so no
    // daemon thread is left parked on it.
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o666)).unwrap();
    for _ in 0..4 {
        let text = install_fd(&fifo);
        assert!(text.starts_with("org.fleetd.Daemon1.Error.Refused: not-regular-file:"), "{text}");
    }
    // /dev/zero: refused by its type, not read.
    let text = install_fd(Path::new("/dev/zero"));
    assert!(text.starts_with("org.fleetd.Daemon1.Error.Refused: not-regular-file:"), "{text}");
    let (ok, last_error) = busctl(&member, &get);
    assert!(ok && !last_error.contains(SECRET), "{last_error}");

    // A real update, passed by the member as an open file, is installed.
    let server = common::imageserver::ImageServer::start();
    let image = image_bytes(1 << 20, 2);
    let file = g.path().join("v2.img");
    std::fs::write(&file, &image).unwrap();
    let v2 = g.message("v2", &server.add("/v2.img", image), &file, 1000);
    let shared = dir.path().join("v2.json");
    std::fs::copy(&v2, &shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = install_fd(&shared);
    assert!(text.starts_with("ok: accepted update"), "{text}\n{}", daemon.log());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !inside.seen().contains("reboot-pending") {
        assert!(Instant::now() < deadline, "the member saw no reboot-pending:\n{}", inside.seen());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));

    // The member saw the refusals and the install; the outsider nothing
    // of the daemon's, though it still hears others on the same path.
    emit(marker + 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !both_heard(marker + 1) {
        assert!(Instant::now() < deadline, "a listener stopped:\n{}\n{}", inside.seen(), outside.seen());
        std::thread::sleep(Duration::from_millis(50));
    }
    let member_saw = inside.seen();
    assert!(member_saw.contains("member=Completed"), "{member_saw}");
    assert!(member_saw.contains("member=PropertiesChanged"), "{member_saw}");
    assert!(!member_saw.contains(SECRET), "{member_saw}");
    let outsider_saw = outside.seen();
    assert!(
        !outsider_saw.contains("member=Completed") && !outsider_saw.contains("member=PropertiesChanged"),
        "a user outside the group received the daemon's signals:\n{outsider_saw}"
    );
    drop(daemon);
}

/// Not a test on its own: `install_reads_only_what_the_caller_can_and_outsiders_see_nothing`
/// runs this binary again as another user to call `InstallFd` with a file
/// that user opened (busctl cannot pass a descriptor). Prints `answer: ok:
/// <reply>` or `answer: <error name>: <text>`.
#[test]
fn install_fd_as_the_caller() {
    let (Some(address), Some(file)) =
        (std::env::var_os("FLEETD_TEST_BUS"), std::env::var_os("FLEETD_TEST_MESSAGE"))
    else {
        return;
    };
    // O_NONBLOCK: a FIFO opens without a writer.
    let file = fleetd::fsutil::open_nonblocking(Path::new(&file)).expect("the caller opens the file");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answer = rt.block_on(async {
        let conn =
            zbus::connection::Builder::address(address.to_str().unwrap()).unwrap().build().await.unwrap();
        let proxy = daemon_proxy(&conn).await;
        let fd = zbus::zvariant::Fd::from(std::os::fd::AsFd::as_fd(&file));
        match proxy.call::<_, _, String>("InstallFd", &(fd,)).await {
            Ok(reply) => format!("ok: {reply}"),
            Err(zbus::Error::MethodError(name, text, _)) => format!("{name}: {}", text.unwrap_or_default()),
            Err(other) => format!("error: {other}"),
        }
    });
    println!("answer: {answer}");
}
