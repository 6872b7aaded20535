//! The control-socket protocol hostapd and wpa_supplicant share, written
//! here (the design's `hostapd-ctl` crate does not exist): Unix datagram
//! sockets, one command per datagram, one reply per command. The daemon's
//! socket is `ctrl_interface/IFNAME`; the client binds its own path so the
//! daemon can answer.
//!
//! Events (`<3>AP-STA-CONNECTED …`) go only to sockets that sent `ATTACH`,
//! and interleave with the replies on them. So fleetd keeps two sockets:
//! `Ctrl` for commands (never attached), `Events` for events (attached; a
//! reply that shows up there is set aside, never taken for an event).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::net::UnixDatagram;

/// hostapd answers at once; past this the daemon is taken as gone.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_DATAGRAM: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    #[error("ctrl-socket: {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("ctrl-socket: {path}: no reply to {command} within {} s", REPLY_TIMEOUT.as_secs())]
    Timeout { path: PathBuf, command: String },
    #[error("ctrl-socket: {path}: {command} failed: {reply}")]
    Failed { path: PathBuf, command: String, reply: String },
}

/// An unsolicited message: `<level>text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub level: u8,
    pub text: String,
}

impl Event {
    /// The event's name: `AP-STA-CONNECTED`, `CTRL-EVENT-CONNECTED`, …
    pub fn name(&self) -> &str {
        self.text.split_whitespace().next().unwrap_or("")
    }
}

/// Events start with `<digit>`; anything else is a reply.
pub fn parse_event(datagram: &[u8]) -> Option<Event> {
    let text = std::str::from_utf8(datagram).ok()?;
    let rest = text.strip_prefix('<')?;
    let (level, text) = rest.split_once('>')?;
    Some(Event { level: level.parse().ok()?, text: text.trim_end().to_string() })
}

/// `STATUS` and similar replies: `key=value` lines.
pub fn parse_key_values(reply: &str) -> BTreeMap<String, String> {
    reply.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// What errors name of a command: its first two words only, because
/// commands such as `SET wpa_passphrase …` carry secrets.
fn verb(command: &str) -> String {
    command.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

static NEXT_CLIENT: AtomicU32 = AtomicU32::new(0);

/// One bound client socket, connected to the daemon's.
struct Socket {
    socket: UnixDatagram,
    local: PathBuf,
    server: PathBuf,
}

impl Socket {
    fn open(server: &Path, client_dir: &Path) -> Result<Self, CtrlError> {
        let io = |source| CtrlError::Io { path: server.to_path_buf(), source };
        let n = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
        let local = client_dir.join(format!("fleetd-ctrl-{}-{n}", std::process::id()));
        let _ = std::fs::remove_file(&local);
        let socket = UnixDatagram::bind(&local).map_err(io)?;
        socket.connect(server).map_err(io)?;
        Ok(Self { socket, local, server: server.to_path_buf() })
    }

    async fn send(&self, command: &str) -> Result<(), CtrlError> {
        self.socket
            .send(command.as_bytes())
            .await
            .map(|_| ())
            .map_err(|source| CtrlError::Io { path: self.server.clone(), source })
    }

    async fn recv(&self) -> Result<Vec<u8>, CtrlError> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = self
            .socket
            .recv(&mut buf)
            .await
            .map_err(|source| CtrlError::Io { path: self.server.clone(), source })?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Sends `command` and returns its reply; events met on the way go to
    /// `events` (only an attached socket gets any).
    async fn request(&self, command: &str, events: &mut Vec<Event>) -> Result<String, CtrlError> {
        let verb = verb(command);
        self.send(command).await?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, async {
            loop {
                let datagram = self.recv().await?;
                match parse_event(&datagram) {
                    Some(event) => events.push(event),
                    None => return Ok::<_, CtrlError>(String::from_utf8_lossy(&datagram).into_owned()),
                }
            }
        })
        .await
        .map_err(|_| CtrlError::Timeout { path: self.server.clone(), command: verb.clone() })??;
        if reply.trim_end() == "FAIL" || reply.starts_with("UNKNOWN COMMAND") {
            return Err(CtrlError::Failed {
                path: self.server.clone(),
                command: verb,
                reply: reply.trim_end().into(),
            });
        }
        Ok(reply)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.local);
    }
}

/// The command socket.
pub struct Ctrl {
    socket: Socket,
}

impl Ctrl {
    /// `server` is `ctrl_interface/IFNAME`; the client's own socket goes in
    /// `client_dir` (a directory only fleetd writes, e.g. its runtime dir).
    pub fn open(server: &Path, client_dir: &Path) -> Result<Self, CtrlError> {
        Ok(Self { socket: Socket::open(server, client_dir)? })
    }

    pub async fn request(&self, command: &str) -> Result<String, CtrlError> {
        let mut stray = Vec::new();
        self.socket.request(command, &mut stray).await
    }

    /// A command whose reply must be `OK`.
    pub async fn ok(&self, command: &str) -> Result<(), CtrlError> {
        let reply = self.request(command).await?;
        if reply.trim_end() == "OK" {
            Ok(())
        } else {
            let verb = command.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            Err(CtrlError::Failed {
                path: self.socket.server.clone(),
                command: verb,
                reply: reply.trim_end().into(),
            })
        }
    }
}

/// The attached event socket.
pub struct Events {
    socket: Socket,
    pending: std::collections::VecDeque<Event>,
}

impl Events {
    pub async fn attach(server: &Path, client_dir: &Path) -> Result<Self, CtrlError> {
        let socket = Socket::open(server, client_dir)?;
        let mut early = Vec::new();
        let reply = socket.request("ATTACH", &mut early).await?;
        if reply.trim_end() != "OK" {
            return Err(CtrlError::Failed { path: server.to_path_buf(), command: "ATTACH".into(), reply });
        }
        Ok(Self { socket, pending: early.into() })
    }

    /// The next event; replies that arrive here (to a PING, say) are skipped.
    pub async fn next(&mut self) -> Result<Event, CtrlError> {
        if let Some(event) = self.pending.pop_front() {
            return Ok(event);
        }
        loop {
            if let Some(event) = parse_event(&self.socket.recv().await?) {
                return Ok(event);
            }
        }
    }

    /// A command on the attached socket: its reply, with the events that
    /// arrived before it kept for `next`.
    pub async fn request(&mut self, command: &str) -> Result<String, CtrlError> {
        let mut early = Vec::new();
        let reply = self.socket.request(command, &mut early).await;
        self.pending.extend(early);
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_replies_are_told_apart() {
        assert_eq!(
            parse_event(b"<3>AP-STA-CONNECTED 02:00:00:00:01:00"),
            Some(Event { level: 3, text: "AP-STA-CONNECTED 02:00:00:00:01:00".into() })
        );
        assert_eq!(parse_event(b"<3>AP-STA-CONNECTED 02:00").unwrap().name(), "AP-STA-CONNECTED");
        assert_eq!(parse_event(b"OK\n"), None);
        assert_eq!(parse_event(b"PONG\n"), None);
        assert_eq!(parse_event(b"<x>bad"), None);
        let status = parse_key_values("state=ENABLED\nssid[0]=fleetd-gw-1\nnum_sta[0]=1\n");
        assert_eq!(status["state"], "ENABLED");
        assert_eq!(status["ssid[0]"], "fleetd-gw-1");
    }

    /// A peer that sends an event before each reply, as an attached
    /// hostapd does: the reply is the reply, the event waits for `next`.
    #[tokio::test]
    async fn a_reply_interleaved_with_events_is_still_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let server_path = dir.path().join("wlan0");
        let server = UnixDatagram::bind(&server_path).unwrap();
        let peer = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            for _ in 0..2 {
                let (n, from) = server.recv_from(&mut buf).await.unwrap();
                let from = from.as_pathname().unwrap().to_path_buf();
                let command = String::from_utf8_lossy(&buf[..n]).to_string();
                server.send_to(b"<3>AP-STA-POSSIBLE-PSK-MISMATCH 02:00:00:00:01:00", &from).await.unwrap();
                let reply: &[u8] = if command == "PING" { b"PONG\n" } else { b"OK\n" };
                server.send_to(reply, &from).await.unwrap();
            }
        });
        let mut events = Events::attach(&server_path, dir.path()).await.unwrap();
        assert_eq!(events.request("PING").await.unwrap(), "PONG\n");
        let first = events.next().await.unwrap();
        assert_eq!(first.name(), "AP-STA-POSSIBLE-PSK-MISMATCH");
        assert_eq!(events.next().await.unwrap().name(), "AP-STA-POSSIBLE-PSK-MISMATCH");
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn no_daemon_is_a_named_error_and_fail_is_failed() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Ctrl::open(&dir.path().join("nothing"), dir.path());
        assert!(matches!(missing, Err(CtrlError::Io { .. })));
        let server_path = dir.path().join("wlan0");
        let server = UnixDatagram::bind(&server_path).unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let (_, from) = server.recv_from(&mut buf).await.unwrap();
            server.send_to(b"FAIL\n", from.as_pathname().unwrap()).await.unwrap();
        });
        let ctrl = Ctrl::open(&server_path, dir.path()).unwrap();
        let e = ctrl.ok("SET wpa_passphrase secret-words").await.unwrap_err();
        assert!(matches!(e, CtrlError::Failed { .. }));
        assert!(!e.to_string().contains("secret-words"), "secrets never in errors: {e}");
    }
}
