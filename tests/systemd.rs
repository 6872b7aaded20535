//! fleetd as systemd's `Type=notify` service with `WatchdogSec=`: the test
//! plays systemd, a datagram socket at `$NOTIFY_SOCKET`. READY=1 comes
//! first, then WATCHDOG=1 every half of `$WATCHDOG_USEC`; when the main
//! loop is wedged (a test hook) the pings stop; SIGTERM sends STOPPING=1.

mod common;
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
    let usec = WATCHDOG_USEC.to_string();
    let mut daemon = Daemon::start(
        &g.dev.config(),
        None,
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", &usec),
            ("FLEETD_TEST_WEDGE_MAIN_LOOP_MS", "3000"),
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemon.log().contains("test hook: wedging the main loop") {
        assert!(Instant::now() < deadline, "the hook never ran:\n{}", daemon.log());
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
