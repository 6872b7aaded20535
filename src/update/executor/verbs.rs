//! The executor's verbs: each action of the agent carried out against the
//! store, the boot environment and the slot, and its outcome turned into
//! the agent's next input.

use super::{narration, ActionError, ExecError, Executor};
use crate::boot::SlotState;
use crate::status::UpdateState;
use crate::store::StoreError;
use crate::update::agent::{Action, BootFacts, Input};
use crate::update::engine::{Event, Failure};
use crate::update::fetch::{AdaptiveRequest, Checkpoint, FetchHooks, FetchPolicy, ImageRequest};
use crate::update::slot_writer::{SlotWriter, DEFAULT_BLOCK};
use crate::update::Report;
use std::path::PathBuf;
use std::time::Duration;

impl Executor {
    pub(super) fn persist(&mut self) -> Result<(), ExecError> {
        self.store.save(self.agent.state())?;
        self.report_status();
        Ok(())
    }

    /// One action; its outcome becomes the agent's next input. An action
    /// that fails becomes `ActionFailed` (the job fails, the rest of its
    /// actions are dropped), or, after the job ended, `SideEffectFailed`.
    pub(super) async fn perform(&mut self, action: Action) -> Result<(), ExecError> {
        let outcome: Result<Option<Input>, ActionError> = match action {
            Action::Persist => return self.persist(),
            Action::PhaseChanged => {
                self.report_phase();
                Ok(None)
            }
            Action::ConfirmBooted => {
                let booted = self.booted().to_string();
                if let Err(e) = self.boot.confirm_booted(&booted) {
                    self.report_step(narration::confirm_failed(&booted, &e));
                }
                Ok(None)
            }
            // Admission's own actions have no meaning inside a job.
            Action::Acknowledge | Action::Duplicate { .. } | Action::Refuse(_) | Action::Continue => Ok(None),
            Action::InvalidateTarget => {
                self.invalidate_target().map(|()| Some(Input::Job(Event::SlotInvalidated)))
            }
            Action::Download { from } => {
                self.download(from).await.map(|()| Some(Input::Job(Event::ImageVerified)))
            }
            Action::SetPrimaryForTrial => {
                let target = self.target();
                self.boot
                    .set_primary_for_trial(&target)
                    .map(|()| {
                        Some(Input::Job(Event::Switched { boot_id: self.agent.facts().boot_id.clone() }))
                    })
                    .map_err(ActionError::from)
            }
            Action::Reboot => self.reboot().await.map(|()| None),
            Action::RunHealthCommand => Ok(Some(self.health_command().await)),
            Action::AwaitConnection => Ok(Some(self.await_connection().await)),
            Action::MarkTargetGood => {
                let target = self.target();
                self.boot.mark_good(&target).map(|()| None).map_err(ActionError::from)
            }
            Action::MarkTargetBad => {
                let target = self.target();
                self.boot.mark_bad(&target).map(|()| None).map_err(ActionError::from)
            }
            Action::ArmTimer { timer, after } => {
                self.timers.insert(timer, tokio::time::Instant::now() + after);
                Ok(None)
            }
            Action::CancelTimer(timer) => {
                self.timers.remove(&timer);
                Ok(None)
            }
        };
        match outcome {
            Ok(Some(input)) => self.inputs.push_back(input),
            Ok(None) => {}
            Err(error) if self.job().is_some_and(|j| j.phase.is_terminal()) => {
                self.report_step(error.to_string());
                self.inputs.push_back(Input::SideEffectFailed { error: error.to_string() });
            }
            Err(error) => {
                self.abandon_plan();
                self.inputs.push_back(Input::Job(Event::ActionFailed { error: Failure::from(&error) }));
            }
        }
        Ok(())
    }

    pub(super) fn boot_facts(&self) -> BootFacts {
        let booted = self.booted().to_string();
        let booted_slot_bad = matches!(self.boot.state(&booted), Ok(SlotState::Bad));
        let target_in_use = self
            .agent
            .target_slot()
            .and_then(|t| self.config.slots.get(t))
            .is_some_and(|slot| crate::sys::block::device_in_use(&slot.device));
        BootFacts { booted_slot_bad, target_in_use }
    }

    fn target(&self) -> String {
        self.job().map(|j| j.target_slot.clone()).unwrap_or_default()
    }

    /// The device of a slot named by the stored job: the configuration may
    /// have changed since, so an unknown name is an error, not a panic.
    fn slot_device(&self, slot: &str) -> Result<PathBuf, ActionError> {
        self.config.slots.get(slot).map(|s| s.device.clone()).ok_or_else(|| ActionError::NoSlot(slot.into()))
    }

    /// Two independent checks before a write: the slot name, and the device
    /// against `/` and every mount. (The exclusive open is the third.)
    fn refuse_booted_target(&self, target: &str) -> Result<PathBuf, ActionError> {
        let device = self.slot_device(target)?;
        if target == self.booted() || crate::sys::block::device_in_use(&device) {
            return Err(ActionError::TargetIsBooted(target.into()));
        }
        Ok(device)
    }

    fn invalidate_target(&mut self) -> Result<(), ActionError> {
        let target = self.target();
        self.refuse_booted_target(&target)?;
        Ok(self.boot.invalidate(&target)?)
    }

    async fn download(&mut self, from: u64) -> Result<(), ActionError> {
        let job = self.job().cloned().ok_or(ActionError::NoJob)?;
        let slot_path = self.refuse_booted_target(&job.target_slot)?;
        let mut writer = SlotWriter::open(&slot_path, job.size, from, DEFAULT_BLOCK)?;
        if from > 0 {
            self.report_step(narration::resuming(&job, from));
        }
        let policy = self.fetch_policy();
        let request = self.image_request(&job, &slot_path)?;
        let agent = &mut self.agent;
        let store = &self.store;
        // Two hooks report; they take turns with the one reporter.
        let reporter = std::cell::RefCell::new(&mut self.reporter);
        let mut on_checkpoint = |checkpoint: Checkpoint| -> Result<(), StoreError> {
            let event = Event::Checkpoint { written: checkpoint.written, transfer: checkpoint.transfer };
            let actions = agent.handle(Input::Job(event), crate::system_now());
            for action in actions {
                if action == Action::Persist {
                    store.save(agent.state())?;
                }
            }
            Ok(())
        };
        let mut last_percent = u64::MAX;
        let mut on_progress = |done: u64, total: u64, transfer: crate::update::Transfer| {
            let percent = done * 100 / total.max(1);
            if percent != last_percent {
                last_percent = percent;
                (reporter.borrow_mut())(&Report::Progress {
                    jti: job.jti.clone(),
                    version: job.version,
                    done,
                    total,
                    fetched: transfer.bytes_fetched,
                    reused: transfer.bytes_reused,
                });
            }
        };
        let mut on_retry = |why: &str, wait: Duration| {
            (reporter.borrow_mut())(&Report::Step {
                state: UpdateState::Downloading,
                detail: narration::download_retry(why, wait),
                failure: None,
                job: Some((job.jti.clone(), job.version)),
            });
        };
        let mut on_note = |note: String| {
            (reporter.borrow_mut())(&Report::Step {
                state: UpdateState::Downloading,
                detail: note,
                failure: None,
                job: Some((job.jti.clone(), job.version)),
            });
        };
        let hooks = FetchHooks {
            on_checkpoint: &mut on_checkpoint,
            on_progress: &mut on_progress,
            on_retry: &mut on_retry,
            on_note: &mut on_note,
        };
        let fetched = self.source.fetch_into(&request, &mut writer, &policy, hooks).await?;
        let stats = writer.finish(&job.sha256)?;
        let transfer = crate::update::Transfer {
            source_offset: 0,
            bytes_fetched: request.base.bytes_fetched + fetched.received,
            bytes_reused: request.base.bytes_reused + fetched.reused,
        };
        // A checkpoint's persisted state is the agent's: report it now.
        self.report_status();
        (self.reporter)(&Report::Step {
            state: UpdateState::Installing,
            detail: narration::image_verified(&stats, &transfer),
            failure: None,
            job: Some((job.jti.clone(), job.version)),
        });
        Ok(())
    }

    /// What the download is: the encoding and, when the message has an
    /// index and `[update] adaptive` is on, the slots an adaptive install reads.
    fn image_request(
        &self,
        job: &crate::update::Job,
        target: &std::path::Path,
    ) -> Result<ImageRequest, ActionError> {
        let u = &self.config.update;
        let adaptive = match (&job.index, u.adaptive) {
            (Some(index), true) => Some(AdaptiveRequest {
                index: index.clone(),
                sha256: job.sha256.clone(),
                target: target.to_path_buf(),
                booted: self.slot_device(&job.from_slot)?,
                max_fetch_percent: u.adaptive_max_fetch,
                fallback: u.adaptive_fallback.plan(),
            }),
            _ => None,
        };
        Ok(ImageRequest { url: job.url.clone(), encoding: job.encoding, base: job.transfer, adaptive })
    }

    fn fetch_policy(&self) -> FetchPolicy {
        let u = &self.config.update;
        FetchPolicy {
            stall_timeout: Duration::from_secs(u.stall_timeout_s),
            min_rate: u.min_rate_bps,
            max_attempts: u.retries,
            backoff_base: Duration::from_millis(u.retry_base_ms),
            give_up_after: Duration::from_secs(u.give_up_after_s),
            checkpoint_every: u.checkpoint_mib << 20,
            ..FetchPolicy::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fakes::{MemorySource, World};
    use crate::boot::SlotState;
    use crate::update::engine::Phase;
    use crate::update::Source;

    /// A download that fails for good fails the job, and the slot stays bad.
    #[tokio::test]
    async fn a_download_that_gives_up_fails_the_job_and_keeps_the_target_bad() {
        let w = World::new("timeout_s = 20");
        let mut ex = w.executor("A", "b1", MemorySource { image: w.image.clone(), fail: Some("cut".into()) });
        ex.admit(&w.message(), Source::Local, || {}).await.unwrap();
        ex.run().await.unwrap();
        let phase = ex.job().unwrap().phase.clone();
        assert!(
            matches!(&phase, Phase::Failed { error }
                if error.name == "download-failed" && error.text.starts_with("download-failed: ")),
            "{phase:?}"
        );
        assert_eq!(w.boot.env.lock().unwrap()["B"], SlotState::Bad);
        assert_eq!(w.stored().last_error, ex.state().last_error, "the failure is on disk");
    }
}
