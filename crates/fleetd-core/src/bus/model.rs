//! What the D-Bus API shows, computed from the executor's reports: pure, no
//! bus. `Model::apply` turns one event into the properties that changed and,
//! when an install or a trial ended, the `Completed` signal.
//!
//! Progress is the install's: the download takes 0–90 %, the verified image
//! 95 %, and 100 % comes only once the boot slot is switched (the install's
//! last step, persisted). `Completed` fires once per ending: the install
//! (0 at reboot-pending, or a failure) and, after the reboot, the trial
//! (committed, rolled back). A refused `Install` call gets one too.

use crate::status::{StatusDoc, UpdateState};
use crate::update::report::Report;

/// `Completed`'s result codes.
pub const RESULT_OK: i32 = 0;
pub const RESULT_FAILED: i32 = 1;
pub const RESULT_CANCELLED: i32 = 2;
pub const RESULT_ROLLED_BACK: i32 = 3;
pub const RESULT_REFUSED: i32 = 4;

/// The percent a download ends at; the rest belongs to the steps after it.
const DOWNLOAD_SHARE: u64 = 90;
const VERIFIED_PERCENT: i32 = 95;

/// One property of `org.fleetd.Daemon1`, by its bus name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Property {
    State,
    Progress,
    LastError,
    BootedSlot,
    PrimarySlot,
    InstalledVersion,
    Provisioned,
    Connected,
}

impl Property {
    pub fn bus_name(self) -> &'static str {
        match self {
            Self::State => "State",
            Self::Progress => "Progress",
            Self::LastError => "LastError",
            Self::BootedSlot => "BootedSlot",
            Self::PrimarySlot => "PrimarySlot",
            Self::InstalledVersion => "InstalledVersion",
            Self::Provisioned => "Provisioned",
            Self::Connected => "Connected",
        }
    }
}

/// What the daemon tells the bus side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Report(Report),
    /// An ending the reports do not show: a refused `Install` call (sent by
    /// the service), or an install found already done.
    Completed(i32, String),
    /// The broker connection went up or down.
    Connected(bool),
    /// Provisioning moved on (the portal is up, the device joined, ...).
    Provisioning(crate::status::Provisioning),
}

/// What to emit after an event: the properties that changed (one
/// PropertiesChanged), then `Completed` when something ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub properties: Vec<Property>,
    pub completed: Option<(i32, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub doc: StatusDoc,
    pub progress: (i32, UpdateState),
    pub connected: bool,
    /// The job whose progress is shown.
    job: Option<String>,
    /// The last (jti, ending) `Completed` was sent for: never twice.
    completed_for: Option<(String, UpdateState)>,
    /// An ending's `Completed`, held until the status report saved with it
    /// arrives (the step comes first), so a client that reads the
    /// properties on `Completed` sees the ending's slots, not the last ones.
    /// The next step releases it too, should no report come.
    pending: Option<(i32, String)>,
}

impl Model {
    /// The starting point: what is on disk. A job that already reached an
    /// ending (reboot-pending, committed, ...) has had its `Completed`.
    pub fn new(doc: StatusDoc) -> Self {
        let job = doc.job.as_ref().map(|j| j.jti.clone());
        let progress = match &doc.job {
            Some(j) => (percent_of_state(j.step, j.progress), j.step),
            None => (0, UpdateState::Idle),
        };
        let completed_for = doc.job.as_ref().and_then(|j| ending(j.step).map(|_| (j.jti.clone(), j.step)));
        Self { doc, progress, connected: false, job, completed_for, pending: None }
    }

    pub fn last_error(&self) -> String {
        self.doc.last_error.clone().unwrap_or_default()
    }

    pub fn booted_slot(&self) -> String {
        self.doc.booted_slot.clone().unwrap_or_default()
    }

    pub fn primary_slot(&self) -> String {
        self.doc.primary_slot.clone().unwrap_or_default()
    }

    /// `GetSlotStatus`: per slot, its state, version (0 = none), device,
    /// and whether it is booted or primary.
    pub fn slot_status(&self) -> Vec<(String, SlotFacts)> {
        self.doc
            .slots
            .iter()
            .map(|(name, s)| {
                let facts = SlotFacts {
                    state: s.state.clone(),
                    version: s.version.unwrap_or(0),
                    device: s.device.clone(),
                    booted: self.doc.booted_slot.as_deref() == Some(name),
                    primary: self.doc.primary_slot.as_deref() == Some(name),
                };
                (name.clone(), facts)
            })
            .collect()
    }

    pub fn apply(&mut self, event: &Event) -> Changes {
        let before = self.clone();
        let mut completed = None;
        match event {
            Event::Connected(up) => self.connected = *up,
            Event::Provisioning(p) => self.doc.apply_provisioning(p),
            Event::Completed(result, detail) => completed = Some((*result, detail.clone())),
            Event::Report(Report::Status(doc)) => {
                self.doc = (**doc).clone();
                completed = self.pending.take();
            }
            Event::Report(Report::Progress { jti, done, total, fetched, reused, .. }) => {
                self.follow(jti);
                // GetStatus shows the download as it goes, not as the last
                // persisted status report left it.
                if let Some(job) = self.doc.job.as_mut().filter(|job| job.jti == *jti) {
                    job.step = UpdateState::Downloading;
                    job.progress = (done.saturating_mul(100) / (*total).max(1)).min(100) as u8;
                    job.bytes_fetched = *fetched;
                    job.bytes_reused = *reused;
                }
                let percent = (done.saturating_mul(DOWNLOAD_SHARE) / (*total).max(1)).min(DOWNLOAD_SHARE);
                // Resuming re-hashes from the start: never go backwards.
                let percent = (percent as i32).max(if self.progress.1 == UpdateState::Downloading {
                    self.progress.0
                } else {
                    0
                });
                self.progress = (percent, UpdateState::Downloading);
            }
            Event::Report(Report::Step { state, detail, failure, job }) => {
                completed = self.pending.take();
                let state = *state;
                if let Some((jti, _)) = job {
                    self.follow(jti);
                    let percent = percent_of_state(state, 0).max(match state {
                        UpdateState::Downloading | UpdateState::Failed | UpdateState::RolledBack => {
                            self.progress.0
                        }
                        _ => 0,
                    });
                    self.progress = (percent, state);
                    if let Some(code) = ending(state) {
                        let key = (jti.clone(), state);
                        if self.completed_for.as_ref() != Some(&key) {
                            self.completed_for = Some(key);
                            let cancelled = failure.as_ref().is_some_and(|f| f.is_cancel());
                            let code =
                                if code == RESULT_FAILED && cancelled { RESULT_CANCELLED } else { code };
                            self.pending = Some((code, detail.clone()));
                        }
                    }
                }
                // The state shown moves with the steps; the status report
                // that follows confirms it.
                self.doc.state = state.to_string();
            }
        }
        let mut properties = Vec::new();
        let mut changed = |p: Property, differs: bool| {
            if differs {
                properties.push(p);
            }
        };
        changed(Property::State, before.doc.state != self.doc.state);
        changed(Property::Progress, before.progress != self.progress);
        changed(Property::LastError, before.doc.last_error != self.doc.last_error);
        changed(Property::BootedSlot, before.doc.booted_slot != self.doc.booted_slot);
        changed(Property::PrimarySlot, before.doc.primary_slot != self.doc.primary_slot);
        changed(Property::InstalledVersion, before.doc.installed_version != self.doc.installed_version);
        changed(Property::Provisioned, before.doc.provisioned != self.doc.provisioned);
        changed(Property::Connected, before.connected != self.connected);
        Changes { properties, completed }
    }

    /// A new job starts its progress from 0.
    fn follow(&mut self, jti: &str) {
        if self.job.as_deref() != Some(jti) {
            self.job = Some(jti.to_string());
            self.progress = (0, UpdateState::Downloading);
        }
    }

    /// The status document as `GetStatus` returns it (with the connection).
    pub fn status(&self) -> StatusDoc {
        let mut doc = self.doc.clone();
        doc.mqtt = Some(crate::status::MqttStatus { connected: self.connected, error: None });
        doc
    }
}

/// `GetSlotStatus`'s facts about one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFacts {
    pub state: String,
    pub version: u64,
    pub device: String,
    pub booted: bool,
    pub primary: bool,
}

/// Progress of a step; `download_percent` (0–100) of the bytes for
/// `downloading`.
fn percent_of_state(state: UpdateState, download_percent: u8) -> i32 {
    match state {
        UpdateState::Downloading => (u64::from(download_percent.min(100)) * DOWNLOAD_SHARE / 100) as i32,
        UpdateState::Installing => VERIFIED_PERCENT,
        UpdateState::RebootPending | UpdateState::Testing | UpdateState::Committed => 100,
        UpdateState::Idle
        | UpdateState::Scheduled
        | UpdateState::RolledBack
        | UpdateState::Failed
        | UpdateState::Halted => 0,
    }
}

/// The steps that end something (`Completed` is kept by the step), with
/// the result.
fn ending(state: UpdateState) -> Option<i32> {
    match state {
        UpdateState::RebootPending | UpdateState::Committed => Some(RESULT_OK),
        UpdateState::RolledBack => Some(RESULT_ROLLED_BACK),
        UpdateState::Failed | UpdateState::Halted => Some(RESULT_FAILED),
        UpdateState::Idle
        | UpdateState::Scheduled
        | UpdateState::Downloading
        | UpdateState::Installing
        | UpdateState::Testing => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{JobStatus, SlotStatus};
    use crate::update::engine::Failure;

    /// A state by its name, as the documents carry it.
    fn st(name: &str) -> UpdateState {
        serde_json::from_value(serde_json::Value::from(name)).unwrap()
    }

    fn doc(state: &str) -> StatusDoc {
        StatusDoc {
            device: "gw-1".into(),
            device_id_source: None,
            groups: Vec::new(),
            identity: None,
            fleetd_version: "0".into(),
            state: state.into(),
            installed_version: 1,
            booted_slot: Some("A".into()),
            primary_slot: Some("A".into()),
            slots: [
                (
                    "A".to_string(),
                    SlotStatus { state: "good".into(), version: Some(1), device: "/dev/a".into() },
                ),
                ("B".to_string(), SlotStatus { state: "bad".into(), version: None, device: "/dev/b".into() }),
            ]
            .into(),
            job: None,
            last_error: None,
            provisioned: true,
            network: None,
            mqtt: None,
            source: None,
        }
    }

    fn step(state: &str, detail: &str) -> Event {
        Event::Report(Report::Step {
            state: st(state),
            detail: detail.into(),
            failure: None,
            job: Some(("j1".into(), 2)),
        })
    }

    /// A `failed` step as the executor reports it.
    fn failed(failure: Failure) -> Event {
        let detail = failure.to_string();
        Event::Report(Report::Step {
            state: UpdateState::Failed,
            detail,
            failure: Some(failure),
            job: Some(("j1".into(), 2)),
        })
    }

    /// The status report the executor sends after the step (it saves).
    fn saved(state: &str) -> Event {
        Event::Report(Report::Status(Box::new(doc(state))))
    }

    /// An ending step and the report saved with it: the `Completed` of both.
    fn end(m: &mut Model, state: &str, detail: &str) -> Option<(i32, String)> {
        end_with(m, step(state, detail), state)
    }

    fn end_with(m: &mut Model, step: Event, state: &str) -> Option<(i32, String)> {
        let at_step = m.apply(&step).completed;
        assert_eq!(at_step, None, "Completed before the ending is saved");
        m.apply(&saved(state)).completed
    }

    fn bytes(done: u64) -> Event {
        Event::Report(Report::Progress {
            jti: "j1".into(),
            version: 2,
            done,
            total: 1000,
            fetched: done,
            reused: 0,
        })
    }

    #[test]
    fn get_status_follows_the_download_of_its_job() {
        let mut m = Model::new(doc("idle"));
        let mut accepted = doc("downloading");
        accepted.job = Some(JobStatus {
            jti: "j1".into(),
            version: 2,
            name: "v2".into(),
            target_slot: "B".into(),
            step: UpdateState::Downloading,
            progress: 0,
            start_at: None,
            bytes_fetched: 0,
            bytes_reused: 0,
        });
        m.apply(&Event::Report(Report::Status(Box::new(accepted))));
        m.apply(&bytes(250));
        let job = m.status().job.unwrap();
        assert_eq!((job.step, job.progress, job.bytes_fetched), (UpdateState::Downloading, 25, 250));

        // Another job's bytes leave this one as it is.
        m.apply(&Event::Report(Report::Progress {
            jti: "j2".into(),
            version: 3,
            done: 900,
            total: 1000,
            fetched: 900,
            reused: 0,
        }));
        assert_eq!(m.status().job.unwrap().bytes_fetched, 250);
    }

    #[test]
    fn progress_reaches_100_only_when_the_boot_slot_is_switched() {
        let mut m = Model::new(doc("idle"));
        let mut seen = Vec::new();
        for event in [
            step("downloading", "accepted"),
            bytes(0),
            bytes(500),
            bytes(1000),
            step("installing", "image verified"),
            step("reboot-pending", "slot B is primary for a trial boot"),
        ] {
            let changes = m.apply(&event);
            if changes.properties.contains(&Property::Progress) {
                seen.push(m.progress);
            }
            assert_eq!(changes.completed, None, "not before the report saved with it");
            if event != step("reboot-pending", "slot B is primary for a trial boot") {
                assert!(m.progress.0 < 100, "{:?} after {event:?}", m.progress);
            } else {
                let changes = m.apply(&saved("reboot-pending"));
                assert_eq!(changes.completed, Some((RESULT_OK, "slot B is primary for a trial boot".into())));
            }
        }
        let percents: Vec<i32> = seen.iter().map(|p| p.0).collect();
        assert_eq!(percents, vec![0, 45, 90, 95, 100], "{seen:?}");
        assert_eq!(m.doc.state, "reboot-pending");
    }

    #[test]
    fn completed_fires_once_per_ending() {
        let mut m = Model::new(doc("idle"));
        m.apply(&step("downloading", "accepted"));
        assert!(end(&mut m, "reboot-pending", "switched").is_some());
        // "rebooting into the new slot" is another step in the same phase.
        assert_eq!(m.apply(&step("reboot-pending", "rebooting")).completed, None);
        assert_eq!(m.apply(&step("testing", "checking health")).completed, None);
        assert_eq!(end(&mut m, "committed", "committed v2"), Some((RESULT_OK, "committed v2".into())));
    }

    /// Should the report never come (a save that failed), the next step
    /// still lets the ending's `Completed` out.
    #[test]
    fn an_ending_without_its_report_completes_at_the_next_step() {
        let mut m = Model::new(doc("idle"));
        m.apply(&step("downloading", "accepted"));
        assert_eq!(m.apply(&step("failed", "failed: state-io")).completed, None);
        let next = m.apply(&step("failed", "cannot record the failure"));
        assert_eq!(next.completed, Some((RESULT_FAILED, "failed: state-io".into())));
    }

    #[test]
    fn failures_cancels_and_rollbacks_have_their_own_codes() {
        let mut m = Model::new(doc("idle"));
        m.apply(&step("downloading", "accepted"));
        m.apply(&bytes(300));
        let c = end_with(&mut m, failed(Failure::cancelled()), "failed");
        assert_eq!(c.map(|c| c.0), Some(RESULT_CANCELLED));
        assert_eq!(m.progress, (27, UpdateState::Failed), "a failure keeps how far it got");

        let mut m = Model::new(doc("idle"));
        m.apply(&step("downloading", "accepted"));
        let c = end_with(&mut m, failed(Failure::named("hash-mismatch", "x")), "failed");
        assert_eq!(c, Some((RESULT_FAILED, "hash-mismatch: x".into())));
        let mut m = Model::new(doc("testing"));
        assert_eq!(end(&mut m, "rolled-back", "rolled back").map(|c| c.0), Some(RESULT_ROLLED_BACK));
        assert_eq!(
            m.apply(&Event::Completed(RESULT_REFUSED, "busy: x".into())).completed,
            Some((RESULT_REFUSED, "busy: x".into()))
        );
    }

    #[test]
    fn a_job_already_ended_on_disk_does_not_complete_again() {
        let mut d = doc("reboot-pending");
        d.job = Some(JobStatus {
            jti: "j1".into(),
            version: 2,
            name: "v2".into(),
            target_slot: "B".into(),
            step: UpdateState::RebootPending,
            progress: 100,
            start_at: None,
            bytes_fetched: 0,
            bytes_reused: 0,
        });
        let mut m = Model::new(d);
        assert_eq!(m.progress, (100, UpdateState::RebootPending));
        assert_eq!(m.apply(&step("reboot-pending", "reboot needed")).completed, None);
        assert!(end(&mut m, "committed", "committed").is_some());
    }

    #[test]
    fn a_new_job_starts_from_zero_and_status_reports_change_properties() {
        let mut m = Model::new(doc("idle"));
        m.apply(&step("downloading", "accepted"));
        m.apply(&bytes(1000));
        let other = Event::Report(Report::Step {
            state: UpdateState::Downloading,
            detail: "accepted".into(),
            failure: None,
            job: Some(("j2".into(), 3)),
        });
        m.apply(&other);
        assert_eq!(m.progress, (0, UpdateState::Downloading));

        let mut next = doc("idle");
        next.installed_version = 3;
        next.primary_slot = Some("B".into());
        let c = m.apply(&Event::Report(Report::Status(Box::new(next))));
        assert_eq!(c.properties, vec![Property::State, Property::PrimarySlot, Property::InstalledVersion]);
        assert_eq!(m.apply(&Event::Connected(true)).properties, vec![Property::Connected]);
        assert_eq!(m.apply(&Event::Connected(true)).properties, vec![]);
        let slots = m.slot_status();
        assert_eq!(slots[0].0, "A");
        assert!(slots[0].1.booted && !slots[0].1.primary && slots[1].1.primary);
        assert_eq!(m.status().mqtt.map(|s| s.connected), Some(true));
    }
}
