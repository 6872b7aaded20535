//! `fleetd demo`: the trust flow on one machine, no root, no setup. Every
//! part is the real one (keys on disk, the co-signer over HTTP on loopback,
//! the device's verifier reading its config); only the addresses are local.

use super::fleetctl::{add_signature, hash_file, keygen, load_public_key, load_signing_key, sign_claims};
use crate::config::Config;
use crate::cosigner::{self, CosignerConfig, Registry};
use crate::store::Store;
use crate::trust::{self, Claims, Image, Target, CLAIMS_TYPE};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

pub fn run() -> ExitCode {
    match demo() {
        Ok(()) => {
            println!("\nDemo finished: every step behaved as it should.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nDemo failed: {e}");
            ExitCode::from(1)
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn demo() -> Result<(), String> {
    let work = tempdir()?;
    let dir = work.path();
    println!(
        "fleetd {} demo — working in a temporary folder, nothing outside it is touched.",
        crate::VERSION
    );

    step(1, "Make the keys: the fleet key, the independent co-signer's key, and fleet server fs1's key.");
    let keys = dir.join("keys");
    for name in ["fleet", "cosigner", "fs1"] {
        let (private, public) = keygen(&keys, name)?;
        println!("    {name}: {} (private, mode 0600) + {}", rel(dir, &private), rel(dir, &public));
    }

    step(2, "Start the co-signer service on loopback and register fleet server fs1 with it.");
    let cosigner_config = CosignerConfig {
        listen: "127.0.0.1:0".into(),
        kid: "cosigner".into(),
        key: keys.join("cosigner.key.pem"),
        state_dir: dir.join("cosigner"),
        projects: vec!["acme-gateways".into()],
        max_validity_s: 86400,
        leeway_s: 60,
        rate_limit_per_minute: 60,
        rate_limit_burst: 10,
    };
    let mut registry = Registry::default();
    registry.register("fs1", &load_public_key(&keys.join("fs1.pub.pem"))?, crate::system_now())?;
    registry.save(&cosigner_config.registry_path())?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .map_err(|e| format!("bind loopback: {e}"))?;
    let url = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
    let app = Arc::new(cosigner::App::new(cosigner_config.clone())?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(cosigner::serve(listener, app, async {
        let _ = stopped.await;
    }));
    println!("    co-signer listening on {url}; fs1 signs as kid \"server:fs1\"");

    step(3, "Set up a device: its config trusts the fleet and co-signer keys, with two file-backed slots.");
    let device_config = write_device(dir)?;
    let config = Config::load(&device_config).map_err(|e| e.to_string())?;
    let policy = config.policy().map_err(|e| e.to_string())?;
    let mut store = Store::open(&config.device.state_dir).map_err(|e| e.to_string())?;
    store.state_mut().installed_version = 7;
    store.save().map_err(|e| e.to_string())?;
    println!("    device gw-0042, project acme-gateways, hardware rpi4-gw, installed version 7");

    step(4, "The fleet server describes an image (size + SHA-256) and signs it with its server key.");
    let image = dir.join("firmware-8.img");
    std::fs::write(&image, vec![0x5au8; 256 * 1024]).map_err(|e| e.to_string())?;
    let (size, sha256) = hash_file(&image)?;
    let now = crate::system_now();
    let claims = Claims {
        typ: CLAIMS_TYPE.into(),
        jti: trust::random_id(),
        iat: now,
        nbf: now,
        exp: now + 3600,
        project: "acme-gateways".into(),
        target: Target { hardware: "rpi4-gw".into(), devices: vec!["gw-0042".into()], groups: vec![] },
        version: 8,
        name: "2026.11-demo".into(),
        image: Image { url: "https://updates.example.com/rpi4-gw/8.img".into(), size, sha256 },
    };
    let server_signed = sign_claims(&claims, &load_signing_key(&keys.join("fs1.key.pem"))?, "server:fs1")?;
    println!("    v8 \"{}\", {size} bytes, sha256 {}…", claims.name, &claims.image.sha256[..16]);

    step(
        5,
        "It asks the co-signer to co-sign over HTTP; the co-signer checks fs1 is registered and not revoked.",
    );
    let cosigned = runtime.block_on(super::fleetctl::request_cosignature(&url, &server_signed, None))?;
    println!(
        "    co-signer answered with its signature; audit log: {}",
        rel(dir, &cosigner_config.audit_path())
    );

    step(6, "The fleet server adds the fleet key's signature. The message now carries both.");
    let mut message = cosigned.clone();
    add_signature(&mut message, &load_signing_key(&keys.join("fleet.key.pem"))?, "fleet")?;
    println!("    signatures by: {}", message.kids().join(" + "));

    step(7, "The device verifies it: both signatures, then every claim.");
    let state = Store::read(&config.device.state_dir).map_err(|e| e.to_string())?;
    let trust_state = state.trust_state();
    let verified = policy
        .verify(message.to_json().as_bytes(), &trust_state, crate::system_now())
        .map_err(|e| format!("the genuine message was refused: {e}"))?;
    println!("    accepted: {} v{}", verified.claims.name, verified.claims.version);

    step(8, "An attacker who stole the fleet server's key signs a message alone. The device refuses it.");
    let mut evil = claims.clone();
    evil.jti = trust::random_id();
    evil.image.url = "https://evil.example/backdoor.img".into();
    let forged = sign_claims(&evil, &load_signing_key(&keys.join("fleet.key.pem"))?, "fleet")?;
    match policy.verify(forged.to_json().as_bytes(), &trust_state, crate::system_now()) {
        Err(e) => println!("    refused: {e}"),
        Ok(_) => return Err("a single-signature message was accepted".into()),
    }

    step(
        9,
        "The fleet operator revokes fs1 at the co-signer; its next request is refused. No device changes.",
    );
    let mut registry = Registry::load(&cosigner_config.registry_path())?;
    registry.revoke("fs1", crate::system_now())?;
    registry.save(&cosigner_config.registry_path())?;
    let again = sign_claims(&evil, &load_signing_key(&keys.join("fs1.key.pem"))?, "server:fs1")?;
    match runtime.block_on(super::fleetctl::request_cosignature(&url, &again, None)) {
        Err(e) => println!("    {e}"),
        Ok(_) => return Err("a revoked server was co-signed".into()),
    }

    let _ = stop.send(());
    let _ = runtime.block_on(server);
    Ok(())
}

fn write_device(dir: &Path) -> Result<std::path::PathBuf, String> {
    for slot in ["slot-a.img", "slot-b.img"] {
        let f = std::fs::File::create(dir.join(slot)).map_err(|e| e.to_string())?;
        f.set_len(4 * 1024 * 1024).map_err(|e| e.to_string())?;
    }
    let path = dir.join("fleetd.toml");
    let text = r#"[device]
id = "gw-0042"
project = "acme-gateways"
hardware = "rpi4-gw"
groups = ["pilot"]
state_dir = "state"

[trust.keys]
fleet = "keys/fleet.pub.pem"
cosigner = "keys/cosigner.pub.pem"

[slots.A]
device = "slot-a.img"
[slots.B]
device = "slot-b.img"

[boot]
backend = "grub"
grubenv = "grubenv"
booted_slot = "A"
"#;
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    Ok(path)
}

fn rel(base: &Path, p: &Path) -> String {
    p.strip_prefix(base).unwrap_or(p).display().to_string()
}

/// A private temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir, String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let p = base.join(format!("fleetd-demo-{}", trust::random_id()));
        if std::fs::DirBuilder::new().mode(0o700).create(&p).is_ok() {
            return Ok(TempDir(p));
        }
    }
    Err(format!("cannot create a directory in {}", base.display()))
}
