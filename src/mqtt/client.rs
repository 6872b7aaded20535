//! The MQTT task: keeps one connection alive and moves messages between the
//! broker and the update worker. It never decides anything about updates.

use super::aws::{AwsJobs, JobsEvent};
use super::{ProgressLimiter, Topics};
use crate::backoff::Backoff;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeReasonCode};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// From the broker to the update worker.
#[derive(Debug)]
pub enum Inbound {
    /// An update message; `token` is handed back in `Outbound::Ack` once the
    /// job it carries is persisted (or the message was refused and recorded).
    UpdateMessage { topic: String, payload: Vec<u8>, token: u64 },
}

/// From the update worker to the broker.
#[derive(Debug)]
pub enum Outbound {
    Ack(u64),
    /// The message was refused (and the refusal recorded): ack it, and in the
    /// AWS profile report the job REJECTED.
    Refused {
        token: u64,
        error: String,
    },
    /// The status document (retained).
    Status(Box<crate::status::StatusDoc>),
    /// A progress event; step changes always go out, the rest ≤ 1/s.
    Progress(Progress),
    /// Ask the broker again for update messages (D-Bus `CheckForUpdate`).
    CheckForUpdate,
}

/// What the progress topic carries, before it is JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Bytes of the image received.
    Download { jti: String, version: u64, done: u64, total: u64 },
    /// A new step of the job (the status `state` name) or an event in it.
    Step { state: String, detail: String },
    /// A second delivery of a message already handled: not run again, but
    /// shown to the fleet (a replay or a redelivery is never silent).
    Duplicate { jti: String },
}

impl Progress {
    /// The step for rate limiting: a change always goes out.
    fn step(&self) -> &str {
        match self {
            Self::Download { .. } => "downloading",
            Self::Step { state, .. } => state,
            Self::Duplicate { .. } => "duplicate",
        }
    }

    fn percent(&self) -> Option<u64> {
        match self {
            Self::Download { done, total, .. } => Some(done * 100 / (*total).max(1)),
            _ => None,
        }
    }

    fn to_json(&self) -> Vec<u8> {
        let value = match self {
            Self::Download { jti, version, done, total } => serde_json::json!({
                "jti": jti, "version": version, "step": "downloading",
                "progress": done * 100 / (*total).max(1), "bytes": done, "total": total,
            }),
            Self::Step { state, detail } => serde_json::json!({ "step": state, "detail": detail }),
            Self::Duplicate { jti } => serde_json::json!({
                "jti": jti, "step": "duplicate",
                "detail": "a second delivery of a message already handled; not run again",
            }),
        };
        value.to_string().into_bytes()
    }
}

/// What the connection did, for logs and `fleetd status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    Connected { session_present: bool },
    Subscribed { topics: Vec<String> },
    SubscriptionRefused { topic: String },
    Disconnected { error: String, retry_in: Duration },
}

pub struct ClientSetup {
    pub options: rumqttc::MqttOptions,
    pub topics: Topics,
    /// `Some` for the AWS IoT Jobs profile: updates arrive as job documents.
    pub aws_jobs: Option<AwsJobs>,
    pub backoff: Backoff,
    /// Written on every connect and disconnect, for `fleetd status`.
    pub connection_file: Option<PathBuf>,
}

/// Runs until `shutdown` turns true. `connected` follows the connection.
pub async fn run(
    setup: ClientSetup,
    to_worker: mpsc::Sender<Inbound>,
    mut from_worker: mpsc::UnboundedReceiver<Outbound>,
    connected: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
    mut on_event: impl FnMut(&ClientEvent),
) {
    let (client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(setup.options, 64);
    eventloop.network_options.set_connection_timeout(super::CONNECT_TIMEOUT.as_secs());
    // `poll()` must never be cancelled half-way through a (re)connect, so it
    // runs in a task of its own that only forwards what happened.
    let (events_tx, mut events) = mpsc::channel(64);
    let poller = tokio::spawn(poll_forever(eventloop, setup.backoff, events_tx));
    let topics = setup.topics;
    let mut aws = setup.aws_jobs;
    let subscriptions = match &aws {
        Some(jobs) => jobs.subscriptions(),
        None => topics.updates.clone(),
    };
    let mut aws_retry = tokio::time::interval(Duration::from_secs(15));
    let publish_all = |client: &AsyncClient, list: Vec<super::aws::Publish>| {
        for (topic, payload) in list {
            let _ = client.try_publish(topic, QoS::AtLeastOnce, false, payload);
        }
    };
    let mut pending_acks: HashMap<u64, rumqttc::Publish> = HashMap::new();
    let mut next_token = 0u64;
    let mut last_status: Option<Vec<u8>> = None;
    let mut limiter = ProgressLimiter::new(Duration::from_secs(1));
    let mut suback_topics: Vec<String> = Vec::new();
    // Whatever a killed predecessor left there, nothing is connected yet.
    if let Some(path) = &setup.connection_file {
        write_connection_state(path, "starting");
    }
    let mut record = |event: &ClientEvent| {
        if let Some(path) = &setup.connection_file {
            write_connection_file(path, event);
        }
        on_event(event);
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            outbound = from_worker.recv() => match outbound {
                None => break,
                Some(Outbound::Ack(token)) => {
                    if let Some(publish) = pending_acks.remove(&token) {
                        let _ = client.try_ack(&publish);
                    }
                }
                Some(Outbound::Refused { token, error }) => {
                    if let Some(publish) = pending_acks.remove(&token) {
                        let _ = client.try_ack(&publish);
                    }
                    if let Some(jobs) = aws.as_mut() {
                        publish_all(&client, jobs.on_refused(&error));
                    }
                }
                Some(Outbound::Status(doc)) => {
                    let bytes = serde_json::to_vec(&doc).unwrap_or_default();
                    if *connected.borrow() {
                        let _ = client.try_publish(&topics.status, QoS::AtLeastOnce, true, bytes.clone());
                        if let (Some(jobs), Ok(value)) = (aws.as_mut(), serde_json::to_value(&doc)) {
                            publish_all(&client, jobs.on_status(&value));
                        }
                    }
                    last_status = Some(bytes);
                }
                Some(Outbound::Progress(progress)) => {
                    if *connected.borrow() && limiter.allow(progress.step(), Instant::now()) {
                        // A duplicate is the fleet's news, not the job's progress.
                        let for_job = !matches!(progress, Progress::Duplicate { .. });
                        if let Some(jobs) = aws.as_mut().filter(|_| for_job) {
                            publish_all(&client, jobs.on_progress(progress.step(), progress.percent()));
                        }
                        let _ = client.try_publish(&topics.progress, QoS::AtMostOnce, false, progress.to_json());
                    }
                }
                Some(Outbound::CheckForUpdate) => {
                    if *connected.borrow() {
                        match &aws {
                            Some(jobs) => publish_all(&client, jobs.on_connect()),
                            // Subscribing again makes the broker send the
                            // retained messages again; known ones are duplicates.
                            None => suback_topics = subscribe_all(&client, &subscriptions),
                        }
                    }
                }
            },
            _ = aws_retry.tick(), if aws.is_some() => {
                if let Some(jobs) = &aws {
                    if *connected.borrow() {
                        publish_all(&client, jobs.retry());
                    }
                }
            },
            polled = events.recv() => match polled {
                None => break,
                Some(Polled::Event(event)) => match event {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    let _ = connected.send(true);
                    record(&ClientEvent::Connected { session_present: ack.session_present });
                    // Without a stored session the broker forgot our subscriptions.
                    if !ack.session_present {
                        suback_topics = subscribe_all(&client, &subscriptions);
                    }
                    if let Some(jobs) = &aws {
                        publish_all(&client, jobs.on_connect());
                    }
                    let _ = client.try_publish(&topics.online, QoS::AtLeastOnce, true, b"true".to_vec());
                    if let Some(doc) = &last_status {
                        let _ = client.try_publish(&topics.status, QoS::AtLeastOnce, true, doc.clone());
                    }
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    // mosquitto grants and silently withholds on an ACL denial;
                    // other brokers answer Failure: say so.
                    let mut granted = Vec::new();
                    for (code, topic) in ack.return_codes.iter().zip(suback_topics.iter()) {
                        match code {
                            SubscribeReasonCode::Failure => record(&ClientEvent::SubscriptionRefused { topic: topic.clone() }),
                            SubscribeReasonCode::Success(_) => granted.push(topic.clone()),
                        }
                    }
                    record(&ClientEvent::Subscribed { topics: granted });
                }
                Event::Incoming(Packet::Publish(publish)) => {
                    let document = match aws.as_mut() {
                        Some(jobs) if jobs.owns(&publish.topic) => match jobs.on_message(&publish.topic, &publish.payload) {
                            JobsEvent::Document { document, .. } => Some(document),
                            JobsEvent::Reply(list) => {
                                publish_all(&client, list);
                                None
                            }
                            JobsEvent::Nothing => None,
                        },
                        Some(_) => None,
                        None if topics.updates.contains(&publish.topic) => Some(publish.payload.to_vec()),
                        None => None,
                    };
                    if let Some(payload) = document {
                        next_token += 1;
                        let message = Inbound::UpdateMessage {
                            topic: publish.topic.clone(),
                            payload,
                            token: next_token,
                        };
                        // Never wait on the worker: it answers even while a job
                        // runs, so a full queue means a flood. Refuse (and ack)
                        // rather than let keep-alives and shutdown stall.
                        match to_worker.try_send(message) {
                            Ok(()) => {
                                pending_acks.insert(next_token, publish);
                            }
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                let _ = client.try_ack(&publish);
                                let error = "busy: the update worker's queue is full".to_string();
                                crate::logging::event(
                                    crate::logging::Priority::Warning,
                                    &format!("update refused: {error} (on {})", publish.topic),
                                    &[(crate::logging::ERROR, "busy")],
                                );
                                if let Some(jobs) = aws.as_mut() {
                                    publish_all(&client, jobs.on_refused(&error));
                                }
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        }
                    } else {
                        // Not ours to handle: acknowledge so it is not redelivered.
                        let _ = client.try_ack(&publish);
                    }
                }
                                _ => {}
                },
                Some(Polled::Lost { error, retry_in }) => {
                    let _ = connected.send(false);
                    // Unacked messages will be redelivered by the broker.
                    pending_acks.clear();
                    record(&ClientEvent::Disconnected { error, retry_in });
                }
            },
        }
    }
    let _ = connected.send(false);
    let _ = client.try_publish(&topics.online, QoS::AtLeastOnce, true, b"false".to_vec());
    let _ = client.try_disconnect();
    // Let the goodbye go out, then stop polling.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(polled) = events.recv().await {
            if matches!(polled, Polled::Event(Event::Outgoing(rumqttc::Outgoing::Disconnect))) {
                break;
            }
        }
    })
    .await;
    poller.abort();
    // A stopped daemon is not connected: the file must not say otherwise.
    if let Some(path) = &setup.connection_file {
        write_connection_state(path, "stopped");
    }
}

/// What the polling task saw.
enum Polled {
    Event(Event),
    /// The connection failed; the next attempt comes after `retry_in`.
    Lost {
        error: String,
        retry_in: Duration,
    },
}

/// Polls the event loop for ever, waiting out a full-jitter backoff after
/// each failure (reset by a successful connection). A network change (a
/// link up, an address or a route) ends the wait at once and starts the
/// count again: the outage is over, or a new one began.
/// Subscribes to every topic at once; returns them in the order the SUBACK
/// answers them.
fn subscribe_all(client: &AsyncClient, subscriptions: &[String]) -> Vec<String> {
    let filters = subscriptions.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
    let _ = client.try_subscribe_many(filters);
    subscriptions.to_vec()
}

async fn poll_forever(mut eventloop: EventLoop, backoff: Backoff, events: mpsc::Sender<Polled>) {
    let mut failures = 0u32;
    let mut changes = crate::sys::netlink::NetChanges::open().ok();
    loop {
        match eventloop.poll().await {
            Ok(event) => {
                if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                    failures = 0;
                }
                if events.send(Polled::Event(event)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let retry_in = backoff.delay(failures);
                failures = failures.saturating_add(1);
                if events.send(Polled::Lost { error: describe(&e), retry_in }).await.is_err() {
                    return;
                }
                if crate::sys::netlink::sleep_or_change(retry_in, &mut changes).await {
                    failures = 0;
                }
            }
        }
    }
}

/// A connection error in words, with TLS problems named as such.
fn describe(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::ConnectionError as E;
    let text = e.to_string();
    let lower = text.to_lowercase();
    // A refused client certificate shows up as a TLS alert wrapped in an IO
    // or protocol error, depending on when it arrives.
    if lower.contains("alert") || lower.contains("certificate") {
        return format!("mqtt-tls: {text}");
    }
    match e {
        E::Tls(t) => format!("mqtt-tls: {t}"),
        E::ConnectionRefused(code) => format!("mqtt-refused: {code:?}"),
        E::Io(io) => format!("mqtt-io: {io}"),
        other => format!("mqtt: {other}"),
    }
}

/// What the daemon last wrote to `connection.json` (for `fleetd status`
/// when no daemon answers on the bus).
pub fn read_connection_file(state_dir: &std::path::Path) -> Option<crate::status::MqttStatus> {
    let bytes = std::fs::read(state_dir.join("connection.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Not connected, and no error to tell: the daemon is starting or stopped.
/// (`error` names only a failed attempt, so a reader waiting for one never
/// takes this for it.)
fn write_connection_state(path: &std::path::Path, state: &str) {
    let doc = serde_json::json!({ "connected": false, "since": crate::system_now(), "error": null, "state": state });
    write_runtime_doc(path, &doc);
}

/// Runtime information: atomic but not worth an fsync of its own.
fn write_runtime_doc(path: &std::path::Path, doc: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, doc.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn write_connection_file(path: &std::path::Path, event: &ClientEvent) {
    let doc = match event {
        ClientEvent::Connected { session_present } => serde_json::json!({
            "connected": true, "since": crate::system_now(), "session_present": session_present, "error": null,
        }),
        ClientEvent::Disconnected { error, retry_in } => serde_json::json!({
            "connected": false, "since": crate::system_now(), "error": error, "retry_in_ms": retry_in.as_millis() as u64,
        }),
        _ => return,
    };
    write_runtime_doc(path, &doc);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a broker that answers a SubAck failure (mosquitto never does;
    /// others do), the refusal is reported by topic and the rest subscribed.
    #[tokio::test]
    async fn a_subscription_refused_in_the_suback_is_reported() {
        let addr = crate::demo_broker::start_denying(vec!["fleet/acme/groups/secret/".into()]).await.unwrap();
        let topics = Topics::native("acme", "gw-1", &["pilot".into(), "secret".into()]);
        let options = super::super::plain_options_for_demo("gw-1", &addr.ip().to_string(), addr.port(), None);
        let setup = ClientSetup {
            options,
            topics,
            aws_jobs: None,
            backoff: Backoff { base: Duration::from_millis(50), cap: Duration::from_millis(200) },
            connection_file: None,
        };
        let (to_worker, _inbox) = mpsc::channel(4);
        let (_outbox, from_worker) = mpsc::unbounded_channel();
        let (connected, _) = watch::channel(false);
        let (stop, shutdown) = watch::channel(false);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let client = tokio::spawn(run(setup, to_worker, from_worker, connected, shutdown, move |e| {
            let _ = events_tx.send(e.clone());
        }));
        let mut refused = Vec::new();
        let mut granted = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while granted.is_empty() {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(ClientEvent::SubscriptionRefused { topic })) => refused.push(topic),
                Ok(Some(ClientEvent::Subscribed { topics })) => granted = topics,
                Ok(Some(_)) => {}
                other => panic!("no SubAck: {other:?}"),
            }
        }
        assert_eq!(refused, vec!["fleet/acme/groups/secret/update".to_string()]);
        assert_eq!(granted, vec!["fleet/acme/devices/gw-1/update", "fleet/acme/groups/pilot/update"]);
        let _ = stop.send(true);
        let _ = client.await;
    }
}
