//! `fleetd run`: the update worker on its own thread (its slot IO never
//! stalls the MQTT keep-alive), the MQTT task on the main runtime, and the
//! messages between them. Messages are acknowledged to the broker only after
//! what they carry is persisted.

use crate::backoff::Backoff;
use crate::config::Config;
use crate::mqtt::{self, ClientEvent, ClientSetup, Inbound, Outbound, Topics};
use crate::update::{Report, Updater};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Runs until SIGTERM/SIGINT. `open` builds the updater (store, boot backend).
pub fn run(
    config: Config,
    open: impl FnOnce(Config) -> Result<Updater, String> + Send + 'static,
) -> Result<(), String> {
    let Some(mqtt_config) = config.mqtt.clone() else {
        return Err("no [mqtt] section: nothing to connect to".into());
    };

    let (cert, key) = mqtt::identity_paths(&config, &mqtt_config);
    mqtt::check_identity(&cert, &config.device.id).map_err(|e| e.to_string())?;
    let tls = mqtt::tls_config(&mqtt_config.ca_file, &cert, &key).map_err(|e| e.to_string())?;
    run_until(config, Some(tls), open, crate::cli::fleetctl::shutdown_signal())
}

/// The daemon until `shutdown` completes. `tls` is the mutual-TLS setup; only
/// the built-in demo passes `None` (plain MQTT on loopback) — no
/// configuration can.
pub fn run_until(
    config: Config,
    tls: Option<rustls::ClientConfig>,
    open: impl FnOnce(Config) -> Result<Updater, String> + Send + 'static,
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
        backoff: Backoff { base: Duration::from_secs(1), cap: Duration::from_secs(300) },
        connection_file: Some(config.device.state_dir.join("connection.json")),
    };

    let (to_worker, worker_inbox) = mpsc::channel::<Inbound>(8);
    let (outbox, from_worker) = mpsc::unbounded_channel::<Outbound>();
    let (connected_tx, connected_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let worker_config = config.clone();
    let worker = std::thread::Builder::new()
        .name("update-worker".into())
        .spawn(move || {
            let result = worker_main(worker_config, open, worker_inbox, outbox, connected_rx);
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
                let _ = shutdown_tx.send(true);
                // Say goodbye (online=false, DISCONNECT) before leaving.
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut client).await;
            }
        }
    });
    // The worker sees its inbox close. A write in progress has reached a
    // durable checkpoint or will be resumed from the last one.
    drop(runtime);
    let _ = worker.join();
    Ok(())
}

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
    config: Config,
    open: impl FnOnce(Config) -> Result<Updater, String>,
    mut inbox: mpsc::Receiver<Inbound>,
    outbox: mpsc::UnboundedSender<Outbound>,
    connected: watch::Receiver<bool>,
) -> Result<(), String> {
    let policy = config.policy().map_err(|e| e.to_string())?;
    let mut updater = open(config)?;
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
        if let Err(e) = updater.resume().await {
            eprintln!("fleetd: resuming: {e}");
        }
        updater.report_status();
        while let Some(Inbound::UpdateMessage { topic, payload, token }) = inbox.recv().await {
            handle_message(&mut updater, &policy, &topic, &payload, token, &outbox).await;
            updater.report_status();
        }
    });
    Ok(())
}

/// One update message: a duplicate, a refusal (recorded), or a new job.
async fn handle_message(
    updater: &mut Updater,
    policy: &crate::trust::Policy,
    topic: &str,
    payload: &[u8],
    token: u64,
    outbox: &mpsc::UnboundedSender<Outbound>,
) {
    let ack = || {
        let _ = outbox.send(Outbound::Ack(token));
    };
    let refuse = |error: &str| {
        let _ = outbox.send(Outbound::Refused { token, error: error.to_string() });
    };
    let jti = crate::cli::peek_jti(payload);
    if let Some(jti) = &jti {
        if updater.store().state().knows_job(jti) {
            let detail = "a second delivery of a message already handled; not run again";
            eprintln!("update {jti} on {topic}: {detail}");
            // The fleet sees it too: a replay or a redelivery is not silent.
            let payload = serde_json::json!({ "jti": jti, "step": "duplicate", "detail": detail });
            let _ = outbox.send(Outbound::Progress {
                step: "duplicate".into(),
                payload: payload.to_string().into_bytes(),
            });
            ack();
            return;
        }
    }
    if let Some(job) = updater.store().state().active_job() {
        let error = format!("busy: update {} (v{}) is in progress", job.jti, job.version);
        record_refusal(updater, &error);
        refuse(&error);
        return;
    }
    let verdict = policy.verify(payload, &updater.store().state().trust_state(), crate::system_now());
    match verdict {
        Err(e) => {
            record_refusal(updater, &format!("{e} (on {topic})"));
            refuse(&e.to_string());
        }
        Ok(verified) => {
            let outbox = outbox.clone();
            let on_persisted = Box::new(move || {
                let _ = outbox.send(Outbound::Ack(token));
            });
            if let Err(e) = updater.start_then(&verified.claims, on_persisted).await {
                eprintln!("update {}: {e}", verified.claims.jti);
                record_refusal(updater, &e.to_string());
                refuse(&e.to_string());
            }
        }
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
