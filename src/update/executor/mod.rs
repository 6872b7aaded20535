//! The executor: carries the agent's actions out against the world (the
//! store, the boot backend, the image source and the slot, the health
//! command, the reboot) and feeds what happened back to the agent. It
//! decides nothing. `fleetd install`, `fleetd run [--once]`, the daemon and
//! `fleetd demo` all go through it.
//!
//! This file is its loop (admission, `run`, the calls that end a job);
//! `verbs` carries out each action, `process` the waits on child processes
//! and the connection, `narration` holds every sentence it reports.

#[cfg(test)]
mod fakes;
mod narration;
mod process;
mod verbs;

use super::agent::{Action, Agent, BusyView, Facts, Input, Refusal, Source, Timer};
use super::engine::{Failure, Job};
use super::fetch::{FetchError, HttpSource, ImageSource};
use super::{State, StateStore};
use crate::boot::slot::{Pair, Slot};
use crate::boot::BootControl;
use crate::config::Config;
use crate::store::StoreError;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

crate::error_name::named_error! {
    #[derive(Debug, thiserror::Error)]
    pub enum ExecError {
        /// Nothing can be recorded when the store itself fails.
        #[name(of 0)]
        #[error(transparent)]
        Store(#[from] StoreError),
        /// The configuration's slots are not an A/B pair (its checks
        /// refuse such a file first).
        #[name = "config"]
        #[error("{name}: slots: {0}")]
        Slots(String),
    }
}

crate::error_name::named_error! {
    /// Why an action failed; its name and text become the job's `Failure`.
    #[derive(Debug, thiserror::Error)]
    pub enum ActionError {
        #[name(of 0)]
        #[error(transparent)]
        Boot(#[from] crate::boot::BootError),
        #[name(of 0)]
        #[error(transparent)]
        Write(#[from] super::slot_writer::WriteError),
        #[name(of 0)]
        #[error(transparent)]
        Fetch(#[from] FetchError),
        #[name = "target-is-booted"]
        #[error("{name}: slot {0} is the running slot or is mounted; refusing to write it")]
        TargetIsBooted(String),
        #[name = "no-slot"]
        #[error("{name}: slot {0:?} of the stored job is not in the configuration")]
        NoSlot(String),
        #[name = "reboot-failed"]
        #[error("{name}: {0}")]
        RebootFailed(String),
        #[name = "no-job"]
        #[error("{name}: nothing to carry out")]
        NoJob,
    }
}

impl From<&ActionError> for Failure {
    fn from(error: &ActionError) -> Self {
        Failure::new(error.name(), error.to_string())
    }
}

/// What became of a cancel: the sentence for the caller either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    Done(String),
    /// Nothing to cancel (`no-job`), or too late (`cancel-too-late`).
    Refused(String),
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A new job: persisted, acknowledged, and run as far as it goes.
    Accepted { jti: String, version: u64 },
    /// A second delivery of a message already handled.
    Duplicate { jti: String },
    /// Refused; the refusal is recorded as the last error.
    Refused(Refusal),
    /// The message of the stored, unfinished job: it went on.
    Continued,
    /// A halt stopped the job it names (its target is given up next).
    Halted { jti: String },
}

pub use super::report::Report;

pub type Reporter = Box<dyn FnMut(&Report) + Send>;

pub struct Executor {
    config: Config,
    agent: Agent,
    store: StateStore,
    boot: Box<dyn BootControl>,
    source: Box<dyn ImageSource>,
    /// Stop at reboot-pending instead of rebooting (`--no-reboot`).
    pub no_reboot: bool,
    reporter: Reporter,
    health_gate: Option<tokio::sync::watch::Receiver<bool>>,
    timers: BTreeMap<Timer, tokio::time::Instant>,
    /// Actions of the current job still to carry out.
    queue: VecDeque<Action>,
    inputs: VecDeque<Input>,
    provisioning: Option<crate::status::Provisioning>,
}

impl Executor {
    pub fn new(
        config: Config,
        store: StateStore,
        state: State,
        boot: Box<dyn BootControl>,
        booted: String,
        boot_id: String,
    ) -> Result<Self, ExecError> {
        let policy = crate::policy::load(&config).map_err(|e| e.to_string());
        let facts = Facts {
            booted,
            boot_id,
            slots: Pair::new(
                config
                    .slots
                    .iter()
                    .map(|(name, slot)| (Slot::new(name), crate::config::slot_size(slot)))
                    .collect(),
            )
            .map_err(ExecError::Slots)?,
            leeway_s: config.trust.leeway_s,
            health_command: config.health.command.is_some(),
            health_needs_connection: false,
            health_timeout: Duration::from_secs(config.health.timeout_s),
            group_spread_s: config.reconnect_spread_s(),
        };
        let source = Box::new(HttpSource { ca_file: config.update.ca_file.clone() });
        Ok(Self {
            agent: Agent::new(state, facts, policy),
            config,
            store,
            boot,
            source,
            no_reboot: false,
            reporter: Box::new(|_| {}),
            health_gate: None,
            timers: BTreeMap::new(),
            queue: VecDeque::new(),
            inputs: VecDeque::new(),
            provisioning: None,
        })
    }

    /// Images from somewhere else than HTTP(S) (tests).
    pub fn with_source(mut self, source: Box<dyn ImageSource>) -> Self {
        self.source = source;
        self
    }

    pub fn on_report(&mut self, reporter: Reporter) {
        self.reporter = reporter;
    }

    /// Makes "connected" part of the health check: a trial slot that cannot
    /// reach the broker within the health timeout is not committed.
    pub fn set_health_gate(&mut self, connected: tokio::sync::watch::Receiver<bool>) {
        self.health_gate = Some(connected);
        self.agent.set_health_needs_connection(true);
    }

    pub fn state(&self) -> &State {
        self.agent.state()
    }

    pub fn job(&self) -> Option<&Job> {
        self.agent.job()
    }

    pub fn booted(&self) -> &str {
        &self.agent.facts().booted
    }

    /// For changes outside a job (`fleetd mark-good/mark-bad`).
    pub fn boot_mut(&mut self) -> &mut dyn BootControl {
        self.boot.as_mut()
    }

    pub fn booted_is_unfinished_target(&self) -> bool {
        self.agent.booted_is_unfinished_target()
    }

    /// What to answer about messages while a job runs.
    pub fn busy_view(&self) -> BusyView {
        self.agent.busy_view()
    }

    /// Start of a process: confirm the running slot, resume the stored job.
    pub async fn start(&mut self) -> Result<(), ExecError> {
        self.inputs.push_back(Input::Started);
        self.run().await
    }

    /// Admits a message (persisting it as a job and calling `on_ack`, or
    /// recording its refusal) without running the job: `run` does that.
    pub async fn admit(
        &mut self,
        bytes: &[u8],
        source: Source,
        on_ack: impl FnOnce(),
    ) -> Result<Admission, ExecError> {
        // Whatever an earlier, failed run left behind belongs to no one now.
        self.abandon_plan();
        // What is on disk: if this admission cannot be saved, memory goes
        // back to it, so memory and disk never disagree.
        let on_disk = self.agent.state().clone();
        let admitted = self.admit_from(bytes, source, on_ack).await;
        if admitted.is_err() {
            self.agent.restore(on_disk);
            self.abandon_plan();
        }
        admitted
    }

    async fn admit_from(
        &mut self,
        bytes: &[u8],
        source: Source,
        on_ack: impl FnOnce(),
    ) -> Result<Admission, ExecError> {
        let now = crate::system_now();
        let actions = match self.agent.early_answer(bytes, &source, now) {
            Err(answered) => answered,
            Ok(claims) => {
                // Verified: now the boot facts the rest of admission needs.
                for action in self.agent.before_admission() {
                    self.perform(action).await?;
                }
                let boot = self.boot_facts();
                self.agent.handle(Input::Verified { claims: Box::new(claims), source, boot }, now)
            }
        };
        let mut on_ack = Some(on_ack);
        let mut outcome = None;
        let mut actions: VecDeque<Action> = actions.into();
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Acknowledge => {
                    if let Some(ack) = on_ack.take() {
                        ack();
                    }
                }
                Action::Duplicate { jti } => outcome = Some(Admission::Duplicate { jti }),
                Action::Refuse(refusal) => outcome = Some(Admission::Refused(refusal)),
                Action::Continue => {
                    self.inputs.push_back(Input::Started);
                    outcome = Some(Admission::Continued);
                }
                // Neither a job nor a refusal is acknowledged unless it is
                // on disk: the sender delivers the message again later.
                Action::Persist => self.persist()?,
                Action::PhaseChanged => {
                    if let Some(job) = self.job() {
                        if matches!(job.phase, crate::update::Phase::Halted { .. }) {
                            outcome = Some(Admission::Halted { jti: job.jti.clone() });
                            self.report_phase();
                        } else {
                            let detail = narration::accepted(job);
                            outcome =
                                Some(Admission::Accepted { jti: job.jti.clone(), version: job.version });
                            self.report_step(detail);
                        }
                    }
                }
                // The job's own actions: `run` carries them out.
                other => {
                    self.queue.push_back(other);
                    self.queue.extend(actions.drain(..));
                }
            }
        }
        Ok(outcome.unwrap_or(Admission::Continued))
    }

    /// Carries out the job's actions until it waits for a reboot or ends.
    pub async fn run(&mut self) -> Result<(), ExecError> {
        loop {
            if let Some(action) = self.queue.pop_front() {
                // In the job's span: every event inside carries its fields.
                let span = match self.job() {
                    Some(job) => crate::logging::job_span(&job.jti, job.version),
                    None => tracing::Span::none(),
                };
                if let Err(e) = tracing::Instrument::instrument(self.perform(action), span).await {
                    // Nothing of this job's plan may run in a later one.
                    self.abandon_plan();
                    return Err(e);
                }
                continue;
            }
            let Some(input) = self.inputs.pop_front() else {
                // A job waiting for its rollout wave: wait here for its start.
                if let Some(&start) = self.timers.get(&Timer::Start) {
                    tokio::time::sleep_until(start).await;
                    self.timers.remove(&Timer::Start);
                    self.inputs.push_back(Input::TimerFired(Timer::Start));
                    continue;
                }
                return Ok(());
            };
            let actions = self.agent.handle(input, crate::system_now());
            self.queue.extend(actions);
        }
    }

    /// `fleetd mark-good` / `mark-bad`: ends a trial of the running slot as
    /// the health check would (true), or false when there is none.
    pub async fn verdict_by_hand(&mut self, healthy: bool) -> Result<bool, ExecError> {
        let actions = self.agent.handle(Input::VerdictByHand { healthy }, crate::system_now());
        if actions.is_empty() {
            return Ok(false);
        }
        self.queue.extend(actions);
        self.run().await?;
        Ok(true)
    }

    /// `MarkGood` / `MarkBad` of the booted slot, from the CLI or the bus:
    /// in a trial the job ends as the health check would end it; otherwise
    /// the boot environment is told directly.
    pub async fn mark_booted(&mut self, good: bool) -> Result<String, MarkError> {
        let booted = self.booted().to_string();
        if good && self.booted_is_unfinished_target() {
            return Err(MarkError::UnfinishedTarget(booted));
        }
        // Also right after a manual reboot, before any health check ran.
        if !self.verdict_by_hand(good).await? {
            let backend = self.boot_mut();
            if good {
                backend.mark_good(&booted)?
            } else {
                backend.mark_bad(&booted)?
            }
            self.report_status();
        }
        Ok(narration::marked(&booted, good))
    }

    /// Gives the job up before its trial boot (`agent::cancellable`): it
    /// ends failed with `Failure::cancelled`, its target bad.
    pub async fn cancel(&mut self) -> Result<Cancel, ExecError> {
        self.abandon_plan();
        let Some(job) = self.job().cloned() else {
            return Ok(Cancel::Refused(narration::NOTHING_TO_CANCEL.into()));
        };
        let actions = self.agent.handle(Input::Cancel, crate::system_now());
        if actions.is_empty() {
            return Ok(Cancel::Refused(narration::cannot_cancel(&job)));
        }
        self.queue.extend(actions);
        self.run().await?;
        Ok(Cancel::Done(narration::cancelled(&job)))
    }

    /// Drops what is left of a plan whose `run` was stopped at an await
    /// point (the bus interrupted it). A later `resume` starts over from the
    /// persisted state, as a restart would.
    pub fn abandon_plan(&mut self) {
        self.queue.clear();
        self.inputs.clear();
    }

    /// Goes on with the stored job from its persisted state (after `abandon_plan`).
    pub async fn resume(&mut self) -> Result<(), ExecError> {
        self.abandon_plan();
        self.start().await
    }

    /// The status document as of now.
    pub fn status_doc(&self) -> crate::status::StatusDoc {
        let mut doc = super::status_doc(
            &self.config,
            self.agent.state(),
            Some(self.boot.as_ref()),
            Some(self.booted()),
        );
        if let Some(p) = &self.provisioning {
            doc.apply_provisioning(p);
        }
        doc
    }

    /// What provisioning left, for the status documents it reports.
    pub fn set_provisioning(&mut self, provisioning: crate::status::Provisioning) {
        self.provisioning = Some(provisioning);
    }

    /// The device's groups from now on (the registry's, from enrollment).
    pub fn set_groups(&mut self, groups: Vec<String>) {
        self.config.device.groups = groups.clone();
        self.agent.set_groups(groups);
    }

    /// The lowest trusted time (seconds): the stored clock floor.
    pub fn clock_floor(&self) -> u64 {
        self.agent.state().clock_floor
    }
}

/// Opens the store (taking its lock), the boot backend, and tells which
/// slot and which boot this is: everything an executor needs.
pub fn open(config: Config) -> Result<Executor, OpenError> {
    let (store, state) = StateStore::open(&config.device.state_dir)?;
    let backend = crate::boot::from_config(&config)?;
    let booted = crate::boot::booted_slot(&config, backend.as_ref())?;
    let boot_id = crate::boot::boot_id(&config)?;
    Ok(Executor::new(config, store, state, backend, booted, boot_id)?)
}

#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("target-is-booted: slot {0} holds an unfinished download; refusing to mark it good")]
    UnfinishedTarget(String),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
}

crate::error_name::named_error! {
    #[derive(Debug, thiserror::Error)]
    pub enum OpenError {
        #[name(of 0)]
        #[error(transparent)]
        Store(#[from] StoreError),
        #[name(of 0)]
        #[error(transparent)]
        Boot(#[from] crate::boot::BootError),
        #[name(of 0)]
        #[error(transparent)]
        Exec(#[from] ExecError),
    }
}

#[cfg(test)]
mod tests {
    use super::fakes::World;
    use super::*;
    use crate::status::UpdateState;
    use crate::update::engine::Phase;
    use crate::update::Report;

    /// Admitted, written through the real slot writer, switched; after the
    /// "reboot" a second executor checks health and commits.
    #[tokio::test]
    async fn a_whole_update_through_the_executor() {
        let w = World::new("timeout_s = 20");
        let mut ex = w.executor("A", "b1", w.source());
        ex.start().await.unwrap();
        let acked = std::cell::Cell::new(false);
        let admission = ex.admit(&w.message(), Source::Local, || acked.set(true)).await.unwrap();
        assert_eq!(admission, Admission::Accepted { jti: "jti-executor-1".into(), version: 8 });
        assert!(acked.get());
        assert_eq!(w.stored().job.unwrap().phase, Phase::Accepted, "persisted before the acknowledgement");
        ex.run().await.unwrap();
        assert!(matches!(ex.job().unwrap().phase, Phase::RebootPending { .. }));
        assert_eq!(&w.slot_b()[..w.image.len()], &w.image[..]);
        assert_eq!(w.boot.primary.lock().unwrap().as_deref(), Some("B"));
        drop(ex);
        let mut after_reboot = w.executor("B", "b2", w.source());
        after_reboot.start().await.unwrap();
        let state = w.stored();
        assert_eq!((state.installed_version, state.job.unwrap().phase), (8, Phase::Committed));
        let steps: Vec<UpdateState> = w
            .reports
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                Report::Step { state, .. } => Some(*state),
                _ => None,
            })
            .collect();
        assert!(
            steps.contains(&UpdateState::RebootPending) && steps.contains(&UpdateState::Committed),
            "{steps:?}"
        );
    }

    /// A save that fails (here: a directory where the temp file goes, which
    /// even root cannot write through) admits nothing: no acknowledgement,
    /// and memory is what is on disk, for a job and for a refusal alike.
    /// Once the save works, the same message is accepted.
    #[tokio::test]
    async fn an_admission_that_cannot_be_saved_is_not_acknowledged_and_leaves_no_job() {
        let w = World::new("timeout_s = 20");
        let mut ex = w.executor("A", "b1", w.source());
        ex.start().await.unwrap();
        let before = w.stored();
        let blocker = w.dir.path().join(format!("state/.state.json.tmp{}", std::process::id()));
        std::fs::create_dir(&blocker).unwrap();
        for message in [w.message(), b"{not a message".to_vec()] {
            let acked = std::cell::Cell::new(false);
            let err = ex.admit(&message, Source::Local, || acked.set(true)).await.unwrap_err();
            assert_eq!(err.name(), "state-io");
            assert!(!acked.get(), "acknowledged without a save");
            assert!(ex.job().is_none(), "a job only in memory: {:?}", ex.job());
            assert_eq!(ex.state(), &before, "memory and disk disagree");
            assert_eq!(w.stored(), before);
        }
        std::fs::remove_dir(&blocker).unwrap();
        let acked = std::cell::Cell::new(false);
        let admission = ex.admit(&w.message(), Source::Local, || acked.set(true)).await.unwrap();
        assert_eq!(admission, Admission::Accepted { jti: "jti-executor-1".into(), version: 8 });
        assert!(acked.get());
        assert_eq!(w.stored().job.unwrap().phase, Phase::Accepted);
    }
}
