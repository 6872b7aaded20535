//! The executor's test world: a boot environment and an image source in
//! memory, a device directory with keys and slots, signed messages.

use super::Executor;
use crate::boot::{BootControl, BootError, SlotState};
use crate::config::Config;
use crate::trust::{Envelope, SigningKey};
use crate::update::fetch::{
    Checkpoint, FetchError, FetchHooks, FetchPolicy, FetchStats, ImageRequest, ImageSource, LocalFuture,
};
use crate::update::slot_writer::SlotWriter;
use crate::update::{Report, State, StateStore};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A boot environment in memory: each slot's state and the primary.
#[derive(Default)]
pub(super) struct FakeBoot {
    pub(super) env: Arc<Mutex<BTreeMap<String, SlotState>>>,
    pub(super) primary: Arc<Mutex<Option<String>>>,
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
pub(super) struct MemorySource {
    pub(super) image: Vec<u8>,
    pub(super) fail: Option<String>,
}

impl ImageSource for MemorySource {
    fn fetch_into<'a>(
        &'a self,
        _request: &'a ImageRequest,
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
                (hooks.on_progress)(writer.position(), writer.size(), Default::default());
            }
            let written = writer.sync()?;
            (hooks.on_checkpoint)(Checkpoint { written, transfer: Default::default() })?;
            Ok(FetchStats { received: self.image.len() as u64, attempts: 1, reused: 0 })
        })
    }
}

pub(super) struct World {
    pub(super) dir: tempfile::TempDir,
    pub(super) fleet: SigningKey,
    pub(super) cosigner: SigningKey,
    pub(super) boot: FakeBoot,
    pub(super) image: Vec<u8>,
    pub(super) reports: Arc<Mutex<Vec<Report>>>,
}

impl World {
    pub(super) fn new(health: &str) -> Self {
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

    pub(super) fn config(&self) -> Config {
        Config::load(&self.dir.path().join("fleetd.toml")).unwrap()
    }

    pub(super) fn executor(&self, booted: &str, boot_id: &str, source: MemorySource) -> Executor {
        let config = self.config();
        let (store, state) = StateStore::open(&config.device.state_dir).unwrap();
        let boot = FakeBoot { env: self.boot.env.clone(), primary: self.boot.primary.clone() };
        let mut executor = Executor::new(config, store, state, Box::new(boot), booted.into(), boot_id.into())
            .unwrap()
            .with_source(Box::new(source));
        let reports = self.reports.clone();
        executor.on_report(Box::new(move |r: &Report| reports.lock().unwrap().push(r.clone())));
        executor
    }

    pub(super) fn source(&self) -> MemorySource {
        MemorySource { image: self.image.clone(), fail: None }
    }

    pub(super) fn message(&self) -> Vec<u8> {
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
                sha256: crate::trust::hex(ring::digest::digest(&ring::digest::SHA256, &self.image).as_ref()),
                encoding: Default::default(),
                index: None,
            },
            requires: vec![],
            rollout: None,
        };
        let mut e = Envelope::new(&claims.to_json());
        e.add_signature(&self.fleet, "fleet").unwrap();
        e.add_signature(&self.cosigner, "cosigner").unwrap();
        e.to_json().into_bytes()
    }

    pub(super) fn slot_b(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("slot-b.img")).unwrap()
    }

    pub(super) fn stored(&self) -> State {
        StateStore::read(&self.dir.path().join("state")).unwrap()
    }
}
