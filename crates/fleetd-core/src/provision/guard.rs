//! Wrong proofs of possession, counted per source (`admission::Source`)
//! under a global ceiling. Pure: time is passed in (milliseconds of the
//! portal's clock, which resumes across restarts; see `GuardState`).
//!
//! - **Per source.** A few free attempts, then a lock-out that doubles up
//!   to a cap. Only that source is locked: the installer at another
//!   address is checked as usual.
//! - **The ceiling.** All sources together have an allowance of wrong
//!   proofs that refills slowly. Once it is spent, every source gets one
//!   attempt per lock-out instead of `free_attempts`, so an attacker with
//!   many addresses gains one guess per address per lock-out period, while
//!   a newcomer (the installer) is still checked at once.
//! - **Bounded memory.** At most `max_sources` records. A record is
//!   forgotten after a success, or `forget_after_ms` after its last wrong
//!   proof once its lock-out is over. When the table is full of live
//!   records, a source without one is refused (its failure could not be
//!   counted) until one can be forgotten.
//!
//! The total stays bounded: the allowance, plus per remembered source one
//! guess per lock-out period. Against an 80-bit secret that is nothing;
//! what the limits buy is that nobody can guess at speed, and that nobody
//! but the installer's own address can lock the installer out.

use crate::admission::Source;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardPolicy {
    /// Wrong proofs a source may make before its first lock-out.
    pub free_attempts: u32,
    pub first_lockout_ms: u64,
    pub max_lockout_ms: u64,
    /// Wrong proofs from all sources together before each source falls to
    /// one attempt per lock-out.
    pub global_allowance: u32,
    /// One wrong proof of the allowance comes back per this many ms.
    pub global_refill_ms: u64,
    pub max_sources: usize,
    pub forget_after_ms: u64,
}

impl Default for GuardPolicy {
    fn default() -> Self {
        Self {
            free_attempts: 5,
            first_lockout_ms: 30_000,
            max_lockout_ms: 3_600_000,
            global_allowance: 30,
            global_refill_ms: 120_000,
            max_sources: 1024,
            forget_after_ms: 24 * 3_600_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("locked-out: too many wrong proofs of possession; try again in {retry_after_ms} ms")]
pub struct LockedOut {
    pub retry_after_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    /// Wrong proofs since the last lock-out.
    failures: u32,
    lockouts: u32,
    locked_until: u64,
    last_failure: u64,
}

#[derive(Debug, Clone)]
pub struct Guard {
    policy: GuardPolicy,
    /// Wrong proofs counted against the global allowance, as of `refilled_at`.
    global_spent: u32,
    refilled_at: u64,
    sources: BTreeMap<Source, Record>,
}

impl Guard {
    pub fn new(policy: GuardPolicy) -> Self {
        Self { policy, global_spent: 0, refilled_at: 0, sources: BTreeMap::new() }
    }

    /// Whether an attempt from `source` may be checked now.
    pub fn check(&mut self, source: Source, now_ms: u64) -> Result<(), LockedOut> {
        if let Some(record) = self.sources.get(&source) {
            if now_ms < record.locked_until {
                return Err(LockedOut { retry_after_ms: record.locked_until - now_ms });
            }
            return Ok(());
        }
        if self.sources.len() >= self.policy.max_sources {
            self.forget_old(now_ms);
        }
        if self.sources.len() >= self.policy.max_sources {
            let soonest = self.sources.values().map(|r| self.forgettable_at(r)).min().unwrap_or(now_ms);
            return Err(LockedOut { retry_after_ms: soonest.saturating_sub(now_ms).max(1_000) });
        }
        Ok(())
    }

    /// Records a wrong proof from `source` (after `check` let it through);
    /// returns the lock-out it starts, if any (the caller logs it).
    pub fn failed(&mut self, source: Source, now_ms: u64) -> Option<LockedOut> {
        self.refill(now_ms);
        let ceiling_reached = self.global_spent >= self.policy.global_allowance;
        self.global_spent = self.global_spent.saturating_add(1);
        if !self.sources.contains_key(&source) && self.sources.len() >= self.policy.max_sources {
            self.forget_old(now_ms);
        }
        let policy = self.policy;
        let record = self.sources.entry(source).or_insert(Record {
            failures: 0,
            lockouts: 0,
            locked_until: 0,
            last_failure: now_ms,
        });
        record.failures += 1;
        record.last_failure = now_ms;
        let free = if ceiling_reached { 1 } else { policy.free_attempts };
        if record.failures < free {
            return None;
        }
        let doubling = 1u64 << record.lockouts.min(20);
        let lockout = policy.first_lockout_ms.saturating_mul(doubling).min(policy.max_lockout_ms);
        record.lockouts += 1;
        record.failures = 0;
        record.locked_until = now_ms.saturating_add(lockout);
        Some(LockedOut { retry_after_ms: lockout })
    }

    /// A right proof ends that source's back-off (not the ceiling's).
    pub fn succeeded(&mut self, source: Source) {
        self.sources.remove(&source);
    }

    pub fn ceiling_reached(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.global_spent >= self.policy.global_allowance
    }

    fn refill(&mut self, now_ms: u64) {
        let step = self.policy.global_refill_ms.max(1);
        let steps = now_ms.saturating_sub(self.refilled_at) / step;
        let back = u32::try_from(steps).unwrap_or(u32::MAX);
        self.global_spent = self.global_spent.saturating_sub(back);
        if self.global_spent == 0 {
            self.refilled_at = now_ms;
        } else {
            self.refilled_at = self.refilled_at.saturating_add(steps.saturating_mul(step));
        }
    }

    fn forgettable_at(&self, record: &Record) -> u64 {
        record.locked_until.max(record.last_failure.saturating_add(self.policy.forget_after_ms))
    }

    fn forget_old(&mut self, now_ms: u64) {
        let after = self.policy.forget_after_ms;
        self.sources.retain(|_, r| now_ms < r.locked_until || now_ms < r.last_failure.saturating_add(after));
    }

    /// What survives a restart, as of `now_ms`.
    pub fn state(&self, now_ms: u64) -> GuardState {
        GuardState {
            clock_ms: now_ms,
            global_spent: self.global_spent,
            refilled_at_ms: self.refilled_at,
            sources: self
                .sources
                .iter()
                .map(|(source, r)| SourceRecord {
                    source: source.ip(),
                    failures: r.failures,
                    lockouts: r.lockouts,
                    locked_until_ms: r.locked_until,
                    last_failure_ms: r.last_failure,
                })
                .collect(),
        }
    }

    /// The guard a saved state describes; its clock resumes at
    /// `state.clock_ms` plus the time since it was saved (the caller's
    /// `Clock`). Values a policy could not have produced are clamped, so a
    /// damaged file cannot lock anyone out for longer than the cap.
    pub fn restore(policy: GuardPolicy, state: &GuardState) -> Self {
        let now = state.clock_ms;
        let mut sources = BTreeMap::new();
        for r in state.sources.iter().take(policy.max_sources) {
            let record = Record {
                failures: r.failures.min(policy.free_attempts),
                lockouts: r.lockouts.min(64),
                locked_until: r.locked_until_ms.min(now.saturating_add(policy.max_lockout_ms)),
                last_failure: r.last_failure_ms.min(now),
            };
            sources.insert(Source::of(r.source), record);
        }
        Self {
            policy,
            global_spent: state.global_spent.min(policy.global_allowance.saturating_mul(2)),
            refilled_at: state.refilled_at_ms.min(now),
            sources,
        }
    }
}

/// The guard on disk (`state_dir/portal-guard.json`, written atomically
/// after every wrong proof, before its answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardState {
    /// The portal clock when saved.
    pub clock_ms: u64,
    pub global_spent: u32,
    pub refilled_at_ms: u64,
    pub sources: Vec<SourceRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRecord {
    pub source: IpAddr,
    pub failures: u32,
    pub lockouts: u32,
    pub locked_until_ms: u64,
    pub last_failure_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(last: u8) -> Source {
        Source::of(IpAddr::from([10, 42, 0, last]))
    }

    /// Guesses from `source` as fast as the guard answers, at `now`: how
    /// many were checked.
    fn guess(g: &mut Guard, source: Source, now: u64, tries: u32) -> u32 {
        let mut checked = 0;
        for _ in 0..tries {
            if g.check(source, now).is_ok() {
                checked += 1;
                let _ = g.failed(source, now);
            }
        }
        checked
    }

    #[test]
    fn free_attempts_then_lockouts_that_double_up_to_the_cap() {
        let mut g = Guard::new(GuardPolicy::default());
        let a = src(7);
        for _ in 0..4 {
            assert!(g.check(a, 0).is_ok());
            assert_eq!(g.failed(a, 0), None);
        }
        assert_eq!(g.failed(a, 0), Some(LockedOut { retry_after_ms: 30_000 }));
        assert_eq!(g.check(a, 29_999), Err(LockedOut { retry_after_ms: 1 }));
        assert!(g.check(a, 30_000).is_ok());
        let mut now = 30_000;
        let mut lockouts = vec![];
        for _ in 0..10 {
            for _ in 0..4 {
                let _ = g.failed(a, now);
            }
            let l = g.failed(a, now).unwrap();
            lockouts.push(l.retry_after_ms);
            now += l.retry_after_ms;
        }
        assert_eq!(&lockouts[..4], &[60_000, 120_000, 240_000, 480_000]);
        assert_eq!(*lockouts.last().unwrap(), 3_600_000, "capped at an hour");
        g.succeeded(a);
        assert!(g.check(a, now).is_ok());
        assert_eq!(g.failed(a, now), None, "a success resets the source's count");
    }

    /// The issue's attack: one address locks itself out, not the installer.
    #[test]
    fn a_locked_source_does_not_lock_another() {
        let mut g = Guard::new(GuardPolicy::default());
        assert_eq!(guess(&mut g, src(66), 0, 1000), 5);
        assert!(g.check(src(66), 1).is_err());
        assert_eq!(g.check(src(1), 1), Ok(()), "the installer is checked");
        g.succeeded(src(1));
        assert!(g.check(src(66), 2).is_err(), "the installer's success frees nobody else");
    }

    /// 1,000 guesses from one address spread over an hour: 5 free attempts,
    /// then windows of 5 after lock-outs of 30, 60, 120, 240, 480 and 960 s:
    /// 7 × 5 checked (the next lock-out, 1,920 s, ends after the hour).
    #[test]
    fn a_thousand_guesses_from_one_address_over_an_hour_get_35_checks() {
        let mut g = Guard::new(GuardPolicy { global_allowance: u32::MAX, ..GuardPolicy::default() });
        let checked: u32 = (0..1000u64).map(|i| guess(&mut g, src(66), i * 3_600, 1)).sum();
        assert_eq!(checked, 35);
    }

    /// Past the global allowance every address gets one attempt per
    /// lock-out, and a new address (the installer) is still checked.
    #[test]
    fn the_ceiling_cuts_every_source_to_one_attempt_per_lockout() {
        let policy = GuardPolicy::default();
        let mut g = Guard::new(policy);
        // Six addresses spend the allowance of 30 at 5 each.
        for s in 0..6 {
            assert_eq!(guess(&mut g, src(100 + s), 0, 10), 5);
        }
        assert!(g.ceiling_reached(0));
        // A seventh gets one guess, then is locked for the first lock-out.
        assert_eq!(guess(&mut g, src(107), 0, 10), 1);
        assert_eq!(g.check(src(107), 1), Err(LockedOut { retry_after_ms: 29_999 }));
        // The first six, after their lock-out: one guess each, not five.
        let after: u32 = (0..6).map(|s| guess(&mut g, src(100 + s), 30_000, 10)).sum();
        assert_eq!(after, 6);
        // The installer, at a fresh address, is checked.
        assert_eq!(g.check(src(1), 30_000), Ok(()));
        // The allowance refills: one wrong proof every 2 min, so after the
        // 37 spent have drained (74 min) sources get five again.
        assert!(!g.ceiling_reached(30_000 + 37 * 120_000));
        assert_eq!(guess(&mut g, src(200), 30_000 + 37 * 120_000, 10), 5);
    }

    /// The whole /24 of an access point guessing for an hour: bounded by the
    /// allowance plus one guess per address per lock-out window.
    #[test]
    fn a_whole_subnet_guessing_for_an_hour_stays_bounded() {
        let mut g = Guard::new(GuardPolicy::default());
        let mut checked = 0u32;
        for second in 0..3_600u64 {
            for s in 1..=254u8 {
                checked += guess(&mut g, src(s), second * 1_000, 1);
            }
        }
        // 30 at full speed (six addresses × 5), then one per address at
        // 0, 30, 90, 210, 450, 930, 1,890 s (lock-outs of 30 s doubling):
        // at most 30 + 254 × 7.
        assert!(checked <= 30 + 254 * 7, "{checked} guesses were checked");
        assert!(checked > 254, "every address got its first attempt: {checked}");
    }

    #[test]
    fn a_full_table_refuses_newcomers_until_a_record_may_be_forgotten() {
        let policy = GuardPolicy { max_sources: 4, ..GuardPolicy::default() };
        let mut g = Guard::new(policy);
        for s in 0..4 {
            guess(&mut g, src(100 + s), 0, 1);
        }
        let refused = g.check(src(1), 10).unwrap_err();
        assert_eq!(refused.retry_after_ms, policy.forget_after_ms - 10);
        assert_eq!(g.check(src(100), 10), Ok(()), "a remembered source is checked");
        assert_eq!(g.check(src(1), policy.forget_after_ms), Ok(()), "the oldest may go now");
        assert_eq!(g.failed(src(1), policy.forget_after_ms), None);
        assert!(g.sources.len() <= 4);
        // A success makes room at once.
        let mut g = Guard::new(policy);
        for s in 0..4 {
            guess(&mut g, src(100 + s), 0, 1);
        }
        g.succeeded(src(100));
        assert_eq!(g.check(src(1), 10), Ok(()));
    }

    #[test]
    fn the_state_survives_a_restart_and_a_damaged_one_is_clamped() {
        let policy = GuardPolicy::default();
        let mut g = Guard::new(policy);
        guess(&mut g, src(66), 1_000, 5);
        let state = g.state(2_000);
        let json = serde_json::to_string(&state).unwrap();
        let back: GuardState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let mut restored = Guard::restore(policy, &back);
        assert_eq!(restored.check(src(66), 2_000), Err(LockedOut { retry_after_ms: 29_000 }));
        assert_eq!(restored.check(src(1), 2_000), Ok(()));
        assert_eq!(restored.global_spent, 5);

        let mut damaged = state.clone();
        damaged.sources[0].locked_until_ms = u64::MAX;
        damaged.global_spent = u32::MAX;
        let mut restored = Guard::restore(policy, &damaged);
        assert_eq!(
            restored.check(src(66), 2_000),
            Err(LockedOut { retry_after_ms: policy.max_lockout_ms }),
            "never longer than the cap"
        );
        assert!(restored.global_spent <= 2 * policy.global_allowance);
        assert!(serde_json::from_str::<GuardState>(r#"{"clock_ms":1}"#).is_err());
    }
}
