//! `fleetctl rollout start|watch|halt`: a rollout's message published to
//! a group, its devices followed wave by wave from their status documents,
//! and the halt, by hand or when failures cross the threshold. The state
//! is kept in a database (`fleetd_registrar::rollouts`), so a restarted
//! `watch` carries on where the last one stopped.

// A command's error is built once, at its end, and printed: its size costs nothing.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod tally;

pub use config::FleetConfig;
pub use tally::{Stage, Tally, Thresholds, Verdict};

use crate::cli::{add_signature, load_signing_key, request_cosignature, CliError};
use crate::publish::{FleetConnection, Outgoing};
use fleetd::mqtt::Topics;
use fleetd::status::StatusDoc;
use fleetd::trust::halt::{HaltClaims, HALT_TYPE};
use fleetd::trust::{self, Claims, Envelope};
use fleetd_registrar::rollouts::{self, DeviceRow, Halt, Rollout};
use fleetd_registrar::Db;
use std::path::Path;
use std::time::Duration;

/// How long the broker has to acknowledge what `start` and `halt` publish.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// After subscribing, how long `watch` takes in retained status documents
/// before it may say every targeted device ended.
const SETTLE: Duration = Duration::from_secs(2);

/// How often `watch` stores what changed, prints, and decides.
const TICK: Duration = Duration::from_millis(500);

impl FleetConfig {
    pub fn connection(&self) -> Result<FleetConnection, CliError> {
        let b = &self.broker;
        Ok(FleetConnection {
            host: b.host.clone(),
            port: b.port,
            client_id: b.client_id.clone().unwrap_or_else(|| format!("fleetctl-{}", trust::random_id())),
            tls: Some(fleetd::mqtt::tls_config(&b.ca, &b.cert, &b.key)?),
        })
    }
}

async fn open_db(config: &FleetConfig) -> Result<Db, CliError> {
    Db::connect(config.database_url()).await.map_err(CliError::Registrar)
}

fn claims_of(envelope: &Envelope, path: &Path) -> Result<Claims, CliError> {
    let message = |source| CliError::Message { path: path.to_path_buf(), source };
    let claims = Claims::parse(&envelope.payload_bytes().map_err(message)?).map_err(message)?;
    claims.check_structure().map_err(message)?;
    Ok(claims)
}

/// `start`: the message must carry a `rollout` and target the group; it is
/// recorded, then published retained to the group's update topic (devices
/// that join or come back later see it).
pub async fn start(config: &FleetConfig, group: &str, file: &Path) -> Result<Rollout, CliError> {
    let envelope = crate::cli::read_envelope(file)?;
    let claims = claims_of(&envelope, file)?;
    if claims.project != config.project {
        return Err(CliError::Usage(format!(
            "the message is for project {:?}, the config for {:?}",
            claims.project, config.project
        )));
    }
    if !claims.target.groups.iter().any(|g| g == group) {
        return Err(CliError::Usage(format!(
            "the message does not target group {group:?} (it targets {:?})",
            claims.target.groups
        )));
    }
    if claims.rollout.is_none() {
        return Err(CliError::Usage(
            "the message has no rollout claim: sign it with --wave PERCENT@TIME (fleetctl sign)".into(),
        ));
    }
    let db = open_db(config).await?;
    let rollout = rollouts::start(
        &db,
        &Rollout {
            jti: claims.jti.clone(),
            project: claims.project.clone(),
            group: group.to_string(),
            version: claims.version,
            message: envelope.to_json(),
            started_at: fleetd_registrar::db::now(),
            halt: None,
        },
    )
    .await
    .map_err(CliError::Registrar)?;
    if let Some(halt) = &rollout.halt {
        return Err(CliError::Usage(format!(
            "rollout {} was halted at {} ({}); a halted rollout does not start again: sign a new message",
            rollout.jti, halt.at, halt.reason
        )));
    }
    let topic = Topics::update_for_group(&config.project, group);
    let message = Outgoing { topic, payload: rollout.message.clone().into_bytes(), retain: true };
    crate::publish::publish_all(config.connection()?, vec![message], PUBLISH_TIMEOUT).await?;
    Ok(rollout)
}

/// `halt`: signs a halt for the rollout (once: a rollout halted before
/// gets the same halt again), records it, and publishes it retained to the
/// group's topic and to the topic of every device still on its way.
pub async fn halt(config: &FleetConfig, jti: &str, reason: &str) -> Result<Halt, CliError> {
    let db = open_db(config).await?;
    let rollout = rollouts::find(&db, jti).await.map_err(CliError::Registrar)?.ok_or_else(|| {
        CliError::Usage(format!("rollout-unknown: no rollout {jti:?} was started with this database"))
    })?;
    let halt = match &rollout.halt {
        Some(halt) => halt.clone(),
        None => {
            let envelope = Envelope::parse(rollout.message.as_bytes())
                .map_err(|source| CliError::Message { path: "the stored rollout".into(), source })?;
            let claims = claims_of(&envelope, Path::new("the stored rollout"))?;
            let message = sign_halt(config, &claims).await?;
            let fresh = Halt { message, at: fleetd_registrar::db::now(), reason: reason.to_string() };
            rollouts::record_halt(&db, jti, &fresh).await.map_err(CliError::Registrar)?
        }
    };
    let mut messages = vec![Outgoing {
        topic: Topics::update_for_group(&config.project, &rollout.group),
        payload: halt.message.clone().into_bytes(),
        retain: true,
    }];
    for row in rollouts::devices(&db, jti).await.map_err(CliError::Registrar)? {
        let on_its_way = Stage::parse(&row.state).is_some_and(|s| !s.has_ended());
        if on_its_way {
            messages.push(Outgoing {
                topic: Topics::update_for_device(&config.project, &row.device),
                payload: halt.message.clone().into_bytes(),
                retain: true,
            });
        }
    }
    crate::publish::publish_all(config.connection()?, messages, PUBLISH_TIMEOUT).await?;
    Ok(halt)
}

/// The halt's claims, signed by this server, the co-signer and the fleet key.
async fn sign_halt(config: &FleetConfig, update: &Claims) -> Result<String, CliError> {
    let now = fleetd::system_now();
    let claims = HaltClaims {
        typ: HALT_TYPE.into(),
        jti: trust::random_id(),
        iat: now,
        nbf: now,
        // As long as the update it stops, so a late device still sees it.
        exp: update.exp.max(now.saturating_add(config.signing.halt_valid_for_s)),
        project: update.project.clone(),
        target: update.target.clone(),
        halts: update.jti.clone(),
    };
    let s = &config.signing;
    let mut envelope = Envelope::new(&claims.to_json());
    let server_kid = format!("{}{}", crate::cosigner::SERVER_KID_PREFIX, s.server);
    add_signature(&mut envelope, &load_signing_key(&s.server_key)?, &server_kid)?;
    let mut cosigned = request_cosignature(&s.cosigner_url, &envelope, s.cosigner_ca.as_deref()).await?;
    add_signature(&mut cosigned, &load_signing_key(&s.fleet_key)?, &s.fleet_kid)?;
    Ok(cosigned.to_json())
}

/// How `watch` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEnd {
    /// Every targeted device ended.
    Done,
    /// Failures crossed the threshold and this watch published the halt,
    /// or the rollout was halted before.
    Halted { reason: String },
    /// `--timeout` passed first.
    TimedOut,
}

/// `watch`: follows the devices' retained status documents and prints the
/// counts per wave as they change.
pub async fn watch(
    config: &FleetConfig,
    jti: &str,
    thresholds: Thresholds,
    timeout: Option<Duration>,
    mut print: impl FnMut(&str),
) -> Result<WatchEnd, CliError> {
    use rumqttc::{AsyncClient, Event, Packet, QoS};
    let db = open_db(config).await?;
    let rollout = rollouts::find(&db, jti).await.map_err(CliError::Registrar)?.ok_or_else(|| {
        CliError::Usage(format!("rollout-unknown: no rollout {jti:?} was started with this database"))
    })?;
    let envelope = Envelope::parse(rollout.message.as_bytes())
        .map_err(|source| CliError::Message { path: "the stored rollout".into(), source })?;
    let claims = claims_of(&envelope, Path::new("the stored rollout"))?;
    let mut tally = Tally::new(&claims, &rollout.group);
    for row in rollouts::devices(&db, jti).await.map_err(CliError::Registrar)? {
        if let Some(stage) = Stage::parse(&row.state) {
            tally.restore(&row.device, stage, row.bytes_fetched);
        }
    }
    if let Some(halt) = &rollout.halt {
        print(&tally.table());
        return Ok(WatchEnd::Halted { reason: format!("halted before, at {}: {}", halt.at, halt.reason) });
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let (client, mut eventloop) = AsyncClient::new(config.connection()?.options(), 64);
    let status_topic = format!("fleet/{}/devices/+/status", config.project);
    let mut subscribed_at: Option<tokio::time::Instant> = None;
    let mut changed: std::collections::BTreeMap<String, DeviceRow> = Default::default();
    let mut printed = String::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            polled = eventloop.poll() => match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .try_subscribe(status_topic.clone(), QoS::AtMostOnce)
                        .map_err(crate::publish::FleetError::from)?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subscribed_at.get_or_insert_with(tokio::time::Instant::now);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(doc) = serde_json::from_slice::<StatusDoc>(&p.payload) else { continue };
                    // The topic names the device; a document for another is ignored.
                    if !p.topic.ends_with(&format!("/devices/{}/status", doc.device)) {
                        continue;
                    }
                    if let Some(entry) = tally.observe(&doc) {
                        changed.insert(doc.device.clone(), DeviceRow {
                            device: doc.device.clone(),
                            wave: entry.wave as u32,
                            state: entry.stage.as_str().to_string(),
                            bytes_fetched: entry.bytes_fetched,
                            updated_at: fleetd_registrar::db::now(),
                        });
                    }
                }
                Ok(_) => {}
                // rumqttc connects again on the next poll; wait a little first.
                Err(e) => {
                    print(&format!("mqtt: {e}; reconnecting"));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            },
            _ = tick.tick() => {
                let rows: Vec<DeviceRow> = std::mem::take(&mut changed).into_values().collect();
                rollouts::record_devices(&db, jti, &rows).await.map_err(CliError::Registrar)?;
                let table = tally.table();
                if table != printed {
                    print(&table);
                    printed = table;
                }
                match tally.verdict(thresholds) {
                    Verdict::Halt { failures, finished } => {
                        let reason = format!(
                            "{failures} of {finished} devices that finished failed or rolled back \
                             (more than {} %, after at least {})",
                            thresholds.max_failures_percent, thresholds.min_devices
                        );
                        halt(config, jti, &reason).await?;
                        let _ = client.try_disconnect();
                        return Ok(WatchEnd::Halted { reason });
                    }
                    Verdict::Done if subscribed_at.is_some_and(|at| at.elapsed() >= SETTLE) => {
                        let _ = client.try_disconnect();
                        return Ok(WatchEnd::Done);
                    }
                    _ => {}
                }
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return Ok(WatchEnd::TimedOut);
                }
            }
        }
    }
}

/// `fleetctl rollout ...`: 0 done, 1 refused, failed or halted, 3 `watch`
/// timed out.
pub fn command(cmd: crate::cli::RolloutCommand) -> std::process::ExitCode {
    use crate::cli::RolloutCommand as C;
    use std::process::ExitCode;
    let fail = |e: CliError| {
        eprintln!("fleetctl: {e}");
        ExitCode::from(1)
    };
    let load = |path: &Path| FleetConfig::load(path).map_err(CliError::FleetConfig);
    let runtime = match crate::cli::runtime() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    match cmd {
        C::Start { config, group, message } => {
            let result =
                load(&config).and_then(|c| runtime.block_on(start(&c, &group, &message)).map(|r| (c, r)));
            match result {
                Ok((c, r)) => {
                    println!(
                        "published rollout {} (version {}) to {}, retained",
                        r.jti,
                        r.version,
                        Topics::update_for_group(&c.project, &r.group)
                    );
                    println!(
                        "follow it with: fleetctl rollout watch --config {} --jti {}",
                        config.display(),
                        r.jti
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        C::Halt { config, jti, reason } => {
            match load(&config).and_then(|c| runtime.block_on(halt(&c, &jti, &reason))) {
                Ok(h) => {
                    println!(
                        "halted rollout {jti} at {} ({}); the halt is published, retained",
                        h.at, h.reason
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        C::Watch { config, jti, max_failures, min_devices, timeout } => {
            let thresholds = Thresholds { max_failures_percent: max_failures, min_devices };
            let result = load(&config).and_then(|c| {
                runtime.block_on(watch(&c, &jti, thresholds, timeout.map(Duration::from_secs), |text| {
                    println!("{text}")
                }))
            });
            match result {
                Ok(WatchEnd::Done) => {
                    println!("rollout {jti}: every targeted device ended");
                    ExitCode::SUCCESS
                }
                Ok(WatchEnd::Halted { reason }) => {
                    println!("rollout {jti}: halted: {reason}");
                    ExitCode::from(1)
                }
                Ok(WatchEnd::TimedOut) => {
                    println!("rollout {jti}: still running when --timeout passed");
                    ExitCode::from(3)
                }
                Err(e) => fail(e),
            }
        }
    }
}
