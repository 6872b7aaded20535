//! systemd's notify protocol (`sd_notify(3)`), written out: one datagram of
//! `KEY=VALUE` lines to `$NOTIFY_SOCKET` (a path, or `@name` in the
//! abstract namespace). `Type=notify` waits for `READY=1`; `WatchdogSec=`
//! wants `WATCHDOG=1` more often than `$WATCHDOG_USEC`; `STATUS=` is what
//! `systemctl status` shows; `STOPPING=1` says a stop has begun.
//!
//! Outside systemd (no `$NOTIFY_SOCKET`) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    /// Non-blocking: WATCHDOG and STATUS never stall the main loop.
    socket: UnixDatagram,
    /// Blocking for at most `RELIABLE_TIMEOUT`: READY and STOPPING matter.
    reliable: UnixDatagram,
    target: Target,
}

const RELIABLE_TIMEOUT: Duration = Duration::from_secs(1);

enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `None` outside systemd.
    pub fn from_env() -> Option<Notifier> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec();
        let target = match bytes.strip_prefix(b"@") {
            Some(name) => Target::Abstract(name.to_vec()),
            None if bytes.starts_with(b"/") => Target::Path(value.into()),
            None => return None,
        };
        Self::new(target)
    }

    fn new(target: Target) -> Option<Notifier> {
        let socket = UnixDatagram::unbound().ok()?;
        // Never block the main loop on systemd: a full queue drops the
        // notification (the next one carries the same news).
        socket.set_nonblocking(true).ok()?;
        let reliable = UnixDatagram::unbound().ok()?;
        reliable.set_write_timeout(Some(RELIABLE_TIMEOUT)).ok()?;
        Some(Notifier { socket, reliable, target })
    }

    /// Sends one notification; errors are ignored (systemd may be gone at
    /// shutdown, and a notification is never worth failing for).
    pub fn send(&self, state: &str) {
        // READY=1 and STOPPING=1 wait a moment for room; the rest never wait.
        let socket = if state.starts_with("READY=") || state.starts_with("STOPPING=") {
            &self.reliable
        } else {
            &self.socket
        };
        let _ = match &self.target {
            Target::Path(p) => socket.send_to(state.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                match std::os::unix::net::SocketAddr::from_abstract_name(name) {
                    Ok(addr) => socket.send_to_addr(state.as_bytes(), &addr),
                    Err(e) => Err(e),
                }
            }
        };
    }
}

static NOTIFIER: std::sync::OnceLock<Option<Notifier>> = std::sync::OnceLock::new();

/// Sends `state` to systemd, if fleetd runs under it.
pub fn send(state: &str) {
    if let Some(n) = NOTIFIER.get_or_init(Notifier::from_env) {
        n.send(state);
    }
}

/// `STATUS=…`: the one line `systemctl status fleetd` shows.
pub fn status(line: &str) {
    send(&format!("STATUS={}", line.replace('\n', " ")));
}

/// Feeds the watchdog from the task that calls it, until dropped: run it
/// on the main loop's runtime, so that a wedged loop stops the pings.
pub async fn feed_watchdog() {
    let Some(every) = watchdog_interval() else { return std::future::pending().await };
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        send("WATCHDOG=1");
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, as
/// `sd_watchdog_enabled(3)` advises; `None` when no watchdog is asked for
/// or it is meant for another process (`$WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// Pure: the interval from the two variables and our pid.
pub fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_interval_is_half_and_only_for_this_process() {
        assert_eq!(watchdog_interval_from(Some("10000000"), None, 7), Some(Duration::from_secs(5)));
        assert_eq!(watchdog_interval_from(Some("10000000"), Some("7"), 7), Some(Duration::from_secs(5)));
        assert_eq!(watchdog_interval_from(Some("10000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
    }

    /// A reader that stopped reading must not block fleetd's main loop.
    #[test]
    fn a_full_queue_drops_the_notification_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let _listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Target::Path(path)).unwrap();
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            n.send("WATCHDOG=1");
        }
        assert!(started.elapsed() < Duration::from_secs(5), "sends blocked");
    }

    #[test]
    fn notifications_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Target::Path(path)).unwrap();
        n.send("READY=1\nSTATUS=idle");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=idle");
    }
}
