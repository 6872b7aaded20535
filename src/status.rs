//! The status document: `fleetd status --json` prints it, and the retained
//! MQTT status topic carries the same. Fields may be added; these stay.

use crate::boot::BootControl;
use crate::config::Config;
use crate::store::State;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatusDoc {
    pub device: String,
    pub fleetd_version: String,
    pub state: String,
    pub installed_version: u64,
    pub booted_slot: Option<String>,
    pub primary_slot: Option<String>,
    pub slots: BTreeMap<String, SlotStatus>,
    pub job: Option<JobStatus>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SlotStatus {
    /// good | trying | bad | unknown (the boot env could not be read)
    pub state: String,
    pub version: Option<u64>,
    pub device: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JobStatus {
    pub jti: String,
    pub version: u64,
    pub name: String,
    pub target_slot: String,
    pub step: String,
    pub progress: u8,
}

impl StatusDoc {
    /// Builds the document. Boot-env read errors are shown, not fatal:
    /// status must work on a device in trouble.
    pub fn build(
        config: &Config,
        state: &State,
        boot: Option<&dyn BootControl>,
        booted: Option<&str>,
    ) -> Self {
        let mut last_error = state.last_error.clone();
        let mut env_error = |e: crate::boot::BootError| {
            if last_error.is_none() {
                last_error = Some(format!("{}: {e}", e.name()));
            }
        };
        let primary_slot = boot.and_then(|b| b.primary().map_err(&mut env_error).ok().flatten());
        let slots = config
            .slots
            .iter()
            .map(|(name, slot)| {
                let state_name = match boot.map(|b| b.state(name)) {
                    Some(Ok(s)) => s.as_str().to_string(),
                    Some(Err(e)) => {
                        env_error(e);
                        "unknown".into()
                    }
                    None => "unknown".into(),
                };
                let status = SlotStatus {
                    state: state_name,
                    version: state.slot_versions.get(name).copied(),
                    device: slot.device.display().to_string(),
                };
                (name.clone(), status)
            })
            .collect();
        let job = state.job.as_ref().map(|j| JobStatus {
            jti: j.jti.clone(),
            version: j.version,
            name: j.name.clone(),
            target_slot: j.target_slot.clone(),
            step: j.phase.status_name().to_string(),
            progress: (j.written.saturating_mul(100) / j.size.max(1)).min(100) as u8,
        });
        let state_name = state.job.as_ref().map(|j| j.phase.status_name()).unwrap_or("idle");
        Self {
            device: config.device.id.clone(),
            fleetd_version: crate::VERSION.to_string(),
            state: state_name.to_string(),
            installed_version: state.installed_version,
            booted_slot: booted.map(str::to_string),
            primary_slot,
            slots,
            job,
            last_error,
        }
    }

    /// Short, aligned text for people.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
        line("device", format!("{} (fleetd {})", self.device, self.fleetd_version));
        line("state", self.state.clone());
        line("installed", format!("v{}", self.installed_version));
        line("booted", self.booted_slot.clone().unwrap_or_else(|| "unknown".into()));
        line("primary", self.primary_slot.clone().unwrap_or_else(|| "none".into()));
        for (name, s) in &self.slots {
            let version = s.version.map(|v| format!("v{v}")).unwrap_or_else(|| "-".into());
            line(&format!("slot {name}"), format!("{:<7} {:<6} {}", s.state, version, s.device));
        }
        if let Some(j) = &self.job {
            line(
                "job",
                format!("{} v{} → slot {}: {} {}%", j.name, j.version, j.target_slot, j.step, j.progress),
            );
        }
        line("last error", self.last_error.clone().unwrap_or_else(|| "none".into()));
        out
    }
}
