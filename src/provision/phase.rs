//! The provisioning phase of `fleetd run`: scan, raise the access point,
//! serve the portal, store what a phone sends, hand over to the Wi-Fi. It
//! ends when the device is provisioned; a failed join brings the access
//! point back with the reason shown at `/api/v1/info`.

use super::enroll::{EnrollRequest, EnrollmentKey};
use super::guard::{Guard, GuardPolicy};
use super::identity::DeviceKey;
use super::pop::Pop;
use super::portal::{Facts, Plan, Portal, Progress};
use super::registrar::{self, EnrollFailure};
use super::request::Enroll;
use super::server::{self, Accepted, Clock, SharedPortal, ToPhase};
use super::store::{load_or_create_pop, GuardFile, ProvisionStore, Provisioned, StoreError};
use crate::config::Config;
use crate::net::{AccessPoint, Backend, NetError};
pub use crate::status::NetworkStatus;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("portal-listen: {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("ap-timeout: nobody provisioned the device within {0} s; the access point is down until fleetd restarts")]
    Timeout(u64),
    #[error("registrar-config: {0}")]
    Registrar(String),
}

/// What `fleetd status` shows while the daemon provisions
/// (`state_dir/provision-status.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseStatus {
    pub state: String,
    pub last_error: Option<String>,
    pub network: NetworkStatus,
}

pub const STATUS_FILE: &str = "provision-status.json";

/// The phone reads the answer to its request before the access point goes.
const HANDOVER_GRACE: Duration = Duration::from_secs(2);
/// How often to look again whether a known network is still up.
const KNOWN_NETWORK_RECHECK: Duration = Duration::from_secs(10);

use crate::logging::log;

struct Phase<'a> {
    config: &'a Config,
    store: ProvisionStore,
    backend: Backend,
    ap: AccessPoint,
    on_status: &'a (dyn Fn() + Sync),
}

/// Runs provisioning to its end: the record of a complete provisioning.
/// `clock_floor`: the device's lowest trusted time, for certificate validity.
/// `on_status` is called after each change of the status file (the D-Bus
/// API shows it live).
pub async fn run(
    config: &Config,
    backend: Backend,
    clock_floor: u64,
    on_status: &(dyn Fn() + Sync),
) -> Result<Provisioned, PhaseError> {
    let Some(settings) = config.provision.as_ref() else {
        return Err(PhaseError::Net(NetError::Backend("no [provision] section".into())));
    };
    let store = ProvisionStore::new(&config.device.state_dir);
    let pop = load_or_create_pop(&config.pop_file())?;
    let device_key = store.device_key()?;
    let image_registrar = registrar::from_config(config).map_err(PhaseError::Registrar)?;
    let floor = clock_floor.max(crate::build_epoch());
    let ap = AccessPoint {
        interface: settings.interface.clone(),
        ssid: settings.ap_ssid(&config.device.id),
        passphrase: pop.ap_passphrase(&config.device.id),
    };
    let mut phase = Phase { config, store, backend, ap, on_status };
    phase.write_status("unprovisioned", None, "none", None, None);

    // Never raise an access point over a network the device already uses:
    // with an explicit `listen` the portal is served on it instead; with
    // "auto" provisioning waits for that network to go.
    let mut known_network = phase.backend.known_network_active().await?;
    // Stopped (power cut, SIGTERM) between joining the Wi-Fi and recording
    // it: the network the phone handed over is up, so provisioning is done.
    if let Some(record) = phase.store.load()? {
        if known_network && record.wifi_ssid.is_some() && !record.network_up {
            let record = phase.store.network_up()?;
            log("provisioning: the Wi-Fi provisioning joined is up; provisioned");
            phase.write_status("idle", None, "station", record.wifi_ssid.clone(), None);
            return Ok(record);
        }
    }
    // An enrollment a restart cut short: made again when its network is
    // up (the registrar refuses a claim already used), else forgotten.
    let mut resumed_error = None;
    match phase.store.pending_enroll() {
        Ok(Some((enroll, ssid))) => {
            if known_network || ssid.is_none() {
                log("provisioning: resuming the enrollment a restart interrupted");
                match phase.enroll(&enroll, ssid.clone(), &pop, &device_key, floor).await {
                    Ok(record) => {
                        phase.write_status(
                            "idle",
                            None,
                            if ssid.is_some() { "station" } else { "wired" },
                            ssid,
                            None,
                        );
                        return Ok(record);
                    }
                    Err(e) => {
                        log(&format!("provisioning: enrollment: {e}"));
                        resumed_error = Some(e.to_string());
                    }
                }
            }
            phase.store.forget_enroll()?;
        }
        Ok(None) => {}
        Err(e) => {
            log(&format!("provisioning: {e}; forgetting it"));
            phase.store.forget_enroll()?;
        }
    }
    if known_network && settings.listen_addr().is_none() {
        log("provisioning: a known network is up; no access point over it (set provision.listen to serve the portal on it)");
        while phase.backend.known_network_active().await? {
            tokio::time::sleep(KNOWN_NETWORK_RECHECK).await;
        }
        known_network = false;
    } else if known_network {
        log("provisioning: a known network is up; serving the portal on it, no access point");
    }
    let networks = match phase.backend.scan().await {
        Ok(n) => n,
        Err(e) => {
            log(&format!("provisioning: scan: {e}"));
            Vec::new()
        }
    };
    let ap_address = if known_network { None } else { phase.backend.start_ap(&phase.ap).await? };
    let listen = match (settings.listen_addr(), ap_address) {
        (Some(addr), _) => addr,
        (None, Some(ip)) => SocketAddr::new(ip, 80),
        (None, None) => {
            return Err(PhaseError::Net(NetError::Backend(
                "provision.listen = \"auto\" needs an access point; backend none needs an ADDR:PORT".into(),
            )))
        }
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| PhaseError::Listen { addr: listen, source })?;
    let listen = listener.local_addr().unwrap_or(listen);
    let portal_url =
        if listen.port() == 80 { format!("http://{}/", listen.ip()) } else { format!("http://{listen}/") };
    let progress = Progress { state: "provisioning".into(), provisioned: false, last_error: resumed_error };
    let facts = Facts {
        device_id: config.device.id.clone(),
        hardware: config.device.hardware.clone(),
        portal_url: portal_url.clone(),
        addresses: [Some(listen.ip()), ap_address]
            .into_iter()
            .flatten()
            .filter(|a| !a.is_unspecified())
            .collect(),
        joins_wifi: phase.backend.joins_wifi(),
        registrar: image_registrar,
    };
    // Wrong proofs counted before a restart still count.
    let guard_file = Arc::new(GuardFile::new(&config.device.state_dir));
    let (guard, clock_ms) = match guard_file.load(crate::system_now_ms()) {
        Ok(Some((state, resume_at))) => (Guard::restore(GuardPolicy::default(), &state), resume_at),
        Ok(None) => (Guard::new(GuardPolicy::default()), 0),
        Err(e) => {
            log(&format!("provisioning: {e}; counting wrong proofs afresh"));
            (Guard::new(GuardPolicy::default()), 0)
        }
    };
    let mut nonce_secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce_secret).map_err(|_| {
        PhaseError::Net(NetError::Backend("the system has no randomness for the portal's nonces".into()))
    })?;
    let mut portal = Portal::new(facts, &pop, device_key.clone(), progress, nonce_secret, guard);
    portal.set_networks(networks);
    let portal: SharedPortal = Arc::new(Mutex::new(portal));
    let (accepted_tx, mut accepted) = mpsc::channel::<ToPhase>(1);
    let clock = Clock::resume(floor, clock_ms);
    let persist = server::Persist { guard: guard_file };
    let server = tokio::spawn(server::serve(listener, portal.clone(), accepted_tx, clock, log, persist));
    let _server = AbortOnDrop(server);
    let mode = match (ap_address, known_network) {
        (Some(_), _) => "access-point",
        (None, true) => "station",
        (None, false) => "wired",
    };
    let ap_ssid = ap_address.map(|_| phase.ap.ssid.clone());
    let at =
        PortalAt { ap_up: ap_address.is_some(), mode, ap_ssid: ap_ssid.clone(), url: portal_url.clone() };
    phase.write_status("provisioning", at_error(&portal), mode, ap_ssid.clone(), Some(portal_url.clone()));
    crate::sys::notify::status(&format!("provisioning: portal at {portal_url}"));
    log(&format!(
        "provisioning: portal at {portal_url}{}",
        ap_ssid.as_ref().map(|s| format!(" on access point {s:?}")).unwrap_or_default()
    ));

    let timeout = settings.ap_timeout_s;
    let deadline = async {
        if timeout == 0 {
            std::future::pending::<()>().await
        } else {
            tokio::time::sleep(Duration::from_secs(timeout)).await
        }
    };
    tokio::pin!(deadline);
    loop {
        let item = tokio::select! {
            item = accepted.recv() => item,
            _ = &mut deadline => {
                let _ = phase.backend.stop_ap().await;
                let e = PhaseError::Timeout(timeout);
                phase.write_status("unprovisioned", Some(e.to_string()), "none", None, None);
                return Err(e);
            }
        };
        let Accepted { wifi, plan, answer } = match item {
            Some(ToPhase::Provision(accepted)) => *accepted,
            Some(ToPhase::Rescan) => {
                tokio::time::sleep(HANDOVER_GRACE).await;
                if ap_address.is_some() {
                    if let Err(e) = phase.backend.stop_ap().await {
                        log(&format!("provisioning: rescan: {e}"));
                    }
                }
                match phase.backend.scan().await {
                    Ok(networks) => lock(&portal).set_networks(networks),
                    Err(e) => log(&format!("provisioning: rescan: {e}")),
                }
                if ap_address.is_some() {
                    phase.raise_ap_again().await?;
                }
                log("provisioning: rescanned");
                continue;
            }
            None => return Err(PhaseError::Net(NetError::Backend("the portal stopped".into()))),
        };
        let (record, enroll) = match plan {
            Plan::Identity { mqtt, identity } => {
                match phase.store.save(wifi.as_ref(), &mqtt, &identity, crate::system_now()) {
                    Ok(record) => (Some(record), None),
                    Err(e) => {
                        log(&format!("provisioning: {e}"));
                        let _ = answer.send(lock(&portal).store_failed(&e.to_string()));
                        continue;
                    }
                }
            }
            // Stored before the answer, so a restart resumes it.
            Plan::Enroll(enroll) => match phase.store.save_enroll(wifi.as_ref(), &enroll) {
                Ok(()) => (None, Some(enroll)),
                Err(e) => {
                    log(&format!("provisioning: {e}"));
                    let _ = answer.send(lock(&portal).store_failed(&e.to_string()));
                    continue;
                }
            },
        };
        let ssid = wifi.as_ref().map(|w| w.ssid.clone());
        match (&wifi, record) {
            (None, Some(record)) => {
                set_progress(&portal, "idle", true, None);
                let _ = answer.send(lock(&portal).stored(None, false));
                log(&format!(
                    "provisioning: provisioned for broker {}:{}",
                    record.broker_host, record.broker_port
                ));
                phase.write_status("idle", None, mode, None, None);
                tokio::time::sleep(HANDOVER_GRACE).await;
                return Ok(record);
            }
            (None, None) => {
                set_progress(&portal, "enrolling", false, None);
                let _ = answer.send(lock(&portal).stored(None, true));
                log("provisioning: stored; enrolling with the registrar");
            }
            (Some(wifi), _) => {
                set_progress(&portal, "joining", false, None);
                let _ = answer.send(lock(&portal).stored(Some(&wifi.ssid), enroll.is_some()));
                log(&format!("provisioning: stored; joining {:?}", wifi.ssid));
                tokio::time::sleep(HANDOVER_GRACE).await;
                phase.write_status("provisioning", None, "joining", Some(wifi.ssid.clone()), None);
                let _ = phase.backend.stop_ap().await;
                if let Err(e) = phase.backend.join(&wifi.ssid, &wifi.psk).await {
                    log(&format!("provisioning: {e}; raising the access point again"));
                    if enroll.is_some() {
                        phase.store.forget_enroll()?;
                    }
                    phase.back_to_portal(&portal, &at, e.to_string()).await?;
                    continue;
                }
                if enroll.is_none() {
                    let record = phase.store.network_up()?;
                    set_progress(&portal, "idle", true, None);
                    log(&format!("provisioning: joined {:?}; provisioned", wifi.ssid));
                    phase.write_status("idle", None, "station", Some(wifi.ssid.clone()), None);
                    return Ok(record);
                }
                log(&format!("provisioning: joined {:?}; enrolling with the registrar", wifi.ssid));
            }
        }
        let Some(enroll) = enroll else { continue };
        let on = if ssid.is_some() { "station" } else { mode };
        let portal_shown = ssid.is_none().then(|| portal_url.clone());
        phase.write_status("provisioning", None, on, ssid.clone(), portal_shown);
        match phase.enroll(&enroll, ssid.clone(), &pop, &device_key, floor).await {
            Ok(record) => {
                set_progress(&portal, "idle", true, None);
                log(&format!(
                    "provisioning: enrolled; provisioned for broker {}:{}",
                    record.broker_host, record.broker_port
                ));
                phase.write_status("idle", None, on, ssid, None);
                if record.wifi_ssid.is_none() {
                    // The phone reads the outcome at /api/v1/info.
                    tokio::time::sleep(HANDOVER_GRACE).await;
                }
                return Ok(record);
            }
            Err(e) => {
                log(&format!("provisioning: enrollment: {e}; back to the portal"));
                phase.store.forget_enroll()?;
                phase.back_to_portal(&portal, &at, e.to_string()).await?;
            }
        }
    }
}

/// Where the portal is served, to show it again after a failure.
struct PortalAt {
    ap_up: bool,
    mode: &'static str,
    ap_ssid: Option<String>,
    url: String,
}

fn at_error(portal: &SharedPortal) -> Option<String> {
    lock(portal).progress().last_error.clone()
}

/// Tries to bring the access point back this many times before the phase
/// gives up (and the daemon exits, for systemd to restart it).
const AP_RETRIES: u32 = 3;
const AP_RETRY_WAIT: Duration = Duration::from_secs(5);

impl Phase<'_> {
    /// A failed join or enrollment: the access point again (if there was
    /// one), and the reason at `/api/v1/info` and in the status.
    async fn back_to_portal(
        &mut self,
        portal: &SharedPortal,
        at: &PortalAt,
        reason: String,
    ) -> Result<(), PhaseError> {
        if at.ap_up {
            self.raise_ap_again().await?;
        }
        set_progress(portal, "provisioning", false, Some(reason.clone()));
        self.write_status("provisioning", Some(reason), at.mode, at.ap_ssid.clone(), Some(at.url.clone()));
        Ok(())
    }

    /// Enrolls with the registrar: a CSR for the device's own key, bound to
    /// the claim by the enrollment key (from the PoP); the answer checked
    /// as an identity, then stored with the registry's groups.
    async fn enroll(
        &self,
        enroll: &Enroll,
        wifi_ssid: Option<String>,
        pop: &Pop,
        device_key: &DeviceKey,
        floor: u64,
    ) -> Result<Provisioned, EnrollFailure> {
        let id = &self.config.device.id;
        let csr_pem = device_key.csr_pem(id)?;
        let mac = EnrollmentKey::derive(pop, id).mac(&enroll.claim, &csr_pem);
        let body = EnrollRequest { claim: enroll.claim.display_code(), csr_pem, mac: Some(mac) };
        log(&format!("provisioning: enrolling with {}", enroll.registrar.url));
        let answer = registrar::enroll(&enroll.registrar, &body, log).await?;
        let now = crate::system_now().max(floor);
        let identity = registrar::check_answer(id, &answer, device_key, now)?;
        let groups = registrar::groups(&answer, log);
        Ok(self.store.save_enrolled(&answer, &identity, &enroll.registrar, groups, wifi_ssid, now)?)
    }

    /// After a rescan or a failed join: without the access point nobody can
    /// reach the portal, so retry a few times, then fail the phase.
    async fn raise_ap_again(&mut self) -> Result<(), PhaseError> {
        let mut attempt = 1;
        loop {
            match self.backend.start_ap(&self.ap).await {
                Ok(_) => return Ok(()),
                Err(e) if attempt < AP_RETRIES => {
                    log(&format!("provisioning: raising the access point again: {e}; retrying"));
                    attempt += 1;
                    tokio::time::sleep(AP_RETRY_WAIT).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn write_status(
        &self,
        state: &str,
        last_error: Option<String>,
        mode: &str,
        ssid: Option<String>,
        portal: Option<String>,
    ) {
        let status = PhaseStatus {
            state: state.into(),
            last_error,
            network: NetworkStatus { mode: mode.into(), ssid, portal },
        };
        let path = self.config.device.state_dir.join(STATUS_FILE);
        let bytes = serde_json::to_vec_pretty(&status).unwrap_or_default();
        if let Err(e) = crate::fsutil::atomic_write(&path, &bytes, 0o644) {
            log(&format!("provisioning: {}: {e}", path.display()));
        }
        (self.on_status)();
    }
}

/// What provisioning left, for the status document. Without a
/// `[provision]` section the device is configured by hand: provisioned.
pub fn facts(config: &Config) -> crate::status::Provisioning {
    let phase = read_status(&config.device.state_dir);
    if config.provision.is_none() {
        return crate::status::Provisioning { provisioned: true, ..Default::default() };
    }
    let store = ProvisionStore::new(&config.device.state_dir);
    let provisioned = matches!(store.load(), Ok(Some(record)) if record.complete());
    let mut facts = crate::status::Provisioning {
        provisioned,
        network: phase.as_ref().map(|p| p.network.clone()),
        ..Default::default()
    };
    if !provisioned {
        facts.state = Some(match &phase {
            Some(p) if p.state == "provisioning" => "provisioning".into(),
            _ => "unprovisioned".into(),
        });
        facts.last_error = phase.and_then(|p| p.last_error);
    }
    facts
}

/// The phase's last status, if the daemon wrote one.
pub fn read_status(state_dir: &std::path::Path) -> Option<PhaseStatus> {
    let bytes = std::fs::read(state_dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn lock(portal: &SharedPortal) -> std::sync::MutexGuard<'_, Portal> {
    portal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn set_progress(portal: &SharedPortal, state: &str, provisioned: bool, last_error: Option<String>) {
    lock(portal).set_progress(Progress { state: state.into(), provisioned, last_error });
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
