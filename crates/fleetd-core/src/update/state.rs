//! The update agent's persistent document (`state.json`): installed
//! version, clock floor, replay cache, the current job and the history.
//! Pure data and rules over it; `store::Store` keeps it on disk.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    pub job: Option<super::Job>,
    /// slot name → version of the image it holds (absent: unknown or invalid).
    pub slot_versions: BTreeMap<String, u64>,
    /// `"<error-name>: <detail>"` of the last failure, cleared by a success.
    pub last_error: Option<String>,
    /// Finished jobs, newest last, bounded.
    pub history: Vec<HistoryEntry>,
    /// Rollouts a halt named (jti → when it can be forgotten): an update
    /// that arrives after its halt is refused, `halted`.
    pub halted: BTreeMap<String, u64>,
}

pub const HISTORY_LEN: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub jti: String,
    pub version: u64,
    pub target_slot: String,
    /// `committed`, `rolled-back` or `failed`.
    pub outcome: crate::status::UpdateState,
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
        use super::engine::{Phase, Rollback};
        use crate::status::UpdateState;
        let Some(job) = &self.job else { return };
        let (outcome, detail) = match &job.phase {
            Phase::Committed => {
                self.installed_version = job.version;
                self.slot_versions.insert(job.target_slot.clone(), job.version);
                self.last_error = None;
                (UpdateState::Committed, None)
            }
            Phase::RolledBack { reason } => {
                self.slot_versions.remove(&job.target_slot);
                self.last_error = Some(match reason {
                    Rollback::FellBack => format!(
                        "rolled-back: slot {} did not come up; running {} again",
                        job.target_slot, job.from_slot
                    ),
                    Rollback::Unhealthy(text) => format!("rolled-back: {text}"),
                });
                (UpdateState::RolledBack, Some(reason.to_string()))
            }
            Phase::Failed { error } => {
                self.slot_versions.remove(&job.target_slot);
                self.last_error = Some(error.text.clone());
                (UpdateState::Failed, Some(error.text.clone()))
            }
            Phase::Halted { by } => {
                let text = format!("halted: stopped by halt {by} before its download finished");
                self.last_error = Some(text.clone());
                (UpdateState::Halted, Some(text))
            }
            _ => return,
        };
        self.history.push(HistoryEntry {
            jti: job.jti.clone(),
            version: job.version,
            target_slot: job.target_slot.clone(),
            outcome,
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
    pub fn active_job(&self) -> Option<&super::Job> {
        self.job.as_ref().filter(|j| !j.phase.is_terminal())
    }

    pub fn prune_replay_cache(&mut self, now: u64) {
        self.replay_cache.retain(|_, forget_after| *forget_after > now);
        self.halted.retain(|_, forget_after| *forget_after > now);
    }

    /// Remembers a halted rollout until its halt expires.
    pub fn record_halted(&mut self, jti: &str, forget_after: u64) {
        self.halted.insert(jti.to_string(), forget_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_accepted_remembers_the_jti_and_raises_the_floor() {
        let mut s = State { installed_version: 7, ..State::default() };
        let b = crate::build_epoch();
        s.record_accepted("jti-00000001", b + 100, b + 200, 60);
        let again: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again.installed_version, 7);
        assert_eq!(again.clock_floor, b + 100);
        assert_eq!(again.replay_cache["jti-00000001"], b + 260);
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
}
