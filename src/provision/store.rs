//! What provisioning leaves on disk, under `state_dir`:
//!
//! ```text
//! identity/            0700
//!   device-key.pem     0600  the key the device made (its CSR's key)
//!   cert.pem           0600  the MQTT client certificate
//!   key.pem            0600  its key (the device's own, or the uploaded one)
//!   ca.pem             0644  the broker's CA
//!   registrar.json     0600  the registrar enrolled with (url, CA): renewals go there
//!   renewal.pem        0600  a renewed key and certificate being put in place
//! enroll.json          0600  an enrollment asked for (registrar, claim), until it ends
//! provisioning.json          broker host and port, the Wi-Fi joined, the
//!                            registry's groups; written last
//! ```
//!
//! Every file is written atomically. `provisioning.json` is the commit
//! point: it is written after the identity files and removed before them,
//! so a power cut leaves either the old provisioning or none. The device is
//! provisioned once that file says the network is up (or none was asked).

use super::enroll::{ClaimCode, EnrollResponse};
use super::guard::GuardState;
use super::identity::{CheckedIdentity, DeviceKey, IdentityError};
use super::pop::Pop;
use super::request::{Broker, Enroll, Registrar, Wifi};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provisioned {
    pub broker_host: String,
    pub broker_port: u16,
    /// The Wi-Fi network asked for (its passphrase lives in the network
    /// backend's profile, never here).
    pub wifi_ssid: Option<String>,
    /// False until the device has joined `wifi_ssid`.
    pub network_up: bool,
    pub provisioned_at: u64,
    /// The device's groups as the registry gave them at enrollment: from
    /// then on they replace `[device] groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
}

impl Provisioned {
    /// Done: the API stays locked until `fleetd reset --factory`.
    pub fn complete(&self) -> bool {
        self.network_up || self.wifi_ssid.is_none()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("provision-store: {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("provision-store: {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

pub struct ProvisionStore {
    state_dir: PathBuf,
}

impl ProvisionStore {
    pub fn new(state_dir: &Path) -> Self {
        Self { state_dir: state_dir.to_path_buf() }
    }

    pub fn identity_dir(&self) -> PathBuf {
        self.state_dir.join("identity")
    }

    fn record_path(&self) -> PathBuf {
        self.state_dir.join("provisioning.json")
    }

    pub fn ca_path(&self) -> PathBuf {
        self.identity_dir().join("ca.pem")
    }

    fn ensure_identity_dir(&self) -> Result<PathBuf, StoreError> {
        let dir = self.identity_dir();
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_error(&dir))?;
        Ok(dir)
    }

    /// The device's own key: made once and kept, so its CSR stays the same
    /// across restarts until provisioning uses it.
    pub fn device_key(&self) -> Result<DeviceKey, StoreError> {
        let dir = self.ensure_identity_dir()?;
        let path = dir.join("device-key.pem");
        match std::fs::read_to_string(&path) {
            Ok(pem) => Ok(DeviceKey::from_pem(pem)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = DeviceKey::generate()?;
                fsutil::atomic_write(&path, key.pem().as_bytes(), 0o600).map_err(io_error(&path))?;
                Ok(key)
            }
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    /// Stores a checked identity for `mqtt`; the record is written last.
    pub fn save(
        &self,
        wifi: Option<&Wifi>,
        mqtt: &Broker,
        identity: &CheckedIdentity,
        now: u64,
    ) -> Result<Provisioned, StoreError> {
        let record = Provisioned {
            broker_host: mqtt.host.clone(),
            broker_port: mqtt.port,
            wifi_ssid: wifi.map(|w| w.ssid.clone()),
            network_up: false,
            provisioned_at: now,
            groups: None,
        };
        self.commit(identity, &mqtt.ca_pem, None, record)
    }

    /// Stores what the registrar gave (checked), on a network already up:
    /// provisioning is complete. The registrar is kept for renewals, the
    /// registry's groups with the broker settings; the enrollment asked
    /// for is done.
    pub fn save_enrolled(
        &self,
        answer: &EnrollResponse,
        identity: &CheckedIdentity,
        registrar: &Registrar,
        groups: Vec<String>,
        wifi_ssid: Option<String>,
        now: u64,
    ) -> Result<Provisioned, StoreError> {
        let record = Provisioned {
            broker_host: answer.mqtt.host.clone(),
            broker_port: answer.mqtt.port,
            wifi_ssid,
            network_up: true,
            provisioned_at: now,
            groups: Some(groups),
        };
        let record = self.commit(identity, &answer.mqtt.ca_pem, Some(registrar), record)?;
        self.forget_enroll()?;
        Ok(record)
    }

    fn commit(
        &self,
        identity: &CheckedIdentity,
        ca_pem: &str,
        registrar: Option<&Registrar>,
        record: Provisioned,
    ) -> Result<Provisioned, StoreError> {
        let dir = self.ensure_identity_dir()?;
        // The old record goes first: between here and the new record a
        // power cut leaves an unprovisioned device, never a mix.
        self.remove_record()?;
        for (name, bytes, mode) in [
            ("cert.pem", identity.cert_pem.as_bytes(), 0o600),
            ("key.pem", identity.key_pem.as_bytes(), 0o600),
            ("ca.pem", ca_pem.as_bytes(), 0o644),
        ] {
            let path = dir.join(name);
            fsutil::atomic_write(&path, bytes, mode).map_err(io_error(&path))?;
        }
        let registrar_path = dir.join(REGISTRAR_FILE);
        match registrar {
            Some(r) => {
                let saved = SavedRegistrar { url: r.url.clone(), ca_pem: r.ca_pem.clone() };
                self.write_json(&registrar_path, &saved, 0o600)?;
            }
            None => remove_if_present(&registrar_path)?,
        }
        self.write_record(&record)?;
        Ok(record)
    }

    /// A renewed identity replaces the current one. The new key and
    /// certificate go into `renewal.pem` first, in one atomic write: that
    /// is the commit point. Then each is put in place and the journal
    /// removed; a power cut in between is finished by `finish_renewal`,
    /// which every start runs before the identity is read, so the key and
    /// certificate in use always belong together.
    pub fn save_renewed(&self, identity: &CheckedIdentity) -> Result<(), StoreError> {
        let dir = self.ensure_identity_dir()?;
        let journal = format!("{}\n{}", identity.key_pem.trim_end(), identity.cert_pem);
        let path = dir.join(RENEWAL_FILE);
        fsutil::atomic_write(&path, journal.as_bytes(), 0o600).map_err(io_error(&path))?;
        self.finish_renewal().map(|_| ())
    }

    /// Puts a renewal that was committed (`renewal.pem`) in place; `true`
    /// when there was one.
    pub fn finish_renewal(&self) -> Result<bool, StoreError> {
        let dir = self.identity_dir();
        let path = dir.join(RENEWAL_FILE);
        let journal = match fsutil::read_private_key(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(fsutil::ReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::Corrupt { path, message: e.to_string() }),
        };
        let (key, cert) = split_pem(&journal);
        if key.is_empty() || cert.is_empty() {
            // Cut short before its commit (atomic_write never leaves
            // that): nothing to put in place.
            remove_if_present(&path)?;
            return Ok(false);
        }
        for (name, bytes) in [("key.pem", &key), ("cert.pem", &cert)] {
            let target = dir.join(name);
            fsutil::atomic_write(&target, bytes.as_bytes(), 0o600).map_err(io_error(&target))?;
        }
        remove_if_present(&path)?;
        fsutil::fsync_dir(&dir).map_err(io_error(&dir))?;
        Ok(true)
    }

    /// The current identity's key (the one a renewal is signed with).
    pub fn current_key(&self) -> Result<DeviceKey, StoreError> {
        let path = self.identity_dir().join("key.pem");
        let bytes = fsutil::read_private_key(&path)
            .map_err(|e| StoreError::Corrupt { path: path.clone(), message: e.to_string() })?;
        let pem = String::from_utf8(bytes)
            .map_err(|_| StoreError::Corrupt { path: path.clone(), message: "not PEM".into() })?;
        Ok(DeviceKey::from_pem(pem)?)
    }

    /// The current certificate (PEM, with its chain).
    pub fn current_cert(&self) -> Result<String, StoreError> {
        let path = self.identity_dir().join("cert.pem");
        let bytes = fsutil::read_public_file(&path)
            .map_err(|e| StoreError::Corrupt { path: path.clone(), message: e.to_string() })?;
        String::from_utf8(bytes).map_err(|_| StoreError::Corrupt { path, message: "not PEM".into() })
    }

    /// The registrar the device enrolled with (for renewals).
    pub fn registrar(&self) -> Result<Option<Registrar>, StoreError> {
        let path = self.identity_dir().join(REGISTRAR_FILE);
        let Some(saved) = self.read_json::<SavedRegistrar>(&path)? else { return Ok(None) };
        Registrar::new(&saved.url, saved.ca_pem)
            .map(Some)
            .map_err(|e| StoreError::Corrupt { path, message: e.to_string() })
    }

    /// Stores an enrollment to make (0600: the claim is a secret) before
    /// the phone is answered.
    pub fn save_enroll(&self, wifi: Option<&Wifi>, enroll: &Enroll) -> Result<(), StoreError> {
        let pending = PendingEnroll {
            url: enroll.registrar.url.clone(),
            ca_pem: enroll.registrar.ca_pem.clone(),
            claim: enroll.claim.display_code(),
            wifi_ssid: wifi.map(|w| w.ssid.clone()),
        };
        self.write_json(&self.state_dir.join(ENROLL_FILE), &pending, 0o600)
    }

    /// An enrollment asked for and not ended (a restart came between), and
    /// the Wi-Fi it was to join.
    pub fn pending_enroll(&self) -> Result<Option<(Enroll, Option<String>)>, StoreError> {
        let path = self.state_dir.join(ENROLL_FILE);
        let Some(p) = self.read_json::<PendingEnroll>(&path)? else { return Ok(None) };
        let corrupt = |message: String| StoreError::Corrupt { path: path.clone(), message };
        let registrar = Registrar::new(&p.url, p.ca_pem).map_err(|e| corrupt(e.to_string()))?;
        let claim = ClaimCode::parse(&p.claim).map_err(|_| corrupt("claim-malformed".into()))?;
        Ok(Some((Enroll { registrar, claim }, p.wifi_ssid)))
    }

    /// The enrollment asked for is over (done, or refused: a claim is
    /// single use).
    pub fn forget_enroll(&self) -> Result<(), StoreError> {
        remove_if_present(&self.state_dir.join(ENROLL_FILE))?;
        fsutil::fsync_dir(&self.state_dir).map_err(io_error(&self.state_dir))
    }

    fn write_json<T: Serialize>(&self, path: &Path, value: &T, mode: u32) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| StoreError::Corrupt { path: path.to_path_buf(), message: e.to_string() })?;
        bytes.push(b'\n');
        fsutil::atomic_write(path, &bytes, mode).map_err(io_error(path))
    }

    fn read_json<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, StoreError> {
        let bytes = match fsutil::read_capped(path, SMALL_FILE_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt { path: path.to_path_buf(), message: e.to_string() })
    }

    /// The Wi-Fi was joined: provisioning is complete.
    pub fn network_up(&self) -> Result<Provisioned, StoreError> {
        let mut record = self.load()?.ok_or_else(|| StoreError::Corrupt {
            path: self.record_path(),
            message: "no provisioning to complete".into(),
        })?;
        record.network_up = true;
        self.write_record(&record)?;
        Ok(record)
    }

    fn write_record(&self, record: &Provisioned) -> Result<(), StoreError> {
        let path = self.record_path();
        let mut bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| StoreError::Corrupt { path: path.clone(), message: e.to_string() })?;
        bytes.push(b'\n');
        fsutil::atomic_write(&path, &bytes, 0o644).map_err(io_error(&path))
    }

    /// The record, when there is one and the identity files it needs exist.
    pub fn load(&self) -> Result<Option<Provisioned>, StoreError> {
        let path = self.record_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path)(e)),
        };
        let record: Provisioned = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt { path: path.clone(), message: e.to_string() })?;
        let dir = self.identity_dir();
        let complete = ["cert.pem", "key.pem", "ca.pem"].iter().all(|f| dir.join(f).is_file());
        Ok(complete.then_some(record))
    }

    /// `fleetd reset --factory`: the record first (the device is then
    /// unprovisioned whatever else a power cut leaves), then the identity.
    /// The device's own key is kept: it never left the device.
    pub fn forget(&self) -> Result<bool, StoreError> {
        let had = self.remove_record()?;
        self.forget_enroll()?;
        let dir = self.identity_dir();
        remove_if_present(&self.state_dir.join(RENEWAL_STATUS_FILE))?;
        for name in ["cert.pem", "key.pem", "ca.pem", REGISTRAR_FILE, RENEWAL_FILE] {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        if dir.is_dir() {
            fsutil::fsync_dir(&dir).map_err(io_error(&dir))?;
        }
        Ok(had)
    }

    fn remove_record(&self) -> Result<bool, StoreError> {
        let path = self.record_path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                fsutil::fsync_dir(&self.state_dir).map_err(io_error(&self.state_dir))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(&path)(e)),
        }
    }
}

const REGISTRAR_FILE: &str = "registrar.json";
const ENROLL_FILE: &str = "enroll.json";
const RENEWAL_FILE: &str = "renewal.pem";
/// The records and the identity files are a few KiB.
const SMALL_FILE_BYTES: usize = 256 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedRegistrar {
    url: String,
    ca_pem: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingEnroll {
    url: String,
    ca_pem: Option<String>,
    claim: String,
    wifi_ssid: Option<String>,
}

/// The private key blocks and the certificate blocks of a PEM text.
fn split_pem(text: &str) -> (String, String) {
    let (mut key, mut cert) = (String::new(), String::new());
    let mut current: Option<&mut String> = None;
    for line in text.lines() {
        if line.starts_with("-----BEGIN ") {
            current = if line.contains("PRIVATE KEY") { Some(&mut key) } else { Some(&mut cert) };
        }
        if let Some(out) = current.as_deref_mut() {
            out.push_str(line);
            out.push('\n');
        }
        if line.starts_with("-----END ") {
            current = None;
        }
    }
    (key, cert)
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Where the renewal task leaves its state, for `fleetd status`.
pub const RENEWAL_STATUS_FILE: &str = "renewal.json";

/// The identity's part of the status, and whether renewing stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalStatus {
    #[serde(flatten)]
    pub identity: crate::status::IdentityStatus,
    #[serde(default)]
    pub stopped: bool,
}

/// Written by the renewal task: runtime state, atomic.
pub fn write_renewal_status(state_dir: &Path, status: &RenewalStatus) -> Result<(), StoreError> {
    let path = state_dir.join(RENEWAL_STATUS_FILE);
    let bytes = serde_json::to_vec(status)
        .map_err(|e| StoreError::Corrupt { path: path.clone(), message: e.to_string() })?;
    fsutil::atomic_write(&path, &bytes, 0o644).map_err(io_error(&path))
}

/// The identity's status: what the renewal task last wrote, else the
/// provisioned certificate's expiry (no renewal running). `None` for an
/// identity configured by hand or none at all.
pub fn identity_status(config: &crate::config::Config) -> Option<RenewalStatus> {
    if config.provision.is_none() || config.mqtt.as_ref().is_some_and(|m| m.cert_file.is_some()) {
        return None;
    }
    let store = ProvisionStore::new(&config.device.state_dir);
    let cert = store.current_cert().ok()?;
    let (_, not_after) = super::identity::certificate_validity(&cert)?;
    let written = fsutil::read_capped(&config.device.state_dir.join(RENEWAL_STATUS_FILE), SMALL_FILE_BYTES)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<RenewalStatus>(&bytes).ok())
        // Only about this certificate (not one renewal replaced since).
        .filter(|s| s.identity.not_after == not_after);
    Some(written.unwrap_or(RenewalStatus {
        identity: crate::status::IdentityStatus { not_after, renew_at: None, last_renewal_error: None },
        stopped: false,
    }))
}

/// The registry's groups, when enrollment stored them, replace
/// `[device] groups` (topics, the trust policy, status).
pub fn apply_provisioned_groups(config: &mut crate::config::Config) {
    if config.provision.is_none() {
        return;
    }
    if let Ok(Some(Provisioned { groups: Some(groups), .. })) =
        ProvisionStore::new(&config.device.state_dir).load()
    {
        config.device.groups = groups;
    }
}

/// The portal's guard on disk (`state_dir/portal-guard.json`): the wrong
/// proofs counted, so a restart does not hand out fresh attempts. Written
/// atomically after each wrong proof, before it is answered.
pub struct GuardFile {
    path: PathBuf,
    /// Held while a state is read and written (the server's writers).
    pub writing: std::sync::Mutex<()>,
}

pub const GUARD_FILE: &str = "portal-guard.json";
/// 1,024 sources at ~150 bytes each, with room.
const GUARD_FILE_MAX_BYTES: usize = 512 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedGuard {
    /// The wall clock when saved, to tell how long the portal was down.
    saved_at_unix_ms: u64,
    guard: GuardState,
}

impl GuardFile {
    pub fn new(state_dir: &Path) -> Self {
        Self { path: state_dir.join(GUARD_FILE), writing: std::sync::Mutex::new(()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved guard, and the portal clock to resume at: the saved clock
    /// plus the wall-clock time since, which counts as none if the clock
    /// went back (a lock-out then lasts longer, never shorter).
    pub fn load(&self, unix_now_ms: u64) -> Result<Option<(GuardState, u64)>, StoreError> {
        let bytes = match fsutil::read_capped(&self.path, GUARD_FILE_MAX_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&self.path)(e)),
        };
        let saved: SavedGuard = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt { path: self.path.clone(), message: e.to_string() })?;
        let down_for = unix_now_ms.saturating_sub(saved.saved_at_unix_ms);
        let resume_at = saved.guard.clock_ms.saturating_add(down_for);
        Ok(Some((saved.guard, resume_at)))
    }

    pub fn save(&self, guard: &GuardState, unix_now_ms: u64) -> Result<(), StoreError> {
        let saved = SavedGuard { saved_at_unix_ms: unix_now_ms, guard: guard.clone() };
        let bytes = serde_json::to_vec(&saved)
            .map_err(|e| StoreError::Corrupt { path: self.path.clone(), message: e.to_string() })?;
        fsutil::atomic_write(&self.path, &bytes, 0o600).map_err(io_error(&self.path))
    }
}

/// The proof of possession from `pop_file`: written at manufacturing, or
/// made here on first start (0600).
pub fn load_or_create_pop(path: &Path) -> Result<Pop, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Pop::parse(text.trim())
            .map_err(|e| StoreError::Corrupt { path: path.to_path_buf(), message: e.to_string() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let pop = Pop::generate().map_err(|_| StoreError::Corrupt {
                path: path.to_path_buf(),
                message: "no randomness to make a proof of possession".into(),
            })?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            }
            let line = format!("{}\n", pop.display_code());
            // Never replaced: if another fleetd (`status --pop` beside the
            // daemon) made one first, that one is the device's.
            match fsutil::create_new(path, line.as_bytes(), 0o600) {
                Ok(()) => Ok(pop),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load_or_create_pop(path),
                Err(e) => Err(io_error(path)(e)),
            }
        }
        Err(e) => Err(io_error(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::request::{How, ProvisionRequest};
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A renewal is committed by its journal: a power cut after it (the
    /// journal alone on disk) is finished at the next start, so the key
    /// and certificate in place always belong together.
    #[test]
    fn a_renewal_is_put_in_place_from_its_journal() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProvisionStore::new(dir.path());
        let old = DeviceKey::generate().unwrap();
        let new = DeviceKey::generate().unwrap();
        let id_dir = store.ensure_identity_dir().unwrap();
        fsutil::atomic_write(&id_dir.join("key.pem"), old.pem().as_bytes(), 0o600).unwrap();
        std::fs::write(
            id_dir.join("cert.pem"),
            "-----BEGIN CERTIFICATE-----\nOLD\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let cert = "-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n";
        let identity = CheckedIdentity { cert_pem: cert.into(), key_pem: new.pem().into(), not_after: 0 };
        // The power cut right after the commit: only the journal is written.
        let journal = format!("{}\n{}", new.pem().trim_end(), cert);
        fsutil::atomic_write(&id_dir.join(RENEWAL_FILE), journal.as_bytes(), 0o600).unwrap();
        assert_eq!(store.current_key().unwrap(), old, "not yet in place");
        assert!(store.finish_renewal().unwrap(), "the next start finishes it");
        assert_eq!(store.current_key().unwrap(), new);
        assert_eq!(store.current_cert().unwrap(), cert);
        assert!(!id_dir.join(RENEWAL_FILE).exists());
        assert!(!store.finish_renewal().unwrap(), "once");
        // And the whole of it in one call.
        let newer = DeviceKey::generate().unwrap();
        store.save_renewed(&CheckedIdentity { key_pem: newer.pem().into(), ..identity }).unwrap();
        assert_eq!(store.current_key().unwrap(), newer);
        assert_eq!(mode(&id_dir.join("key.pem")), 0o600);
        assert_eq!(mode(&id_dir.join("cert.pem")), 0o600);
    }

    /// What enrollment stores: the identity, the registrar (for renewals),
    /// the registry's groups, which then replace `[device] groups`; the
    /// pending request (0600) is gone, and a reset forgets it all.
    #[test]
    fn an_enrollment_is_stored_with_its_registrar_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let text = fleetd_fixture::DeviceConfig::default().to_toml() + "\n[provision]\nbackend = \"none\"\n";
        let mut config = crate::config::Config::parse(&text, &dir.path().join("fleetd.toml")).unwrap();
        let store = ProvisionStore::new(&config.device.state_dir);
        let key = store.device_key().unwrap();
        let registrar = Registrar::new("http://127.0.0.1:8443", None).unwrap();
        let enroll = Enroll { registrar: registrar.clone(), claim: ClaimCode::from_bytes([7; 10]) };
        store.save_enroll(None, &enroll).unwrap();
        let pending = config.device.state_dir.join(ENROLL_FILE);
        assert_eq!(mode(&pending), 0o600);
        assert_eq!(store.pending_enroll().unwrap(), Some((enroll, None)));

        let answer = EnrollResponse {
            cert_pem: "-----BEGIN CERTIFICATE-----\nC\n-----END CERTIFICATE-----\n".into(),
            chain_pem: String::new(),
            mqtt: crate::provision::enroll::BrokerSettings {
                host: "broker".into(),
                port: 8884,
                ca_pem: "CA".into(),
            },
            groups: vec!["eu".into()],
        };
        let identity =
            CheckedIdentity { cert_pem: answer.cert_pem.clone(), key_pem: key.pem().into(), not_after: 0 };
        let record = store.save_enrolled(&answer, &identity, &registrar, vec!["eu".into()], None, 9).unwrap();
        assert!(record.complete() && record.broker_port == 8884);
        assert!(!pending.exists(), "the request is done");
        assert_eq!(store.registrar().unwrap(), Some(registrar));
        assert_eq!(config.device.groups, ["pilot"]);
        apply_provisioned_groups(&mut config);
        assert_eq!(config.device.groups, ["eu"], "the registry's groups");

        assert!(store.forget().unwrap());
        assert_eq!(store.registrar().unwrap(), None);
        let mut again = crate::config::Config::parse(&text, &dir.path().join("fleetd.toml")).unwrap();
        apply_provisioned_groups(&mut again);
        assert_eq!(again.device.groups, ["pilot"]);
    }

    #[test]
    fn the_pop_is_made_once_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pop");
        let pop = load_or_create_pop(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(load_or_create_pop(&path).unwrap(), pop);
        std::fs::write(&path, "not a code\n").unwrap();
        assert!(load_or_create_pop(&path).unwrap_err().to_string().contains("pop-malformed"));
    }

    #[test]
    fn the_guard_file_round_trips_and_resumes_its_clock_never_backwards() {
        use crate::provision::guard::{Guard, GuardPolicy};
        let dir = tempfile::tempdir().unwrap();
        let file = GuardFile::new(dir.path());
        assert!(file.load(0).unwrap().is_none());
        let mut guard = Guard::new(GuardPolicy::default());
        let neighbour = crate::admission::Source::of([10, 42, 0, 66].into());
        let _ = guard.failed(neighbour, 500);
        let state = guard.state(1_000);
        file.save(&state, 1_700_000_000_000).unwrap();
        assert_eq!(mode(file.path()), 0o600);
        let (back, resume) = file.load(1_700_000_004_000).unwrap().unwrap();
        assert_eq!((back, resume), (state.clone(), 5_000), "down for 4 s");
        let (_, resume) = file.load(1_600_000_000_000).unwrap().unwrap();
        assert_eq!(resume, 1_000, "a clock that went back counts as no time");
        std::fs::write(file.path(), b"{not json").unwrap();
        assert!(matches!(file.load(0), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn save_network_up_and_forget_keep_the_record_last_in_and_first_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProvisionStore::new(dir.path());
        let own = store.device_key().unwrap();
        assert_eq!(store.device_key().unwrap(), own, "made once");
        assert_eq!(mode(&store.identity_dir().join("device-key.pem")), 0o600);
        assert_eq!(mode(&store.identity_dir()), 0o700);

        let body = serde_json::json!({
            "wifi": {"ssid": "home", "psk": "correct horse"},
            "mqtt": {"host": "broker", "port": 8883, "ca_pem": "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n"},
            "identity": {"cert_pem": "-----BEGIN CERTIFICATE-----\nC\n-----END CERTIFICATE-----\n"},
        });
        let request = ProvisionRequest::parse(body.to_string().as_bytes()).unwrap();
        let How::Identity { mqtt, identity } = &request.how else { panic!("{request:?}") };
        let identity = CheckedIdentity {
            cert_pem: identity.cert_pem.clone(),
            key_pem: own.pem().to_string(),
            not_after: 0,
        };
        let record = store.save(request.wifi.as_ref(), mqtt, &identity, 7).unwrap();
        assert!(!record.complete(), "not until the Wi-Fi is joined");
        assert_eq!(mode(&store.identity_dir().join("key.pem")), 0o600);
        assert_eq!(mode(&store.identity_dir().join("cert.pem")), 0o600);
        let text = std::fs::read_to_string(dir.path().join("provisioning.json")).unwrap();
        assert!(!text.contains("correct horse"), "the passphrase is not stored here");
        assert!(store.network_up().unwrap().complete());
        assert_eq!(store.load().unwrap().unwrap().broker_host, "broker");

        std::fs::remove_file(store.identity_dir().join("key.pem")).unwrap();
        assert_eq!(store.load().unwrap(), None, "a record without its key is no provisioning");
        assert!(store.forget().unwrap());
        assert!(!store.identity_dir().join("cert.pem").exists());
        assert_eq!(store.device_key().unwrap(), own, "the device's own key survives a reset");
        assert!(!store.forget().unwrap());
    }
}
