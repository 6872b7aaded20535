//! The status document: `fleetd status --json` prints it, and the retained
//! MQTT status topic carries the same. Fields may be added; these stay.
//! Plain data: `update::status_doc` fills it in from the state and the boot
//! environment.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusDoc {
    pub device: String,
    /// Where the id came from: `id_file`, `config`, `device-tree`, `dmi`,
    /// `machine-id` (`device_id::IdSource`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id_source: Option<String>,
    /// The device's groups: `[device] groups`, or the registry's once
    /// enrollment stored them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    pub fleetd_version: String,
    pub state: String,
    pub installed_version: u64,
    pub booted_slot: Option<String>,
    pub primary_slot: Option<String>,
    pub slots: BTreeMap<String, SlotStatus>,
    pub job: Option<JobStatus>,
    pub last_error: Option<String>,
    /// Whether the device holds its identity and broker settings (always
    /// true without a `[provision]` section: configured by hand).
    pub provisioned: bool,
    pub network: Option<NetworkStatus>,
    /// The broker connection: the daemon's own view over D-Bus, else what
    /// it last wrote to `connection.json`. None when nothing says.
    pub mqtt: Option<MqttStatus>,
    /// The device's MQTT certificate: when it expires and, with a
    /// registrar to renew it, when the renewal is due and why the last one
    /// failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityStatus>,
    /// Where `fleetd status` got this: `daemon` (over D-Bus) or `disk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct IdentityStatus {
    /// Unix seconds.
    pub not_after: u64,
    /// Unix seconds; absent when the device does not renew (no registrar,
    /// or renewing stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<u64>,
    /// `"<error-name>: <detail>"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_renewal_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MqttStatus {
    pub connected: bool,
    pub error: Option<String>,
}

/// How the device is on the network, as provisioning last left it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkStatus {
    /// `access-point`, `joining`, `station`, `wired`, `none`.
    pub mode: String,
    pub ssid: Option<String>,
    /// Where the portal listens, while it does.
    pub portal: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotStatus {
    /// good | trying | bad | unknown (the boot env could not be read)
    pub state: String,
    pub version: Option<u64>,
    pub device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobStatus {
    pub jti: String,
    pub version: u64,
    pub name: String,
    pub target_slot: String,
    pub step: UpdateState,
    pub progress: u8,
    /// A scheduled job's start (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<u64>,
    /// Bytes received from the network for this job, index included.
    #[serde(default)]
    pub bytes_fetched: u64,
    /// Image bytes copied from the device's own slots instead of fetched.
    #[serde(default)]
    pub bytes_reused: u64,
}

/// An update's state, as the status document, the MQTT reports and D-Bus
/// name it (`idle`, `downloading`, ..., `rolled-back`, `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateState {
    Idle,
    /// Waiting for its rollout wave.
    Scheduled,
    Downloading,
    Installing,
    RebootPending,
    Testing,
    Committed,
    RolledBack,
    Failed,
    /// Stopped by a halt message before its download finished.
    Halted,
}

impl UpdateState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Scheduled => "scheduled",
            Self::Downloading => "downloading",
            Self::Installing => "installing",
            Self::RebootPending => "reboot-pending",
            Self::Testing => "testing",
            Self::Committed => "committed",
            Self::RolledBack => "rolled-back",
            Self::Failed => "failed",
            Self::Halted => "halted",
        }
    }

    /// A job that ended badly: its reason is an error.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::RolledBack | Self::Failed)
    }
}

impl std::fmt::Display for UpdateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What provisioning left, for the status document (plain data; the
/// provisioning code reads it from disk).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Provisioning {
    pub provisioned: bool,
    pub network: Option<NetworkStatus>,
    /// `unprovisioned` or `provisioning` while not provisioned.
    pub state: Option<String>,
    pub last_error: Option<String>,
}

impl StatusDoc {
    /// An unprovisioned device's state is `unprovisioned` or (while the
    /// daemon runs its portal) `provisioning`, whatever the update state.
    pub fn apply_provisioning(&mut self, p: &Provisioning) {
        self.provisioned = p.provisioned;
        self.network = p.network.clone();
        if let Some(state) = &p.state {
            self.state = state.clone();
        }
        if let Some(e) = &p.last_error {
            self.last_error.get_or_insert_with(|| e.clone());
        }
    }

    /// Short, aligned text for people.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
        let from = self.device_id_source.as_deref().map(|name| {
            let described = crate::device_id::IdSource::from_name(name).map_or(name, |s| s.describe());
            format!("from {described}; ")
        });
        line(
            "device",
            format!("{} ({}fleetd {})", self.device, from.unwrap_or_default(), self.fleetd_version),
        );
        if !self.groups.is_empty() {
            line("groups", self.groups.join(", "));
        }
        line("state", self.state.clone());
        line("provisioned", if self.provisioned { "yes".into() } else { "no".into() });
        if let Some(n) = &self.network {
            let mut text = n.mode.clone();
            if let Some(ssid) = &n.ssid {
                text.push_str(&format!(" {ssid:?}"));
            }
            if let Some(portal) = &n.portal {
                text.push_str(&format!(", portal {portal}"));
            }
            line("network", text);
        }
        if let Some(m) = &self.mqtt {
            let text = match (&m.connected, &m.error) {
                (true, _) => "connected".to_string(),
                (false, Some(e)) => format!("disconnected ({e})"),
                (false, None) => "disconnected".to_string(),
            };
            line("mqtt", text);
        }
        if let Some(i) = &self.identity {
            let mut text = format!("certificate valid until {} (unix)", i.not_after);
            if let Some(at) = i.renew_at {
                text.push_str(&format!(", renews at {at}"));
            }
            if let Some(e) = &i.last_renewal_error {
                text.push_str(&format!(", last renewal error: {e}"));
            }
            line("identity", text);
        }
        line("installed", format!("v{}", self.installed_version));
        match self.source.as_deref() {
            Some("daemon") => line("source", "the running daemon (D-Bus)".into()),
            Some(_) => line("source", "the state on disk (no daemon answered on the bus)".into()),
            None => {}
        }
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
            if j.bytes_fetched > 0 || j.bytes_reused > 0 {
                line("transfer", format!("{} fetched, {} reused", mib(j.bytes_fetched), mib(j.bytes_reused)));
            }
        }
        line("last error", self.last_error.clone().unwrap_or_else(|| "none".into()));
        out
    }
}

/// Bytes for a person: `12.3 MiB`.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

#[cfg(test)]
mod tests {
    use super::UpdateState;

    /// `as_str` (logs, D-Bus) and serde (the documents) say the same.
    #[test]
    fn an_update_state_has_one_name() {
        use UpdateState::*;
        for state in [
            Idle,
            Scheduled,
            Downloading,
            Installing,
            RebootPending,
            Testing,
            Committed,
            RolledBack,
            Failed,
            Halted,
        ] {
            let json = serde_json::to_value(state).unwrap();
            assert_eq!(json, state.as_str(), "{state:?}");
            assert_eq!(serde_json::from_value::<UpdateState>(json).unwrap(), state);
        }
    }
}
