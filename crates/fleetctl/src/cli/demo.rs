//! `fleetd demo`: the whole update flow on one machine — no root, no setup,
//! a few seconds. The parts are the real ones: keys on disk, the co-signer
//! over HTTP, the daemon (`daemon::run_until`) with its MQTT client, update
//! driver and GRUB backend, and the fleet side's `fleet::publish` and
//! `fleet::watch`. Only the surroundings are stand-ins: an embedded MQTT
//! broker and image server on loopback, file-backed slots, and the demo
//! itself playing GRUB at each power-on.

use super::CliError;
use super::{add_signature, keygen, load_public_key, load_signing_key, sign_claims};
use crate::cosigner::{self, CosignerConfig, Registry};
use crate::publish::{self, FleetConnection};
use fleetd::boot::grub::{self, GrubEnv};
use fleetd::config::Config;
use fleetd::mqtt::Topics;
use fleetd::trust::{self, Claims, Envelope, Image, Target, CLAIMS_TYPE};
use fleetd::update::StateStore as Store;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

const PROJECT: &str = "acme-gateways";
const DEVICE: &str = "gw-0042";
const SLOTS: [&str; 2] = ["A", "B"];
const IMAGE_BYTES: usize = 4 << 20;
/// The image server sends a chunk this often (200 KB/s), so v8's .zst
/// (half a MiB) takes about 2.5 s and a few progress reports (at most one
/// a second) show.
const CHUNK: usize = 16 << 10;
const PACE: Duration = Duration::from_millis(80);
/// The longest any one step may take before the demo gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

pub fn run() -> ExitCode {
    let started = Instant::now();
    let result = (|| {
        let work = tempdir()?;
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(demo_error)?;
        runtime.block_on(demo(work.path()))
    })();
    match result {
        Ok(()) => {
            println!(
                "\nDemo finished in {:.1} s: v8 was co-signed, delivered over MQTT, installed into slot B and \
                 committed after a reboot; v9 went adaptive, fetching only what the slots lacked; a forged and \
                 a replayed message were refused; the revoked server was stopped at the co-signer.",
                started.elapsed().as_secs_f64()
            );
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

async fn demo(dir: &Path) -> Result<(), CliError> {
    println!(
        "fleetd {} demo — working in a temporary folder, nothing outside it is touched.\n\
         The narration is on stdout; the device's own log lines go to stderr.",
        fleetd::VERSION
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
        projects: vec![PROJECT.into()],
        max_validity_s: 86400,
        leeway_s: 60,
        rate_limit_per_minute: 60,
        rate_limit_burst: 10,
        peer_rate_limit_per_minute: 120,
        peer_rate_limit_burst: 20,
        // The demo's image server is plain HTTP on loopback.
        allow_http: true,
        max_version: crate::cosigner::DEFAULT_MAX_VERSION,
    };
    let mut registry = Registry::default();
    registry.register("fs1", &load_public_key(&keys.join("fs1.pub.pem"))?, fleetd::system_now(), false)?;
    registry.save(&cosigner_config.registry_path())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| demo_failed(format!("bind loopback: {e}")))?;
    let cosigner_url = format!("http://{}", listener.local_addr().map_err(demo_error)?);
    let app = Arc::new(cosigner::App::new(cosigner_config.clone())?);
    tokio::spawn(cosigner::serve(listener, app, std::future::pending()));
    println!("    co-signer listening on {cosigner_url}; fs1 signs as kid \"server:fs1\"");

    step(
        3,
        "Pack firmware v8 and v9 (zstd frames and a block index); start an MQTT broker and an image server.",
    );
    let broker =
        fleetd_fixture::broker::start().await.map_err(|e| demo_failed(format!("demo broker: {e}")))?;
    let images = dir.join("images");
    let v8: Vec<u8> = (0..IMAGE_BYTES).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    // v9 changes 1 % of v8's 4 KiB blocks, in two runs.
    let mut v9 = v8.clone();
    for start in [IMAGE_BYTES / 5, IMAGE_BYTES * 3 / 4] {
        fleetd_fixture::images::random_fill(&mut v9[start..start + 5 * 4096], start as u64);
    }
    let mut served = std::collections::HashMap::new();
    let mut packed = Vec::new();
    for (version, bytes) in [(8, &v8), (9, &v9)] {
        let image = dir.join(format!("firmware-{version}.img"));
        std::fs::write(&image, bytes).map_err(demo_error)?;
        let p = crate::image::pack(
            &image,
            &images,
            crate::image::DEFAULT_FRAME_SIZE,
            crate::image::DEFAULT_LEVEL,
        )?;
        for file in [&p.zst, &p.index] {
            let name = format!("/{}", file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
            served.insert(name, Arc::new(std::fs::read(file).map_err(demo_error)?));
        }
        println!(
            "    v{version}: {} bytes → {} ({} bytes) + {} ({} bytes)",
            p.size,
            rel(dir, &p.zst),
            p.zst_size,
            rel(dir, &p.index),
            p.index_size
        );
        packed.push(p);
    }
    let image_base =
        image_server(Arc::new(served)).await.map_err(|e| demo_failed(format!("image server: {e}")))?;
    println!(
        "    MQTT broker on {broker} (a small built-in one: plain TCP; real devices require mutual TLS)"
    );
    println!("    image server on {image_base}, serving both with single-range requests");
    let (mut fleet, watcher) = Fleet::watch(broker.port());

    step(4, "Set up device gw-0042: two file-backed slots A and B, a GRUB boot environment, its config.");
    let config_path = write_device(dir, broker.port(), "A")?;
    let config = Config::load(&config_path)?;
    let grubenv = dir.join("grubenv");
    GrubEnv::initialize(&grubenv, &SLOTS.map(String::from))?;
    let (store, mut state) = Store::open(&config.device.state_dir)?;
    state.installed_version = 7;
    state.slot_versions.insert("A".into(), 7);
    store.save(&state)?;
    drop(store);
    println!("    project {PROJECT}, hardware rpi4-gw, slot A holds version 7; it trusts the fleet and co-signer keys");
    println!("    grubenv: {}", grubenv_line(&grubenv)?);

    step(5, "Power the device on: GRUB picks a slot, then the fleetd daemon starts and connects.");
    let booted = grub_power_on(&grubenv)?;
    new_boot_id(dir)?;
    println!("    GRUB boots slot {booted} (grubenv now: {})", grubenv_line(&grubenv)?);
    let mut daemon = Daemon::start(config)?;
    fleet
        .wait_for("the device's first status", |kind, v| {
            Ok((kind == "status" && v["booted_slot"] == "A" && v["state"] == "idle").then_some(()))
        })
        .await?;
    println!("    grubenv: {} (the daemon confirmed the running slot)", grubenv_line(&grubenv)?);

    step(6, "The fleet server describes image v8 (URL, size, SHA-256, zstd) and signs it with its key fs1.");
    let (size, sha256) = (packed[0].size, packed[0].sha256.clone());
    let now = fleetd::system_now();
    let claims = Claims {
        typ: CLAIMS_TYPE.into(),
        jti: trust::random_id(),
        iat: now,
        nbf: now,
        exp: now + 3600,
        project: PROJECT.into(),
        target: Target { hardware: "rpi4-gw".into(), devices: vec![DEVICE.into()], groups: vec![] },
        version: 8,
        name: "2026.11-demo".into(),
        image: Image {
            url: format!("{image_base}/firmware-8.zst"),
            size,
            sha256,
            encoding: trust::Encoding::Zstd,
            index: None,
        },
        requires: vec![],
        rollout: None,
    };
    let server_signed = sign_claims(&claims, &load_signing_key(&keys.join("fs1.key.pem"))?, "server:fs1")?;
    println!("    v8 \"{}\", {size} bytes, sha256 {}…", claims.name, &claims.image.sha256[..16]);

    step(
        7,
        "It asks the co-signer to co-sign over HTTP; the co-signer checks fs1 is registered and not revoked.",
    );
    let cosigned = super::request_cosignature(&cosigner_url, &server_signed, None).await?;
    println!(
        "    the co-signer answered with its signature; audit log: {}",
        rel(dir, &cosigner_config.audit_path())
    );

    step(8, "The fleet server adds the fleet key's signature: the message now carries both it and the co-signer's.");
    let mut message = cosigned;
    add_signature(&mut message, &load_signing_key(&keys.join("fleet.key.pem"))?, "fleet")?;
    println!("    signatures by: {}; requires: {}", message.kids().join(" + "), requires(&message));

    step(9, "Publish it to the device's MQTT topic and follow what the device reports.");
    let topic = Topics::update_for_device(PROJECT, DEVICE);
    publish(broker.port(), &topic, &message).await?;
    println!("    published to {topic}");
    let mut accepted = false;
    fleet
        .wait_for("reboot-pending", |kind, v| {
            let ours = v["job"]["jti"] == claims.jti.as_str();
            if kind == "status" && ours && !accepted {
                accepted = true;
                println!(
                    "    => accepted: {} v{} (both signatures and every claim checked)",
                    claims.name, claims.version
                );
            }
            if kind == "status" && !ours && v["last_error"].is_string() {
                return Err(demo_failed(format!("the device refused the update: {}", v["last_error"])));
            }
            job_progress(kind, v, &claims.jti, "reboot-pending")
        })
        .await?;
    println!("    => slot B is written, verified and set to be tried once at the next boot");

    step(
        10,
        "Reboot: the daemon stops, GRUB boots the new slot once, the daemon starts and checks its health.",
    );
    daemon.stop().await?;
    fleet
        .wait_for("the device to go offline", |kind, v| Ok((kind == "online" && *v == false).then_some(())))
        .await?;
    let booted = grub_power_on(&grubenv)?;
    if booted != "B" {
        return Err(demo_failed(format!("GRUB booted slot {booted}, not the new slot B")));
    }
    new_boot_id(dir)?;
    println!("    GRUB boots slot B (grubenv now: {})", grubenv_line(&grubenv)?);
    let config_path = write_device(dir, broker.port(), "B")?;
    let mut daemon = Daemon::start(Config::load(&config_path)?)?;
    let status = fleet
        .wait_for("the commit of v8", |kind, v| {
            let done = v["booted_slot"] == "B" && v["installed_version"] == 8;
            Ok(job_progress(kind, v, &claims.jti, "committed")?.filter(|_| done).map(|_| v.clone()))
        })
        .await?;
    println!(
        "    => committed v8; booted B: {} (zstd, the whole image).",
        transfer_line(&status["job"], size)
    );
    println!("    The retained status the fleet now sees:");
    print_status(&status);
    println!("    grubenv: {} (B is confirmed: GRUB keeps booting it)", grubenv_line(&grubenv)?);

    step(
        11,
        "v9 changes 1 % of the image. Its message adds the block index: the device fetches only what its slots lack.",
    );
    let mut v9_claims = claims.clone();
    v9_claims.jti = trust::random_id();
    v9_claims.version = 9;
    v9_claims.name = "2026.12-demo".into();
    v9_claims.image = Image {
        url: format!("{image_base}/firmware-9.zst"),
        size: packed[1].size,
        sha256: packed[1].sha256.clone(),
        encoding: trust::Encoding::Zstd,
        index: Some(trust::IndexRef {
            url: format!("{image_base}/firmware-9.index"),
            size: packed[1].index_size,
            sha256: packed[1].index_sha256.clone(),
        }),
    };
    let signed = sign_claims(&v9_claims, &load_signing_key(&keys.join("fs1.key.pem"))?, "server:fs1")?;
    let mut v9_message = super::request_cosignature(&cosigner_url, &signed, None).await?;
    add_signature(&mut v9_message, &load_signing_key(&keys.join("fleet.key.pem"))?, "fleet")?;
    println!("    co-signed and signed as before; requires: {}", requires(&v9_message));
    publish(broker.port(), &topic, &v9_message).await?;
    let status = fleet
        .wait_for("v9 reboot-pending", |kind, v| {
            Ok(job_progress(kind, v, &v9_claims.jti, "reboot-pending")?.map(|_| v.clone()))
        })
        .await?;
    println!("    => slot A is written and verified: {}", transfer_line(&status["job"], packed[1].size));
    if status["job"]["bytes_fetched"].as_u64().unwrap_or(u64::MAX) >= packed[1].zst_size {
        return Err(demo_failed("the adaptive install fetched as much as the whole .zst".into()));
    }
    daemon.stop().await?;
    let booted = grub_power_on(&grubenv)?;
    new_boot_id(dir)?;
    let config_path = write_device(dir, broker.port(), &booted)?;
    let mut daemon = Daemon::start(Config::load(&config_path)?)?;
    fleet
        .wait_for("the commit of v9", |kind, v| {
            let done = v["booted_slot"] == "A" && v["installed_version"] == 9;
            Ok(job_progress(kind, v, &v9_claims.jti, "committed")?.filter(|_| done))
        })
        .await?;
    println!("    => committed v9; booted A");

    step(
        12,
        "An attacker who stole the fleet key signs a message alone and publishes it. The device refuses it.",
    );
    let mut evil = claims.clone();
    evil.jti = trust::random_id();
    evil.version = 10;
    evil.image.url = "http://evil.example/backdoor.img".into();
    let forged = sign_claims(&evil, &load_signing_key(&keys.join("fleet.key.pem"))?, "fleet")?;
    publish(broker.port(), &topic, &forged).await?;
    let error = fleet
        .wait_for("the refusal of the forged message", |kind, v| {
            if kind == "status" && (v["job"]["jti"] == evil.jti.as_str() || v["installed_version"] != 9) {
                return Err(demo_failed("the device accepted a message with a single signature".into()));
            }
            // Every refusal is reported to the fleet on the progress topic.
            let refused = kind == "progress" && v["step"] == "refused";
            Ok(v["detail"].as_str().filter(|_| refused).map(str::to_string))
        })
        .await?;
    if !error.starts_with("signature-missing") {
        return Err(demo_failed(format!(
            "the forged message was refused, but for the wrong reason: {error}"
        )));
    }
    println!("    => refused: {error}");

    step(13, "Someone replays the genuine v8 message. The device recognises it and does not run it again.");
    publish(broker.port(), &topic, &message).await?;
    let detail = fleet
        .wait_for("the replay to be recognised", |kind, v| {
            if kind == "status" && (v["installed_version"] != 9 || v["state"] != "committed") {
                return Err(demo_failed(format!("the replay changed the device's state: {v}")));
            }
            let duplicate = kind == "progress" && v["step"] == "duplicate" && v["jti"] == claims.jti.as_str();
            Ok(duplicate.then(|| v["detail"].as_str().unwrap_or("").to_string()))
        })
        .await?;
    println!("    => refused as a duplicate: {detail}");
    daemon.stop().await?;
    watcher.abort();

    step(
        14,
        "The fleet operator revokes fs1 at the co-signer; its next request is refused. No device changes.",
    );
    let mut registry = Registry::load(&cosigner_config.registry_path())?;
    registry.revoke("fs1", fleetd::system_now())?;
    registry.save(&cosigner_config.registry_path())?;
    let again = sign_claims(&evil, &load_signing_key(&keys.join("fs1.key.pem"))?, "server:fs1")?;
    match super::request_cosignature(&cosigner_url, &again, None).await {
        Err(e) if e.to_string().contains("(403)") => println!("    => {e}"),
        Err(e) => return Err(demo_failed(format!("the revoked server was refused, but not with 403: {e}"))),
        Ok(_) => return Err(demo_failed("a revoked server was co-signed".into())),
    }
    Ok(())
}

/// `requires` of a message, for the narration.
fn requires(message: &Envelope) -> String {
    let claims = message.payload_bytes().ok().and_then(|b| Claims::parse(&b).ok());
    let list = claims.map(|c| c.requires.join(", ")).unwrap_or_default();
    if list.is_empty() {
        "nothing".into()
    } else {
        list
    }
}

/// `fetched N bytes (P % of the image), reused M bytes from the slots`.
fn transfer_line(job: &Value, size: u64) -> String {
    let fetched = job["bytes_fetched"].as_u64().unwrap_or(0);
    format!(
        "fetched {fetched} bytes ({:.1} % of the {size}-byte image), reused {} bytes from the slots",
        fetched as f64 * 100.0 / size.max(1) as f64,
        job["bytes_reused"].as_u64().unwrap_or(0)
    )
}

/// Waits on a status for job `jti`: `Some` once it reaches `goal`, an error
/// if it failed or rolled back.
fn job_progress(kind: &str, v: &Value, jti: &str, goal: &str) -> Result<Option<()>, CliError> {
    if kind != "status" || v["job"]["jti"] != jti {
        return Ok(None);
    }
    match v["state"].as_str().unwrap_or("") {
        "failed" | "rolled-back" => {
            Err(demo_failed(format!("the update ended {}: {}", v["state"], v["last_error"])))
        }
        state => Ok((state == goal).then_some(())),
    }
}

fn print_status(v: &Value) {
    let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| "none".into());
    println!("      state        {}", text(&v["state"]));
    println!("      installed    v{}", v["installed_version"]);
    println!("      booted       {}", text(&v["booted_slot"]));
    println!("      primary      {}", text(&v["primary_slot"]));
    for slot in SLOTS {
        let s = &v["slots"][slot];
        let version = s["version"].as_u64().map(|n| format!("v{n}")).unwrap_or_else(|| "-".into());
        println!("      slot {slot}       {:<7} {version}", text(&s["state"]));
    }
    println!("      last error   {}", text(&v["last_error"]));
}

/// The fleet side's view: `fleet::watch` on the project's devices, printed
/// in words as messages arrive.
struct Fleet {
    messages: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    last_status: String,
}

impl Fleet {
    fn watch(port: u16) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, messages) = mpsc::unbounded_channel();
        let watcher = tokio::spawn(async move {
            let result = publish::watch(connection(port, "demo-fleet-watch"), PROJECT, None, None, |t, p| {
                let _ = tx.send((t.to_string(), p.to_vec()));
            });
            if let Err(e) = result.await {
                eprintln!("fleet watcher: {e}");
            }
        });
        (Self { messages, last_status: String::new() }, watcher)
    }

    /// Prints every message until `check` returns something (or an error).
    async fn wait_for<T>(
        &mut self,
        what: &str,
        mut check: impl FnMut(&str, &Value) -> Result<Option<T>, CliError>,
    ) -> Result<T, CliError> {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let (topic, payload) = tokio::time::timeout_at(deadline, self.messages.recv())
                .await
                .map_err(|_| demo_failed(format!("waited {} s for {what}", STEP_TIMEOUT.as_secs())))?
                .ok_or_else(|| demo_failed("the fleet's MQTT watcher stopped".into()))?;
            let kind = topic.rsplit('/').next().unwrap_or("");
            let value: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
            self.narrate(kind, &value);
            if let Some(found) = check(kind, &value)? {
                return Ok(found);
            }
        }
    }

    fn narrate(&mut self, kind: &str, v: &Value) {
        match kind {
            "online" if *v == true => println!("    device is online (connected to the broker)"),
            "online" => println!("    device is offline"),
            "progress" => match (v["step"].as_str(), v["bytes"].as_u64(), v["total"].as_u64()) {
                (Some("downloading"), Some(done), Some(total)) => println!(
                    "    device: downloading, {}% ({:.1} of {:.1} MiB)",
                    done * 100 / total.max(1),
                    done as f64 / 1048576.0,
                    total as f64 / 1048576.0
                ),
                (Some(step), ..) => println!("    device: {step}: {}", v["detail"].as_str().unwrap_or("")),
                _ => {}
            },
            "status" => {
                let mut line = format!(
                    "{}, installed v{}, booted {}",
                    v["state"].as_str().unwrap_or("?"),
                    v["installed_version"],
                    v["booted_slot"].as_str().unwrap_or("?")
                );
                if let Some(e) = v["last_error"].as_str() {
                    line.push_str(&format!(", last error: {e}"));
                }
                if line != self.last_status {
                    println!("    device status (retained): {line}");
                    self.last_status = line;
                }
            }
            _ => {}
        }
    }
}

fn connection(port: u16, client_id: &str) -> FleetConnection {
    FleetConnection { host: "127.0.0.1".into(), port, client_id: client_id.into(), tls: None }
}

async fn publish(port: u16, topic: &str, message: &Envelope) -> Result<(), CliError> {
    let payload = message.to_json().into_bytes();
    Ok(publish::publish(connection(port, "demo-fleet-publish"), topic, payload, STEP_TIMEOUT).await?)
}

/// The real daemon on its own thread, as `fleetd run` would run it.
struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    done: oneshot::Receiver<Result<(), fleetd::daemon::DaemonError>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(config: Config) -> Result<Self, CliError> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (finished, done) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("demo-device".into())
            .spawn(move || {
                let shutdown = async {
                    let _ = stopped.await;
                };
                // Plain MQTT (`None`): only the demo can ask for it.
                let _ =
                    finished.send(fleetd::daemon::run_until(config, None, fleetd::update::open, shutdown));
            })
            .map_err(demo_error)?;
        Ok(Self { stop: Some(stop), done, thread: Some(thread) })
    }

    async fn stop(&mut self) -> Result<(), CliError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(STEP_TIMEOUT, &mut self.done)
            .await
            .map_err(|_| demo_failed("the daemon did not stop".into()))?
            .map_err(|_| demo_failed("the daemon's thread ended without a result".into()))?;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        Ok(result?)
    }
}

impl Drop for Daemon {
    /// On a failed step: ask the daemon to stop, without waiting (a download
    /// in progress would wait for servers that this runtime no longer runs).
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What the shipped grub.cfg does at power-on, here played by the demo: boot
/// the first slot in `ORDER` with `OK=1` and `TRY=0`, saving its `TRY=1`
/// first; when every good slot was tried, clear their tries and pick again.
fn grub_power_on(path: &Path) -> Result<String, CliError> {
    let slots = SLOTS.map(String::from);
    let mut env = GrubEnv::new(path.to_path_buf(), &slots)?.read()?;
    let mut chosen = grub::primary_in(&env, &slots)?;
    if chosen.is_none() {
        for slot in SLOTS {
            if env.get(&format!("{slot}_OK")) == Some("1") {
                env.set(&format!("{slot}_TRY"), "0")?;
            }
        }
        chosen = grub::primary_in(&env, &slots)?;
    }
    let slot = chosen.ok_or_else(|| demo_failed("GRUB finds no bootable slot".into()))?;
    env.set(&format!("{slot}_TRY"), "1")?;
    let bytes = env.encode()?;
    fleetd::fsutil::atomic_write(path, &bytes, 0o644)
        .map_err(|e| demo_failed(format!("{}: {e}", path.display())))?;
    Ok(slot)
}

fn grubenv_line(path: &Path) -> Result<String, CliError> {
    let env = GrubEnv::new(path.to_path_buf(), &SLOTS.map(String::from))
        .and_then(|g| g.read())
        .map_err(demo_error)?;
    Ok(env.vars().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join(" "))
}

/// A new boot id: what tells the daemon it came back after a reboot.
fn new_boot_id(dir: &Path) -> Result<(), CliError> {
    std::fs::write(dir.join("boot_id"), trust::random_id()).map_err(demo_error)
}

/// Serves the image at `/8.img` over HTTP/1.1 (with `Range`), paced so the
/// download takes a moment. Returns the base URL.
async fn image_server(
    files: Arc<std::collections::HashMap<String, Arc<Vec<u8>>>>,
) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_image(stream, files.clone()));
        }
    });
    Ok(base)
}

/// One request: a whole file, or one range of it (`bytes=A-` or `bytes=A-B`).
async fn serve_image(
    stream: tokio::net::TcpStream,
    files: Arc<std::collections::HashMap<String, Arc<Vec<u8>>>>,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    let (mut request, mut range) = (String::new(), None);
    stream.read_line(&mut request).await?;
    for _ in 0..64 {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                let spec = value.trim().strip_prefix("bytes=").unwrap_or("");
                let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
                range = a.parse::<usize>().ok().map(|a| (a, b.parse::<usize>().ok()));
            }
        }
    }
    let stream = stream.get_mut();
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let file = files.get(path).filter(|_| request.starts_with("GET "));
    let Some(file) = file.filter(|f| !matches!(range, Some((a, _)) if a >= f.len())) else {
        return stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    };
    let (start, end) = match range {
        Some((a, b)) => (a, b.map_or(file.len(), |b| (b + 1).min(file.len()))),
        None => (0, file.len()),
    };
    let body = &file[start..end];
    let head = match range {
        Some(_) => format!("206 Partial Content\r\nContent-Range: bytes {start}-{}/{}", end - 1, file.len()),
        None => "200 OK".to_string(),
    };
    let head = format!("HTTP/1.1 {head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    for chunk in body.chunks(CHUNK) {
        stream.write_all(chunk).await?;
        tokio::time::sleep(PACE).await;
    }
    stream.shutdown().await
}

/// Writes the device's config; `booted` stands in for the kernel command line.
fn write_device(dir: &Path, broker_port: u16, booted: &str) -> Result<PathBuf, CliError> {
    for slot in ["slot-a.img", "slot-b.img"] {
        let path = dir.join(slot);
        if !path.exists() {
            let f = std::fs::File::create(&path).map_err(demo_error)?;
            f.set_len(8 << 20).map_err(demo_error)?;
        }
    }
    let path = dir.join("fleetd.toml");
    let text = fleetd_fixture::DeviceConfig {
        id: DEVICE.into(),
        project: PROJECT.into(),
        // The demo's image server is plain HTTP on loopback.
        trust: "allow_http = true".into(),
        boot: format!("backend = \"grub\"\ngrubenv = \"grubenv\"\nbooted_slot = \"{booted}\"\nboot_id_file = \"boot_id\""),
        // The CA file is required but unused: the demo connects without TLS.
        mqtt: Some(format!("host = \"127.0.0.1\"\nport = {broker_port}\nca_file = \"keys/fleet.pub.pem\"")),
        // The demo reboots the device itself.
        update: Some("reboot = \"none\"\ncheckpoint_mib = 1".into()),
        health: Some("timeout_s = 15".into()),
        ..Default::default()
    }
    .to_toml();
    std::fs::write(&path, text).map_err(demo_error)?;
    Ok(path)
}

fn rel(base: &Path, p: &Path) -> String {
    p.strip_prefix(base).unwrap_or(p).display().to_string()
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

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

fn tempdir() -> Result<TempDir, CliError> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let p = base.join(format!("fleetd-demo-{}", trust::random_id()));
        if std::fs::DirBuilder::new().mode(0o700).create(&p).is_ok() {
            return Ok(TempDir(p));
        }
    }
    Err(demo_failed(format!("cannot create a directory in {}", base.display())))
}

fn demo_failed(what: String) -> CliError {
    CliError::Demo(what)
}

/// A failure of the demo's own scaffolding (its servers, files, threads).
fn demo_error(e: impl std::fmt::Display) -> CliError {
    CliError::Demo(e.to_string())
}
