//! What `fleetctl rollout watch` knows of a rollout (sans-IO): each
//! targeted device's stage from its status documents, counted per wave,
//! and whether failures call for the halt.

use fleetd::status::{StatusDoc, UpdateState};
use fleetd::trust::{Claims, Rollout};
use std::collections::BTreeMap;

/// Where a targeted device is in one rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Has not reported the rollout's job yet.
    Waiting,
    Scheduled,
    /// Accepted, downloading or writing the image.
    Downloading,
    /// Rebooting into the new slot, or on trial there.
    Testing,
    Committed,
    RolledBack,
    Failed,
    Halted,
    /// Already runs this version or a newer one: not part of the rollout.
    Current,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Waiting,
        Stage::Scheduled,
        Stage::Downloading,
        Stage::Testing,
        Stage::Committed,
        Stage::RolledBack,
        Stage::Failed,
        Stage::Halted,
        Stage::Current,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Waiting => "waiting",
            Stage::Scheduled => "scheduled",
            Stage::Downloading => "downloading",
            Stage::Testing => "testing",
            Stage::Committed => "committed",
            Stage::RolledBack => "rolled-back",
            Stage::Failed => "failed",
            Stage::Halted => "halted",
            Stage::Current => "current",
        }
    }

    pub fn parse(text: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The device is done with this rollout, one way or another.
    pub fn has_ended(self) -> bool {
        matches!(self, Stage::Committed | Stage::RolledBack | Stage::Failed | Stage::Halted | Stage::Current)
    }

    pub fn is_failure(self) -> bool {
        matches!(self, Stage::RolledBack | Stage::Failed)
    }

    /// The stage a status document shows for the rollout `jti` of `version`.
    pub fn of(doc: &StatusDoc, jti: &str, version: u64) -> Stage {
        match &doc.job {
            Some(job) if job.jti == jti => match job.step {
                UpdateState::Idle | UpdateState::Scheduled => Stage::Scheduled,
                UpdateState::Downloading | UpdateState::Installing => Stage::Downloading,
                UpdateState::RebootPending | UpdateState::Testing => Stage::Testing,
                UpdateState::Committed => Stage::Committed,
                UpdateState::RolledBack => Stage::RolledBack,
                UpdateState::Failed => Stage::Failed,
                UpdateState::Halted => Stage::Halted,
            },
            _ if doc.installed_version >= version => Stage::Current,
            _ => Stage::Waiting,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    pub wave: usize,
    pub stage: Stage,
    pub bytes_fetched: u64,
}

/// One wave's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaveCounts {
    pub devices: usize,
    pub by_stage: BTreeMap<Stage, usize>,
    pub bytes_fetched: u64,
}

impl WaveCounts {
    pub fn count(&self, stage: Stage) -> usize {
        self.by_stage.get(&stage).copied().unwrap_or(0)
    }
}

/// When `watch` halts: failures (rolled back or failed) above
/// `max_failures_percent` of the devices that finished with an outcome
/// (committed, rolled back, failed), once at least `min_devices` have.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub max_failures_percent: f64,
    pub min_devices: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Devices are still on their way.
    Continue,
    /// Every targeted device ended.
    Done,
    /// Failures crossed the threshold.
    Halt { failures: usize, finished: usize },
}

#[derive(Debug, Clone)]
pub struct Tally {
    pub jti: String,
    pub version: u64,
    pub group: String,
    target_devices: Vec<String>,
    rollout: Option<Rollout>,
    pub devices: BTreeMap<String, DeviceEntry>,
}

impl Tally {
    pub fn new(claims: &Claims, group: &str) -> Self {
        Self {
            jti: claims.jti.clone(),
            version: claims.version,
            group: group.to_string(),
            target_devices: claims.target.devices.clone(),
            rollout: claims.rollout.clone(),
            devices: BTreeMap::new(),
        }
    }

    pub fn wave_count(&self) -> usize {
        self.rollout.as_ref().map_or(1, |r| r.waves.len().max(1))
    }

    /// The wave a device belongs to (0 without waves).
    pub fn wave_of(&self, device: &str) -> usize {
        self.rollout.as_ref().map_or(0, |r| fleetd::update::rollout::schedule(&self.jti, device, r).wave)
    }

    /// A device's stage as restored from the store.
    pub fn restore(&mut self, device: &str, stage: Stage, bytes_fetched: u64) {
        let wave = self.wave_of(device);
        self.devices.insert(device.to_string(), DeviceEntry { wave, stage, bytes_fetched });
    }

    /// Takes in a status document; returns the device's entry when it
    /// changed. Devices outside the target are ignored, and a device that
    /// ended stays as it ended (its next update replaces the job it reports).
    pub fn observe(&mut self, doc: &StatusDoc) -> Option<&DeviceEntry> {
        let targeted = doc.groups.contains(&self.group) || self.target_devices.contains(&doc.device);
        if !targeted {
            return None;
        }
        let stage = Stage::of(doc, &self.jti, self.version);
        let bytes_fetched = doc.job.as_ref().filter(|j| j.jti == self.jti).map_or(0, |j| j.bytes_fetched);
        let wave = self.wave_of(&doc.device);
        let entry = DeviceEntry { wave, stage, bytes_fetched };
        match self.devices.get(&doc.device) {
            Some(old) if old.stage.has_ended() && old.stage != Stage::Current => None,
            Some(old) if *old == entry => None,
            _ => {
                self.devices.insert(doc.device.clone(), entry);
                self.devices.get(&doc.device)
            }
        }
    }

    pub fn waves(&self) -> Vec<WaveCounts> {
        let mut waves = vec![WaveCounts::default(); self.wave_count()];
        for entry in self.devices.values() {
            let Some(wave) = waves.get_mut(entry.wave) else { continue };
            wave.devices += 1;
            *wave.by_stage.entry(entry.stage).or_default() += 1;
            wave.bytes_fetched += entry.bytes_fetched;
        }
        waves
    }

    pub fn verdict(&self, thresholds: Thresholds) -> Verdict {
        let stages = || self.devices.values().map(|e| e.stage);
        let failures = stages().filter(|s| s.is_failure()).count();
        let finished = failures + stages().filter(|s| *s == Stage::Committed).count();
        if finished >= thresholds.min_devices.max(1)
            && failures as f64 * 100.0 > thresholds.max_failures_percent * finished as f64
        {
            return Verdict::Halt { failures, finished };
        }
        if !self.devices.is_empty() && stages().all(Stage::has_ended) {
            return Verdict::Done;
        }
        Verdict::Continue
    }

    /// The counts as a table, one line per wave and a total.
    pub fn table(&self) -> String {
        let columns = Stage::ALL;
        let mut out = format!("{:<12} {:>7}", "wave", "devices");
        for c in columns {
            out.push_str(&format!(" {:>11}", c.as_str()));
        }
        out.push_str(&format!(" {:>12}\n", "fetched"));
        let mut cumulative = 0u8;
        let mut total = WaveCounts::default();
        for (i, wave) in self.waves().iter().enumerate() {
            let label = match &self.rollout {
                Some(r) => {
                    let percent = r.waves.get(i).map_or(100, |w| w.percent);
                    let label = format!("{} ({}-{}%)", i + 1, cumulative, percent);
                    cumulative = percent;
                    label
                }
                None => "all".to_string(),
            };
            out.push_str(&format!("{label:<12} {:>7}", wave.devices));
            for c in columns {
                out.push_str(&format!(" {:>11}", wave.count(c)));
                *total.by_stage.entry(c).or_default() += wave.count(c);
            }
            out.push_str(&format!(" {:>12}\n", bytes(wave.bytes_fetched)));
            total.devices += wave.devices;
            total.bytes_fetched += wave.bytes_fetched;
        }
        out.push_str(&format!("{:<12} {:>7}", "total", total.devices));
        for c in columns {
            out.push_str(&format!(" {:>11}", total.count(c)));
        }
        out.push_str(&format!(" {:>12}\n", bytes(total.bytes_fetched)));
        out
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetd::status::JobStatus;
    use fleetd::trust::{Image, Target, Wave};

    fn claims() -> Claims {
        Claims {
            typ: fleetd::trust::CLAIMS_TYPE.into(),
            jti: "roll-0000001".into(),
            iat: 0,
            nbf: 0,
            exp: 1,
            project: "acme".into(),
            target: Target {
                hardware: "rpi4".into(),
                devices: vec!["gw-direct".into()],
                groups: vec!["field".into()],
            },
            version: 9,
            name: "9".into(),
            image: Image {
                url: "https://h/i".into(),
                size: 1,
                sha256: "ab".repeat(32),
                encoding: Default::default(),
                index: None,
            },
            requires: vec![],
            rollout: Some(Rollout {
                waves: vec![Wave { percent: 10, not_before: 0 }, Wave { percent: 100, not_before: 0 }],
                spread_s: 0,
            }),
        }
    }

    fn doc(
        device: &str,
        groups: &[&str],
        job: Option<(&str, UpdateState, u64)>,
        installed: u64,
    ) -> StatusDoc {
        StatusDoc {
            device: device.into(),
            device_id_source: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            fleetd_version: "0".into(),
            state: "idle".into(),
            installed_version: installed,
            booted_slot: None,
            primary_slot: None,
            slots: Default::default(),
            job: job.map(|(jti, step, bytes_fetched)| JobStatus {
                jti: jti.into(),
                version: 9,
                name: "9".into(),
                target_slot: "B".into(),
                step,
                progress: 0,
                start_at: None,
                bytes_fetched,
                bytes_reused: 0,
            }),
            last_error: None,
            provisioned: true,
            network: None,
            mqtt: None,
            identity: None,
            source: None,
        }
    }

    const J: &str = "roll-0000001";

    #[test]
    fn stages_from_status_documents_by_table() {
        use UpdateState as U;
        // (job, installed version, stage)
        let cases = [
            (Some((J, U::Scheduled, 0)), 8, Stage::Scheduled),
            (Some((J, U::Downloading, 0)), 8, Stage::Downloading),
            (Some((J, U::Installing, 0)), 8, Stage::Downloading),
            (Some((J, U::RebootPending, 0)), 8, Stage::Testing),
            (Some((J, U::Testing, 0)), 8, Stage::Testing),
            (Some((J, U::Committed, 0)), 9, Stage::Committed),
            (Some((J, U::RolledBack, 0)), 8, Stage::RolledBack),
            (Some((J, U::Failed, 0)), 8, Stage::Failed),
            (Some((J, U::Halted, 0)), 8, Stage::Halted),
            (Some(("other-000001", U::Committed, 0)), 8, Stage::Waiting),
            (Some(("other-000001", U::Committed, 0)), 10, Stage::Current),
            (None, 9, Stage::Current),
            (None, 0, Stage::Waiting),
        ];
        for (job, installed, stage) in cases {
            assert_eq!(Stage::of(&doc("gw", &[], job, installed), J, 9), stage, "{job:?} {installed}");
            assert_eq!(Stage::parse(stage.as_str()), Some(stage));
        }
    }

    #[test]
    fn devices_are_counted_in_their_wave_and_ended_devices_stay_ended() {
        let mut t = Tally::new(&claims(), "field");
        assert!(t.observe(&doc("gw-other", &["lab"], None, 0)).is_none(), "not targeted");
        assert!(t.observe(&doc("gw-direct", &[], None, 0)).is_some(), "named in the target");
        for i in 0..200 {
            t.observe(&doc(&format!("gw-{i}"), &["field"], Some((J, UpdateState::Committed, 100)), 9));
        }
        let waves = t.waves();
        assert_eq!(waves.iter().map(|w| w.devices).sum::<usize>(), 201);
        assert!((5..=40).contains(&waves[0].devices), "about 10 % in the first wave: {}", waves[0].devices);
        assert_eq!(waves[0].bytes_fetched + waves[1].bytes_fetched, 200 * 100);
        for (i, w) in waves.iter().enumerate() {
            for name in t.devices.iter().filter(|(_, e)| e.wave == i).map(|(n, _)| n) {
                assert_eq!(t.wave_of(name), i);
            }
            assert_eq!(w.devices, w.by_stage.values().sum::<usize>());
        }
        // A committed device that takes the next update stays committed here.
        assert!(t
            .observe(&doc("gw-1", &["field"], Some(("next-0000001", UpdateState::Downloading, 0)), 9))
            .is_none());
        assert_eq!(t.devices["gw-1"].stage, Stage::Committed);
        assert!(t.table().lines().count() == 4, "{}", t.table());
    }

    #[test]
    fn the_verdict_by_table() {
        let th = |max, min| Thresholds { max_failures_percent: max, min_devices: min };
        // (stages, thresholds, verdict)
        use Stage::*;
        let cases: Vec<(Vec<Stage>, Thresholds, Verdict)> = vec![
            (vec![Committed, Committed], th(10.0, 1), Verdict::Done),
            (vec![Committed, Downloading], th(10.0, 1), Verdict::Continue),
            (vec![Committed, Halted, Current], th(10.0, 1), Verdict::Done),
            (vec![RolledBack], th(10.0, 1), Verdict::Halt { failures: 1, finished: 1 }),
            (vec![RolledBack, Waiting], th(10.0, 2), Verdict::Continue),
            (vec![RolledBack, Committed], th(50.0, 2), Verdict::Done),
            (vec![RolledBack, Failed, Committed], th(50.0, 2), Verdict::Halt { failures: 2, finished: 3 }),
            (vec![Failed; 1].into_iter().chain(vec![Committed; 9]).collect(), th(10.0, 5), Verdict::Done),
            (
                vec![Failed; 2].into_iter().chain(vec![Committed; 9]).collect(),
                th(10.0, 5),
                Verdict::Halt { failures: 2, finished: 11 },
            ),
            (vec![], th(10.0, 1), Verdict::Continue),
        ];
        for (stages, thresholds, verdict) in cases {
            let mut t = Tally::new(&claims(), "field");
            for (i, s) in stages.iter().enumerate() {
                t.restore(&format!("gw-{i}"), *s, 0);
            }
            assert_eq!(t.verdict(thresholds), verdict, "{stages:?} {thresholds:?}");
        }
    }
}
