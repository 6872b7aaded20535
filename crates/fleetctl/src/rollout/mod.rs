//! `fleetctl rollout start|watch|halt`: a rollout's message published to
//! a group, its devices followed wave by wave from their status documents,
//! and the halt, by hand or when failures cross the threshold. The state
//! is kept in a database (`fleetd_registrar::rollouts`), so a restarted
//! `watch` carries on where the last one stopped.

pub mod config;
pub mod tally;

pub use config::FleetConfig;
pub use tally::{Stage, Tally, Thresholds, Verdict};

use crate::publish::{FleetConnection, FleetError, Outgoing};
use fleetd::mqtt::Topics;
use fleetd::status::StatusDoc;
use fleetd::trust::halt::{HaltClaims, HALT_TYPE};
use fleetd::trust::{self, Claims, Envelope, VerifyError};
use fleetd_registrar::rollouts::{self, DeviceRow, Halt, Rollout};
use fleetd_registrar::{Db, RegistrarError};
use std::time::Duration;

/// Why a rollout command failed, by cause.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Database(#[from] RegistrarError),
    #[error(transparent)]
    Publish(Box<FleetError>),
    #[error(transparent)]
    Broker(#[from] fleetd::mqtt::MqttError),
    /// The message (given, or the stored one) does not parse or check.
    #[error("{what}: {source}")]
    Message { what: String, source: VerifyError },
    #[error("rollout-unknown: no rollout {0:?} was started with this database")]
    Unknown(String),
    /// `start` refused the message (no `rollout`, another group or project,
    /// halted before).
    #[error("{0}")]
    Refused(String),
    #[error("mqtt: the connection task ended")]
    ConnectionTask,
}

impl From<FleetError> for RolloutError {
    fn from(e: FleetError) -> Self {
        RolloutError::Publish(Box::new(e))
    }
}

/// How long the broker has to acknowledge what `start` and `halt` publish.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// After subscribing, how long `watch` takes in retained status documents
/// before it may say every targeted device ended.
const SETTLE: Duration = Duration::from_secs(2);

/// How often `watch` stores what changed, prints, and decides.
const TICK: Duration = Duration::from_millis(500);

impl FleetConfig {
    pub fn connection(&self) -> Result<FleetConnection, RolloutError> {
        let b = &self.broker;
        Ok(FleetConnection {
            host: b.host.clone(),
            port: b.port,
            client_id: b.client_id.clone().unwrap_or_else(|| format!("fleetctl-{}", trust::random_id())),
            tls: Some(fleetd::mqtt::tls_config(&b.ca, &b.cert, &b.key)?),
        })
    }
}

pub async fn open_db(config: &FleetConfig) -> Result<Db, RolloutError> {
    Ok(Db::connect(config.database_url()).await?)
}

fn claims_of(envelope: &Envelope, what: &str) -> Result<Claims, RolloutError> {
    let message = |source| RolloutError::Message { what: what.to_string(), source };
    let claims = Claims::parse(&envelope.payload_bytes().map_err(message)?).map_err(message)?;
    claims.check_structure().map_err(message)?;
    Ok(claims)
}

async fn find(db: &Db, jti: &str) -> Result<(Rollout, Claims), RolloutError> {
    let rollout = rollouts::find(db, jti).await?.ok_or_else(|| RolloutError::Unknown(jti.to_string()))?;
    let envelope = Envelope::parse(rollout.message.as_bytes())
        .map_err(|source| RolloutError::Message { what: "the stored rollout".into(), source })?;
    let claims = claims_of(&envelope, "the stored rollout")?;
    Ok((rollout, claims))
}

/// `start`: the message must carry a `rollout` and target the group; it is
/// recorded, then published retained to the group's update topic (devices
/// that join or come back later see it).
pub async fn start(config: &FleetConfig, group: &str, envelope: &Envelope) -> Result<Rollout, RolloutError> {
    let claims = claims_of(envelope, "the message")?;
    if claims.project != config.project {
        return Err(RolloutError::Refused(format!(
            "the message is for project {:?}, the config for {:?}",
            claims.project, config.project
        )));
    }
    if !claims.target.groups.iter().any(|g| g == group) {
        return Err(RolloutError::Refused(format!(
            "the message does not target group {group:?} (it targets {:?})",
            claims.target.groups
        )));
    }
    if claims.rollout.is_none() {
        return Err(RolloutError::Refused(
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
    .await?;
    if let Some(halt) = &rollout.halt {
        return Err(RolloutError::Refused(format!(
            "rollout {} was halted at {} ({}); a halted rollout does not start again: sign a new message",
            rollout.jti, halt.at, halt.reason
        )));
    }
    let topic = Topics::update_for_group(&config.project, group);
    let message = Outgoing { topic, payload: rollout.message.clone().into_bytes(), retain: true };
    crate::publish::publish_all(config.connection()?, vec![message], PUBLISH_TIMEOUT).await?;
    Ok(rollout)
}

/// What `halt` publishes: the halt recorded before, or claims to sign.
pub enum HaltDraft {
    Recorded(Halt),
    /// A new halt's claims: its own jti, valid as long as the update it
    /// stops (so a late device still sees it), within the validity a
    /// device accepts.
    Unsigned(HaltClaims),
}

/// The stored rollout, and the halt to publish for it.
pub async fn draft_halt(db: &Db, jti: &str, valid_for_s: u64) -> Result<(Rollout, HaltDraft), RolloutError> {
    let (rollout, update) = find(db, jti).await?;
    if let Some(halt) = rollout.halt.clone() {
        return Ok((rollout, HaltDraft::Recorded(halt)));
    }
    let now = fleetd::system_now();
    let longest = now.saturating_add(trust::DEFAULT_MAX_VALIDITY_S);
    let claims = HaltClaims {
        typ: HALT_TYPE.into(),
        jti: trust::random_id(),
        iat: now,
        nbf: now,
        exp: update.exp.max(now.saturating_add(valid_for_s)).min(longest),
        project: update.project,
        target: update.target,
        halts: update.jti,
    };
    Ok((rollout, HaltDraft::Unsigned(claims)))
}

/// Records the signed halt (a halt recorded before stands instead) and
/// publishes it retained to the group's topic and to the topic of every
/// device still on its way. Returns the halt published.
pub async fn publish_halt(
    config: &FleetConfig,
    db: &Db,
    rollout: &Rollout,
    halt: Halt,
) -> Result<Halt, RolloutError> {
    let jti = rollout.jti.as_str();
    let halt = rollouts::record_halt(db, jti, &halt).await?;
    let mut messages = vec![Outgoing {
        topic: Topics::update_for_group(&config.project, &rollout.group),
        payload: halt.message.clone().into_bytes(),
        retain: true,
    }];
    for row in rollouts::devices(db, jti).await? {
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

/// Stops the MQTT poller when `watch` returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How `watch` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEnd {
    /// Every targeted device ended.
    Done,
    /// Failures crossed the threshold: the caller publishes the halt.
    FailuresCrossed { reason: String },
    /// The rollout was halted before.
    HaltedBefore { reason: String },
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
) -> Result<WatchEnd, RolloutError> {
    use rumqttc::{AsyncClient, Event, Packet, QoS};
    let db = open_db(config).await?;
    let (rollout, claims) = find(&db, jti).await?;
    let mut tally = Tally::new(&claims, &rollout.group);
    for row in rollouts::devices(&db, jti).await? {
        if let Some(stage) = Stage::parse(&row.state) {
            tally.restore(&row.device, stage, row.bytes_fetched);
        }
    }
    if let Some(halt) = &rollout.halt {
        print(&tally.table());
        return Ok(WatchEnd::HaltedBefore {
            reason: format!("halted before, at {}: {}", halt.at, halt.reason),
        });
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let (client, mut eventloop) = AsyncClient::new(config.connection()?.options(), 64);
    let status_topic = format!("fleet/{}/devices/+/status", config.project);
    // `poll()` is never cancelled half-way through a connect: it runs in a
    // task of its own that forwards what came in.
    let (events_tx, mut events) = tokio::sync::mpsc::channel::<Result<Event, String>>(256);
    let poller = {
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                let polled = eventloop.poll().await;
                let failed = polled.is_err();
                if let Ok(Event::Incoming(Packet::ConnAck(_))) = &polled {
                    let _ = client.try_subscribe(status_topic.clone(), QoS::AtMostOnce);
                }
                if events_tx.send(polled.map_err(|e| e.to_string())).await.is_err() {
                    return;
                }
                if failed {
                    // rumqttc connects again on the next poll.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        })
    };
    let _stop_polling = AbortOnDrop(poller);
    let mut subscribed_at: Option<tokio::time::Instant> = None;
    let mut changed: std::collections::BTreeMap<String, DeviceRow> = Default::default();
    let mut printed = String::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            polled = events.recv() => match polled {
                Some(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                    subscribed_at.get_or_insert_with(tokio::time::Instant::now);
                }
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let Ok(doc) = serde_json::from_slice::<StatusDoc>(&p.payload) else { continue };
                    // The topic names the device (the broker's ACL lets a
                    // device write its own only); a document for another is ignored.
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
                Some(Ok(_)) => {}
                None => return Err(RolloutError::ConnectionTask),
                Some(Err(e)) => print(&format!("mqtt: {e}; reconnecting")),
            },
            _ = tick.tick() => {
                let rows: Vec<DeviceRow> = std::mem::take(&mut changed).into_values().collect();
                rollouts::record_devices(&db, jti, &rows).await?;
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
                        let _ = client.try_disconnect();
                        return Ok(WatchEnd::FailuresCrossed { reason });
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
