//! The update agent: every decision about updates, and no IO.
//!
//! `Agent::handle(input, now)` takes what reached the update core (a
//! message's bytes, the start after a boot, the outcome of an action, a
//! health verdict, a timer) and returns the actions the executor must carry
//! out, in order. The agent owns the persistent document (`State`): it
//! changes it in memory and asks for `Persist` wherever the crash-safe order
//! needs the change on disk before the next side effect. Facts only IO can
//! learn (is the booted slot still bootable, is the target device in use)
//! come in with the input that needs them.
//!
//! `engine::step` stays the heart: the job's transition table. The agent
//! wraps it with admission (busy, duplicate, verification through `trust`,
//! target choice, slot size), the end of a job (`State::finish_job`), and
//! the health check's timer.

use super::engine::{self, Event, Failure, Job, Phase};
use super::State;
use crate::boot::slot::Pair;
use crate::trust::{Claims, Policy, VerifyError};
use std::time::Duration;

/// What the agent knows about the device, fixed for a process's life.
#[derive(Debug, Clone)]
pub struct Facts {
    pub booted: String,
    pub boot_id: String,
    /// The two slots, each with its size in bytes where known.
    pub slots: Pair<Option<u64>>,
    pub leeway_s: u64,
    /// A health command is configured.
    pub health_command: bool,
    /// "Connected to the broker" is part of the health check (the daemon).
    pub health_needs_connection: bool,
    pub health_timeout: Duration,
    /// A group message without a `rollout` starts within this many seconds
    /// (a stable offset per device), so a group does not start at once.
    pub group_spread_s: u64,
}

/// Where a message came from: the broker redelivers, a person retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An MQTT topic: a known jti is a second delivery, acknowledged.
    Broker { topic: String },
    /// `fleetd install FILE`: the message of the unfinished job continues it.
    Local,
}

/// Facts about the boot environment an admission needs, read just before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootFacts {
    /// The bootloader will not choose the running slot (it was given up).
    pub booted_slot_bad: bool,
    /// The slot an update would write is mounted or held.
    pub target_in_use: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The process started: after a boot, or a restart of the daemon.
    Started,
    /// An update message, as received.
    Message {
        bytes: Vec<u8>,
        source: Source,
        boot: BootFacts,
    },
    /// A message that `Agent::early_answer` verified, with the boot facts
    /// read since.
    Verified {
        claims: Box<Claims>,
        source: Source,
        boot: BootFacts,
    },
    /// An event of the running job (the outcome of one of its actions).
    Job(Event),
    /// `fleetd mark-good` / `mark-bad` on the running slot.
    VerdictByHand {
        healthy: bool,
    },
    /// A person gives the job up before its trial boot (D-Bus `Cancel`).
    Cancel,
    /// The health command finished (`ok` = exit 0).
    HealthCommandDone {
        ok: bool,
        detail: String,
    },
    /// The broker connection is up (the health check may be waiting for it).
    Connected,
    TimerFired(Timer),
    /// A side effect after the job ended (giving a slot up, the reboot) failed.
    SideEffectFailed {
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// The health check's deadline.
    Health,
    /// A scheduled job's start.
    Start,
}

/// What the executor must do, in order.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Save the agent's state (atomic, fsynced) before the next action.
    Persist,
    /// Give the running slot back what booting it spent (not a trial target).
    ConfirmBooted,
    /// The message is on disk as a job (or its refusal is recorded): it may
    /// be acknowledged to whoever sent it.
    Acknowledge,
    /// A second delivery of a message already handled: acknowledged, not run.
    Duplicate {
        jti: String,
    },
    /// The message is refused; the refusal is recorded when `Persist` precedes.
    Refuse(Refusal),
    /// The stored job goes on (`fleetd install` of the same message).
    Continue,
    /// Mark the target bad so a half-written slot can never boot.
    InvalidateTarget,
    Download {
        from: u64,
    },
    SetPrimaryForTrial,
    Reboot,
    RunHealthCommand,
    AwaitConnection,
    MarkTargetGood,
    MarkTargetBad,
    ArmTimer {
        timer: Timer,
        after: Duration,
    },
    CancelTimer(Timer),
    /// The job's phase changed: tell people and the fleet.
    PhaseChanged,
}

crate::error_name::named_error! {
    /// Why a message was not run. Each has a stable name (`name()`).
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum Refusal {
        #[name = "busy"]
        #[error("{name}: update {jti} (v{version}) is in progress")]
        Busy { jti: String, version: u64 },
        #[name(of 0)]
        #[error("{0}")]
        Verify(VerifyError),
        #[name = "reboot-required"]
        #[error(
            "{name}: slot {booted} is running but was given up; reboot into the good slot before the next update"
        )]
        RebootRequired { booted: String },
        #[name = "target-is-booted"]
        #[error("{name}: slot {0} is the running slot or is mounted; refusing to write it")]
        TargetIsBooted(String),
        #[name = "image-too-large"]
        #[error("{name}: {size} bytes do not fit slot {slot} ({slot_size} bytes)")]
        SlotTooSmall { slot: String, size: u64, slot_size: u64 },
        #[name = "no-slot"]
        #[error("{name}: no slot other than the booted {0}")]
        NoSlot(String),
        /// The device is resuming a stored job at start.
        #[name = "busy"]
        #[error("{name}: the device is resuming an update")]
        Resuming,
        /// The trust keys could not be loaded: no message can be verified.
        #[name(hidden = "config")]
        #[error("{0}")]
        TrustConfig(String),
        /// A halt for this rollout came first.
        #[name = "halted"]
        #[error("{name}: rollout {0} was halted")]
        Halted(String),
    }
}

/// Where the health check stands while its timer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HealthWait {
    Command,
    Connection,
}

pub struct Agent {
    state: State,
    facts: Facts,
    /// The trust policy, or why it could not be loaded: only admission
    /// needs it, so a broken key file refuses messages and nothing else
    /// (a trial can still be committed or rolled back).
    policy: Result<Policy, String>,
    health: Option<HealthWait>,
    connected: bool,
}

impl Agent {
    pub fn new(state: State, facts: Facts, policy: Result<Policy, String>) -> Self {
        Self { state, facts, policy, health: None, connected: false }
    }

    /// The device's groups changed (the registry's, given at enrollment):
    /// messages for those groups are for this device from now on.
    pub fn set_groups(&mut self, groups: Vec<String>) {
        if let Ok(policy) = &mut self.policy {
            policy.groups = groups;
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Puts back the state as it is on disk, after a change to it could
    /// not be saved.
    pub fn restore(&mut self, on_disk: State) {
        self.state = on_disk;
    }

    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    pub fn job(&self) -> Option<&Job> {
        self.state.job.as_ref()
    }

    pub fn set_health_needs_connection(&mut self, needed: bool) {
        self.facts.health_needs_connection = needed;
    }

    /// The slot an update would write: the one not booted.
    pub fn target_slot(&self) -> Option<&str> {
        self.facts.slots.other(&self.facts.booted).map(|(slot, _)| slot.as_str())
    }

    /// The running slot holds a download that has not reached `Written`:
    /// never to be marked good, by hand or otherwise.
    pub fn booted_is_unfinished_target(&self) -> bool {
        self.job().is_some_and(|j| {
            j.target_slot == self.facts.booted && matches!(j.phase, Phase::Accepted | Phase::Downloading)
        })
    }

    /// What to answer while a job runs (the executor is busy with it).
    pub fn busy_view(&self) -> BusyView {
        let mut known: Vec<String> = self.state.history.iter().map(|h| h.jti.clone()).collect();
        known.extend(self.state.job.as_ref().map(|j| j.jti.clone()));
        let active = self.state.active_job();
        BusyView {
            known,
            running: active.map(|j| (j.jti.clone(), j.version)),
            cancellable: active.is_some_and(|j| cancellable(j, &self.facts.booted)),
            in_trial: active.is_some_and(|j| j.target_slot == self.facts.booted),
        }
    }

    /// Records `error` as the last error (and asks for it to be saved).
    pub fn record_error(&mut self, error: String) -> Vec<Action> {
        self.state.last_error = Some(error);
        vec![Action::Persist]
    }

    pub fn handle(&mut self, input: Input, now: u64) -> Vec<Action> {
        match input {
            Input::Started => self.started(now),
            Input::Message { bytes, source, boot } => match self.early_answer(&bytes, &source, now) {
                Err(answered) => answered,
                Ok(claims) => self.accept(claims, &source, boot, now),
            },
            Input::Verified { claims, source, boot } => self.accept(*claims, &source, boot, now),
            Input::Job(event) => self.job_event(event, now),
            Input::VerdictByHand { healthy } => {
                let in_trial = self.job().is_some_and(|j| {
                    j.target_slot == self.facts.booted
                        && matches!(j.phase, Phase::RebootPending { .. } | Phase::Testing { .. })
                });
                if !in_trial {
                    return Vec::new();
                }
                let booted = self.facts.booted.clone();
                self.job_event(Event::VerdictByHand { booted, healthy }, now)
            }
            Input::Cancel => {
                if !self.job().is_some_and(|j| cancellable(j, &self.facts.booted)) {
                    return Vec::new();
                }
                self.job_event(Event::ActionFailed { error: Failure::cancelled() }, now)
            }
            Input::HealthCommandDone { ok, detail } => {
                if self.health != Some(HealthWait::Command) {
                    return Vec::new();
                }
                if !ok {
                    return self.health_verdict(false, detail, now);
                }
                if self.facts.health_needs_connection && !self.connected {
                    self.health = Some(HealthWait::Connection);
                    return vec![Action::AwaitConnection];
                }
                self.health_verdict(true, "passed".into(), now)
            }
            Input::Connected => {
                self.connected = true;
                if self.health == Some(HealthWait::Connection) {
                    return self.health_verdict(true, "passed".into(), now);
                }
                Vec::new()
            }
            Input::TimerFired(Timer::Start) => self.start_if_due(now),
            Input::TimerFired(Timer::Health) => match self.health {
                Some(HealthWait::Command) => {
                    let detail = format!("timed out after {} s", self.facts.health_timeout.as_secs());
                    self.health_verdict(false, detail, now)
                }
                Some(HealthWait::Connection) => {
                    let detail =
                        format!("mqtt-not-connected within {} s", self.facts.health_timeout.as_secs());
                    self.health_verdict(false, detail, now)
                }
                None => Vec::new(),
            },
            Input::SideEffectFailed { error } => {
                let text = match self.state.last_error.take() {
                    Some(before) if !before.is_empty() => format!("{before}; then {error}"),
                    _ => error,
                };
                self.record_error(text)
            }
        }
    }

    /// The first input of every process: confirm the running slot (outside
    /// a trial of it), then resume the stored job from where it stopped.
    fn started(&mut self, now: u64) -> Vec<Action> {
        let mut actions = self.before_admission();
        if self.state.job.is_some() {
            let event =
                Event::Started { booted: self.facts.booted.clone(), boot_id: self.facts.boot_id.clone() };
            actions.extend(self.job_event(event, now));
            actions.extend(self.start_if_due(now));
        }
        actions
    }

    /// A scheduled job starts when its time has come; until then its timer runs.
    fn start_if_due(&mut self, now: u64) -> Vec<Action> {
        match self.job().map(|j| j.phase.clone()) {
            Some(Phase::Scheduled { start_at }) if now >= start_at => self.job_event(Event::StartDue, now),
            Some(Phase::Scheduled { start_at }) => {
                vec![Action::ArmTimer { timer: Timer::Start, after: Duration::from_secs(start_at - now) }]
            }
            _ => Vec::new(),
        }
    }

    /// A halt message: verified like an update, recorded, and applied to
    /// the job it names if that job has not finished downloading.
    fn halt(&mut self, bytes: &[u8], source: &Source, now: u64) -> Vec<Action> {
        if let Some(jti) = crate::trust::peek_jti(bytes) {
            // Retained on its topic: every reconnect delivers it again.
            if self.state.replay_cache.contains_key(&jti) {
                return vec![Action::Duplicate { jti }, Action::Acknowledge];
            }
        }
        let verified = match &self.policy {
            Err(e) => Err(Refusal::TrustConfig(e.clone())),
            Ok(policy) => policy.verify_halt(bytes, &self.state.trust_state(), now).map_err(Refusal::Verify),
        };
        let halt = match verified {
            Ok(halt) => halt,
            Err(refusal) => return self.refuse(refusal, source),
        };
        self.state.record_accepted(&halt.jti, halt.iat, halt.exp, self.facts.leeway_s);
        self.state.record_halted(&halt.halts, halt.exp.saturating_add(self.facts.leeway_s));
        let applies = self.job().is_some_and(|j| {
            j.jti == halt.halts
                && matches!(j.phase, Phase::Scheduled { .. } | Phase::Accepted | Phase::Downloading)
        });
        // On disk, then acknowledged, then told; then the target is given up.
        let mut actions = vec![Action::Persist, Action::Acknowledge];
        if applies {
            let scheduled = matches!(self.job().map(|j| &j.phase), Some(Phase::Scheduled { .. }));
            let steps = self.job_event(Event::Halt { by: halt.jti }, now);
            actions.extend(steps.iter().filter(|a| **a == Action::PhaseChanged).cloned());
            if scheduled {
                actions.push(Action::CancelTimer(Timer::Start));
            }
            actions
                .extend(steps.into_iter().filter(|a| !matches!(a, Action::PhaseChanged | Action::Persist)));
        }
        actions
    }

    /// What must happen before a message is admitted (and before a stored
    /// job resumes): the running slot gets back what its boots spent, so
    /// the booted-slot facts an admission reads are current.
    pub fn before_admission(&self) -> Vec<Action> {
        if engine::may_confirm_booted(self.job(), &self.facts.booted) {
            vec![Action::ConfirmBooted]
        } else {
            Vec::new()
        }
    }

    /// The part of admission that needs no boot-environment facts: a
    /// duplicate, the unfinished job's message, busy, or a message that
    /// fails verification (each answered, refusals recorded: `Err`). `Ok`:
    /// the verified claims, for `Input::Verified` once the executor has
    /// read the boot facts. So a flood of forged or repeated messages costs
    /// no boot-env IO, and a good one is verified once.
    pub fn early_answer(&mut self, bytes: &[u8], source: &Source, now: u64) -> Result<Claims, Vec<Action>> {
        if crate::trust::halt::is_halt(bytes) {
            return Err(self.halt(bytes, source, now));
        }
        match (source, crate::trust::peek_jti(bytes)) {
            (Source::Broker { .. }, Some(jti)) if self.state.knows_job(&jti) => {
                return Err(vec![Action::Duplicate { jti }, Action::Acknowledge]);
            }
            (Source::Local, Some(jti)) if self.state.active_job().is_some_and(|j| j.jti == jti) => {
                return Err(vec![Action::Continue]);
            }
            _ => {}
        }
        self.early_checks(bytes, now).map_err(|refusal| self.refuse(refusal, source))
    }

    /// Records a refusal before it is acknowledged.
    fn refuse(&mut self, refusal: Refusal, source: &Source) -> Vec<Action> {
        let on = match source {
            Source::Broker { topic } => format!(" (on {topic})"),
            Source::Local => String::new(),
        };
        self.state.last_error = Some(match &refusal {
            Refusal::Verify(e) => format!("{e}{on}"),
            other => other.to_string(),
        });
        vec![Action::Persist, Action::Refuse(refusal)]
    }

    /// The rest of admission, for verified claims: then the job.
    fn accept(&mut self, claims: Claims, source: &Source, boot: BootFacts, now: u64) -> Vec<Action> {
        let target = match self.boot_checks(&claims, boot) {
            Ok(target) => target,
            Err(refusal) => return self.refuse(refusal, source),
        };
        self.state.record_accepted(&claims.jti, claims.iat, claims.exp, self.facts.leeway_s);
        let start_at = self.start_time(&claims, source, now);
        self.state.job = Some(Job {
            jti: claims.jti.clone(),
            version: claims.version,
            name: claims.name.clone(),
            url: claims.image.url.clone(),
            size: claims.image.size,
            sha256: claims.image.sha256.clone(),
            target_slot: target,
            from_slot: self.facts.booted.clone(),
            phase: start_at.map_or(Phase::Accepted, |start_at| Phase::Scheduled { start_at }),
            written: 0,
            started_at: now,
            encoding: claims.image.encoding,
            index: claims.image.index.clone(),
            transfer: Default::default(),
        });
        // Persist, then acknowledge: the job is on disk first.
        let mut actions = vec![Action::Persist, Action::Acknowledge, Action::PhaseChanged];
        let started =
            Event::Started { booted: self.facts.booted.clone(), boot_id: self.facts.boot_id.clone() };
        actions.extend(self.job_event(started, now));
        actions.extend(self.start_if_due(now));
        actions
    }

    /// When a new job may start: its wave's time plus its offset (`rollout`);
    /// for a group message from the broker without one, a stable offset
    /// within `group_spread_s`, so a group does not download at once; else now.
    fn start_time(&self, claims: &Claims, source: &Source, now: u64) -> Option<u64> {
        let device_id = self.policy.as_ref().map(|p| p.device_id.as_str()).unwrap_or_default();
        let for_the_group =
            matches!(source, Source::Broker { .. }) && !claims.target.devices.iter().any(|d| d == device_id);
        let start_at = match &claims.rollout {
            Some(rollout) => super::rollout::schedule(&claims.jti, device_id, rollout).start_at,
            None if for_the_group => {
                now + super::rollout::spread_offset(&claims.jti, device_id, self.facts.group_spread_s)
            }
            None => now,
        };
        (start_at > now).then_some(start_at)
    }

    /// The checks that need no boot-environment facts: busy, then `trust`.
    fn early_checks(&self, bytes: &[u8], now: u64) -> Result<Claims, Refusal> {
        if let Some(job) = self.state.active_job() {
            return Err(Refusal::Busy { jti: job.jti.clone(), version: job.version });
        }
        let policy = self.policy.as_ref().map_err(|e| Refusal::TrustConfig(e.clone()))?;
        let claims = policy.verify(bytes, &self.state.trust_state(), now).map_err(Refusal::Verify)?.claims;
        if self.state.halted.contains_key(&claims.jti) {
            return Err(Refusal::Halted(claims.jti));
        }
        Ok(claims)
    }

    /// The checks on verified claims that need the boot facts, in order;
    /// `Ok` is the target slot.
    fn boot_checks(&self, claims: &Claims, boot: BootFacts) -> Result<String, Refusal> {
        // After a failed trial that did not reboot, the rejected slot still
        // runs and the other one is the only good slot: writing it would
        // leave nothing to boot.
        if boot.booted_slot_bad {
            return Err(Refusal::RebootRequired { booted: self.facts.booted.clone() });
        }
        let target = self.target_slot().ok_or_else(|| Refusal::NoSlot(self.facts.booted.clone()))?;
        if boot.target_in_use {
            return Err(Refusal::TargetIsBooted(target.to_string()));
        }
        let slot_size = self.facts.slots.get(target).copied().flatten();
        if let Some(slot_size) = slot_size {
            if claims.image.size > slot_size {
                return Err(Refusal::SlotTooSmall {
                    slot: target.to_string(),
                    size: claims.image.size,
                    slot_size,
                });
            }
        }
        Ok(target.to_string())
    }

    /// One event of the job through the engine's table; the job's end is
    /// recorded in memory here, and persisted by the `Persist` after it.
    fn job_event(&mut self, event: Event, now: u64) -> Vec<Action> {
        let Some(job) = self.state.job.clone() else {
            return Vec::new();
        };
        let (next, steps) = match engine::step(&job, event) {
            Ok(step) => step,
            // An event that does not fit the job's phase changes nothing.
            Err(unexpected) => {
                return self.record_error(unexpected.to_string());
            }
        };
        let phase_changed = next.phase != job.phase;
        self.state.job = Some(next);
        let mut actions = Vec::new();
        if phase_changed {
            actions.push(Action::PhaseChanged);
        }
        for step in steps {
            match step {
                engine::Action::Persist => actions.push(Action::Persist),
                engine::Action::Finish => {
                    self.health = None;
                    self.state.finish_job(now);
                }
                engine::Action::InvalidateTarget => actions.push(Action::InvalidateTarget),
                engine::Action::Download { from } => actions.push(Action::Download { from }),
                engine::Action::SetPrimaryForTrial => actions.push(Action::SetPrimaryForTrial),
                engine::Action::Reboot => actions.push(Action::Reboot),
                engine::Action::MarkTargetGood => actions.push(Action::MarkTargetGood),
                engine::Action::MarkTargetBad => actions.push(Action::MarkTargetBad),
                engine::Action::RunHealthCheck => actions.extend(self.start_health_check(now)),
            }
        }
        actions
    }

    fn start_health_check(&mut self, now: u64) -> Vec<Action> {
        let arm = Action::ArmTimer { timer: Timer::Health, after: self.facts.health_timeout };
        if self.facts.health_command {
            self.health = Some(HealthWait::Command);
            return vec![arm, Action::RunHealthCommand];
        }
        if self.facts.health_needs_connection && !self.connected {
            self.health = Some(HealthWait::Connection);
            return vec![arm, Action::AwaitConnection];
        }
        self.health = Some(HealthWait::Command);
        self.health_verdict(true, "passed".into(), now)
    }

    fn health_verdict(&mut self, healthy: bool, detail: String, now: u64) -> Vec<Action> {
        self.health = None;
        let mut actions = vec![Action::CancelTimer(Timer::Health)];
        actions.extend(self.job_event(Event::HealthChecked { healthy, detail }, now));
        actions
    }
}

/// What the agent says about messages while the executor runs a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusyView {
    known: Vec<String>,
    running: Option<(String, u64)>,
    /// The running job may be cancelled (it has not booted its target).
    pub cancellable: bool,
    /// The running job is the trial of the booted slot (a verdict ends it).
    pub in_trial: bool,
}

/// Until the target boots, a job can be given up: the target is (or is
/// made) bad, the running slot stays primary. In its trial, `MarkBad` does that.
pub fn cancellable(job: &Job, booted: &str) -> bool {
    job.target_slot != booted
        && matches!(
            job.phase,
            Phase::Scheduled { .. }
                | Phase::Accepted
                | Phase::Downloading
                | Phase::Written
                | Phase::RebootPending { .. }
        )
}

impl BusyView {
    /// A view by hand (the bus policy's tables).
    #[cfg(test)]
    pub(crate) fn new(
        known: Vec<String>,
        running: Option<(String, u64)>,
        cancellable: bool,
        in_trial: bool,
    ) -> Self {
        Self { known, running, cancellable, in_trial }
    }

    /// A second delivery of a known message (acknowledge, do not run) or a
    /// refusal: busy.
    pub fn answer(&self, bytes: &[u8]) -> Result<String, Refusal> {
        if let Some(jti) = crate::trust::peek_jti(bytes).filter(|j| self.known.contains(j)) {
            return Ok(jti);
        }
        Err(match &self.running {
            Some((jti, version)) => Refusal::Busy { jti: jti.clone(), version: *version },
            None => Refusal::Resuming,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::*;
    use crate::boot::slot::Slot;
    use crate::trust::{Envelope, Image, SigningKey, Target, CLAIMS_TYPE, DEFAULT_MAX_VALIDITY_S};
    use crate::update::engine::Rollback;

    const NOW: u64 = 1_900_000_000;

    struct Keys {
        fleet: SigningKey,
        cosigner: SigningKey,
    }

    fn keys() -> Keys {
        Keys { fleet: SigningKey::generate().unwrap(), cosigner: SigningKey::generate().unwrap() }
    }

    fn policy(k: &Keys) -> Policy {
        Policy {
            keys: vec![("fleet".into(), k.fleet.public_key()), ("cosigner".into(), k.cosigner.public_key())],
            project: "acme".into(),
            hardware: "rpi4".into(),
            device_id: "gw-1".into(),
            groups: vec![],
            leeway_s: 60,
            max_validity_s: DEFAULT_MAX_VALIDITY_S,
            allow_http: true,
            max_image_size: None,
        }
    }

    fn facts(booted: &str, boot_id: &str) -> Facts {
        Facts {
            booted: booted.into(),
            boot_id: boot_id.into(),
            slots: Pair::new(vec![(Slot::new("A"), Some(1000)), (Slot::new("B"), Some(1000))]).unwrap(),
            leeway_s: 60,
            health_command: true,
            health_needs_connection: false,
            health_timeout: Duration::from_secs(20),
            group_spread_s: 0,
        }
    }

    /// An update in a rollout of one wave opening at `not_before`.
    fn rollout_message(k: &Keys, jti: &str, not_before: u64, spread_s: u64) -> Vec<u8> {
        let mut claims: Claims = serde_json::from_slice(
            &Envelope::parse(&message(k, jti, 8, 100)).unwrap().payload_bytes().unwrap(),
        )
        .unwrap();
        claims.rollout = Some(crate::trust::Rollout {
            waves: vec![crate::trust::Wave { percent: 100, not_before }],
            spread_s,
        });
        claims.fill_requires();
        signed_by_both(k, &claims.to_json())
    }

    fn halt_message(k: &Keys, jti: &str, halts: &str) -> Vec<u8> {
        let claims = crate::trust::halt::HaltClaims {
            typ: crate::trust::halt::HALT_TYPE.into(),
            jti: jti.into(),
            iat: NOW,
            nbf: NOW,
            exp: NOW + 3600,
            project: "acme".into(),
            target: Target { hardware: "rpi4".into(), devices: vec!["gw-1".into()], groups: vec![] },
            halts: halts.into(),
        };
        signed_by_both(k, &claims.to_json())
    }

    fn message(k: &Keys, jti: &str, version: u64, size: u64) -> Vec<u8> {
        let claims = Claims {
            typ: CLAIMS_TYPE.into(),
            jti: jti.into(),
            iat: NOW,
            nbf: NOW,
            exp: NOW + 3600,
            project: "acme".into(),
            target: Target { hardware: "rpi4".into(), devices: vec!["gw-1".into()], groups: vec![] },
            version,
            name: format!("v{version}"),
            image: Image {
                url: "http://h/x.img".into(),
                size,
                sha256: "ab".repeat(32),
                encoding: Default::default(),
                index: None,
            },
            requires: vec![],
            rollout: None,
        };
        signed_by_both(k, &claims.to_json())
    }

    /// A payload signed by the fleet key and the co-signer, as a message's bytes.
    fn signed_by_both(k: &Keys, payload: &[u8]) -> Vec<u8> {
        let mut e = Envelope::new(payload);
        e.add_signature(&k.fleet, "fleet").unwrap();
        e.add_signature(&k.cosigner, "cosigner").unwrap();
        e.to_json().into_bytes()
    }

    fn agent(k: &Keys, booted: &str, boot_id: &str, state: State) -> Agent {
        Agent::new(state, facts(booted, boot_id), Ok(policy(k)))
    }

    fn installed_7() -> State {
        State { installed_version: 7, ..State::default() }
    }

    fn broker() -> Source {
        Source::Broker { topic: "t/update".into() }
    }

    fn msg(bytes: Vec<u8>, source: Source) -> Input {
        Input::Message { bytes, source, boot: BootFacts::default() }
    }

    fn phase(a: &Agent) -> Phase {
        a.job().map(|j| j.phase.clone()).unwrap()
    }

    /// A job waits for its wave: persisted as scheduled, a timer for the
    /// rest; a restart re-arms it; the timer (or a late start) begins the
    /// download. A device online after its wave opened starts at once.
    #[test]
    fn rollout_scheduling_by_table() {
        let k = keys();
        let offset = super::super::rollout::schedule(
            "jti-roll-0001",
            "gw-1",
            &crate::trust::Rollout {
                waves: vec![crate::trust::Wave { percent: 100, not_before: NOW + 600 }],
                spread_s: 60,
            },
        )
        .offset_s;
        let start_at = NOW + 600 + offset;
        let mut a = agent(&k, "A", "b1", installed_7());
        let actions = a.handle(msg(rollout_message(&k, "jti-roll-0001", NOW + 600, 60), broker()), NOW);
        assert_eq!(
            actions,
            vec![
                Persist,
                Acknowledge,
                PhaseChanged,
                ArmTimer { timer: Timer::Start, after: Duration::from_secs(start_at - NOW) }
            ]
        );
        assert_eq!(phase(&a), Phase::Scheduled { start_at });
        assert_eq!(phase(&a).status_name(), crate::status::UpdateState::Scheduled);
        // A restart while scheduled: the same start, the timer armed again for what is left.
        let mut restarted = agent(&k, "A", "b2", a.state().clone());
        assert_eq!(
            restarted.handle(Input::Started, NOW + 100),
            vec![
                ConfirmBooted,
                ArmTimer { timer: Timer::Start, after: Duration::from_secs(start_at - NOW - 100) }
            ]
        );
        // An early timer (a clock that moved) waits again; the due one starts the job.
        assert_eq!(
            restarted.handle(Input::TimerFired(Timer::Start), start_at - 1),
            vec![ArmTimer { timer: Timer::Start, after: Duration::from_secs(1) }]
        );
        assert_eq!(
            restarted.handle(Input::TimerFired(Timer::Start), start_at),
            vec![PhaseChanged, Persist, InvalidateTarget]
        );
        assert_eq!(phase(&restarted), Phase::Accepted);
        // A restart after the start time: the job starts at once.
        let mut late = agent(&k, "A", "b3", a.state().clone());
        let actions = late.handle(Input::Started, start_at + 5000);
        assert!(actions.ends_with(&[PhaseChanged, Persist, InvalidateTarget]), "{actions:?}");
        // Online after its wave opened: accepted and started at once.
        let mut online_late = agent(&k, "A", "b1", installed_7());
        let actions =
            online_late.handle(msg(rollout_message(&k, "jti-roll-0002", NOW - 3000, 0), broker()), NOW);
        assert_eq!(phase(&online_late), Phase::Accepted, "{actions:?}");
        assert!(actions.contains(&InvalidateTarget));
    }

    /// A group message from the broker without a `rollout` starts within
    /// `group_spread_s` (a stable offset per device and jti); one naming the
    /// device, or installed by hand, starts at once.
    #[test]
    fn group_messages_are_spread_by_table() {
        let k = keys();
        let group_message = |jti: &str| {
            let mut claims: Claims = serde_json::from_slice(
                &Envelope::parse(&message(&k, jti, 8, 100)).unwrap().payload_bytes().unwrap(),
            )
            .unwrap();
            claims.target = Target { hardware: "rpi4".into(), devices: vec![], groups: vec!["field".into()] };
            signed_by_both(&k, &claims.to_json())
        };
        let mut spread_policy = policy(&k);
        spread_policy.groups = vec!["field".into()];
        // (message, source, spread, expected start)
        let spread_offset = super::super::rollout::spread_offset;
        let jti =
            &(1..).map(|i| format!("jti-group-{i:04}")).find(|j| spread_offset(j, "gw-1", 30) > 0).unwrap();
        let offset = spread_offset(jti, "gw-1", 30);
        let cases = [
            (group_message(jti), broker(), 30, Phase::Scheduled { start_at: NOW + offset }),
            (group_message(jti), Source::Local, 30, Phase::Accepted),
            (group_message(jti), broker(), 0, Phase::Accepted),
            (message(&k, jti, 8, 100), broker(), 30, Phase::Accepted),
        ];
        for (bytes, source, spread, expected) in cases {
            let mut facts = facts("A", "b1");
            facts.group_spread_s = spread;
            let mut a = Agent::new(installed_7(), facts, Ok(spread_policy.clone()));
            a.handle(msg(bytes, source.clone()), NOW);
            assert_eq!(phase(&a), expected, "{source:?}, spread {spread}");
        }
    }

    /// A halt stops a job that has not finished downloading (scheduled:
    /// nothing written; downloading: the target given up), never one past
    /// its download, and never another rollout; a halt seen again is a
    /// duplicate, and an update that arrives after its halt is refused.
    #[test]
    fn halts_by_table() {
        let k = keys();
        let scheduled = {
            let mut a = agent(&k, "A", "b1", installed_7());
            a.handle(msg(rollout_message(&k, "jti-roll-0001", NOW + 600, 0), broker()), NOW);
            a.state().clone()
        };
        let downloading = {
            let mut a = agent(&k, "A", "b1", scheduled.clone());
            a.handle(Input::TimerFired(Timer::Start), NOW + 600);
            a.handle(Input::Job(Event::SlotInvalidated), NOW + 600);
            assert_eq!(phase(&a), Phase::Downloading);
            a.state().clone()
        };
        let written = {
            let mut a = agent(&k, "A", "b1", downloading.clone());
            a.handle(Input::Job(Event::ImageVerified), NOW + 600);
            a.state().clone()
        };
        // (state, halts, the job's phase after, actions)
        let halted = Phase::Halted { by: "halt-0000001".into() };
        let cases: Vec<(State, &str, Phase, Vec<Action>)> = vec![
            (
                scheduled.clone(),
                "jti-roll-0001",
                halted.clone(),
                vec![Persist, Acknowledge, PhaseChanged, CancelTimer(Timer::Start)],
            ),
            (
                downloading.clone(),
                "jti-roll-0001",
                halted.clone(),
                vec![Persist, Acknowledge, PhaseChanged, MarkTargetBad],
            ),
            (written.clone(), "jti-roll-0001", Phase::Written, vec![Persist, Acknowledge]),
            (
                scheduled.clone(),
                "jti-roll-0009",
                Phase::Scheduled { start_at: NOW + 600 },
                vec![Persist, Acknowledge],
            ),
        ];
        for (state, halts, after, actions) in cases {
            let mut a = agent(&k, "A", "b1", state);
            let got = a.handle(msg(halt_message(&k, "halt-0000001", halts), broker()), NOW + 700);
            assert_eq!((phase(&a), got), (after.clone(), actions), "halt of {halts}");
            if after == halted {
                assert_eq!(
                    a.state().last_error.as_deref(),
                    Some("halted: stopped by halt halt-0000001 before its download finished")
                );
                assert_eq!(
                    a.state().history.last().map(|h| h.outcome),
                    Some(crate::status::UpdateState::Halted)
                );
            }
            // The same halt again (retained, redelivered): a duplicate, nothing changes.
            let again = a.handle(msg(halt_message(&k, "halt-0000001", halts), broker()), NOW + 800);
            assert_eq!(again, vec![Duplicate { jti: "halt-0000001".into() }, Acknowledge]);
        }
        // A halt signed by the fleet key alone is refused by name.
        let mut a = agent(&k, "A", "b1", scheduled.clone());
        let payload = Envelope::parse(&halt_message(&k, "halt-0000002", "jti-roll-0001"))
            .unwrap()
            .payload_bytes()
            .unwrap();
        let mut forged = Envelope::new(&payload);
        forged.add_signature(&k.fleet, "fleet").unwrap();
        let actions = a.handle(msg(forged.to_json().into_bytes(), broker()), NOW + 700);
        assert!(
            matches!(&actions[..], [Persist, Refuse(r)] if r.name() == "signature-missing"),
            "{actions:?}"
        );
        assert_eq!(phase(&a), Phase::Scheduled { start_at: NOW + 600 });
        // The halt came first: the rollout's message is refused when it arrives.
        let mut a = agent(&k, "A", "b1", installed_7());
        a.handle(msg(halt_message(&k, "halt-0000003", "jti-roll-0005"), broker()), NOW);
        let actions = a.handle(msg(rollout_message(&k, "jti-roll-0005", NOW + 600, 0), broker()), NOW);
        assert!(matches!(&actions[..], [Persist, Refuse(r)] if r.name() == "halted"), "{actions:?}");
    }

    /// Cancel gives a job up in each phase before its trial boot: the
    /// target is (or stays) bad, the job ends failed with `Failure::cancelled`; in the
    /// trial, and with no job, it changes nothing.
    #[test]
    fn cancel_before_the_trial_boot_only() {
        let k = keys();
        let m = message(&k, "jti-00000008", 8, 100);
        let mut a = agent(&k, "A", "b1", installed_7());
        assert_eq!(a.handle(Input::Cancel, NOW), vec![], "no job, nothing to cancel");
        a.handle(msg(m, broker()), NOW);
        let fresh = a.state().clone();
        a.handle(Input::Job(Event::SlotInvalidated), NOW);
        let downloading = a.state().clone();
        assert!(a.busy_view().cancellable && !a.busy_view().in_trial);
        a.handle(Input::Job(Event::ImageVerified), NOW);
        let written = a.state().clone();
        a.handle(Input::Job(Event::Switched { boot_id: "b1".into() }), NOW);
        let pending = a.state().clone();
        for (state, gives_up_target) in
            [(fresh, false), (downloading, false), (written, true), (pending, true)]
        {
            let mut before = agent(&k, "A", "b1", state);
            let actions = before.handle(Input::Cancel, NOW);
            assert_eq!(actions.contains(&MarkTargetBad), gives_up_target, "{actions:?}");
            assert!(actions.contains(&Persist), "{actions:?}");
            assert_eq!(phase(&before), Phase::Failed { error: Failure::cancelled() });
            assert!(!before.busy_view().cancellable);
        }
        // Booted into B: the trial, where MarkBad (a verdict) is the way.
        let mut b = agent(&k, "B", "b2", a.state().clone());
        b.handle(Input::Started, NOW);
        assert!(b.busy_view().in_trial && !b.busy_view().cancellable);
        assert_eq!(b.handle(Input::Cancel, NOW), vec![]);
        assert!(matches!(phase(&b), Phase::Testing { .. }));
    }

    /// One row per input kind: (agent before, input) → actions, and what
    /// the state must say after.
    #[test]
    fn each_input_kind_gives_its_actions() {
        let k = keys();
        let m = message(&k, "jti-00000008", 8, 100);

        // Started: confirm the running slot; nothing to resume.
        let mut a = agent(&k, "A", "b1", installed_7());
        assert_eq!(a.handle(Input::Started, NOW), vec![ConfirmBooted]);

        // Message: persisted as a job, then acknowledged, then the target is invalidated.
        assert_eq!(
            a.handle(msg(m.clone(), broker()), NOW),
            vec![Persist, Acknowledge, PhaseChanged, InvalidateTarget]
        );
        assert_eq!(phase(&a), Phase::Accepted);
        assert!(a.state().replay_cache.contains_key("jti-00000008"));
        assert_eq!(a.state().clock_floor, NOW);
        assert_eq!(a.job().unwrap().target_slot, "B");

        // The same message again: from the broker a duplicate, from a person "continue".
        assert_eq!(
            a.handle(msg(m.clone(), broker()), NOW),
            vec![Duplicate { jti: "jti-00000008".into() }, Acknowledge]
        );
        assert_eq!(a.handle(msg(m.clone(), Source::Local), NOW), vec![Continue]);

        // Another message while the job runs: busy, recorded before the refusal.
        let other = message(&k, "jti-00000009", 9, 100);
        let busy = a.handle(msg(other, broker()), NOW);
        assert!(matches!(busy.as_slice(), [Persist, Refuse(Refusal::Busy { version: 8, .. })]), "{busy:?}");
        assert!(a.state().last_error.as_deref().unwrap().starts_with("busy"));

        // The job's events, through the engine's table.
        assert_eq!(
            a.handle(Input::Job(Event::SlotInvalidated), NOW),
            vec![PhaseChanged, Download { from: 0 }]
        );
        assert_eq!(
            a.handle(Input::Job(Event::Checkpoint { written: 40, transfer: Default::default() }), NOW),
            vec![Persist]
        );
        assert_eq!(a.job().unwrap().written, 40);
        assert_eq!(
            a.handle(Input::Job(Event::ImageVerified), NOW),
            vec![PhaseChanged, Persist, SetPrimaryForTrial]
        );
        assert_eq!(
            a.handle(Input::Job(Event::Switched { boot_id: "b1".into() }), NOW),
            vec![PhaseChanged, Persist, Reboot]
        );

        // After the reboot into B: the health check runs under its timer.
        let mut b = agent(&k, "B", "b2", a.state().clone());
        let start = b.handle(Input::Started, NOW);
        assert_eq!(
            start,
            vec![
                PhaseChanged,
                Persist,
                ArmTimer { timer: Timer::Health, after: Duration::from_secs(20) },
                RunHealthCommand
            ],
            "a trial target is not confirmed"
        );
        let mut healthy = agent(&k, "B", "b2", b.state().clone());
        let _ = healthy.handle(Input::Started, NOW);
        assert_eq!(
            healthy.handle(Input::HealthCommandDone { ok: true, detail: "passed".into() }, NOW),
            vec![CancelTimer(Timer::Health), PhaseChanged, MarkTargetGood, Persist]
        );
        assert_eq!(healthy.state().installed_version, 8);
        assert_eq!(healthy.state().slot_versions["B"], 8);

        // A failing command, a timer that fires first, a verdict by hand.
        let mut failing = agent(&k, "B", "b2", b.state().clone());
        let _ = failing.handle(Input::Started, NOW);
        assert_eq!(
            failing.handle(Input::HealthCommandDone { ok: false, detail: "exit 3".into() }, NOW),
            vec![CancelTimer(Timer::Health), PhaseChanged, MarkTargetBad, Persist, Reboot]
        );
        assert_eq!(failing.state().last_error.as_deref(), Some("rolled-back: health-check-failed: exit 3"));
        let mut slow = agent(&k, "B", "b2", b.state().clone());
        let _ = slow.handle(Input::Started, NOW);
        let _ = slow.handle(Input::TimerFired(Timer::Health), NOW);
        assert_eq!(
            phase(&slow),
            Phase::RolledBack {
                reason: Rollback::Unhealthy("health-check-failed: timed out after 20 s".into())
            }
        );
        let mut by_hand = agent(&k, "B", "b2", a.state().clone());
        assert_eq!(
            by_hand.handle(Input::VerdictByHand { healthy: true }, NOW),
            vec![PhaseChanged, MarkTargetGood, Persist],
            "straight after a manual reboot, before any health check"
        );

        // The connection is part of the health check in the daemon.
        let mut gated = agent(&k, "B", "b2", b.state().clone());
        gated.set_health_needs_connection(true);
        let _ = gated.handle(Input::Started, NOW);
        assert_eq!(
            gated.handle(Input::HealthCommandDone { ok: true, detail: "passed".into() }, NOW),
            vec![AwaitConnection]
        );
        assert_eq!(
            gated.handle(Input::Connected, NOW),
            vec![CancelTimer(Timer::Health), PhaseChanged, MarkTargetGood, Persist]
        );
        let mut never = agent(&k, "B", "b2", b.state().clone());
        never.set_health_needs_connection(true);
        let _ = never.handle(Input::Started, NOW);
        let _ = never.handle(Input::HealthCommandDone { ok: true, detail: "passed".into() }, NOW);
        let _ = never.handle(Input::TimerFired(Timer::Health), NOW);
        assert_eq!(
            phase(&never),
            Phase::RolledBack {
                reason: Rollback::Unhealthy("health-check-failed: mqtt-not-connected within 20 s".into())
            }
        );

        // A side effect that failed after the end joins the last error.
        assert_eq!(
            failing.handle(Input::SideEffectFailed { error: "reboot-failed: exit 1".into() }, NOW),
            vec![Persist]
        );
        assert_eq!(
            failing.state().last_error.as_deref(),
            Some("rolled-back: health-check-failed: exit 3; then reboot-failed: exit 1")
        );
        // A failed action fails the job.
        let mut cut = agent(&k, "A", "b1", installed_7());
        let _ = cut.handle(msg(m.clone(), broker()), NOW);
        let _ = cut.handle(Input::Job(Event::SlotInvalidated), NOW);
        assert_eq!(
            cut.handle(
                Input::Job(Event::ActionFailed { error: Failure::named("download-failed", "x") }),
                NOW
            ),
            vec![PhaseChanged, Persist]
        );
        assert_eq!(cut.state().last_error.as_deref(), Some("download-failed: x"));
    }

    #[test]
    fn admission_refuses_with_named_reasons_and_records_them() {
        let k = keys();
        let refused = |boot: BootFacts, bytes: Vec<u8>| {
            let mut a = agent(&k, "A", "b1", installed_7());
            let actions = a.handle(Input::Message { bytes, source: broker(), boot }, NOW);
            let [Persist, Refuse(refusal)] = actions.as_slice() else { panic!("{actions:?}") };
            assert!(a.job().is_none(), "no job for a refused message");
            assert!(a.state().replay_cache.is_empty(), "nothing accepted");
            (refusal.name(), a.state().last_error.clone().unwrap())
        };
        let ok = message(&k, "jti-00000008", 8, 100);
        let bad_booted = BootFacts { booted_slot_bad: true, target_in_use: false };
        assert_eq!(refused(bad_booted, ok.clone()).0, "reboot-required");
        let in_use = BootFacts { booted_slot_bad: false, target_in_use: true };
        assert_eq!(refused(in_use, ok.clone()).0, "target-is-booted");
        assert_eq!(refused(BootFacts::default(), message(&k, "jti-00000008", 8, 1001)).0, "image-too-large");
        let (name, recorded) = refused(BootFacts::default(), message(&k, "jti-00000008", 7, 100));
        assert_eq!((name, recorded.ends_with(" (on t/update)")), ("version-not-newer", true));
        // Signed by keys the device does not trust.
        let forged = message(&keys(), "jti-00000008", 8, 100);
        assert_eq!(refused(BootFacts::default(), forged).0, "signature-invalid");
    }

    /// Boot-environment facts are read only for a message that passed
    /// verification; without trust keys only admission stops working.
    #[test]
    fn early_answers_need_no_boot_facts_and_broken_keys_refuse_messages_only() {
        let k = keys();
        let mut a = agent(&k, "A", "b1", installed_7());
        let forged = message(&keys(), "jti-00000008", 8, 100);
        let early = a.early_answer(&forged, &broker(), NOW).unwrap_err();
        assert!(matches!(early.as_slice(), [Persist, Refuse(Refusal::Verify(_))]), "{early:?}");
        let verified = a.early_answer(&message(&k, "jti-00000008", 8, 100), &broker(), NOW).unwrap();
        assert_eq!(verified.jti, "jti-00000008");
        assert!(a.job().is_none(), "an early answer never starts a job");

        let mut trial = agent(&k, "A", "b1", installed_7());
        let _ = trial.handle(msg(message(&k, "jti-00000008", 8, 100), broker()), NOW);
        for event in [Event::SlotInvalidated, Event::ImageVerified, Event::Switched { boot_id: "b1".into() }]
        {
            let _ = trial.handle(Input::Job(event), NOW);
        }
        let mut no_keys =
            Agent::new(trial.state().clone(), facts("B", "b2"), Err("keys/fleet.pub.pem: missing".into()));
        let _ = no_keys.handle(Input::Started, NOW);
        let _ = no_keys.handle(Input::HealthCommandDone { ok: true, detail: "passed".into() }, NOW);
        assert_eq!(phase(&no_keys), Phase::Committed, "a trial still commits without trust keys");
        let refused = no_keys.handle(msg(message(&k, "jti-00000009", 9, 100), broker()), NOW);
        assert!(matches!(refused.as_slice(), [Persist, Refuse(Refusal::TrustConfig(_))]), "{refused:?}");
    }

    /// The crash-safe order as a table: run one update to its end, keep the
    /// document exactly as each `Persist` left it on disk, then restart from
    /// each (the same boot, or after a reboot) and check what comes next.
    #[test]
    fn a_crash_right_after_each_persistence_point_resumes_correctly() {
        let k = keys();
        let mut disk: Vec<(Phase, State)> = Vec::new();
        let mut keep = |a: &Agent, actions: &[Action]| {
            if actions.contains(&Persist) {
                let on_disk: State = serde_json::from_slice(&serde_json::to_vec(a.state()).unwrap()).unwrap();
                disk.push((phase(a), on_disk));
            }
        };
        let mut a = agent(&k, "A", "b1", installed_7());
        for input in [
            msg(message(&k, "jti-00000008", 8, 100), broker()),
            Input::Job(Event::SlotInvalidated),
            Input::Job(Event::Checkpoint { written: 60, transfer: Default::default() }),
            Input::Job(Event::ImageVerified),
            Input::Job(Event::Switched { boot_id: "b1".into() }),
        ] {
            let actions = a.handle(input, NOW);
            keep(&a, &actions);
        }
        let mut b = agent(&k, "B", "b2", a.state().clone());
        let actions = b.handle(Input::Started, NOW);
        keep(&b, &actions);
        let actions = b.handle(Input::HealthCommandDone { ok: true, detail: "passed".into() }, NOW);
        keep(&b, &actions);
        let phases: Vec<String> = disk.iter().map(|(p, _)| p.status_name().to_string()).collect();
        assert_eq!(
            phases,
            ["downloading", "downloading", "installing", "reboot-pending", "testing", "committed"]
        );

        let arm = ArmTimer { timer: Timer::Health, after: Duration::from_secs(20) };
        // (persisted phase, written, restart on slot, boot id) → actions at start
        let table: Vec<(usize, &str, &str, Vec<Action>)> = vec![
            // Accepted: invalidate again and start from byte 0.
            (0, "A", "b1", vec![ConfirmBooted, InvalidateTarget]),
            // Downloading at 60: invalidate again, go on from the durable offset.
            (1, "A", "b1", vec![ConfirmBooted, InvalidateTarget, Download { from: 60 }]),
            // ... and after a power cut (a new boot of A): the same, A confirmed.
            (1, "A", "b9", vec![ConfirmBooted, InvalidateTarget, Download { from: 60 }]),
            // Written: switch (again) before the reboot.
            (2, "A", "b1", vec![ConfirmBooted, SetPrimaryForTrial]),
            // RebootPending, same boot: the reboot did not happen yet.
            (3, "A", "b1", vec![ConfirmBooted, Reboot]),
            // RebootPending, booted the target: the trial, not confirmed.
            (3, "B", "b2", vec![PhaseChanged, Persist, arm.clone(), RunHealthCommand]),
            // RebootPending, a new boot of A: the bootloader fell back.
            (3, "A", "b2", vec![ConfirmBooted, PhaseChanged, MarkTargetBad, Persist]),
            // Testing, a crash during the health check: check again.
            (4, "B", "b3", vec![PhaseChanged, Persist, arm, RunHealthCommand]),
            // Committed: nothing but confirming the running slot.
            (5, "B", "b3", vec![ConfirmBooted]),
        ];
        for (point, booted, boot_id, expected) in table {
            let (persisted_phase, state) = disk[point].clone();
            let mut restarted = agent(&k, booted, boot_id, state);
            let got = restarted.handle(Input::Started, NOW);
            assert_eq!(got, expected, "crash after {persisted_phase:?}, restart on {booted} ({boot_id})");
        }
        // The fallback was recorded as a rollback; the commit as installed.
        let mut fell_back = agent(&k, "A", "b2", disk[3].1.clone());
        let _ = fell_back.handle(Input::Started, NOW);
        assert!(matches!(phase(&fell_back), Phase::RolledBack { .. }));
        assert_eq!(fell_back.state().installed_version, 7);
        assert_eq!(disk[5].1.installed_version, 8);
    }
}
