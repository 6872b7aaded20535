//! Carries out the engine's actions against the real world: the store, the
//! boot backend, the slot, the network, the health check and the reboot.

use super::engine::{self, Action, Event, Job, Phase};
use super::fetch::{self, FetchPolicy};
use super::slot_writer::{SlotWriter, DEFAULT_BLOCK};
use super::StateStore as Store;
use crate::boot::BootControl;
use crate::config::{Config, RebootMethod};
use crate::store::StoreError;
use crate::trust::Claims;
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Engine(#[from] engine::UnexpectedEvent),
    #[error("busy: update {jti} (v{version}) is in progress")]
    Busy { jti: String, version: u64 },
    #[error("target-is-booted: slot {0} is the running slot or is mounted; refusing to write it")]
    TargetIsBooted(String),
    #[error("image-too-large: {size} bytes do not fit slot {slot} ({slot_size} bytes)")]
    SlotTooSmall { slot: String, size: u64, slot_size: u64 },
    #[error("no-slot: {0}")]
    NoSlot(String),
    /// The running slot was given up (a failed trial that did not reboot):
    /// the only good slot is the one an update would write.
    #[error(
        "reboot-required: slot {booted} is running but was given up; reboot into the good slot before the next update"
    )]
    RebootRequired { booted: String },
    #[error("{0}")]
    Boot(#[from] crate::boot::BootError),
}

impl DriveError {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Store(e) => e.name(),
            Self::Engine(_) => "unexpected-event",
            Self::Busy { .. } => "busy",
            Self::TargetIsBooted(_) => "target-is-booted",
            Self::SlotTooSmall { .. } => "image-too-large",
            Self::NoSlot(_) => "no-slot",
            Self::RebootRequired { .. } => "reboot-required",
            Self::Boot(e) => e.name(),
        }
    }
}

/// What the driver tells its front end (CLI progress, MQTT reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A new phase: the status `state` name and a sentence for people.
    Step { state: &'static str, detail: String },
    /// Download progress, at most once per percent.
    Progress { jti: String, version: u64, done: u64, total: u64 },
    /// The status document, after every persisted change.
    Status(Box<crate::status::StatusDoc>),
}

pub type Reporter = Box<dyn FnMut(&Report) + Send>;

pub struct Updater {
    config: Config,
    store: Store,
    boot: Box<dyn BootControl>,
    booted: String,
    boot_id: String,
    /// Stop at reboot-pending instead of rebooting (`--no-reboot`).
    pub no_reboot: bool,
    reporter: Reporter,
    health_gate: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Updater {
    pub fn new(
        config: Config,
        store: Store,
        boot: Box<dyn BootControl>,
        booted: String,
        boot_id: String,
    ) -> Self {
        Self {
            config,
            store,
            boot,
            booted,
            boot_id,
            no_reboot: false,
            reporter: Box::new(|_| {}),
            health_gate: None,
        }
    }

    pub fn on_report(&mut self, reporter: Reporter) {
        self.reporter = reporter;
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    pub fn boot(&self) -> &dyn BootControl {
        self.boot.as_ref()
    }

    /// For changes outside a job (`fleetd mark-good/mark-bad`).
    pub fn boot_mut(&mut self) -> &mut dyn BootControl {
        self.boot.as_mut()
    }

    pub fn booted(&self) -> &str {
        &self.booted
    }

    pub fn job(&self) -> Option<&Job> {
        self.store.state().job.as_ref()
    }

    /// The slot an update would write: the one not booted.
    pub fn target_slot(&self) -> Result<String, DriveError> {
        self.config
            .slots
            .keys()
            .find(|s| **s != self.booted)
            .cloned()
            .ok_or_else(|| DriveError::NoSlot(format!("no slot other than the booted {}", self.booted)))
    }

    /// Records a verified message as a new job (persisted before anything
    /// else happens), then runs it as far as it goes.
    pub async fn start(&mut self, claims: &Claims) -> Result<(), DriveError> {
        self.start_then(claims, Box::new(|| {})).await
    }

    /// As `start`, calling `on_persisted` as soon as the job is on disk: the
    /// moment an MQTT message may be acknowledged.
    pub async fn start_then(
        &mut self,
        claims: &Claims,
        on_persisted: Box<dyn FnOnce() + Send>,
    ) -> Result<(), DriveError> {
        if let Some(job) = self.store.state().active_job() {
            return Err(DriveError::Busy { jti: job.jti.clone(), version: job.version });
        }
        self.confirm_booted_slot();
        // After a failed trial that did not reboot, the rejected slot still
        // runs and the other one is the only good slot: writing it would
        // leave nothing to boot. Refuse until the device runs a good slot.
        if let Ok(crate::boot::SlotState::Bad) = self.boot.state(&self.booted) {
            return Err(DriveError::RebootRequired { booted: self.booted.clone() });
        }
        let target = self.target_slot()?;
        self.refuse_booted_target(&target)?;
        let slot = &self.config.slots[&target];
        if let Some(slot_size) = crate::config::slot_size(slot) {
            if claims.image.size > slot_size {
                return Err(DriveError::SlotTooSmall { slot: target, size: claims.image.size, slot_size });
            }
        }
        let now = crate::system_now();
        let state = self.store.state_mut();
        state.record_accepted(&claims.jti, claims.iat, claims.exp, self.config.trust.leeway_s);
        state.job = Some(Job {
            jti: claims.jti.clone(),
            version: claims.version,
            name: claims.name.clone(),
            url: claims.image.url.clone(),
            size: claims.image.size,
            sha256: claims.image.sha256.clone(),
            target_slot: target.clone(),
            from_slot: self.booted.clone(),
            phase: Phase::Accepted,
            written: 0,
            started_at: now,
        });
        self.store.save()?;
        on_persisted();
        self.report_status();
        self.report_step(format!("accepted {} v{}; writing slot {target}", claims.name, claims.version));
        self.resume().await
    }

    /// First confirms the running slot to the bootloader (outside a trial),
    /// then continues whatever job is stored, from wherever it stopped. The
    /// confirmation comes first: a download can take an hour, and a power
    /// cut during it must not cost the running slot an attempt for good.
    pub async fn resume(&mut self) -> Result<(), DriveError> {
        self.confirm_booted_slot();
        if self.job().is_some() {
            let event = Event::Started { booted: self.booted.clone(), boot_id: self.boot_id.clone() };
            self.drive(event).await?;
        }
        Ok(())
    }

    /// Bootloaders count boots (U-Boot spends an attempt, GRUB sets
    /// `<slot>_TRY=1`) and skip a slot nobody confirmed. Outside a trial of
    /// the running slot, the running slot is the good one: give back what
    /// its boots spent. A trial target is left to the health check.
    fn confirm_booted_slot(&mut self) {
        if !engine::may_confirm_booted(self.job(), &self.booted) {
            return;
        }
        let booted = self.booted.clone();
        if let Err(e) = self.boot.confirm_booted(&booted) {
            self.report_step(format!("could not confirm booted slot {booted}: {e}"));
        }
    }

    /// `fleetd mark-good` / `mark-bad`: ends a trial of the running slot as
    /// the health check would (true), or returns false when no trial of it
    /// is under way.
    pub async fn verdict_by_hand(&mut self, healthy: bool) -> Result<bool, DriveError> {
        let in_trial = self.job().is_some_and(|j| {
            j.target_slot == self.booted
                && matches!(j.phase, Phase::RebootPending { .. } | Phase::Testing { .. })
        });
        if !in_trial {
            return Ok(false);
        }
        self.drive(Event::VerdictByHand { booted: self.booted.clone(), healthy }).await?;
        Ok(true)
    }

    /// The running slot holds a download that has not reached `Written`:
    /// never marked good, by hand or otherwise.
    pub fn booted_is_unfinished_target(&self) -> bool {
        self.job().is_some_and(|j| {
            j.target_slot == self.booted && matches!(j.phase, Phase::Accepted | Phase::Downloading)
        })
    }

    fn refuse_booted_target(&self, target: &str) -> Result<(), DriveError> {
        // Two independent checks: the slot name, and the device against `/`.
        if target == self.booted || crate::sys::block::device_in_use(self.slot_device(target)?) {
            return Err(DriveError::TargetIsBooted(target.to_string()));
        }
        Ok(())
    }

    /// The device of a slot named by the stored job: the configuration may
    /// have changed since, so an unknown name is an error, not a panic.
    fn slot_device(&self, slot: &str) -> Result<&Path, DriveError> {
        self.config.slots.get(slot).map(|s| s.device.as_path()).ok_or_else(|| {
            DriveError::NoSlot(format!("slot {slot:?} of the stored job is not in the configuration"))
        })
    }

    async fn drive(&mut self, first: Event) -> Result<(), DriveError> {
        let mut events = VecDeque::from([first]);
        while let Some(event) = events.pop_front() {
            let Some(job) = self.store.state().job.clone() else {
                return Ok(());
            };
            let (next, actions) = engine::step(&job, event)?;
            let phase_changed = next.phase != job.phase;
            let ending = next.phase.is_terminal();
            self.store.state_mut().job = Some(next);
            if phase_changed {
                self.report_phase();
            }
            let mut side_errors = Vec::new();
            for action in actions {
                let is_persist = action == Action::Persist;
                match self.perform(action).await {
                    Ok(Some(next_event)) => events.push_back(next_event),
                    Ok(None) => {}
                    // Nothing can be recorded when the store itself fails.
                    Err(e) if is_persist => return Err(e.into_drive_error()),
                    // The job has ended: a failed side effect (giving the
                    // slot up, the reboot) must not keep it from being
                    // recorded. It is reported and joins the last error.
                    Err(e) if ending => {
                        self.report_step(format!("{e}"));
                        side_errors.push(e.to_string());
                    }
                    Err(e) => {
                        events.clear();
                        events.push_back(Event::ActionFailed { error: e.to_string() });
                        break;
                    }
                }
            }
            if !side_errors.is_empty() {
                let state = self.store.state_mut();
                let mut text = state.last_error.take().unwrap_or_default();
                for e in side_errors {
                    text = if text.is_empty() { e } else { format!("{text}; then {e}") };
                }
                state.last_error = Some(text);
                self.store.save()?;
                self.report_status();
            }
        }
        Ok(())
    }

    async fn perform(&mut self, action: Action) -> Result<Option<Event>, ActionError> {
        let target = match self.job() {
            Some(job) => job.target_slot.clone(),
            None => return Ok(None),
        };
        match action {
            Action::Persist => {
                self.store.save().map_err(ActionError::Store)?;
                self.report_status();
                Ok(None)
            }
            Action::InvalidateTarget => {
                self.refuse_booted_target(&target).map_err(|e| ActionError::Named(e.to_string()))?;
                self.boot.invalidate(&target).map_err(|e| ActionError::Named(e.to_string()))?;
                Ok(Some(Event::SlotInvalidated))
            }
            Action::Download { from } => self.download(from).await.map(Some),
            Action::SetPrimaryForTrial => {
                self.boot.set_primary_for_trial(&target).map_err(|e| ActionError::Named(e.to_string()))?;
                Ok(Some(Event::Switched { boot_id: self.boot_id.clone() }))
            }
            Action::Reboot => {
                self.reboot().await?;
                Ok(None)
            }
            Action::RunHealthCheck => Ok(Some(self.health_check().await)),
            Action::MarkTargetGood => {
                self.boot.mark_good(&target).map_err(|e| ActionError::Named(e.to_string()))?;
                Ok(None)
            }
            Action::MarkTargetBad => {
                self.boot.mark_bad(&target).map_err(|e| ActionError::Named(e.to_string()))?;
                Ok(None)
            }
            Action::Finish => {
                self.store.state_mut().finish_job(crate::system_now());
                Ok(None)
            }
        }
    }

    async fn download(&mut self, from: u64) -> Result<Event, ActionError> {
        let job = self.job().cloned().ok_or_else(|| ActionError::Named("no job".into()))?;
        self.refuse_booted_target(&job.target_slot).map_err(|e| ActionError::Named(e.to_string()))?;
        let slot_path =
            self.slot_device(&job.target_slot).map_err(|e| ActionError::Named(e.to_string()))?.to_path_buf();
        let named = |e: &dyn std::fmt::Display| ActionError::Named(e.to_string());
        let mut writer =
            SlotWriter::open(&slot_path, job.size, from, DEFAULT_BLOCK).map_err(|e| named(&e))?;
        let tls = crate::http::tls_config(self.config.update.ca_file.as_deref());
        let tls = match (tls, job.url.starts_with("https://")) {
            (Ok(t), _) => t,
            (Err(e), true) => return Err(named(&e)),
            (Err(_), false) => crate::http::plain_tls_config().map_err(|e| named(&e))?,
        };
        let client: fetch::Client = crate::http::client(tls);
        let policy = self.fetch_policy();
        let store = &mut self.store;
        // Two hooks report; they take turns with the one reporter.
        let reporter = std::cell::RefCell::new(&mut self.reporter);
        let mut on_checkpoint = |durable: u64| -> Result<(), String> {
            let job = store.state().job.clone().ok_or("no job")?;
            let (next, _) =
                engine::step(&job, Event::Checkpoint { written: durable }).map_err(|e| e.to_string())?;
            store.state_mut().job = Some(next);
            store.save().map_err(|e| e.to_string())
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
                state: "downloading",
                detail: format!("download interrupted ({why}); retrying in {} ms", wait.as_millis()),
            });
        };
        let hooks = fetch::FetchHooks {
            on_checkpoint: &mut on_checkpoint,
            on_progress: &mut on_progress,
            on_retry: &mut on_retry,
        };
        fetch::fetch_into(&client, &job.url, &mut writer, &policy, hooks).await.map_err(|e| named(&e))?;
        let stats = writer.finish(&job.sha256).map_err(|e| named(&e))?;
        (self.reporter)(&Report::Step {
            state: "installing",
            detail: format!(
                "image verified (sha256 ok); {} bytes written, {} unchanged bytes skipped",
                stats.written, stats.skipped
            ),
        });
        Ok(Event::ImageVerified)
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
        let status = command.status().await.map_err(|e| ActionError::Named(format!("reboot-failed: {e}")))?;
        if !status.success() {
            return Err(ActionError::Named(format!("reboot-failed: {status}")));
        }
        Ok(())
    }

    async fn health_check(&mut self) -> Event {
        let timeout = Duration::from_secs(self.config.health.timeout_s);
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(command) = self.config.health.command.clone() {
            self.report_step(format!("running health check {}", command.display()));
            let child = tokio::process::Command::new(&command).kill_on_drop(true).status();
            let failure = match tokio::time::timeout_at(deadline, child).await {
                Err(_) => Some(format!("timed out after {} s", timeout.as_secs())),
                Ok(Err(e)) => Some(format!("{}: {e}", command.display())),
                Ok(Ok(status)) if status.success() => None,
                Ok(Ok(status)) => Some(format!("{} {status}", command.display())),
            };
            if let Some(detail) = failure {
                return Event::HealthChecked { healthy: false, detail };
            }
        }
        if let Some(mut gate) = self.health_gate.clone() {
            self.report_step("waiting for the MQTT connection (health check)".into());
            let connected = tokio::time::timeout_at(deadline, gate.wait_for(|c| *c)).await;
            if !matches!(connected, Ok(Ok(_))) {
                return Event::HealthChecked {
                    healthy: false,
                    detail: format!("mqtt-not-connected within {} s", timeout.as_secs()),
                };
            }
        }
        Event::HealthChecked { healthy: true, detail: "passed".into() }
    }

    /// The status document as of now.
    pub fn status_doc(&self) -> crate::status::StatusDoc {
        super::status_doc(&self.config, self.store.state(), Some(self.boot.as_ref()), Some(&self.booted))
    }

    pub fn report_status(&mut self) {
        let doc = self.status_doc();
        (self.reporter)(&Report::Status(Box::new(doc)));
    }

    /// Makes "connected" part of the health check: a trial slot that cannot
    /// reach the broker within the health timeout is not committed.
    pub fn set_health_gate(&mut self, connected: tokio::sync::watch::Receiver<bool>) {
        self.health_gate = Some(connected);
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn report_step(&mut self, detail: String) {
        let state = self.job().map(|j| j.phase.status_name()).unwrap_or("idle");
        (self.reporter)(&Report::Step { state, detail });
    }

    fn report_phase(&mut self) {
        let Some(job) = self.job() else { return };
        let detail = match &job.phase {
            Phase::Accepted => return,
            Phase::Downloading => format!("downloading {} into slot {}", job.url, job.target_slot),
            Phase::Written => format!("slot {} written and verified", job.target_slot),
            Phase::RebootPending { .. } => {
                format!("slot {} is primary for a trial boot", job.target_slot)
            }
            Phase::Testing { .. } => format!("booted slot {}; checking health", job.target_slot),
            Phase::Committed => format!("committed v{} in slot {}", job.version, job.target_slot),
            Phase::RolledBack { reason } => {
                format!("rolled back to slot {}: {reason}", job.from_slot)
            }
            Phase::Failed { error } => format!("failed: {error}"),
        };
        let state = job.phase.status_name();
        (self.reporter)(&Report::Step { state, detail });
    }
}

/// Why an action failed; becomes the job's error (`name: detail`).
#[derive(Debug, thiserror::Error)]
enum ActionError {
    #[error("{0}")]
    Named(String),
    #[error(transparent)]
    Store(StoreError),
}

impl ActionError {
    fn into_drive_error(self) -> DriveError {
        match self {
            Self::Store(e) => DriveError::Store(e),
            Self::Named(detail) => DriveError::NoSlot(detail),
        }
    }
}
