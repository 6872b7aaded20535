//! The MQTT task: keeps one connection alive and moves messages between the
//! broker and the update worker. It never decides anything about updates.

use super::aws::{AwsJobs, JobsEvent};
use super::{ProgressLimiter, Topics};
use crate::backoff::ReconnectPacer;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeReasonCode};
use std::collections::{HashMap, VecDeque};
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
    /// The message was refused (and the refusal recorded, where it could
    /// be): ack it and report it, in the AWS profile as a REJECTED job.
    Refused {
        token: u64,
        /// The refusal's stable name (`busy`, `message-too-large`, ...).
        name: &'static str,
        error: String,
    },
    /// Neither the job nor its refusal could be saved: the message stays
    /// unacknowledged and is handed to the worker again after
    /// `RETRY_UNSAVED`, so memory, disk and the broker never disagree.
    NotSaved {
        token: u64,
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
    /// Bytes of the image in the slot; bytes fetched and reused to get there.
    Download { jti: String, version: u64, done: u64, total: u64, fetched: u64, reused: u64 },
    /// A new step of the job (the status `state`) or an event in it.
    Step { state: crate::status::UpdateState, detail: String },
    /// A second delivery of a message already handled: not run again, but
    /// shown to the fleet (a replay or a redelivery is never silent).
    Duplicate { jti: String },
    /// A message refused: always sent, at QoS 1, whatever the rate.
    Refused { name: &'static str, detail: String },
}

impl Progress {
    /// The step for rate limiting: a change always goes out.
    fn step(&self) -> &str {
        match self {
            Self::Download { .. } => "downloading",
            Self::Step { state, .. } => state.as_str(),
            Self::Duplicate { .. } => "duplicate",
            Self::Refused { .. } => "refused",
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
            Self::Download { jti, version, done, total, fetched, reused } => serde_json::json!({
                "jti": jti, "version": version, "step": "downloading",
                "progress": done * 100 / (*total).max(1), "bytes": done, "total": total,
                "bytes_fetched": fetched, "bytes_reused": reused,
            }),
            Self::Step { state, detail } => serde_json::json!({ "step": state, "detail": detail }),
            Self::Duplicate { jti } => serde_json::json!({
                "jti": jti, "step": "duplicate",
                "detail": "a second delivery of a message already handled; not run again",
            }),
            Self::Refused { name, detail } => serde_json::json!({
                "step": "refused", "error": name, "detail": detail,
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
    Disconnected { error: Lost, retry_in: Duration },
}

crate::error_name::named_error! {
    /// Why the connection was lost, with TLS problems named as such.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum Lost {
        #[name = "mqtt-tls"]
        #[error("{name}: {0}")]
        Tls(String),
        #[name = "mqtt-refused"]
        #[error("{name}: {0}")]
        Refused(String),
        #[name = "mqtt-io"]
        #[error("{name}: {0}")]
        Io(String),
        #[name = "mqtt"]
        #[error("{name}: {0}")]
        Other(String),
    }
}

pub struct ClientSetup {
    pub options: rumqttc::MqttOptions,
    pub topics: Topics,
    /// `Some` for the AWS IoT Jobs profile: updates arrive as job documents.
    pub aws_jobs: Option<AwsJobs>,
    pub reconnect: ReconnectPacer,
    /// Written on every connect and disconnect, for `fleetd status`.
    pub connection_file: Option<PathBuf>,
    /// A renewed identity: the client ends its connection cleanly
    /// (DISCONNECT, so no last will) and reconnects with it, keeping its
    /// session.
    pub renewed: Option<mpsc::Receiver<rustls::ClientConfig>>,
}

/// Messages handed to the worker's queue or waiting for room in it. Each
/// is unacknowledged until the worker answers, so the broker's in-flight
/// window (20 in mosquitto) bounds this; past it, the broker (or whoever)
/// is made to wait: no more is read from the connection until room frees.
pub const MAX_WAITING: usize = 64;

/// How soon a message whose job or refusal could not be saved (a full
/// disk) is handed to the worker again. It stays unacknowledged meanwhile.
pub const RETRY_UNSAVED: Duration = Duration::from_secs(5);

/// What goes to the broker, in order, through one sender task: an
/// acknowledgement or a report is never dropped because rumqttc's request
/// queue is full at that moment; the task waits for room instead.
enum Request {
    Ack(rumqttc::Publish),
    Publish { topic: String, qos: QoS, retain: bool, payload: Vec<u8> },
}

/// A received message the worker has not answered yet.
struct Unanswered {
    /// The publish without its payload: its topic, and all an
    /// acknowledgement needs.
    publish: rumqttc::Publish,
    payload: Vec<u8>,
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
    let poller =
        tokio::spawn(poll_forever(eventloop, setup.reconnect, events_tx, client.clone(), setup.renewed));
    let (requests, requests_rx) = mpsc::unbounded_channel();
    let sender = tokio::spawn(send_forever(client.clone(), requests_rx));
    let topics = setup.topics;
    let mut aws = setup.aws_jobs;
    let subscriptions = match &aws {
        Some(jobs) => jobs.subscriptions(),
        None => topics.updates.clone(),
    };
    let mut aws_retry = tokio::time::interval(Duration::from_secs(15));
    let send = |request: Request| {
        let _ = requests.send(request);
    };
    let publish_all = |list: Vec<super::aws::Publish>| {
        for (topic, payload) in list {
            send(Request::Publish { topic, qos: QoS::AtLeastOnce, retain: false, payload });
        }
    };
    let mut unanswered: HashMap<u64, Unanswered> = HashMap::new();
    // Tokens received, in order, not yet in the worker's queue.
    let mut waiting: VecDeque<u64> = VecDeque::new();
    // Tokens whose save failed, with when to try again.
    let mut unsaved: VecDeque<(Instant, u64)> = VecDeque::new();
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
        let held = unanswered.len();
        let retry_at = unsaved.front().map(|(at, _)| *at);
        tokio::select! {
            _ = shutdown.changed() => break,
            permit = to_worker.reserve(), if !waiting.is_empty() => {
                let Ok(permit) = permit else { break };
                if let Some(token) = waiting.pop_front() {
                    if let Some(m) = unanswered.get(&token) {
                        permit.send(Inbound::UpdateMessage { topic: m.publish.topic.clone(), payload: m.payload.clone(), token });
                    }
                }
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                if let Some((_, token)) = unsaved.pop_front() {
                    if unanswered.contains_key(&token) {
                        waiting.push_back(token);
                    }
                }
            }
            outbound = from_worker.recv() => match outbound {
                None => break,
                Some(Outbound::Ack(token)) => {
                    if let Some(m) = unanswered.remove(&token) {
                        send(Request::Ack(m.publish));
                    }
                }
                Some(Outbound::Refused { token, name, error }) => {
                    if let Some(m) = unanswered.remove(&token) {
                        send(Request::Ack(m.publish));
                    }
                    match aws.as_mut() {
                        Some(jobs) => publish_all(jobs.on_refused(&error)),
                        None => send(Request::Publish {
                            topic: topics.progress.clone(),
                            qos: QoS::AtLeastOnce,
                            retain: false,
                            payload: Progress::Refused { name, detail: error }.to_json(),
                        }),
                    }
                }
                Some(Outbound::NotSaved { token }) => {
                    if unanswered.contains_key(&token) {
                        unsaved.push_back((Instant::now() + RETRY_UNSAVED, token));
                    }
                }
                Some(Outbound::Status(doc)) => {
                    let bytes = serde_json::to_vec(&doc).unwrap_or_default();
                    if *connected.borrow() {
                        send(Request::Publish { topic: topics.status.clone(), qos: QoS::AtLeastOnce, retain: true, payload: bytes.clone() });
                        if let (Some(jobs), Ok(value)) = (aws.as_mut(), serde_json::to_value(&doc)) {
                            publish_all(jobs.on_status(&value));
                        }
                    }
                    last_status = Some(bytes);
                }
                Some(Outbound::Progress(progress)) => {
                    if *connected.borrow() && limiter.allow(progress.step(), Instant::now()) {
                        // A duplicate is the fleet's news, not the job's progress.
                        let for_job = !matches!(progress, Progress::Duplicate { .. });
                        if let Some(jobs) = aws.as_mut().filter(|_| for_job) {
                            publish_all(jobs.on_progress(progress.step(), progress.percent()));
                        }
                        send(Request::Publish { topic: topics.progress.clone(), qos: QoS::AtMostOnce, retain: false, payload: progress.to_json() });
                    }
                }
                Some(Outbound::CheckForUpdate) => {
                    if *connected.borrow() {
                        match &aws {
                            Some(jobs) => publish_all(jobs.on_connect()),
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
                        publish_all(jobs.retry());
                    }
                }
            },
            // Backpressure: while MAX_WAITING messages wait for the worker,
            // nothing more is read, so nothing is refused unseen.
            polled = events.recv(), if held < MAX_WAITING => match polled {
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
                        publish_all(jobs.on_connect());
                    }
                    send(Request::Publish { topic: topics.online.clone(), qos: QoS::AtLeastOnce, retain: true, payload: b"true".to_vec() });
                    if let Some(doc) = &last_status {
                        send(Request::Publish { topic: topics.status.clone(), qos: QoS::AtLeastOnce, retain: true, payload: doc.clone() });
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
                Event::Incoming(Packet::Publish(mut publish)) => {
                    let document = match aws.as_mut() {
                        Some(jobs) if jobs.owns(&publish.topic) => match jobs.on_message(&publish.topic, &publish.payload) {
                            JobsEvent::Document { document, .. } => Some(document),
                            JobsEvent::Reply(list) => {
                                publish_all(list);
                                None
                            }
                            JobsEvent::Nothing => None,
                        },
                        Some(_) => None,
                        None if topics.updates.contains(&publish.topic) => Some(publish.payload.to_vec()),
                        None => None,
                    };
                    // The acknowledgement needs only the packet id.
                    publish.payload = bytes::Bytes::new();
                    match document {
                        Some(mut payload) => {
                            // One byte past the limit is enough for the
                            // verifier to refuse it by name; no more is kept.
                            payload.truncate(crate::trust::MAX_MESSAGE_BYTES + 1);
                            next_token += 1;
                            unanswered.insert(next_token, Unanswered { publish, payload });
                            waiting.push_back(next_token);
                        }
                        // Not ours to handle: acknowledge so it is not redelivered.
                        None => send(Request::Ack(publish)),
                    }
                }
                _ => {}
                },
                Some(Polled::Lost { error, retry_in }) => {
                    let _ = connected.send(false);
                    // Unacked messages will be redelivered by the broker, on
                    // a session whose packet ids mean something else.
                    unanswered.clear();
                    waiting.clear();
                    unsaved.clear();
                    record(&ClientEvent::Disconnected { error, retry_in });
                }
            },
        }
    }
    let _ = connected.send(false);
    sender.abort();
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

/// Hands each request to rumqttc in order, waiting while its queue is full
/// (the poller drains it; it never waits on this task).
async fn send_forever(client: AsyncClient, mut requests: mpsc::UnboundedReceiver<Request>) {
    while let Some(request) = requests.recv().await {
        let sent = match request {
            Request::Ack(publish) => client.ack(&publish).await,
            Request::Publish { topic, qos, retain, payload } => {
                client.publish(topic, qos, retain, payload).await
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// What the polling task saw.
enum Polled {
    Event(Event),
    /// The connection failed; the next attempt comes after `retry_in`.
    Lost {
        error: Lost,
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

async fn poll_forever(
    mut eventloop: EventLoop,
    mut pacer: ReconnectPacer,
    events: mpsc::Sender<Polled>,
    client: AsyncClient,
    mut renewed: Option<mpsc::Receiver<rustls::ClientConfig>>,
) {
    let origin = Instant::now();
    let mut changes = crate::sys::netlink::NetChanges::open().ok();
    loop {
        // Between two polls (never inside one: a connect is never cut
        // short): a renewed identity is used from the next connection on,
        // and the current one ends with a DISCONNECT (no last will; the
        // session stays, clean_session is false). A poll returns at least
        // every keep-alive, so this waits no longer than that.
        if let Some(tls) = renewed.as_mut().and_then(|r| r.try_recv().ok()) {
            eventloop.mqtt_options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
            ));
            if eventloop.network.is_some() {
                let _ = client.try_disconnect();
                pacer.restart_backoff();
            }
        }
        if eventloop.network.is_none() {
            pacer.attempting(origin.elapsed());
        }
        match eventloop.poll().await {
            Ok(event) => {
                if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                    pacer.connected();
                }
                if events.send(Polled::Event(event)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let retry_in = pacer.delay(origin.elapsed(), crate::backoff::random_u64());
                if events.send(Polled::Lost { error: describe(&e), retry_in }).await.is_err() {
                    return;
                }
                if crate::sys::netlink::sleep_or_change(retry_in, &mut changes).await {
                    // The outage may be over: try again as soon as the floor allows.
                    pacer.restart_backoff();
                    tokio::time::sleep(pacer.floor(origin.elapsed())).await;
                }
            }
        }
    }
}

/// A connection error by cause.
fn describe(e: &rumqttc::ConnectionError) -> Lost {
    use rumqttc::ConnectionError as E;
    let text = e.to_string();
    let lower = text.to_lowercase();
    // A refused client certificate shows up as a TLS alert wrapped in an IO
    // or protocol error, depending on when it arrives (rumqttc's text: the
    // alert is not typed where it surfaces).
    if lower.contains("alert") || lower.contains("certificate") {
        return Lost::Tls(text);
    }
    match e {
        E::Tls(t) => Lost::Tls(t.to_string()),
        E::ConnectionRefused(code) => Lost::Refused(format!("{code:?}")),
        E::Io(io) => Lost::Io(io.to_string()),
        other => Lost::Other(other.to_string()),
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
            "connected": false, "since": crate::system_now(), "error": error.to_string(), "retry_in_ms": retry_in.as_millis() as u64,
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
        let addr =
            fleetd_fixture::broker::start_denying(vec!["fleet/acme/groups/secret/".into()]).await.unwrap();
        let topics = Topics::native("acme", "gw-1", &["pilot".into(), "secret".into()]);
        let options = super::super::plain_options_for_demo("gw-1", &addr.ip().to_string(), addr.port(), None);
        let setup = ClientSetup {
            options,
            topics,
            aws_jobs: None,
            reconnect: crate::backoff::ReconnectPacer::new(
                crate::backoff::Backoff { base: Duration::from_millis(50), cap: Duration::from_millis(200) },
                Duration::ZERO,
                0,
            ),
            connection_file: None,
            renewed: None,
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
