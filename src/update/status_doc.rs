//! The status document as of now: the stored state, the boot environment
//! (read errors are shown, not fatal: status must work on a device in
//! trouble) and which slot runs.

use super::State;
use crate::boot::BootControl;
use crate::config::Config;
use crate::status::{JobStatus, SlotStatus, StatusDoc};

/// Builds the document. Boot-env read errors are shown, not fatal:
/// status must work on a device in trouble.
pub fn status_doc(
    config: &Config,
    state: &State,
    boot: Option<&dyn BootControl>,
    booted: Option<&str>,
) -> StatusDoc {
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
        step: j.phase.status_name(),
        progress: (j.written.saturating_mul(100) / j.size.max(1)).min(100) as u8,
        start_at: match j.phase {
            crate::update::Phase::Scheduled { start_at } => Some(start_at),
            _ => None,
        },
        bytes_fetched: j.transfer.bytes_fetched,
        bytes_reused: j.transfer.bytes_reused,
    });
    let state_name = state
        .job
        .as_ref()
        .map(|j| j.phase.status_name())
        .unwrap_or(crate::status::UpdateState::Idle)
        .to_string();
    let mut doc = StatusDoc {
        device: config.device.id.clone(),
        device_id_source: Some(config.device.id_source.as_str().to_string()),
        groups: config.device.groups.clone(),
        fleetd_version: crate::VERSION.to_string(),
        state: state_name,
        installed_version: state.installed_version,
        booted_slot: booted.map(str::to_string),
        primary_slot,
        slots,
        job,
        last_error,
        // Configured by hand until the caller applies what provisioning
        // left (`StatusDoc::apply_provisioning`).
        provisioned: true,
        network: None,
        mqtt: None,
        identity: None,
        source: None,
    };
    apply_identity(&mut doc, config);
    doc
}

/// The certificate's expiry and the renewal's state (`renewal.json`, which
/// the daemon's renewal task writes); a renewal that stopped for good is
/// the last error when there is no other.
pub fn apply_identity(doc: &mut StatusDoc, config: &Config) {
    let Some(status) = crate::provision::store::identity_status(config) else { return };
    if let (true, Some(e)) = (status.stopped, &status.identity.last_renewal_error) {
        doc.last_error.get_or_insert_with(|| e.clone());
    }
    doc.identity = Some(status.identity);
}
