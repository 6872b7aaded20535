//! The update state machine: pure, no IO. `step(job, event)` returns the next
//! job and the actions the driver must carry out, in order. Each change of
//! phase is persisted (`Action::Persist`) before the side effect it leads to,
//! so a restart at any instant finds a phase it can resume or clean up.
//!
//! The crash-safe order, literally:
//!   persist Accepted → invalidate the target slot → write (Downloading,
//!   persisted with each checkpoint after fsync) → verify hash → persist Written →
//!   set primary for trial (one atomic env store) → persist RebootPending →
//!   reboot → booted into target: persist Testing → health check →
//!   mark good → persist Committed.

use crate::status::UpdateState;
use crate::trust::{Encoding, IndexRef};
use serde::{Deserialize, Serialize};

/// One update, from acceptance to its end. Persisted in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub jti: String,
    pub version: u64,
    pub name: String,
    pub url: String,
    pub size: u64,
    pub sha256: String,
    /// The slot being written (never the booted one).
    pub target_slot: String,
    /// The slot that was booted when the job began: the fallback.
    pub from_slot: String,
    pub phase: Phase,
    /// Bytes of the image durably in the target slot (fsynced).
    pub written: u64,
    pub started_at: u64,
    /// How `url` encodes the image (`raw` when absent in an older state).
    #[serde(default, skip_serializing_if = "Encoding::is_raw")]
    pub encoding: Encoding,
    /// The block index, when the message offers adaptive installs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexRef>,
    /// Where the transfer stood at the last checkpoint.
    #[serde(default)]
    pub transfer: Transfer,
}

/// The transfer's side of a checkpoint: where to resume in the bytes the
/// server holds, and what the job has cost so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Transfer {
    /// For a zstd stream, the offset in the `.zst` of the frame that starts
    /// at `written` (frames are independent, so decoding resumes there).
    #[serde(default)]
    pub source_offset: u64,
    /// Bytes received from the network, index included.
    #[serde(default)]
    pub bytes_fetched: u64,
    /// Image bytes copied from the local slots instead.
    #[serde(default)]
    pub bytes_reused: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Verified and recorded; waiting for its start in a rollout wave.
    Scheduled {
        start_at: u64,
    },
    /// Verified and recorded; the target slot is about to be invalidated.
    Accepted,
    /// The target is invalid in the boot env; bytes are streaming into it.
    Downloading,
    /// All bytes written, fsynced, and the hash matched.
    Written,
    /// The target is primary for a trial; waiting for the reboot.
    RebootPending {
        boot_id: String,
    },
    /// Booted into the target; the health check decides.
    Testing {
        boot_id: String,
    },
    Committed,
    /// The old slot runs again: the bootloader fell back, or the health check failed.
    RolledBack {
        reason: Rollback,
    },
    Failed {
        #[serde(flatten)]
        error: Failure,
    },
    /// Stopped by a halt message before its download finished.
    Halted {
        by: String,
    },
}

/// Why a job failed: its error's stable name and whole text, kept typed
/// from the error to the reports (`state.json` keeps the text as `error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Empty in a state saved before names were kept.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(rename = "error")]
    pub text: String,
}

const CANCELLED: &str = "cancelled";

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Failure {
    /// `text` is the error's whole text (`name: detail`, or more).
    pub fn new(name: &str, text: String) -> Self {
        Self { name: name.to_string(), text }
    }

    /// `name: detail`.
    pub fn named(name: &str, detail: &str) -> Self {
        Self::new(name, format!("{name}: {detail}"))
    }

    /// A job given up by request before its trial boot.
    pub fn cancelled() -> Self {
        Self::named(CANCELLED, "given up by request before its trial boot")
    }

    pub fn is_cancel(&self) -> bool {
        self.name == CANCELLED
    }
}

/// Why a trial ended with the old slot running. Stored as the text it
/// always was: `rolled-back`, or `health-check-failed: <detail>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Rollback {
    /// A new boot, and the old slot runs: the bootloader fell back.
    FellBack,
    /// The health check failed; the whole text.
    Unhealthy(String),
}

const FELL_BACK: &str = "rolled-back";

impl Rollback {
    pub fn unhealthy(detail: &str) -> Self {
        Self::Unhealthy(format!("health-check-failed: {detail}"))
    }
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FellBack => f.write_str(FELL_BACK),
            Self::Unhealthy(text) => f.write_str(text),
        }
    }
}

impl From<String> for Rollback {
    /// The stored tag, as a unit variant's: one exact word, nothing parsed.
    fn from(text: String) -> Self {
        if text == FELL_BACK {
            Self::FellBack
        } else {
            Self::Unhealthy(text)
        }
    }
}

impl From<Rollback> for String {
    fn from(reason: Rollback) -> Self {
        reason.to_string()
    }
}

impl Phase {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Committed | Self::RolledBack { .. } | Self::Failed { .. } | Self::Halted { .. })
    }

    /// The status document's `state` for this phase.
    pub fn status_name(&self) -> UpdateState {
        match self {
            Self::Scheduled { .. } => UpdateState::Scheduled,
            Self::Halted { .. } => UpdateState::Halted,
            Self::Accepted | Self::Downloading => UpdateState::Downloading,
            Self::Written => UpdateState::Installing,
            Self::RebootPending { .. } => UpdateState::RebootPending,
            Self::Testing { .. } => UpdateState::Testing,
            Self::Committed => UpdateState::Committed,
            Self::RolledBack { .. } => UpdateState::RolledBack,
            Self::Failed { .. } => UpdateState::Failed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Startup, or after a reboot: which slot runs, and this boot's id.
    Started {
        booted: String,
        boot_id: String,
    },
    /// The target slot is marked bad in the boot env.
    SlotInvalidated,
    /// `written` bytes are fsynced in the target slot.
    Checkpoint {
        written: u64,
        transfer: Transfer,
    },
    /// Every byte is written and fsynced, and the SHA-256 matched.
    ImageVerified,
    /// The target is primary for a trial; `boot_id` is the current boot's.
    Switched {
        boot_id: String,
    },
    HealthChecked {
        healthy: bool,
        detail: String,
    },
    /// `fleetd mark-good` / `mark-bad` during a trial (RAUC's flow): the
    /// verdict a health check would give, from a process that may be the
    /// first to run since the trial boot.
    VerdictByHand {
        booted: String,
        healthy: bool,
    },
    /// An action failed for good (after its own retries).
    ActionFailed {
        error: Failure,
    },
    /// A scheduled job's start time has come.
    StartDue,
    /// A verified halt names this job (its jti is `by`).
    Halt {
        by: String,
    },
}

/// What the driver must do, in order.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Save the job as returned by `step`.
    Persist,
    /// Mark the target slot bad so a half-written slot can never boot.
    InvalidateTarget,
    /// Stream the image into the target from this offset (earlier bytes are
    /// already there and are re-hashed from the slot).
    Download {
        from: u64,
    },
    SetPrimaryForTrial,
    Reboot,
    RunHealthCheck,
    MarkTargetGood,
    MarkTargetBad,
    /// Record the finished job in memory (installed version, slot versions,
    /// history); the `Persist` that follows saves it.
    Finish,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected-event: {event:?} in phase {phase:?}")]
pub struct UnexpectedEvent {
    pub phase: Phase,
    pub event: Event,
}

pub type Step = (Job, Vec<Action>);

/// The whole state machine. An unexpected (phase, event) pair is an error
/// and changes nothing.
pub fn step(job: &Job, event: Event) -> Result<Step, UnexpectedEvent> {
    use Action::*;
    let with = |phase: Phase| Job { phase, ..job.clone() };
    let unexpected = |event: Event| UnexpectedEvent { phase: job.phase.clone(), event };
    if let Event::ActionFailed { error } = &event {
        if job.phase.is_terminal() {
            return Err(unexpected(event.clone()));
        }
        let failed = with(Phase::Failed { error: error.clone() });
        // Once the target may have been switched, give it up explicitly.
        let mut actions = vec![Finish, Persist];
        if matches!(job.phase, Phase::Written | Phase::RebootPending { .. } | Phase::Testing { .. }) {
            actions.insert(0, MarkTargetBad);
        }
        return Ok((failed, actions));
    }
    if let Event::Halt { by } = &event {
        // Only what has not finished downloading stops; the running slot is untouched.
        let give_up_target = match job.phase {
            Phase::Scheduled { .. } => false,
            Phase::Accepted | Phase::Downloading => true,
            _ => return Err(unexpected(event.clone())),
        };
        let halted = with(Phase::Halted { by: by.clone() });
        let mut actions = vec![Finish, Persist];
        if give_up_target {
            actions.insert(0, MarkTargetBad);
        }
        return Ok((halted, actions));
    }
    Ok(match (&job.phase, event) {
        // Waiting for its wave: a restart changes nothing (the agent re-arms the timer).
        (Phase::Scheduled { .. }, Event::Started { .. }) => (job.clone(), vec![]),
        (Phase::Scheduled { .. }, Event::StartDue) => {
            (with(Phase::Accepted), vec![Persist, InvalidateTarget])
        }
        // The slot being written runs: whatever booted it, it is not a good
        // image. Give it up, never confirm it.
        (Phase::Accepted | Phase::Downloading, Event::Started { booted, .. })
            if booted == job.target_slot =>
        {
            let (failed, mut actions) =
                fail(job, Failure::named("target-is-booted", "the slot being written is running"));
            actions.insert(0, MarkTargetBad);
            (failed, actions)
        }
        (Phase::Accepted, Event::Started { .. }) => (job.clone(), vec![InvalidateTarget]),
        // Not persisted here: a restart in Accepted re-invalidates and starts
        // from byte 0, exactly what Downloading at 0 would do. The first
        // checkpoint persists it; the first byte is fetched two fsyncs sooner.
        (Phase::Accepted, Event::SlotInvalidated) => {
            let mut next = with(Phase::Downloading);
            next.written = 0;
            next.transfer = Transfer::default();
            (next, vec![Download { from: 0 }])
        }
        (Phase::Downloading, Event::Started { .. }) => {
            (job.clone(), vec![InvalidateTarget, Download { from: job.written }])
        }
        // Resuming re-invalidates the target; its confirmation changes nothing.
        (Phase::Downloading, Event::SlotInvalidated) => (job.clone(), vec![]),
        (Phase::Downloading, Event::Checkpoint { written, transfer }) if written <= job.size => {
            (Job { written, transfer, ..job.clone() }, vec![Persist])
        }
        (Phase::Downloading, Event::ImageVerified) => {
            (Job { written: job.size, ..with(Phase::Written) }, vec![Persist, SetPrimaryForTrial])
        }
        (Phase::Written, Event::Started { .. }) => (job.clone(), vec![SetPrimaryForTrial]),
        (Phase::Written, Event::Switched { boot_id }) => {
            (with(Phase::RebootPending { boot_id }), vec![Persist, Reboot])
        }
        (Phase::RebootPending { boot_id: switched_in }, Event::Started { booted, boot_id }) => {
            if booted == job.target_slot {
                (with(Phase::Testing { boot_id }), vec![Persist, RunHealthCheck])
            } else if *switched_in != boot_id {
                // A new boot, yet the old slot runs: the bootloader fell back.
                (with(Phase::RolledBack { reason: Rollback::FellBack }), vec![MarkTargetBad, Finish, Persist])
            } else {
                // Same boot: the daemon restarted before the reboot happened.
                (job.clone(), vec![Reboot])
            }
        }
        (Phase::Testing { .. }, Event::Started { booted, boot_id }) => {
            if booted == job.target_slot {
                (with(Phase::Testing { boot_id }), vec![Persist, RunHealthCheck])
            } else {
                (with(Phase::RolledBack { reason: Rollback::FellBack }), vec![MarkTargetBad, Finish, Persist])
            }
        }
        (Phase::Testing { .. }, Event::HealthChecked { healthy, detail }) => verdict(job, healthy, &detail),
        // By hand, right after the trial boot (nothing ran the health check
        // yet) or during it: the job ends exactly as a health check ends it.
        (Phase::RebootPending { .. } | Phase::Testing { .. }, Event::VerdictByHand { booted, healthy })
            if booted == job.target_slot =>
        {
            let detail = if healthy { "marked good by hand" } else { "marked bad by hand" };
            verdict(job, healthy, detail)
        }
        (phase, Event::Started { .. }) if phase.is_terminal() => (job.clone(), vec![]),
        (_, event) => return Err(unexpected(event)),
    })
}

/// The end of a trial: committed, or rolled back with a reboot into the old slot.
fn verdict(job: &Job, healthy: bool, detail: &str) -> Step {
    if healthy {
        (
            Job { phase: Phase::Committed, ..job.clone() },
            vec![Action::MarkTargetGood, Action::Finish, Action::Persist],
        )
    } else {
        (
            Job { phase: Phase::RolledBack { reason: Rollback::unhealthy(detail) }, ..job.clone() },
            vec![Action::MarkTargetBad, Action::Finish, Action::Persist, Action::Reboot],
        )
    }
}

/// Whether the running slot may be confirmed to the bootloader at start:
/// always, except while a job that has not ended targets it (a trial to be
/// judged by the health check, or a slot that was being written).
pub fn may_confirm_booted(job: Option<&Job>, booted: &str) -> bool {
    !job.is_some_and(|j| !j.phase.is_terminal() && j.target_slot == booted)
}

fn fail(job: &Job, error: Failure) -> Step {
    (Job { phase: Phase::Failed { error }, ..job.clone() }, vec![Action::Finish, Action::Persist])
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::*;

    fn job(phase: Phase) -> Job {
        Job {
            jti: "jti-00000001".into(),
            version: 8,
            name: "v8".into(),
            url: "https://h/x.img".into(),
            size: 100,
            sha256: "00".repeat(32),
            target_slot: "B".into(),
            from_slot: "A".into(),
            phase,
            written: 0,
            started_at: 1,
            encoding: Encoding::Raw,
            index: None,
            transfer: Transfer::default(),
        }
    }

    fn started(booted: &str, boot_id: &str) -> Event {
        Event::Started { booted: booted.into(), boot_id: boot_id.into() }
    }

    fn pending(id: &str) -> Phase {
        Phase::RebootPending { boot_id: id.into() }
    }

    fn testing(id: &str) -> Phase {
        Phase::Testing { boot_id: id.into() }
    }

    fn rolled_back() -> Phase {
        Phase::RolledBack { reason: Rollback::FellBack }
    }

    /// (phase, event) → (phase, actions)
    #[test]
    fn transition_table() {
        let table: Vec<(Phase, Event, Phase, Vec<Action>)> = vec![
            (Phase::Accepted, Event::SlotInvalidated, Phase::Downloading, vec![Download { from: 0 }]),
            (Phase::Accepted, started("A", "b1"), Phase::Accepted, vec![InvalidateTarget]),
            (Phase::Downloading, Event::ImageVerified, Phase::Written, vec![Persist, SetPrimaryForTrial]),
            (Phase::Downloading, Event::SlotInvalidated, Phase::Downloading, vec![]),
            (Phase::Written, started("A", "b1"), Phase::Written, vec![SetPrimaryForTrial]),
            (Phase::Written, Event::Switched { boot_id: "b1".into() }, pending("b1"), vec![Persist, Reboot]),
            (pending("b1"), started("B", "b2"), testing("b2"), vec![Persist, RunHealthCheck]),
            (pending("b1"), started("A", "b1"), pending("b1"), vec![Reboot]),
            (pending("b1"), started("A", "b2"), rolled_back(), vec![MarkTargetBad, Finish, Persist]),
            (testing("b2"), started("B", "b3"), testing("b3"), vec![Persist, RunHealthCheck]),
            (testing("b2"), started("A", "b3"), rolled_back(), vec![MarkTargetBad, Finish, Persist]),
            (
                testing("b2"),
                Event::HealthChecked { healthy: true, detail: String::new() },
                Phase::Committed,
                vec![MarkTargetGood, Finish, Persist],
            ),
            (
                testing("b2"),
                Event::HealthChecked { healthy: false, detail: "exit 3".into() },
                Phase::RolledBack { reason: Rollback::Unhealthy("health-check-failed: exit 3".into()) },
                vec![MarkTargetBad, Finish, Persist, Reboot],
            ),
            (Phase::Committed, started("B", "b4"), Phase::Committed, vec![]),
            (rolled_back(), started("A", "b4"), rolled_back(), vec![]),
        ];
        for (from, event, to, actions) in table {
            let (next, got) = step(&job(from.clone()), event.clone())
                .unwrap_or_else(|e| panic!("{from:?} + {event:?}: {e}"));
            assert_eq!((&next.phase, &got), (&to, &actions), "{from:?} + {event:?}");
        }
    }

    #[test]
    fn downloads_resume_from_the_durable_offset() {
        let mut j = job(Phase::Downloading);
        let transfer = Transfer { source_offset: 17, bytes_fetched: 20, bytes_reused: 30 };
        let (j2, a) = step(&j, Event::Checkpoint { written: 40, transfer }).unwrap();
        assert_eq!((j2.written, j2.transfer, a), (40, transfer, vec![Persist]));
        j.written = 40;
        let (_, a) = step(&j, started("A", "b1")).unwrap();
        assert_eq!(a, vec![InvalidateTarget, Download { from: 40 }]);
        // A checkpoint past the image size is a driver bug, not progress.
        assert!(step(&j, Event::Checkpoint { written: 101, transfer }).is_err());
        // A restart from Accepted starts over: no stale transfer survives.
        let mut accepted = job(Phase::Accepted);
        accepted.transfer = transfer;
        let (j3, a) = step(&accepted, Event::SlotInvalidated).unwrap();
        assert_eq!((j3.written, j3.transfer, a), (0, Transfer::default(), vec![Download { from: 0 }]));
    }

    #[test]
    fn writing_into_the_booted_slot_is_refused_and_the_slot_given_up() {
        for phase in [Phase::Accepted, Phase::Downloading] {
            let (next, actions) = step(&job(phase.clone()), started("B", "b1")).unwrap();
            assert!(
                matches!(next.phase, Phase::Failed { ref error }
                    if error.name == "target-is-booted" && error.text.starts_with("target-is-booted: ")),
                "{phase:?}"
            );
            assert_eq!(actions, vec![MarkTargetBad, Finish, Persist], "{phase:?}");
        }
    }

    #[test]
    fn a_verdict_by_hand_ends_a_trial_as_the_health_check_would() {
        let by_hand = |healthy| Event::VerdictByHand { booted: "B".into(), healthy };
        for phase in [pending("b1"), testing("b2")] {
            let (next, actions) = step(&job(phase.clone()), by_hand(true)).unwrap();
            assert_eq!((next.phase, actions), (Phase::Committed, vec![MarkTargetGood, Finish, Persist]));
            let (next, actions) = step(&job(phase.clone()), by_hand(false)).unwrap();
            assert_eq!(
                (next.phase, actions),
                (
                    Phase::RolledBack {
                        reason: Rollback::Unhealthy("health-check-failed: marked bad by hand".into())
                    },
                    vec![MarkTargetBad, Finish, Persist, Reboot]
                )
            );
        }
        // Not running the target: no trial to judge.
        let on_a = Event::VerdictByHand { booted: "A".into(), healthy: true };
        assert!(step(&job(pending("b1")), on_a.clone()).is_err());
        assert!(step(&job(Phase::Downloading), by_hand(true)).is_err());
        assert!(step(&job(Phase::Committed), by_hand(true)).is_err());
    }

    #[test]
    fn the_booted_slot_is_confirmed_unless_an_unfinished_job_targets_it() {
        assert!(may_confirm_booted(None, "A"));
        for phase in [Phase::Accepted, Phase::Downloading, Phase::Written, pending("b1"), testing("b1")] {
            assert!(may_confirm_booted(Some(&job(phase.clone())), "A"), "{phase:?}: the fallback runs");
            assert!(!may_confirm_booted(Some(&job(phase.clone())), "B"), "{phase:?}: the target runs");
        }
        for phase in [Phase::Committed, rolled_back(), Phase::Failed { error: Failure::named("x", "y") }] {
            assert!(may_confirm_booted(Some(&job(phase.clone())), "B"), "{phase:?}");
        }
    }

    #[test]
    fn failures_give_up_a_switched_target() {
        let (next, actions) =
            step(&job(Phase::Downloading), Event::ActionFailed { error: Failure::named("download", "cut") })
                .unwrap();
        assert_eq!(next.phase, Phase::Failed { error: Failure::new("download", "download: cut".into()) });
        assert_eq!(actions, vec![Finish, Persist]);
        let (_, actions) =
            step(&job(Phase::Written), Event::ActionFailed { error: Failure::named("x", "y") }).unwrap();
        assert_eq!(actions, vec![MarkTargetBad, Finish, Persist]);
        assert!(
            step(&job(Phase::Committed), Event::ActionFailed { error: Failure::named("x", "y") }).is_err()
        );
    }

    #[test]
    fn unexpected_pairs_are_typed_errors() {
        for (phase, event) in [
            (Phase::Accepted, Event::ImageVerified),
            (Phase::Downloading, Event::Switched { boot_id: "b".into() }),
            (Phase::Written, Event::HealthChecked { healthy: true, detail: String::new() }),
            (Phase::Committed, Event::SlotInvalidated),
            (pending("b1"), Event::ImageVerified),
        ] {
            let err = step(&job(phase.clone()), event.clone()).unwrap_err();
            assert!(err.to_string().starts_with("unexpected-event"), "{phase:?} {event:?}");
        }
    }

    #[test]
    fn phases_serialize_with_a_tag() {
        let j = job(pending("b1"));
        let text = serde_json::to_string(&j).unwrap();
        assert!(text.contains(r#""phase":{"phase":"reboot-pending","boot_id":"b1"}"#), "{text}");
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), j);
    }

    /// The ends keep the text they were stored with; a failure adds its
    /// name, and one stored without it still loads.
    #[test]
    fn endings_are_stored_as_before() {
        let cases = [
            (
                Phase::RolledBack { reason: Rollback::FellBack },
                r#"{"phase":"rolled-back","reason":"rolled-back"}"#,
            ),
            (
                Phase::RolledBack { reason: Rollback::unhealthy("exit 3") },
                r#"{"phase":"rolled-back","reason":"health-check-failed: exit 3"}"#,
            ),
            (
                Phase::Failed { error: Failure::named("hash-mismatch", "x") },
                r#"{"phase":"failed","name":"hash-mismatch","error":"hash-mismatch: x"}"#,
            ),
        ];
        for (phase, text) in cases {
            assert_eq!(serde_json::to_string(&phase).unwrap(), text);
            assert_eq!(serde_json::from_str::<Phase>(text).unwrap(), phase);
        }
        let old: Phase = serde_json::from_str(r#"{"phase":"failed","error":"hash-mismatch: x"}"#).unwrap();
        assert_eq!(old, Phase::Failed { error: Failure::new("", "hash-mismatch: x".into()) });
        assert!(Failure::cancelled().is_cancel() && !Failure::named("x", "y").is_cancel());
    }
}
