//! The executor: carries the agent's actions out against the world (the
//! store, the boot backend, the image source and the slot, the health
//! command, the reboot) and feeds what happened back to the agent. It
//! decides nothing. `fleetd install`, `fleetd run [--once]`, the daemon and
//! `fleetd demo` all go through it.

use super::agent::{Action, Agent, BootFacts, BusyView, Facts, Input, Refusal, Source, Timer};
use super::engine::{Event, Failure, Job, Phase};
use super::fetch::{FetchError, FetchHooks, FetchPolicy, FetchStats};
use super::slot_writer::{SlotWriter, DEFAULT_BLOCK};
use super::{State, StateStore};
use crate::boot::slot::{Pair, Slot};
use crate::boot::{BootControl, SlotState};
use crate::config::{Config, RebootMethod};
use crate::status::UpdateState;
use crate::store::StoreError;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
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
}

pub use super::report::Report;

pub type Reporter = Box<dyn FnMut(&Report) + Send>;

type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Where image bytes come from: HTTP(S) on a device, memory in tests.
pub trait ImageSource: Send {
    fn fetch_into<'a>(
        &'a self,
        url: &'a str,
        writer: &'a mut SlotWriter,
        policy: &'a FetchPolicy,
        hooks: FetchHooks<'a>,
    ) -> LocalFuture<'a, Result<FetchStats, FetchError>>;
}

/// HTTP(S) with rustls; `ca_file` replaces the system roots when set.
pub struct HttpSource {
    pub ca_file: Option<PathBuf>,
}

impl ImageSource for HttpSource {
    fn fetch_into<'a>(
        &'a self,
        url: &'a str,
        writer: &'a mut SlotWriter,
        policy: &'a FetchPolicy,
        hooks: FetchHooks<'a>,
    ) -> LocalFuture<'a, Result<FetchStats, FetchError>> {
        Box::pin(async move {
            let tls = match (crate::http::tls_config(self.ca_file.as_deref()), url.starts_with("https://")) {
                (Ok(t), _) => t,
                (Err(e), true) => return Err(FetchError::Tls(e)),
                (Err(_), false) => crate::http::plain_tls_config().map_err(FetchError::Tls)?,
            };
            let client: super::fetch::Client = crate::http::client(tls);
            super::fetch::fetch_into(&client, url, writer, policy, hooks).await
        })
    }
}

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
                        let detail = format!(
                            "accepted {} v{}; writing slot {}",
                            job.name, job.version, job.target_slot
                        );
                        outcome = Some(Admission::Accepted { jti: job.jti.clone(), version: job.version });
                        self.report_step(detail);
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
        Ok(format!("slot {booted} marked {}", if good { "good" } else { "bad" }))
    }

    /// Gives the job up before its trial boot (`agent::cancellable`): it
    /// ends failed with `Failure::cancelled`, its target bad.
    pub async fn cancel(&mut self) -> Result<Cancel, ExecError> {
        self.abandon_plan();
        let Some(job) = self.job().cloned() else {
            return Ok(Cancel::Refused("no-job: nothing to cancel".into()));
        };
        let actions = self.agent.handle(Input::Cancel, crate::system_now());
        if actions.is_empty() {
            let why = if job.phase.is_terminal() {
                format!(
                    "no-job: update {} v{} already ended ({})",
                    job.name,
                    job.version,
                    job.phase.status_name()
                )
            } else {
                format!("cancel-too-late: slot {} is on trial; MarkBad gives it up", job.target_slot)
            };
            return Ok(Cancel::Refused(why));
        }
        self.queue.extend(actions);
        self.run().await?;
        Ok(Cancel::Done(format!("cancelled {} v{}", job.name, job.version)))
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

    fn boot_facts(&self) -> BootFacts {
        let booted = self.booted().to_string();
        let booted_slot_bad = matches!(self.boot.state(&booted), Ok(SlotState::Bad));
        let target_in_use = self
            .agent
            .target_slot()
            .and_then(|t| self.config.slots.get(t))
            .is_some_and(|slot| crate::sys::block::device_in_use(&slot.device));
        BootFacts { booted_slot_bad, target_in_use }
    }

    fn persist(&mut self) -> Result<(), ExecError> {
        self.store.save(self.agent.state())?;
        self.report_status();
        Ok(())
    }

    /// One action; its outcome becomes the agent's next input. An action
    /// that fails becomes `ActionFailed` (the job fails, the rest of its
    /// actions are dropped), or, after the job ended, `SideEffectFailed`.
    async fn perform(&mut self, action: Action) -> Result<(), ExecError> {
        let outcome: Result<Option<Input>, ActionError> = match action {
            Action::Persist => return self.persist(),
            Action::PhaseChanged => {
                self.report_phase();
                Ok(None)
            }
            Action::ConfirmBooted => {
                let booted = self.booted().to_string();
                if let Err(e) = self.boot.confirm_booted(&booted) {
                    self.report_step(format!("could not confirm booted slot {booted}: {e}"));
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
        let policy = self.fetch_policy();
        let agent = &mut self.agent;
        let store = &self.store;
        // Two hooks report; they take turns with the one reporter.
        let reporter = std::cell::RefCell::new(&mut self.reporter);
        let mut on_checkpoint = |durable: u64| -> Result<(), StoreError> {
            let actions =
                agent.handle(Input::Job(Event::Checkpoint { written: durable }), crate::system_now());
            for action in actions {
                if action == Action::Persist {
                    store.save(agent.state())?;
                }
            }
            Ok(())
        };
        let mut last_percent = u64::MAX;
        let mut on_progress = |done: u64, total: u64| {
            let percent = done * 100 / total.max(1);
            if percent != last_percent {
                last_percent = percent;
                (reporter.borrow_mut())(&Report::Progress {
                    jti: job.jti.clone(),
                    version: job.version,
                    done,
                    total,
                });
            }
        };
        let mut on_retry = |why: &str, wait: Duration| {
            (reporter.borrow_mut())(&Report::Step {
                state: UpdateState::Downloading,
                detail: format!("download interrupted ({why}); retrying in {} ms", wait.as_millis()),
                failure: None,
                job: Some((job.jti.clone(), job.version)),
            });
        };
        let hooks = FetchHooks {
            on_checkpoint: &mut on_checkpoint,
            on_progress: &mut on_progress,
            on_retry: &mut on_retry,
        };
        self.source.fetch_into(&job.url, &mut writer, &policy, hooks).await?;
        let stats = writer.finish(&job.sha256)?;
        // A checkpoint's persisted state is the agent's: report it now.
        self.report_status();
        (self.reporter)(&Report::Step {
            state: UpdateState::Installing,
            detail: format!(
                "image verified (sha256 ok); {} bytes written, {} unchanged bytes skipped",
                stats.written, stats.skipped
            ),
            failure: None,
            job: Some((job.jti.clone(), job.version)),
        });
        Ok(())
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

    async fn reboot(&mut self) -> Result<(), ActionError> {
        let arg = self.boot.trial_reboot_arg().unwrap_or("");
        if self.no_reboot || self.config.update.reboot == RebootMethod::None {
            self.report_step("reboot needed to continue (reboot disabled here)".into());
            return Ok(());
        }
        let mut command = match self.config.update.reboot {
            RebootMethod::Command => {
                let script = self.config.update.reboot_command.clone().unwrap_or_default();
                let mut c = tokio::process::Command::new("/bin/sh");
                c.args(["-c", &script]).env("FLEETD_REBOOT_ARG", arg);
                c
            }
            // systemctl asks systemd (logind/PID 1) over D-Bus to reboot.
            _ => {
                let mut c = tokio::process::Command::new("systemctl");
                c.arg("reboot");
                if !arg.is_empty() {
                    c.arg(arg);
                }
                c
            }
        };
        self.report_step("rebooting into the new slot".into());
        let status = command.status().await.map_err(|e| ActionError::RebootFailed(e.to_string()))?;
        if !status.success() {
            return Err(ActionError::RebootFailed(status.to_string()));
        }
        Ok(())
    }

    /// Waits for `work`, or for the earliest armed timer (`Err` with it).
    async fn before_timer<T>(&self, work: impl Future<Output = T>) -> Result<T, Timer> {
        let Some((&timer, &deadline)) = self.timers.iter().min_by_key(|(_, at)| **at) else {
            return Ok(work.await);
        };
        tokio::select! {
            done = work => Ok(done),
            _ = tokio::time::sleep_until(deadline) => Err(timer),
        }
    }

    async fn health_command(&mut self) -> Input {
        let Some(command) = self.config.health.command.clone() else {
            return Input::HealthCommandDone { ok: true, detail: "no command".into() };
        };
        self.report_step(format!("running health check {}", command.display()));
        let child = tokio::process::Command::new(&command).kill_on_drop(true).status();
        match self.before_timer(child).await {
            Err(timer) => Input::TimerFired(timer),
            Ok(Err(e)) => {
                Input::HealthCommandDone { ok: false, detail: format!("{}: {e}", command.display()) }
            }
            Ok(Ok(status)) if status.success() => {
                Input::HealthCommandDone { ok: true, detail: "passed".into() }
            }
            Ok(Ok(status)) => {
                Input::HealthCommandDone { ok: false, detail: format!("{} {status}", command.display()) }
            }
        }
    }

    async fn await_connection(&mut self) -> Input {
        let Some(mut gate) = self.health_gate.clone() else {
            return Input::Connected;
        };
        self.report_step("waiting for the MQTT connection (health check)".into());
        match self.before_timer(async move { gate.wait_for(|c| *c).await.is_ok() }).await {
            Ok(true) => Input::Connected,
            // The sender is gone (the daemon is stopping): only the timer ends this.
            Ok(false) => match self.before_timer(std::future::pending::<()>()).await {
                Err(timer) => Input::TimerFired(timer),
                Ok(()) => Input::Connected,
            },
            Err(timer) => Input::TimerFired(timer),
        }
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

    /// The lowest trusted time (seconds): the stored clock floor.
    pub fn clock_floor(&self) -> u64 {
        self.agent.state().clock_floor
    }

    pub fn report_status(&mut self) {
        let doc = self.status_doc();
        (self.reporter)(&Report::Status(Box::new(doc)));
    }

    fn report_step(&mut self, detail: String) {
        let state = self.job().map(|j| j.phase.status_name()).unwrap_or(UpdateState::Idle);
        let job = self.job().map(|j| (j.jti.clone(), j.version));
        (self.reporter)(&Report::Step { state, detail, failure: None, job });
    }

    fn report_phase(&mut self) {
        let Some(job) = self.job() else { return };
        let detail = match &job.phase {
            Phase::Accepted => return,
            Phase::Downloading => format!("downloading {} into slot {}", job.url, job.target_slot),
            Phase::Written => format!("slot {} written and verified", job.target_slot),
            Phase::RebootPending { .. } => format!("slot {} is primary for a trial boot", job.target_slot),
            Phase::Testing { .. } => format!("booted slot {}; checking health", job.target_slot),
            Phase::Committed => format!("committed v{} in slot {}", job.version, job.target_slot),
            Phase::RolledBack { reason } => format!("rolled back to slot {}: {reason}", job.from_slot),
            Phase::Failed { error } => format!("failed: {error}"),
        };
        let state = job.phase.status_name();
        let failure = match &job.phase {
            Phase::Failed { error } => Some(error.clone()),
            _ => None,
        };
        let job = Some((job.jti.clone(), job.version));
        (self.reporter)(&Report::Step { state, detail, failure, job });
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
    use super::*;
    use crate::boot::BootError;
    use crate::trust::{Envelope, SigningKey};
    use crate::update::engine::Rollback;
    use std::sync::{Arc, Mutex};

    /// A boot environment in memory: each slot's state and the primary.
    #[derive(Default)]
    struct FakeBoot {
        env: Arc<Mutex<BTreeMap<String, SlotState>>>,
        primary: Arc<Mutex<Option<String>>>,
    }

    impl BootControl for FakeBoot {
        fn backend(&self) -> &'static str {
            "fake"
        }
        fn primary(&self) -> Result<Option<String>, BootError> {
            Ok(self.primary.lock().unwrap().clone())
        }
        fn state(&self, slot: &str) -> Result<SlotState, BootError> {
            Ok(self.env.lock().unwrap().get(slot).copied().unwrap_or(SlotState::Good))
        }
        fn set_primary_for_trial(&mut self, slot: &str) -> Result<(), BootError> {
            self.env.lock().unwrap().insert(slot.into(), SlotState::Good);
            *self.primary.lock().unwrap() = Some(slot.into());
            Ok(())
        }
        fn mark_good(&mut self, slot: &str) -> Result<(), BootError> {
            self.env.lock().unwrap().insert(slot.into(), SlotState::Good);
            Ok(())
        }
        fn mark_bad(&mut self, slot: &str) -> Result<(), BootError> {
            self.env.lock().unwrap().insert(slot.into(), SlotState::Bad);
            Ok(())
        }
    }

    /// An image from memory, pushed through the real slot writer in chunks
    /// with the real hooks; `fail` makes every fetch fail as a dead server would.
    struct MemorySource {
        image: Vec<u8>,
        fail: Option<String>,
    }

    impl ImageSource for MemorySource {
        fn fetch_into<'a>(
            &'a self,
            _url: &'a str,
            writer: &'a mut SlotWriter,
            _policy: &'a FetchPolicy,
            hooks: FetchHooks<'a>,
        ) -> LocalFuture<'a, Result<FetchStats, FetchError>> {
            Box::pin(async move {
                if let Some(why) = &self.fail {
                    return Err(FetchError::GaveUp { attempts: 1, last: why.clone() });
                }
                let from = writer.position() as usize;
                for chunk in self.image[from..].chunks(64 << 10) {
                    writer.push(chunk)?;
                    (hooks.on_progress)(writer.position(), writer.size());
                }
                let durable = writer.sync()?;
                (hooks.on_checkpoint)(durable)?;
                Ok(FetchStats { received: self.image.len() as u64, attempts: 1 })
            })
        }
    }

    struct World {
        dir: tempfile::TempDir,
        fleet: SigningKey,
        cosigner: SigningKey,
        boot: FakeBoot,
        image: Vec<u8>,
        reports: Arc<Mutex<Vec<Report>>>,
    }

    impl World {
        fn new(health: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (fleet, cosigner) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
            std::fs::create_dir(dir.path().join("keys")).unwrap();
            for (name, key) in [("fleet", &fleet), ("cosigner", &cosigner)] {
                std::fs::write(dir.path().join(format!("keys/{name}.pub.pem")), key.public_key().to_pem())
                    .unwrap();
            }
            for slot in ["slot-a.img", "slot-b.img"] {
                std::fs::File::create(dir.path().join(slot)).unwrap().set_len(1 << 20).unwrap();
            }
            let config = fleetd_fixture::DeviceConfig {
                trust: "allow_http = true".into(),
                boot: "backend = \"grub\"\ngrubenv = \"grubenv\"\nbooted_slot = \"A\"".into(),
                update: Some(
                    "reboot = \"none\"\nretries = 2\nretry_base_ms = 1000\ngive_up_after_s = 300".into(),
                ),
                health: Some(health.into()),
                ..Default::default()
            };
            std::fs::write(dir.path().join("fleetd.toml"), config.to_toml()).unwrap();
            let image = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
            Self { dir, fleet, cosigner, boot: FakeBoot::default(), image, reports: Default::default() }
        }

        fn config(&self) -> Config {
            Config::load(&self.dir.path().join("fleetd.toml")).unwrap()
        }

        fn executor(&self, booted: &str, boot_id: &str, source: MemorySource) -> Executor {
            let config = self.config();
            let (store, state) = StateStore::open(&config.device.state_dir).unwrap();
            let boot = FakeBoot { env: self.boot.env.clone(), primary: self.boot.primary.clone() };
            let mut executor =
                Executor::new(config, store, state, Box::new(boot), booted.into(), boot_id.into())
                    .unwrap()
                    .with_source(Box::new(source));
            let reports = self.reports.clone();
            executor.on_report(Box::new(move |r: &Report| reports.lock().unwrap().push(r.clone())));
            executor
        }

        fn source(&self) -> MemorySource {
            MemorySource { image: self.image.clone(), fail: None }
        }

        fn message(&self) -> Vec<u8> {
            let now = crate::system_now();
            let claims = crate::trust::Claims {
                typ: crate::trust::CLAIMS_TYPE.into(),
                jti: "jti-executor-1".into(),
                iat: now,
                nbf: now,
                exp: now + 3600,
                project: "acme-gateways".into(),
                target: crate::trust::Target {
                    hardware: "rpi4-gw".into(),
                    devices: vec!["gw-0042".into()],
                    groups: vec![],
                },
                version: 8,
                name: "v8".into(),
                image: crate::trust::Image {
                    url: "http://image.invalid/v8.img".into(),
                    size: self.image.len() as u64,
                    sha256: crate::trust::hex(
                        ring::digest::digest(&ring::digest::SHA256, &self.image).as_ref(),
                    ),
                },
            };
            let mut e = Envelope::new(&claims.to_json());
            e.add_signature(&self.fleet, "fleet").unwrap();
            e.add_signature(&self.cosigner, "cosigner").unwrap();
            e.to_json().into_bytes()
        }

        fn slot_b(&self) -> Vec<u8> {
            std::fs::read(self.dir.path().join("slot-b.img")).unwrap()
        }

        fn stored(&self) -> State {
            StateStore::read(&self.dir.path().join("state")).unwrap()
        }
    }

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

    /// The health timer on tokio's paused clock: a command that never ends
    /// is judged when the timer fires, 20 virtual seconds later.
    #[tokio::test(start_paused = true)]
    async fn a_health_check_that_hangs_fails_at_its_timeout() {
        let w = World::new("command = \"hang\"\ntimeout_s = 20");
        let script = w.dir.path().join("hang");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 1000\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut ex = w.executor("A", "b1", w.source());
        ex.admit(&w.message(), Source::Local, || {}).await.unwrap();
        ex.run().await.unwrap();
        drop(ex);
        let mut trial = w.executor("B", "b2", w.source());
        let started = tokio::time::Instant::now();
        trial.start().await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(20), "judged exactly at the timer");
        assert_eq!(
            trial.job().unwrap().phase,
            Phase::RolledBack {
                reason: Rollback::Unhealthy("health-check-failed: timed out after 20 s".into())
            }
        );
        assert_eq!(w.boot.env.lock().unwrap()["B"], SlotState::Bad);
    }

    /// The daemon's gate: no broker connection within the timeout fails the trial.
    #[tokio::test(start_paused = true)]
    async fn a_trial_that_never_connects_fails_at_its_timeout() {
        let w = World::new("timeout_s = 30");
        let mut ex = w.executor("A", "b1", w.source());
        ex.admit(&w.message(), Source::Local, || {}).await.unwrap();
        ex.run().await.unwrap();
        drop(ex);
        let mut trial = w.executor("B", "b2", w.source());
        let (_connected_tx, connected) = tokio::sync::watch::channel(false);
        trial.set_health_gate(connected);
        let started = tokio::time::Instant::now();
        trial.start().await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(
            trial.job().unwrap().phase,
            Phase::RolledBack {
                reason: Rollback::Unhealthy("health-check-failed: mqtt-not-connected within 30 s".into())
            }
        );
    }

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

    /// Retries and give-up on paused time, against a real (closed) port:
    /// `retries` fruitless attempts and `give_up_after_s` of virtual time.
    #[tokio::test(start_paused = true)]
    async fn http_retries_give_up_after_the_configured_time() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot");
        std::fs::File::create(&slot).unwrap().set_len(1 << 20).unwrap();
        let mut writer = SlotWriter::open(&slot, 1000, 0, DEFAULT_BLOCK).unwrap();
        let policy = FetchPolicy {
            max_attempts: 3,
            give_up_after: Duration::from_secs(300),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            ..FetchPolicy::default()
        };
        let retries = std::cell::RefCell::new(Vec::new());
        let hooks = FetchHooks {
            on_checkpoint: &mut |_| Ok(()),
            on_progress: &mut |_, _| {},
            on_retry: &mut |_, wait| retries.borrow_mut().push(wait),
        };
        let source = HttpSource { ca_file: None };
        let started = tokio::time::Instant::now();
        let url = format!("http://127.0.0.1:{port}/x.img");
        let err = source.fetch_into(&url, &mut writer, &policy, hooks).await.unwrap_err();
        assert_eq!(err.name(), "download-failed");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(300), "gave up after {waited:?}, before give_up_after");
        let retries = retries.into_inner();
        assert!(retries.len() >= 3, "{retries:?}");
        assert!(
            retries.iter().all(|w| *w <= Duration::from_secs(60)),
            "each wait under the cap: {retries:?}"
        );
    }
}
