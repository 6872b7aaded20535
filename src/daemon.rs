//! `fleetd run`: the update worker on its own thread (its slot IO never
//! stalls the MQTT keep-alive), the MQTT task on the main runtime, and the
//! messages between them. Messages are acknowledged to the broker only after
//! what they carry is persisted.

use crate::config::Config;
use crate::mqtt::{self, ClientEvent, ClientSetup, Inbound, Outbound, Topics};
use crate::update::{Report, Updater};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Runs until SIGTERM/SIGINT. `open` builds the updater (store, boot backend).
pub fn run(config: Config, open: impl FnOnce(Config) -> Result<Updater, String>) -> Result<(), String> {
    let Some(mqtt_config) = config.mqtt.clone() else {
        return Err("no [mqtt] section: nothing to connect to".into());
    };

    let (cert, key) = mqtt::identity_paths(&config, &mqtt_config);
    mqtt::check_identity(&cert, &config.device.id).map_err(|e| e.to_string())?;
    let tls = mqtt::tls_config(&mqtt_config.ca_file, &cert, &key).map_err(|e| e.to_string())?;
    run_until(config, Some(tls), open, crate::sys::signals::shutdown())
}

/// The daemon until `shutdown` completes. `tls` is the mutual-TLS setup; only
/// the built-in demo passes `None` (plain MQTT on loopback) — no
/// configuration can.
pub fn run_until(
    config: Config,
    tls: Option<rustls::ClientConfig>,
    open: impl FnOnce(Config) -> Result<Updater, String>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let Some(mqtt_config) = config.mqtt.clone() else {
        return Err("no [mqtt] section: nothing to connect to".into());
    };
    let topics = Topics::for_config(&config);
    let will = Some((topics.online.clone(), b"false".to_vec()));
    let options = match tls {
        Some(tls) => mqtt::options(
            &config.device.id,
            &mqtt_config.host,
            mqtt_config.port,
            tls,
            mqtt_config.keep_alive_s,
            will,
        ),
        None => mqtt::plain_options_for_demo(&config.device.id, &mqtt_config.host, mqtt_config.port, will),
    };
    let aws_jobs = match mqtt_config.profile {
        crate::config::MqttProfile::AwsIotJobs => Some(mqtt::aws::AwsJobs::new(&config.device.id)),
        crate::config::MqttProfile::Native => None,
    };
    let setup = ClientSetup {
        options,
        topics,
        aws_jobs,
        backoff: mqtt::RECONNECT,
        connection_file: Some(config.device.state_dir.join("connection.json")),
    };

    // Opened here, before anything connects: a second daemon (or a
    // running `fleetd install`) holds the state lock, and this one stops.
    let policy = config.policy().map_err(|e| e.to_string())?;
    let updater = open(config.clone())?;

    let (to_worker, worker_inbox) = mpsc::channel::<Inbound>(WORKER_QUEUE);
    let (outbox, from_worker) = mpsc::unbounded_channel::<Outbound>();
    let (connected_tx, connected_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let worker_shutdown = shutdown_rx.clone();
    let worker = std::thread::Builder::new()
        .name("update-worker".into())
        .spawn(move || {
            let result = worker_main(updater, policy, worker_inbox, outbox, connected_rx, worker_shutdown);
            if let Err(e) = &result {
                eprintln!("fleetd: update worker: {e}");
            }
            result
        })
        .map_err(|e| e.to_string())?;

    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let client = mqtt::run(setup, to_worker, from_worker, connected_tx, shutdown_rx, log_client_event);
        tokio::pin!(client);
        tokio::select! {
            _ = &mut client => {}
            _ = shutdown => {
                // The worker drops its job at its next await point (every
                // slot and env write is synchronous, so none is cut short);
                // the MQTT task says goodbye (online=false, DISCONNECT).
                let _ = shutdown_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut client).await;
            }
        }
    });
    drop(runtime);
    // A download in progress stopped at a durable checkpoint, or will be
    // resumed from the last one at the next start.
    let _ = worker.join();
    Ok(())
}

/// Update messages queued for the worker. The worker answers at once even
/// while a job runs, so the queue stays short; past this the MQTT task
/// refuses a message itself rather than wait.
pub const WORKER_QUEUE: usize = 8;

fn log_client_event(event: &ClientEvent) {
    match event {
        ClientEvent::Connected { session_present } => {
            eprintln!("mqtt: connected (session present: {session_present})")
        }
        ClientEvent::Subscribed { topics } => eprintln!("mqtt: subscribed to {}", topics.join(", ")),
        ClientEvent::SubscriptionRefused { topic } => {
            eprintln!("mqtt-suback: the broker refused the subscription to {topic}")
        }
        ClientEvent::Disconnected { error, retry_in } => {
            eprintln!("{error}; reconnecting in {} ms", retry_in.as_millis())
        }
    }
}

fn worker_main(
    mut updater: Updater,
    policy: crate::trust::Policy,
    mut inbox: mpsc::Receiver<Inbound>,
    outbox: mpsc::UnboundedSender<Outbound>,
    connected: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    updater.set_health_gate(connected);
    let reports = outbox.clone();
    updater.on_report(Box::new(move |report: &Report| match report {
        Report::Status(doc) => {
            let _ = reports.send(Outbound::Status(serde_json::to_vec(doc).unwrap_or_default()));
        }
        Report::Progress { jti, version, done, total } => {
            let payload = serde_json::json!({
                "jti": jti, "version": version, "step": "downloading",
                "progress": done * 100 / (*total).max(1), "bytes": done, "total": total,
            });
            let _ = reports.send(Outbound::Progress {
                step: "downloading".into(),
                payload: payload.to_string().into_bytes(),
            });
        }
        Report::Step { state, detail } => {
            eprintln!("{state}: {detail}");
            let payload = serde_json::json!({ "step": state, "detail": detail });
            let _ = reports.send(Outbound::Progress {
                step: state.to_string(),
                payload: payload.to_string().into_bytes(),
            });
        }
    }));
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let busy = Busy::of(&updater);
        match while_busy(updater.resume(), &busy, &mut inbox, &outbox, &mut shutdown).await {
            None => return,
            Some(Err(e)) => eprintln!("fleetd: resuming: {e}"),
            Some(Ok(())) => {}
        }
        updater.report_status();
        loop {
            let message = tokio::select! {
                message = inbox.recv() => message,
                _ = shutdown.wait_for(|stop| *stop) => None,
            };
            let Some(Inbound::UpdateMessage { topic, payload, token }) = message else { break };
            let Some(claims) = admit(&mut updater, &policy, &topic, &payload, token, &outbox) else {
                updater.report_status();
                continue;
            };
            let ack = outbox.clone();
            let on_persisted = Box::new(move || {
                let _ = ack.send(Outbound::Ack(token));
            });
            let busy = Busy::running(&updater, &claims);
            let started = updater.start_then(&claims, on_persisted);
            match while_busy(started, &busy, &mut inbox, &outbox, &mut shutdown).await {
                None => break,
                Some(Err(e)) => {
                    eprintln!("update {}: {e}", claims.jti);
                    record_refusal(&mut updater, &e.to_string());
                    let _ = outbox.send(Outbound::Refused { token, error: e.to_string() });
                }
                Some(Ok(())) => {}
            }
            updater.report_status();
        }
    });
    Ok(())
}

/// What the worker can say about a message while a job runs, without the
/// updater (the job holds it): the jtis it already knows, and the job.
struct Busy {
    known: Vec<String>,
    running: Option<(String, u64)>,
}

impl Busy {
    fn of(updater: &Updater) -> Self {
        let state = updater.store().state();
        let mut known: Vec<String> = state.history.iter().map(|h| h.jti.clone()).collect();
        known.extend(state.job.as_ref().map(|j| j.jti.clone()));
        Self { known, running: state.active_job().map(|j| (j.jti.clone(), j.version)) }
    }

    fn running(updater: &Updater, claims: &crate::trust::Claims) -> Self {
        let mut busy = Self::of(updater);
        busy.known.push(claims.jti.clone());
        busy.running = Some((claims.jti.clone(), claims.version));
        busy
    }
}

/// Runs `work` (a job) to its end while answering every update message that
/// arrives meanwhile, so the MQTT task never waits on the worker. `None`
/// when shutdown came first: `work` is dropped at an await point, and the
/// job stays at its last persisted checkpoint, to be resumed at next start.
async fn while_busy<T>(
    work: impl std::future::Future<Output = T>,
    busy: &Busy,
    inbox: &mut mpsc::Receiver<Inbound>,
    outbox: &mpsc::UnboundedSender<Outbound>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<T> {
    tokio::pin!(work);
    let mut inbox_open = true;
    loop {
        tokio::select! {
            done = &mut work => return Some(done),
            _ = shutdown.wait_for(|stop| *stop) => return None,
            message = inbox.recv(), if inbox_open => match message {
                Some(Inbound::UpdateMessage { topic, payload, token }) => {
                    answer_while_busy(busy, &topic, &payload, token, outbox)
                }
                None => inbox_open = false,
            },
        }
    }
}

fn answer_while_busy(
    busy: &Busy,
    topic: &str,
    payload: &[u8],
    token: u64,
    outbox: &mpsc::UnboundedSender<Outbound>,
) {
    let jti = crate::trust::peek_jti(payload);
    if let Some(jti) = jti.filter(|j| busy.known.contains(j)) {
        report_duplicate(&jti, topic, outbox);
        let _ = outbox.send(Outbound::Ack(token));
        return;
    }
    let error = match &busy.running {
        Some((jti, version)) => format!("busy: update {jti} (v{version}) is in progress"),
        None => "busy: the device is resuming an update".to_string(),
    };
    eprintln!("update refused: {error} (on {topic})");
    let _ = outbox.send(Outbound::Refused { token, error });
}

fn report_duplicate(jti: &str, topic: &str, outbox: &mpsc::UnboundedSender<Outbound>) {
    let detail = "a second delivery of a message already handled; not run again";
    eprintln!("update {jti} on {topic}: {detail}");
    // The fleet sees it too: a replay or a redelivery is not silent.
    let payload = serde_json::json!({ "jti": jti, "step": "duplicate", "detail": detail });
    let _ = outbox
        .send(Outbound::Progress { step: "duplicate".into(), payload: payload.to_string().into_bytes() });
}

/// One update message while idle: a duplicate (acked), a refusal (recorded,
/// then acked), or verified claims for a new job.
fn admit(
    updater: &mut Updater,
    policy: &crate::trust::Policy,
    topic: &str,
    payload: &[u8],
    token: u64,
    outbox: &mpsc::UnboundedSender<Outbound>,
) -> Option<crate::trust::Claims> {
    let refuse = |updater: &mut Updater, error: &str, recorded: &str| {
        record_refusal(updater, recorded);
        let _ = outbox.send(Outbound::Refused { token, error: error.to_string() });
    };
    if let Some(jti) = crate::trust::peek_jti(payload) {
        if updater.store().state().knows_job(&jti) {
            report_duplicate(&jti, topic, outbox);
            let _ = outbox.send(Outbound::Ack(token));
            return None;
        }
    }
    if let Some(job) = updater.store().state().active_job() {
        let error = format!("busy: update {} (v{}) is in progress", job.jti, job.version);
        refuse(updater, &error, &error);
        return None;
    }
    match policy.verify(payload, &updater.store().state().trust_state(), crate::system_now()) {
        Err(e) => {
            refuse(updater, &e.to_string(), &format!("{e} (on {topic})"));
            None
        }
        Ok(verified) => Some(verified.claims),
    }
}

/// Records a refused message as the last error before it is acknowledged.
fn record_refusal(updater: &mut Updater, error: &str) {
    eprintln!("update refused: {error}");
    let store = updater.store_mut();
    store.state_mut().last_error = Some(error.to_string());
    if let Err(e) = store.save() {
        eprintln!("fleetd: cannot record the refusal: {e}");
    }
}
