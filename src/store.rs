//! Persistent device state under `state_dir`, one JSON document written
//! atomically. Mutators change memory only; `save()` is the single write.

use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state.json";
const MAX_STATE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state-io: {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state-corrupt: {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// Another mutating fleetd (daemon, install, mark-*) owns the state.
    #[error("busy: {0}")]
    Busy(String),
}

impl StoreError {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Io { .. } => "state-io",
            Self::Corrupt { .. } => "state-corrupt",
            Self::Busy(_) => "busy",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// The version of the image running in the committed slot.
    pub installed_version: u64,
    /// The largest `iat` ever accepted; stands in for a clock that reads earlier.
    pub clock_floor: u64,
    /// jti → the time after which it can be forgotten (its exp plus leeway).
    pub replay_cache: BTreeMap<String, u64>,
    /// The current or most recent update job.
    pub job: Option<crate::update::Job>,
    /// slot name → version of the image it holds (absent: unknown or invalid).
    pub slot_versions: BTreeMap<String, u64>,
    /// `"<error-name>: <detail>"` of the last failure, cleared by a success.
    pub last_error: Option<String>,
    /// Finished jobs, newest last, bounded.
    pub history: Vec<HistoryEntry>,
}

pub const HISTORY_LEN: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub jti: String,
    pub version: u64,
    pub target_slot: String,
    /// `committed`, `rolled-back` or `failed`.
    pub outcome: String,
    pub detail: Option<String>,
    pub finished_at: u64,
}

impl State {
    /// Records a message that passed every check: remembers its jti until it
    /// can no longer verify, and raises the clock floor.
    ///
    /// The cache is pruned by the clock floor, never by the system clock: a
    /// clock that jumps ahead for a while must not forget jtis that are still
    /// valid once it comes back. A jti is dropped only when the floor itself
    /// has passed its exp, and then its message is `expired` anyway.
    pub fn record_accepted(&mut self, jti: &str, iat: u64, exp: u64, leeway_s: u64) {
        self.clock_floor = self.clock_floor.max(iat);
        self.prune_replay_cache(self.clock_floor.max(crate::build_epoch()));
        self.replay_cache.insert(jti.to_string(), exp.saturating_add(leeway_s));
    }

    /// Records a finished job: versions on success, the error otherwise.
    pub fn finish_job(&mut self, now: u64) {
        use crate::update::Phase;
        let Some(job) = &self.job else { return };
        let (outcome, detail) = match &job.phase {
            Phase::Committed => {
                self.installed_version = job.version;
                self.slot_versions.insert(job.target_slot.clone(), job.version);
                self.last_error = None;
                ("committed", None)
            }
            Phase::RolledBack { reason } => {
                self.slot_versions.remove(&job.target_slot);
                self.last_error = Some(if reason.starts_with("rolled-back") {
                    format!(
                        "rolled-back: slot {} did not come up; running {} again",
                        job.target_slot, job.from_slot
                    )
                } else {
                    format!("rolled-back: {reason}")
                });
                ("rolled-back", Some(reason.clone()))
            }
            Phase::Failed { error } => {
                self.slot_versions.remove(&job.target_slot);
                self.last_error = Some(error.clone());
                ("failed", Some(error.clone()))
            }
            _ => return,
        };
        self.history.push(HistoryEntry {
            jti: job.jti.clone(),
            version: job.version,
            target_slot: job.target_slot.clone(),
            outcome: outcome.into(),
            detail,
            finished_at: now,
        });
        let excess = self.history.len().saturating_sub(HISTORY_LEN);
        self.history.drain(..excess);
    }

    /// What message verification needs from the stored state; the clock
    /// floor is never below this binary's build time.
    pub fn trust_state(&self) -> crate::trust::TrustState<'_> {
        crate::trust::TrustState {
            installed_version: self.installed_version,
            clock_floor: self.clock_floor.max(crate::build_epoch()),
            seen_jtis: &self.replay_cache,
        }
    }

    /// True when `jti` belongs to the current or a finished job: a second
    /// delivery of a message already handled.
    pub fn knows_job(&self, jti: &str) -> bool {
        self.job.as_ref().is_some_and(|j| j.jti == jti) || self.history.iter().any(|h| h.jti == jti)
    }

    /// An update that has not reached its end yet.
    pub fn active_job(&self) -> Option<&crate::update::Job> {
        self.job.as_ref().filter(|j| !j.phase.is_terminal())
    }

    pub fn prune_replay_cache(&mut self, now: u64) {
        self.replay_cache.retain(|_, forget_after| *forget_after > now);
    }
}

/// The state of one mutating fleetd process: it holds the state
/// directory's lock for as long as it lives, so two processes can never
/// write the same slot or overwrite each other's state.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state: State,
    _lock: fsutil::DirLock,
}

impl Store {
    /// Opens the store for writing, creating the directory (0700) if needed,
    /// and takes its lock at once: a second writer gets `busy`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
        }
        let lock = fsutil::DirLock::acquire(dir).map_err(|e| match e {
            fsutil::LockError::Held { .. } => {
                StoreError::Busy(format!("{e}; try again when it has finished"))
            }
            fsutil::LockError::Io { path, source } => StoreError::Io { path, source },
        })?;
        // Read under the lock: nobody else can be halfway through a save.
        Ok(Self { dir: dir.to_path_buf(), state: Self::read(dir)?, _lock: lock })
    }

    /// Reads the state without creating anything (for read-only commands).
    pub fn read(dir: &Path) -> Result<State, StoreError> {
        let path = dir.join(STATE_FILE);
        let bytes = match fsutil::read_capped(&path, MAX_STATE_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt { path, message: e.to_string() })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Changes memory only; call `save` to persist.
    pub fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    pub fn save(&self) -> Result<(), StoreError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| StoreError::Corrupt { path: path.clone(), message: e.to_string() })?;
        fsutil::atomic_write(&path, &bytes, 0o600).map_err(|source| StoreError::Io { path, source })
    }
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_state_is_default_and_saves_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s")).unwrap();
        assert_eq!(store.state(), &State::default());
        store.state_mut().installed_version = 7;
        store.state_mut().record_accepted("jti-00000001", 100, 200, 60);
        store.save().unwrap();
        let again = Store::read(&dir.path().join("s")).unwrap();
        assert_eq!(again.installed_version, 7);
        assert_eq!(again.clock_floor, 100);
        assert_eq!(again.replay_cache["jti-00000001"], 260);
    }

    #[test]
    fn replay_cache_is_pruned_by_the_clock_floor_only() {
        let b = crate::build_epoch();
        let mut s = State::default();
        s.record_accepted("first-jti", b + 10, b + 100, 0);
        // Accepted while the system clock read far ahead (it is not an input
        // any more): the first jti is still valid by the floor, so kept.
        s.record_accepted("second-jti", b + 20, b + 300, 0);
        assert!(s.replay_cache.contains_key("first-jti"), "{s:?}");
        assert_eq!(s.clock_floor, b + 20);
        // The floor passes the first jti's exp: it can no longer verify.
        s.record_accepted("third-jti", b + 150, b + 400, 0);
        assert!(!s.replay_cache.contains_key("first-jti"));
        assert!(s.replay_cache.contains_key("second-jti"));
        s.record_accepted("fourth-jti", b + 5, b + 400, 0);
        assert_eq!(s.clock_floor, b + 150, "the floor never goes down");
    }

    #[test]
    fn corrupt_state_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = Store::read(dir.path()).unwrap_err();
        assert_eq!(err.name(), "state-corrupt");
    }
}
