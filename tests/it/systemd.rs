//! fleetd as systemd's `Type=notify` service with `WatchdogSec=`: the test
//! plays systemd, a datagram socket at `$NOTIFY_SOCKET`. READY=1 comes
//! first, then WATCHDOG=1 every half of `$WATCHDOG_USEC`; when the main
//! loop is wedged (a test hook) the pings stop; SIGTERM sends STOPPING=1.

use crate::common;
use common::gateway::*;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// 400 ms: a ping every 200 ms.
const WATCHDOG_USEC: u64 = 400_000;

struct Systemd {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Systemd {
    fn new(path: &std::path::Path) -> Systemd {
        let socket = UnixDatagram::bind(path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        Systemd { socket, seen: Vec::new() }
    }

    /// Reads notifications until `done` holds over what was seen.
    fn until(&mut self, what: &str, timeout: Duration, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while !done(&self.seen) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; saw {:?}", self.seen);
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// Everything that arrives within `window`.
    fn during(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    }
}

fn pings(seen: &[String]) -> usize {
    seen.iter().filter(|m| m.as_str() == "WATCHDOG=1").count()
}

fn device() -> Gateway {
    let mut g = Gateway::new(Bootloader::Grub, 1 << 20);
    g.extra_config =
        "\n[mqtt]\nkeep_alive_s = 5\n\n[provision]\nbackend = \"none\"\nlisten = \"127.0.0.1:0\"\n".into();
    g.write_config();
    g
}

#[test]
fn ready_then_watchdog_pings_that_stop_when_the_main_loop_wedges() {
    let g = device();
    let notify = g.path().join("notify");
    let mut systemd = Systemd::new(&notify);
    let log = g.path().join("fleetd.log");
    let wedge = g.path().join("wedge-now");
    let usec = WATCHDOG_USEC.to_string();
    let mut daemon = Daemon::start(
        &g.dev.config(),
        None,
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", &usec),
            ("FLEETD_TEST_WEDGE_MAIN_LOOP_FILE", wedge.to_str().unwrap()),
        ],
        &log,
    );
    systemd.until("READY=1", Duration::from_secs(20), |s| s.iter().any(|m| m == "READY=1"));
    let ready = systemd.seen.iter().position(|m| m == "READY=1").unwrap();
    assert_eq!(pings(&systemd.seen[..ready]), 0, "READY=1 comes first: {:?}", systemd.seen);
    systemd.until("three pings", Duration::from_secs(20), |s| pings(s) >= 3);
    assert!(
        systemd.seen.iter().any(|m| m.starts_with("STATUS=provisioning: portal at")),
        "{:?}",
        systemd.seen
    );

    // The hook wedges the loop: after its log line, no ping for ten
    // intervals (a ping sent before it is already in the socket: drained).
    std::fs::write(&wedge, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemon.log().contains("test hook: wedging the main loop") {
        assert!(
            Instant::now() < deadline,
            "the hook never ran (it is in fleetd built with the test-hooks feature, as `cargo test` builds it):\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    systemd.during(Duration::from_millis(100));
    let after = systemd.during(Duration::from_micros(WATCHDOG_USEC / 2 * 10));
    assert_eq!(pings(&after), 0, "pings from a wedged loop: {after:?}");
    assert!(daemon.running(), "wedged, not dead: systemd's watchdog is what ends it");
    daemon.signal(libc::SIGKILL);
}

#[test]
fn sigterm_says_stopping() {
    let g = device();
    let notify = g.path().join("notify");
    let mut systemd = Systemd::new(&notify);
    let log = g.path().join("fleetd.log");
    let mut daemon =
        Daemon::start(&g.dev.config(), None, &[("NOTIFY_SOCKET", notify.to_str().unwrap())], &log);
    systemd.until("the portal", Duration::from_secs(20), |s| {
        s.iter().any(|m| m.starts_with("STATUS=provisioning"))
    });
    daemon.stop();
    systemd.until("STOPPING=1", Duration::from_secs(5), |s| s.iter().any(|m| m == "STOPPING=1"));
    assert_eq!(pings(&systemd.seen), 0, "no WATCHDOG_USEC, no pings: {:?}", systemd.seen);
}

/// Under systemd (`$JOURNAL_STREAM`), each step is a native-protocol
/// datagram with FLEETD_JOB, FLEETD_VERSION and FLEETD_STEP, and a failed
/// job's reason is FLEETD_ERROR; the test's socket plays journald.
#[test]
fn steps_reach_the_journal_with_their_fields() {
    let mut g = Gateway::new(Bootloader::Grub, 8 << 20);
    let journal_path = g.path().join("journal");
    let journal = UnixDatagram::bind(&journal_path).unwrap();
    journal.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    // Read as journald does, while fleetd runs: its socket never waits.
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<(String, String)>>::new()));
    let (sink, stop) = (received.clone(), std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let stopping = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = journal.recv(&mut buf) {
                sink.lock().unwrap().push(fleetd::logging::decode(&buf[..n]).expect("native protocol"));
            }
        }
    });
    let take = || std::mem::take(&mut *received.lock().unwrap());
    let server = common::imageserver::ImageServer::start();
    let image = image_bytes(1 << 20, 3);
    let file = g.path().join("v8.img");
    std::fs::write(&file, &image).unwrap();
    let good = g.message("v8", &server.add("/v8.img", image.clone()), &file, 8);
    // Signed for these bytes, served with others: the hash check fails.
    let bad = g.message("v9", &server.add("/v9.img", image_bytes(1 << 20, 4)), &file, 9);
    let config = g.dev.config();
    let install = |msg: &std::path::Path| {
        run(fleetd()
            .env("JOURNAL_STREAM", "8:1234")
            .env("FLEETD_JOURNAL_SOCKET", &journal_path)
            .args(["install", "--no-reboot", "--config"])
            .arg(&config)
            .arg(msg))
    };
    let out = install(&good);
    assert!(out.status.success(), "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(200)); // the reader's last datagrams
    let entries = take();
    let get = |e: &Vec<(String, String)>, k: &str| e.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let jti = g.status()["job"]["jti"].as_str().unwrap().to_string();
    let steps: Vec<String> = entries.iter().filter_map(|e| get(e, "FLEETD_STEP")).collect();
    assert!(
        steps.contains(&"downloading".to_string()) && steps.contains(&"reboot-pending".to_string()),
        "{steps:?}"
    );
    for e in entries.iter().filter(|e| get(e, "FLEETD_STEP").is_some()) {
        assert_eq!(get(e, "FLEETD_JOB"), Some(jti.clone()), "{e:?}");
        assert_eq!(get(e, "FLEETD_VERSION").as_deref(), Some("8"), "{e:?}");
        assert_eq!(get(e, "SYSLOG_IDENTIFIER").as_deref(), Some("fleetd"));
        assert!(get(e, "MESSAGE").is_some_and(|m| !m.is_empty()));
    }

    // Boot B, commit, then a job that fails: its reason is FLEETD_ERROR.
    g.power_on(&|_| true);
    assert!(g.run_once().status.success());
    std::thread::sleep(Duration::from_millis(200));
    take();
    let out = install(&bad);
    assert!(!out.status.success());
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    let failed = take()
        .into_iter()
        .find(|e| get(e, "FLEETD_STEP").as_deref() == Some("failed"))
        .expect("a failed step in the journal");
    assert_eq!(get(&failed, "FLEETD_VERSION").as_deref(), Some("9"));
    assert_eq!(get(&failed, "PRIORITY").as_deref(), Some("3"));
    assert!(
        get(&failed, "FLEETD_ERROR").is_some_and(|e| e.contains("hash") && !e.starts_with("failed")),
        "{failed:?}"
    );
}

/// The shipped unit: `systemd-analyze verify` passes on it (in a throwaway
/// root holding the binary and systemd's own units) and its exposure under
/// `systemd-analyze security --offline=yes` is at most 2.0.
#[test]
fn the_shipped_unit_verifies_and_is_hardened() {
    let analyze = "/usr/bin/systemd-analyze";
    if !std::path::Path::new(analyze).exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must check the unit (systemd, scripts/setup)");
        eprintln!("SKIP: needs systemd-analyze (scripts/setup)");
        return;
    }
    let unit = crate::common::root().join("systemd/fleetd.service");
    let out =
        run(std::process::Command::new(analyze).args(["security", "--offline=yes", "--no-pager"]).arg(&unit));
    let text = stdout(&out);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for fleetd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure figure:\n{text}{}", stderr(&out)));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0:\n{text}");

    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for dir in ["usr/bin", "etc/systemd/system", "usr/lib/systemd"] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
    }
    std::fs::copy(crate::common::fleetd_bin(), r.join("usr/bin/fleetd")).unwrap();
    std::fs::copy(&unit, r.join("etc/systemd/system/fleetd.service")).unwrap();
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| std::path::Path::new(d).join("sysinit.target").exists())
        .expect("systemd's units");
    ok(std::process::Command::new("cp").arg("-r").arg(system_units).arg(r.join("usr/lib/systemd/")));
    let out = run(std::process::Command::new(analyze).arg(format!("--root={}", r.display())).args([
        "verify",
        "--man=no",
        "fleetd.service",
    ]));
    assert!(out.status.success(), "systemd-analyze verify:\n{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).trim().is_empty(), "warnings:\n{}", stderr(&out));
}

/// The Yocto layer: the crates list matches Cargo.lock, and oelint-adv
/// finds no errors in the recipe and the bbappend.
#[test]
fn the_yocto_layer_is_current_and_lints_clean() {
    let root = crate::common::root();
    ok(std::process::Command::new(root.join("scripts/yocto-crates")).arg("--check"));
    let Ok(version) = std::process::Command::new("oelint-adv").arg("--version").output() else {
        assert!(std::env::var_os("CI").is_none(), "CI must lint the layer (oelint-adv, scripts/setup)");
        eprintln!("SKIP: needs oelint-adv (scripts/setup)");
        return;
    };
    assert!(version.status.success());
    let layer = root.join("yocto-layer/meta-fleetd");
    let out = run(std::process::Command::new("oelint-adv")
        .current_dir(&layer)
        .args(["--quiet", "--release", "scarthgap", "--constantmods", "+oelint-constants.json", "--"])
        .args(["recipes-core/fleetd/fleetd_0.1.0.bb", "recipes-bsp/libubootenv/libubootenv_%.bbappend"]));
    let report = format!("{}{}", stdout(&out), stderr(&out));
    let errors: Vec<&str> = report.lines().filter(|l| l.contains(":error:")).collect();
    eprintln!("oelint-adv: {} errors, {} warnings", errors.len(), report.matches(":warning:").count());
    assert!(errors.is_empty(), "{report}");
    let layer_conf = std::fs::read_to_string(layer.join("conf/layer.conf")).unwrap();
    assert!(layer_conf.contains("LAYERSERIES_COMPAT_fleetd = \"scarthgap"), "{layer_conf}");
}
