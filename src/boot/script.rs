//! Custom script backend, with the verbs of RAUC's custom bootloader backend:
//!
//! ```text
//! SCRIPT get-primary              prints the primary slot
//! SCRIPT set-primary SLOT
//! SCRIPT get-state SLOT           prints good or bad
//! SCRIPT set-state SLOT good|bad
//! SCRIPT get-current              prints the booted slot
//! ```
//!
//! Output is one line naming a configured slot or a state, nothing else; a
//! non-zero exit, other output or a hang is a `boot-command` error naming the
//! verb and carrying the script's stderr. The script owns atomicity: each
//! `set-*` must change the boot environment in one store.

use super::{BootControl, BootError, SlotState};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BACKEND: &str = "script";
/// A boot script that has not finished by then is taken to hang.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// A slot name or a state is a few bytes: longer output is refused.
const MAX_OUTPUT: usize = 4096;
const MAX_STDERR_IN_ERROR: usize = 1024;

#[derive(Debug)]
pub struct ScriptBoot {
    script: PathBuf,
    slots: Vec<String>,
    timeout: Duration,
}

impl ScriptBoot {
    /// The script must exist; slot names must be letters or digits, so they
    /// pass through argv and stdout unchanged.
    pub fn new(script: PathBuf, slots: &[String]) -> Result<Self, BootError> {
        let config = |detail: String| BootError::Config { backend: BACKEND, detail };
        if slots.is_empty() {
            return Err(config("no slots".into()));
        }
        for (i, slot) in slots.iter().enumerate() {
            if slot.is_empty() || !slot.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(config(format!("slot name {slot:?} is not letters and digits")));
            }
            if slots[..i].contains(slot) {
                return Err(config(format!("slot {slot:?} is listed twice")));
            }
        }
        if !script.is_file() {
            return Err(config(format!("{} is not a file", script.display())));
        }
        Ok(Self { script, slots: slots.to_vec(), timeout: DEFAULT_TIMEOUT })
    }

    /// How long one call may take before it is killed.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn known(&self, slot: &str) -> Result<(), BootError> {
        if self.slots.iter().any(|s| s == slot) {
            Ok(())
        } else {
            Err(BootError::UnknownSlot { backend: BACKEND, slot: slot.to_string() })
        }
    }

    /// Runs `SCRIPT args...` and returns its stdout if it exits 0 in time.
    fn run(&self, args: &[&str]) -> Result<Vec<u8>, BootError> {
        let failed = |detail: String| command_error(args, detail);
        let deadline = Instant::now() + self.timeout;
        let mut child = Command::new(&self.script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot run {}: {e}", self.script.display())))?;
        let stdout = read_in_background(child.stdout.take());
        let stderr = read_in_background(child.stderr.take());
        let status = wait_until(&mut child, deadline).map_err(failed)?;
        // A background process the script left holding the pipes must not
        // hang us either.
        let stdout = stdout
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| failed("did not close its output in time".into()))?;
        let stderr =
            stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_default();
        if !status.success() {
            return Err(failed(format!("{status}{}", stderr_suffix(&stderr))));
        }
        Ok(stdout)
    }

    /// Runs a `get-*` verb and parses its single line with `parse`.
    fn query<T>(&self, args: &[&str], parse: impl FnOnce(&str) -> Option<T>) -> Result<T, BootError> {
        let stdout = self.run(args)?;
        let line = single_line(&stdout).map_err(|detail| command_error(args, detail))?;
        parse(line).ok_or_else(|| command_error(args, format!("unexpected output {line:?}")))
    }

    fn query_slot(&self, args: &[&str]) -> Result<String, BootError> {
        self.query(args, |line| self.slots.iter().find(|s| *s == line).cloned())
    }
}

impl BootControl for ScriptBoot {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn primary(&self) -> Result<Option<String>, BootError> {
        self.query_slot(&["get-primary"]).map(Some)
    }

    /// The script knows only good and bad: never `Trying`.
    fn state(&self, slot: &str) -> Result<SlotState, BootError> {
        self.known(slot)?;
        self.query(&["get-state", slot], |line| match line {
            "good" => Some(SlotState::Good),
            "bad" => Some(SlotState::Bad),
            _ => None,
        })
    }

    fn set_primary_for_trial(&mut self, slot: &str) -> Result<(), BootError> {
        self.known(slot)?;
        self.run(&["set-primary", slot]).map(drop)
    }

    fn mark_good(&mut self, slot: &str) -> Result<(), BootError> {
        self.known(slot)?;
        self.run(&["set-state", slot, "good"]).map(drop)
    }

    fn mark_bad(&mut self, slot: &str) -> Result<(), BootError> {
        self.known(slot)?;
        self.run(&["set-state", slot, "bad"]).map(drop)
    }

    fn booted_hint(&self) -> Result<Option<String>, BootError> {
        self.query_slot(&["get-current"]).map(Some)
    }
}

fn command_error(args: &[&str], detail: String) -> BootError {
    BootError::Command { backend: BACKEND, detail: format!("{}: {detail}", args.join(" ")) }
}

/// The output's one line, trimmed; a trailing newline is allowed.
fn single_line(stdout: &[u8]) -> Result<&str, String> {
    if stdout.len() > MAX_OUTPUT {
        return Err(format!("printed more than {MAX_OUTPUT} bytes"));
    }
    let text = std::str::from_utf8(stdout).map_err(|_| "output is not UTF-8".to_string())?;
    let line = text.trim();
    if line.is_empty() {
        return Err("printed nothing".into());
    }
    if line.contains('\n') {
        return Err(format!("printed more than one line: {line:?}"));
    }
    Ok(line)
}

fn stderr_suffix(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let cut: String = text.chars().take(MAX_STDERR_IN_ERROR).collect();
    format!(": {cut}")
}

/// Reads a pipe to its end on a thread, keeping the first `MAX_OUTPUT` bytes
/// and draining the rest so the script never blocks on a full pipe.
fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(mut pipe) = pipe {
            let mut chunk = [0u8; 1024];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        // One byte more than the limit tells "too much" apart.
                        let room = (MAX_OUTPUT + 1).saturating_sub(kept.len());
                        kept.extend_from_slice(&chunk[..n.min(room)]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let _ = tx.send(kept);
    });
    rx
}

/// Waits for the child until `deadline`, killing it after.
fn wait_until(child: &mut Child, deadline: Instant) -> Result<ExitStatus, String> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("timed out, killed".into());
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for it failed: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_is_strict() {
        assert_eq!(single_line(b"A\n"), Ok("A"));
        assert_eq!(single_line(b"  good \r\n"), Ok("good"));
        assert!(single_line(b"").is_err());
        assert!(single_line(b"\n").is_err());
        assert!(single_line(b"A\nB\n").is_err());
        assert!(single_line(b"\xff\n").is_err());
        let mut long = b"A".to_vec();
        long.resize(MAX_OUTPUT + 1, b' ');
        assert!(single_line(&long).is_err());
    }

    #[test]
    fn stderr_suffix_is_trimmed_and_capped() {
        assert_eq!(stderr_suffix(b""), "");
        assert_eq!(stderr_suffix(b" oops \n"), ": oops");
        assert_eq!(stderr_suffix(&[b'x'; 5000]).len(), 2 + MAX_STDERR_IN_ERROR);
    }

    #[test]
    fn new_validates_slots_and_script() {
        let script = PathBuf::from("/bin/sh");
        assert!(ScriptBoot::new(script.clone(), &["A".into(), "B".into()]).is_ok());
        for bad in [vec![], vec!["A".into(), "A".into()], vec!["A B".to_string()]] {
            assert_eq!(ScriptBoot::new(script.clone(), &bad).unwrap_err().name(), "boot-config");
        }
        assert_eq!(
            ScriptBoot::new("/nonexistent/boot.sh".into(), &["A".into()]).unwrap_err().name(),
            "boot-config"
        );
    }
}
