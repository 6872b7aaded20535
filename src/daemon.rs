//! `fleetd run`: the update worker on its own thread (its slot IO never
//! stalls the MQTT keep-alive), the MQTT task on the main runtime, and the
//! messages between them. Messages are acknowledged to the broker only after
//! what they carry is persisted.

use crate::config::{Broker, Config};
use crate::logging::{self, Priority};
use crate::mqtt::{self, ClientEvent, ClientSetup, Inbound, Outbound, Progress, Topics};
use crate::provision::phase::PhaseError;
use crate::provision::store::{ProvisionStore, Provisioned};
use crate::sys::notify;
use crate::update::{Admission, Executor, OpenError, Refusal, Report, Source};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no [mqtt] section: nothing to connect to")]
    NoMqtt,
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Provision(#[from] PhaseError),
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Runs until SIGTERM/SIGINT. `open` builds the executor (store, boot
/// backend). An unprovisioned device with a `[provision]` section first
/// provisions (access point, portal, handover), then connects.
pub fn run(
    config: Config,
    open: impl FnOnce(Config) -> Result<Executor, OpenError>,
) -> Result<(), DaemonError> {
    // Opened first: a second daemon (or a running `fleetd install`) holds
    // the state lock, and this one stops before raising anything.
    let mut executor = open(config.clone())?;
    let clock_floor = executor.clock_floor();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        // Handlers first: from here a SIGTERM is a clean stop.
        let signals = crate::sys::signals::shutdown();
        // systemd: ready once the state is loaded; the watchdog is fed by
        // this (the main) loop, so a wedged loop stops the pings.
        notify::send("READY=1");
        notify::status("started");
        tokio::spawn(notify::feed_watchdog());
        wedge_for_tests();
        let shutdown = async {
            signals.await;
            notify::send("STOPPING=1");
        };
        tokio::pin!(shutdown);
        let provisioned = tokio::select! {
            provisioned = provision_if_needed(&config, clock_floor) => provisioned?,
            _ = &mut shutdown => return Ok(()),
        };
        let Some(provisioned) = provisioned else {
            // The access point timed out: nothing to connect to until a restart.
            notify::status("unprovisioned: the access point timed out; restart fleetd to provision");
            shutdown.await;
            return Ok(());
        };
        let broker = config
            .broker(provisioned.as_ref().map(|p| (p.broker_host.as_str(), p.broker_port)))
            .ok_or(DaemonError::NoMqtt)?;
        executor.set_provisioning(crate::provision::phase::facts(&config));
        mqtt::check_identity(&broker.cert_file, &config.device.id)?;
        let tls = mqtt::tls_config(&broker.ca_file, &broker.cert_file, &broker.key_file)?;
        notify::status(&format!("connecting to {}:{}", broker.host, broker.port));
        connected(config, broker, Some(tls), executor, shutdown).await
    })
}

/// A test hook: with `FLEETD_TEST_WEDGE_MAIN_LOOP_FILE=PATH`, the main
/// loop's thread blocks for good once PATH exists, so a test can see the
/// watchdog pings stop. Nothing else reads the variable.
fn wedge_for_tests() {
    let Some(trigger) = std::env::var_os("FLEETD_TEST_WEDGE_MAIN_LOOP_FILE") else { return };
    let trigger = std::path::PathBuf::from(trigger);
    tokio::spawn(async move {
        while !trigger.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        crate::logging::log("test hook: wedging the main loop");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    });
}

/// `Ok(Some(None))`: nothing to provision; `Ok(Some(Some(record)))`: the
/// provisioning to connect with; `Ok(None)`: the access point timed out.
async fn provision_if_needed(
    config: &Config,
    clock_floor: u64,
) -> Result<Option<Option<Provisioned>>, DaemonError> {
    let Some(settings) = &config.provision else { return Ok(Some(None)) };
    let store = ProvisionStore::new(&config.device.state_dir);
    if let Some(record) = store.load().map_err(PhaseError::from)? {
        if record.complete() {
            return Ok(Some(Some(record)));
        }
    }
    let client_dir = crate::net::client_dir(&config.device.state_dir);
    let backend = crate::net::Backend::from_config(settings, &client_dir).await.map_err(PhaseError::from)?;
    match crate::provision::phase::run(config, backend, clock_floor).await {
        Ok(record) => Ok(Some(Some(record))),
        Err(e @ PhaseError::Timeout(_)) => {
            crate::logging::log(&format!("provisioning: {e}"));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The daemon until `shutdown` completes. `tls` is the mutual-TLS setup; only
/// the built-in demo passes `None` (plain MQTT on loopback) — no
/// configuration can.
pub fn run_until(
    config: Config,
    tls: Option<rustls::ClientConfig>,
    open: impl FnOnce(Config) -> Result<Executor, OpenError>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let broker = config.broker(None).ok_or(DaemonError::NoMqtt)?;
    let executor = open(config.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(connected(config, broker, tls, executor, shutdown))
}

/// Connected: the MQTT task here, the update worker on its own thread.
async fn connected(
    config: Config,
    broker: Broker,
    tls: Option<rustls::ClientConfig>,
    executor: Executor,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let topics = Topics::for_config(&config);
    let will = Some((topics.online.clone(), b"false".to_vec()));
    let options = match tls {
        Some(tls) => {
            mqtt::options(&config.device.id, &broker.host, broker.port, tls, broker.keep_alive_s, will)
        }
        #[cfg(feature = "fleet")]
        None => mqtt::plain_options_for_demo(&config.device.id, &broker.host, broker.port, will),
        // Plain MQTT exists only for the demo; a device build has no demo.
        #[cfg(not(feature = "fleet"))]
        None => return Err(DaemonError::NoMqtt),
    };
    let aws_jobs = match broker.profile {
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

    let (to_worker, worker_inbox) = mpsc::channel::<Inbound>(WORKER_QUEUE);
    let (outbox, from_worker) = mpsc::unbounded_channel::<Outbound>();
    let (connected_tx, connected_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let worker_shutdown = shutdown_rx.clone();
    let worker = std::thread::Builder::new().name("update-worker".into()).spawn(move || {
        let result = worker_main(executor, worker_inbox, outbox, connected_rx, worker_shutdown);
        if let Err(e) = &result {
            logging::event(
                Priority::Error,
                &format!("fleetd: update worker: {e}"),
                &[(logging::ERROR, "worker")],
            );
        }
        result
    })?;

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
    // A download in progress stopped at a durable checkpoint, or will be
    // resumed from the last one at the next start. (The worker has its own
    // runtime; joining blocks only this last moment.)
    let _ = worker.join();
    Ok(())
}

/// Update messages queued for the worker. The worker answers at once even
/// while a job runs, so the queue stays short; past this the MQTT task
/// refuses a message itself rather than wait.
pub const WORKER_QUEUE: usize = 8;

/// An error's name is the part before its first colon.
fn log_error(message: &str, error: &str) {
    let name = error.split(':').next().unwrap_or(error);
    logging::event(Priority::Error, message, &[(logging::ERROR, name)]);
}

fn log_client_event(event: &ClientEvent) {
    match event {
        ClientEvent::Connected { session_present } => {
            notify::status("connected to the broker");
            logging::log(&format!("mqtt: connected (session present: {session_present})"))
        }
        ClientEvent::Subscribed { topics } => {
            logging::log(&format!("mqtt: subscribed to {}", topics.join(", ")))
        }
        ClientEvent::SubscriptionRefused { topic } => logging::event(
            Priority::Error,
            &format!("mqtt-suback: the broker refused the subscription to {topic}"),
            &[(logging::ERROR, "mqtt-suback")],
        ),
        ClientEvent::Disconnected { error, retry_in } => {
            notify::status(&format!("disconnected ({error}); reconnecting"));
            let text = error.to_string();
            logging::event(
                Priority::Warning,
                &format!("{error}; reconnecting in {} ms", retry_in.as_millis()),
                &[(logging::ERROR, text.split(':').next().unwrap_or("mqtt"))],
            )
        }
    }
}

fn worker_main(
    mut executor: Executor,
    mut inbox: mpsc::Receiver<Inbound>,
    outbox: mpsc::UnboundedSender<Outbound>,
    connected: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    executor.set_health_gate(connected);
    let reports = outbox.clone();
    executor.on_report(Box::new(move |report: &Report| {
        let outbound = match report {
            Report::Status(doc) => Outbound::Status(doc.clone()),
            Report::Progress { jti, version, done, total } => Outbound::Progress(Progress::Download {
                jti: jti.clone(),
                version: *version,
                done: *done,
                total: *total,
            }),
            Report::Step { state, detail, job } => {
                notify::status(&format!("{state}: {detail}"));
                logging::step(state, detail, job.as_ref());
                Outbound::Progress(Progress::Step { state: state.to_string(), detail: detail.clone() })
            }
        };
        let _ = reports.send(outbound);
    }));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let busy = executor.busy_view();
        match while_busy(executor.start(), &busy, &mut inbox, &outbox, &mut shutdown).await {
            None => return,
            Some(Err(e)) => log_error(&format!("fleetd: resuming: {e}"), &e.to_string()),
            Some(Ok(())) => {}
        }
        executor.report_status();
        loop {
            let message = tokio::select! {
                message = inbox.recv() => message,
                _ = shutdown.wait_for(|stop| *stop) => None,
            };
            let Some(Inbound::UpdateMessage { topic, payload, token }) = message else { break };
            let ack = outbox.clone();
            let on_ack = move || {
                let _ = ack.send(Outbound::Ack(token));
            };
            let source = Source::Broker { topic: topic.clone() };
            match executor.admit(&payload, source, on_ack).await {
                Ok(Admission::Duplicate { jti }) => report_duplicate(&jti, &topic, &outbox),
                Ok(Admission::Refused(refusal)) => send_refusal(&refusal, &topic, token, &outbox),
                Ok(Admission::Accepted { .. } | Admission::Continued) => {
                    let busy = executor.busy_view();
                    match while_busy(executor.run(), &busy, &mut inbox, &outbox, &mut shutdown).await {
                        None => break,
                        Some(Err(e)) => log_error(&format!("fleetd: {e}"), &e.to_string()),
                        Some(Ok(())) => {}
                    }
                }
                Err(e) => {
                    log_error(&format!("fleetd: {e}"), &e.to_string());
                    let _ = outbox.send(Outbound::Refused { token, error: e.to_string() });
                }
            }
            executor.report_status();
        }
    });
    Ok(())
}

/// Runs `work` (a job) to its end while answering every update message that
/// arrives meanwhile, so the MQTT task never waits on the worker. `None`
/// when shutdown came first: `work` is dropped at an await point, and the
/// job stays at its last persisted checkpoint, to be resumed at next start.
async fn while_busy<T>(
    work: impl std::future::Future<Output = T>,
    busy: &crate::update::agent::BusyView,
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
                Some(Inbound::UpdateMessage { topic, payload, token }) => match busy.answer(&payload) {
                    Ok(jti) => {
                        report_duplicate(&jti, &topic, outbox);
                        let _ = outbox.send(Outbound::Ack(token));
                    }
                    Err(refusal) => send_refusal(&refusal, &topic, token, outbox),
                },
                None => inbox_open = false,
            },
        }
    }
}

/// Logs a refusal and hands it to the MQTT task, which acks the message.
fn send_refusal(refusal: &Refusal, topic: &str, token: u64, outbox: &mpsc::UnboundedSender<Outbound>) {
    logging::event(
        Priority::Warning,
        &format!("update refused: {refusal} (on {topic})"),
        &[(logging::ERROR, refusal.name())],
    );
    let _ = outbox.send(Outbound::Refused { token, error: refusal.to_string() });
}

fn report_duplicate(jti: &str, topic: &str, outbox: &mpsc::UnboundedSender<Outbound>) {
    logging::event(
        Priority::Info,
        &format!("update {jti} on {topic}: a second delivery of a message already handled; not run again"),
        &[(logging::JOB, jti)],
    );
    let _ = outbox.send(Outbound::Progress(Progress::Duplicate { jti: jti.to_string() }));
}
