//! Where log lines go. Under systemd (`$JOURNAL_STREAM` names standard
//! error's stream: it is the journal) each event is one datagram of journald's native
//! protocol to `/run/systemd/journal/socket`, with structured fields
//! (`FLEETD_JOB`, `FLEETD_VERSION`, `FLEETD_STEP`, `FLEETD_ERROR`), so that
//! `journalctl FLEETD_JOB=…` finds a job's whole story. Elsewhere, plain
//! lines on standard error.
//!
//! Written here rather than with systemd-journal-logger: one small file,
//! no `log` facade, and a socket path a test can point at a stand-in
//! (`$FLEETD_JOURNAL_SOCKET`).

use crate::status::UpdateState;
use fleetd_core::update::engine::Failure;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::OnceLock;

/// syslog priorities, as journald stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Error = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
}

pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Journal field names fleetd adds.
pub const JOB: &str = "FLEETD_JOB";
pub const VERSION: &str = "FLEETD_VERSION";
pub const STEP: &str = "FLEETD_STEP";
pub const ERROR: &str = "FLEETD_ERROR";

enum Sink {
    Journal { socket: UnixDatagram, path: PathBuf },
    Stderr,
}

static SINK: OnceLock<Sink> = OnceLock::new();

fn sink() -> &'static Sink {
    SINK.get_or_init(|| {
        // `$FLEETD_JOURNAL_SOCKET` names another journal socket (a
        // container's, a test's stand-in) and turns the journal on.
        let path = match std::env::var_os("FLEETD_JOURNAL_SOCKET") {
            Some(p) => PathBuf::from(p),
            None if stderr_is_the_journal() => PathBuf::from(JOURNAL_SOCKET),
            None => return Sink::Stderr,
        };
        // Non-blocking: a stalled journald must not stall the daemon; a
        // refused datagram goes to standard error instead.
        match UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(socket) => Sink::Journal { socket, path },
            Err(_) => Sink::Stderr,
        }
    })
}

/// systemd.exec(5): `$JOURNAL_STREAM` is `DEVICE:INODE` of the stream
/// standard error is connected to; only if it still is, is it the journal.
fn stderr_is_the_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    std::fs::metadata("/proc/self/fd/2").map(|m| m.dev() == dev && m.ino() == ino).unwrap_or(false)
}

/// An informational line.
pub fn log(line: &str) {
    event(Priority::Info, line, &[]);
}

/// One event with its fields. A journal that refuses the datagram gets the
/// line on standard error instead (which systemd also journals).
pub fn event(priority: Priority, message: &str, fields: &[(&str, &str)]) {
    if let Sink::Journal { socket, path } = sink() {
        if socket.send_to(&encode(priority, message, fields), path).is_ok() {
            return;
        }
        // The journal takes `<N>` on its stream as the priority.
        eprintln!("<{}>{message}", priority as u8);
        return;
    }
    eprintln!("{message}");
}

/// Whether events go to the journal (fleetd runs under systemd).
pub fn to_journal() -> bool {
    matches!(sink(), Sink::Journal { .. })
}

/// A job's step, with the fields `journalctl FLEETD_JOB=…` finds; a failed
/// or rolled-back step carries its reason as `FLEETD_ERROR`: the failure's
/// text, else the step's sentence.
pub fn step(state: UpdateState, detail: &str, failure: Option<&Failure>, job: Option<&(String, u64)>) {
    let version = job.map(|j| j.1.to_string()).unwrap_or_default();
    let mut fields = vec![(STEP, state.as_str())];
    if let Some((jti, _)) = job {
        fields.push((JOB, jti.as_str()));
        fields.push((VERSION, version.as_str()));
    }
    let failed = state.is_failure();
    if failed {
        fields.push((ERROR, failure.map_or(detail, |f| f.text.as_str())));
    }
    let priority = if failed { Priority::Error } else { Priority::Notice };
    event(priority, &format!("{state}: {detail}"), &fields);
}

/// The native protocol: `KEY=value\n`, or for a value with a newline
/// `KEY\n`, its length as a little-endian u64, the value, `\n`. Pure.
pub fn encode(priority: Priority, message: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 128);
    let mut field = |key: &str, value: &str| {
        if value.contains('\n') {
            out.extend_from_slice(key.as_bytes());
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        } else {
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
    };
    field("PRIORITY", &(priority as u8).to_string());
    field("SYSLOG_IDENTIFIER", "fleetd");
    field("SYSLOG_PID", &std::process::id().to_string());
    field("MESSAGE", message);
    for (key, value) in fields {
        if valid_key(key) {
            field(key, value);
        }
    }
    out
}

/// journald's rule: uppercase letters, digits and `_`, starting with a
/// letter, at most 64 bytes.
fn valid_key(key: &str) -> bool {
    key.len() <= 64
        && key.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Reads a native-protocol datagram back into its fields (for tests and
/// the stand-in journal).
pub fn decode(datagram: &[u8]) -> Option<Vec<(String, String)>> {
    let mut fields = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let line_end = rest.iter().position(|b| *b == b'\n')?;
        let line = &rest[..line_end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            rest = &rest[line_end + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let after = &rest[line_end + 1..];
            let len = u64::from_le_bytes(after.get(..8)?.try_into().ok()?) as usize;
            let value = after.get(8..8 + len)?;
            fields.push((key, String::from_utf8_lossy(value).into_owned()));
            rest = after.get(8 + len + 1..)?;
        }
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_through_the_native_protocol() {
        let bytes = encode(
            Priority::Warning,
            "update refused: replayed",
            &[
                (ERROR, "replayed"),
                (JOB, "j-1"),
                ("bad key", "dropped"),
                ("1X", "dropped"),
                (STEP, "two\nlines"),
            ],
        );
        let fields = decode(&bytes).unwrap();
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PRIORITY"), Some("4"));
        assert_eq!(get("SYSLOG_IDENTIFIER"), Some("fleetd"));
        assert_eq!(get("MESSAGE"), Some("update refused: replayed"));
        assert_eq!(get(ERROR), Some("replayed"));
        assert_eq!(get(JOB), Some("j-1"));
        assert_eq!(get(STEP), Some("two\nlines"), "a newline takes the length-prefixed form");
        assert_eq!(get("bad key"), None, "an invalid key is left out");
        assert_eq!(get("1X"), None, "a key starts with a letter");
        assert!(bytes.windows(5).any(|w| w == b"STEP\n"), "binary form on the wire");
    }
}
