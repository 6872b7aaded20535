//! What the executor tells people, in one place: the sentences of its
//! reports (each phase, each step) and of its answers (cancel, mark).
//! They are read by people in the log, `fleetd status`, the fleet's
//! progress topic and D-Bus; names (`busy`, `no-job` ...) stay first.

use super::Executor;
use crate::status::UpdateState;
use crate::update::engine::{Job, Phase};
use crate::update::slot_writer::WriteStats;
use crate::update::Report;
use std::path::Path;
use std::time::Duration;

/// A job admitted: `admit`'s step.
pub(super) fn accepted(job: &Job) -> String {
    match &job.phase {
        Phase::Scheduled { start_at } => format!(
            "accepted {} v{}; scheduled by its rollout to start at {start_at} (in {} s), then write slot {}",
            job.name,
            job.version,
            start_at.saturating_sub(crate::system_now()),
            job.target_slot
        ),
        _ => format!("accepted {} v{}; writing slot {}", job.name, job.version, job.target_slot),
    }
}

/// The sentence of the phase the job just entered (none for `Accepted`:
/// `accepted` said it).
pub(super) fn phase(job: &Job) -> Option<String> {
    Some(match &job.phase {
        Phase::Accepted => return None,
        Phase::Scheduled { start_at } => format!("scheduled to start at {start_at}"),
        Phase::Halted { by } => {
            format!("halted by {by} before its download finished; slot {} given up", job.target_slot)
        }
        Phase::Downloading => format!("downloading {} into slot {}", job.url, job.target_slot),
        Phase::Written => format!("slot {} written and verified", job.target_slot),
        Phase::RebootPending { .. } => format!("slot {} is primary for a trial boot", job.target_slot),
        Phase::Testing { .. } => format!("booted slot {}; checking health", job.target_slot),
        Phase::Committed => format!("committed v{} in slot {}", job.version, job.target_slot),
        Phase::RolledBack { reason } => format!("rolled back to slot {}: {reason}", job.from_slot),
        // The state name goes before it everywhere (`failed: slot-open: ...`).
        Phase::Failed { error } => error.to_string(),
    })
}

/// A restarted daemon goes on with a download from its last checkpoint
/// (no phase changes, so `phase` says nothing).
pub(super) fn resuming(job: &Job, from: u64) -> String {
    format!("resuming {} into slot {} from byte {from}, its last checkpoint", job.url, job.target_slot)
}

pub(super) fn confirm_failed(booted: &str, error: &crate::boot::BootError) -> String {
    format!("could not confirm booted slot {booted}: {error}")
}

pub(super) fn download_retry(why: &str, wait: Duration) -> String {
    format!("download interrupted ({why}); retrying in {} ms", wait.as_millis())
}

pub(super) fn image_verified(stats: &WriteStats, transfer: &crate::update::Transfer) -> String {
    format!(
        "image verified (sha256 ok); {} bytes written, {} unchanged bytes skipped; {} bytes fetched, {} bytes reused from the slots",
        stats.written, stats.skipped, transfer.bytes_fetched, transfer.bytes_reused
    )
}

pub(super) const REBOOT_DISABLED: &str = "reboot needed to continue (reboot disabled here)";
pub(super) const REBOOTING: &str = "rebooting into the new slot";
pub(super) const AWAITING_CONNECTION: &str = "waiting for the MQTT connection (health check)";

pub(super) fn running_health_check(command: &Path) -> String {
    format!("running health check {}", command.display())
}

/// `MarkGood` / `MarkBad` done.
pub(super) fn marked(slot: &str, good: bool) -> String {
    format!("slot {slot} marked {}", if good { "good" } else { "bad" })
}

pub(super) const NOTHING_TO_CANCEL: &str = "no-job: nothing to cancel";

/// Why `job` cannot be cancelled: it ended, or its trial began.
pub(super) fn cannot_cancel(job: &Job) -> String {
    if job.phase.is_terminal() {
        format!("no-job: update {} v{} already ended ({})", job.name, job.version, job.phase.status_name())
    } else {
        format!("cancel-too-late: slot {} is on trial; MarkBad gives it up", job.target_slot)
    }
}

pub(super) fn cancelled(job: &Job) -> String {
    format!("cancelled {} v{}", job.name, job.version)
}

impl Executor {
    /// The status document, to the reporter.
    pub fn report_status(&mut self) {
        let doc = self.status_doc();
        (self.reporter)(&Report::Status(Box::new(doc)));
    }

    pub(super) fn report_step(&mut self, detail: String) {
        let state = self.job().map(|j| j.phase.status_name()).unwrap_or(UpdateState::Idle);
        let job = self.job().map(|j| (j.jti.clone(), j.version));
        (self.reporter)(&Report::Step { state, detail, failure: None, job });
    }

    pub(super) fn report_phase(&mut self) {
        let Some(job) = self.job() else { return };
        let Some(detail) = phase(job) else { return };
        let state = job.phase.status_name();
        let failure = match &job.phase {
            Phase::Failed { error } => Some(error.clone()),
            _ => None,
        };
        let job = Some((job.jti.clone(), job.version));
        (self.reporter)(&Report::Step { state, detail, failure, job });
    }
}
