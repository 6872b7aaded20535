//! `fleetd run`: the update worker on its own thread (its slot IO never
//! stalls the MQTT keep-alive), the MQTT task on the main runtime, and the
//! messages between them. Messages are acknowledged to the broker only after
//! what they carry is persisted.

use crate::bus::model::Event as BusEvent;
use crate::bus::service::Bus;
use crate::bus::{Command, CommandError, Request};
use crate::config::{Broker, Config};
use crate::logging::{self, Priority};
use crate::mqtt::{self, ClientEvent, ClientSetup, Inbound, Outbound, Progress, Topics};
use crate::provision::phase::PhaseError;
use crate::provision::store::{ProvisionStore, Provisioned};
use crate::sys::notify;
use crate::update::agent::BusyView;
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
        let bus = start_bus(&config, &executor).await;
        let sink = bus.as_ref().and_then(Bus::sink);
        // systemd: ready once the state is loaded and the bus name owned;
        // the watchdog is fed by this (the main) loop, so a wedged loop
        // stops the pings.
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
            provisioned = provision_if_needed(&config, clock_floor, &sink) => provisioned?,
            _ = &mut shutdown => return Ok(()),
        };
        let record = match &provisioned {
            ProvisionOutcome::ByHand => None,
            ProvisionOutcome::Done(record) => Some(record),
            ProvisionOutcome::TimedOut => {
                // Nothing to connect to until a restart.
                notify::status("unprovisioned: the access point timed out; restart fleetd to provision");
                shutdown.await;
                return Ok(());
            }
        };
        let broker = config
            .broker(record.map(|p| (p.broker_host.as_str(), p.broker_port)))
            .ok_or(DaemonError::NoMqtt)?;
        executor.set_provisioning(crate::provision::phase::facts(&config));
        crate::bus::send(&sink, BusEvent::Report(Report::Status(Box::new(executor.status_doc()))));
        mqtt::check_identity(&broker.cert_file, &config.device.id)?;
        let tls = mqtt::tls_config(&broker.ca_file, &broker.cert_file, &broker.key_file)?;
        notify::status(&format!("connecting to {}:{}", broker.host, broker.port));
        connected(config, broker, Some(tls), executor, shutdown, bus.as_ref()).await
    })
}

/// The D-Bus API, when the config wants it and a system bus answers.
/// Updates never depend on it: without it the daemon logs why and runs on.
async fn start_bus(config: &Config, executor: &Executor) -> Option<Bus> {
    if !config.dbus.enabled {
        return None;
    }
    let mut doc = executor.status_doc();
    doc.apply_provisioning(&crate::provision::phase::facts(config));
    match Bus::start(doc).await {
        Ok(bus) => {
            logging::log(&format!("d-bus: serving {} on the system bus", crate::bus::NAME));
            Some(bus)
        }
        Err(e) => {
            logging::event(
                Priority::Warning,
                &format!("d-bus-unavailable: {e}; running without the D-Bus API"),
                &[(logging::ERROR, "d-bus-unavailable")],
            );
            None
        }
    }
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

/// Where provisioning left the device.
enum ProvisionOutcome {
    /// No `[provision]` section: configured by hand.
    ByHand,
    /// The provisioning to connect with.
    Done(Provisioned),
    /// The access point timed out.
    TimedOut,
}

async fn provision_if_needed(
    config: &Config,
    clock_floor: u64,
    sink: &crate::bus::Sink,
) -> Result<ProvisionOutcome, DaemonError> {
    let Some(settings) = &config.provision else { return Ok(ProvisionOutcome::ByHand) };
    let store = ProvisionStore::new(&config.device.state_dir);
    if let Some(record) = store.load().map_err(PhaseError::from)? {
        if record.complete() {
            return Ok(ProvisionOutcome::Done(record));
        }
    }
    let client_dir = crate::net::client_dir(&config.device.state_dir);
    let backend = crate::net::Backend::from_config(settings, &client_dir).await.map_err(PhaseError::from)?;
    let on_status = || crate::bus::send(sink, BusEvent::Provisioning(crate::provision::phase::facts(config)));
    match crate::provision::phase::run(config, backend, clock_floor, &on_status).await {
        Ok(record) => Ok(ProvisionOutcome::Done(record)),
        Err(e @ PhaseError::Timeout(_)) => {
            crate::logging::log(&format!("provisioning: {e}"));
            Ok(ProvisionOutcome::TimedOut)
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
    runtime.block_on(connected(config, broker, tls, executor, shutdown, None))
}

/// Connected: the MQTT task here, the update worker on its own thread.
async fn connected(
    config: Config,
    broker: Broker,
    tls: Option<rustls::ClientConfig>,
    executor: Executor,
    shutdown: impl std::future::Future<Output = ()>,
    bus: Option<&Bus>,
) -> Result<(), DaemonError> {
    let topics = Topics::for_config(&config);
    let will = Some((topics.online.clone(), b"false".to_vec()));
    let options = match tls {
        Some(tls) => {
            mqtt::options(&config.device.id, &broker.host, broker.port, tls, broker.keep_alive_s, will)
        }
        None => mqtt::plain_options_for_demo(&config.device.id, &broker.host, broker.port, will),
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

    let (requests_tx, requests) = mpsc::channel::<Request>(BUS_QUEUE);
    let sink = bus.and_then(Bus::sink);
    if let Some(bus) = bus {
        bus.attach_worker(requests_tx, outbox.clone());
        let (mut up, sink) = (connected_rx.clone(), sink.clone());
        tokio::spawn(async move {
            while up.changed().await.is_ok() {
                let now = *up.borrow_and_update();
                crate::bus::send(&sink, BusEvent::Connected(now));
            }
        });
    }
    let worker_shutdown = shutdown_rx.clone();
    let worker = std::thread::Builder::new().name("update-worker".into()).spawn(move || {
        let channels = Channels { inbox: worker_inbox, requests, outbox, sink, shutdown: worker_shutdown };
        let result = worker_main(executor, channels, connected_rx);
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
/// keeps them (unacknowledged) until there is room.
pub const WORKER_QUEUE: usize = 8;

/// D-Bus calls waiting for the worker; past this a call is answered busy.
const BUS_QUEUE: usize = 4;

fn log_error(message: &str, name: &str) {
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
            logging::event(
                Priority::Warning,
                &format!("{error}; reconnecting in {} ms", retry_in.as_millis()),
                &[(logging::ERROR, error.name())],
            )
        }
    }
}

/// The worker's ends of its channels.
struct Channels {
    /// Update messages from the MQTT task.
    inbox: mpsc::Receiver<Inbound>,
    /// Calls from the D-Bus API.
    requests: mpsc::Receiver<Request>,
    outbox: mpsc::UnboundedSender<Outbound>,
    sink: crate::bus::Sink,
    shutdown: watch::Receiver<bool>,
}

/// What woke the idle worker.
enum Work {
    Message(Inbound),
    Call(Request),
}

fn worker_main(
    mut executor: Executor,
    mut ch: Channels,
    connected: watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    executor.set_health_gate(connected);
    let (reports, sink) = (ch.outbox.clone(), ch.sink.clone());
    executor.on_report(Box::new(move |report: &Report| {
        crate::bus::send(&sink, BusEvent::Report(report.clone()));
        let outbound = match report {
            Report::Status(doc) => Outbound::Status(doc.clone()),
            Report::Progress { jti, version, done, total } => Outbound::Progress(Progress::Download {
                jti: jti.clone(),
                version: *version,
                done: *done,
                total: *total,
            }),
            Report::Step { state, detail, failure, job } => {
                notify::status(&format!("{state}: {detail}"));
                logging::step(*state, detail, failure.as_ref(), job.as_ref());
                Outbound::Progress(Progress::Step { state: *state, detail: detail.clone() })
            }
        };
        let _ = reports.send(outbound);
    }));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        if !run_job(&mut executor, &mut ch, Entry::Start).await {
            return;
        }
        executor.report_status();
        let mut calls_open = true;
        loop {
            let work = tokio::select! {
                message = ch.inbox.recv() => match message {
                    Some(m) => Work::Message(m),
                    None => break,
                },
                call = ch.requests.recv(), if calls_open => match call {
                    Some(c) => Work::Call(c),
                    None => {
                        calls_open = false;
                        continue;
                    }
                },
                _ = ch.shutdown.wait_for(|stop| *stop) => break,
            };
            let has_job = match work {
                Work::Message(Inbound::UpdateMessage { topic, payload, token }) => {
                    let ack = ch.outbox.clone();
                    let on_ack = move || {
                        let _ = ack.send(Outbound::Ack(token));
                    };
                    let source = Source::Broker { topic: topic.clone() };
                    match executor.admit(&payload, source, on_ack).await {
                        Ok(Admission::Duplicate { jti }) => {
                            report_duplicate(&jti, &topic, &ch.outbox);
                            false
                        }
                        Ok(Admission::Refused(refusal)) => {
                            send_refusal(&refusal, &topic, token, &ch.outbox);
                            false
                        }
                        Ok(Admission::Accepted { .. } | Admission::Continued) => true,
                        // Not saved, so not acknowledged: the MQTT task
                        // hands the message over again later.
                        Err(e) => {
                            log_error(&format!("fleetd: {e}; the message stays unacknowledged"), e.name());
                            let _ = ch.outbox.send(Outbound::NotSaved { token });
                            false
                        }
                    }
                }
                Work::Call(request) => answer_call(&mut executor, request, &ch.sink).await,
            };
            if has_job && !run_job(&mut executor, &mut ch, Entry::Run).await {
                break;
            }
            executor.report_status();
        }
    });
    Ok(())
}

/// How the executor is entered: the process's start (confirm the booted
/// slot, resume the stored job), an admitted job, or what is left of a job
/// after an interrupting call.
enum Entry {
    Start,
    Run,
    Resume,
}

/// Runs the job from `entry` while answering what arrives.
/// A call that must act on the job (a verdict in its trial, a cancel)
/// stops it at an await point, is carried out, and what is left of the
/// job resumes from its persisted state. `false` when shutdown came.
async fn run_job(executor: &mut Executor, ch: &mut Channels, mut entry: Entry) -> bool {
    loop {
        let busy = executor.busy_view();
        let ended = match std::mem::replace(&mut entry, Entry::Resume) {
            Entry::Start => while_busy(executor.start(), &busy, ch).await,
            Entry::Run => while_busy(executor.run(), &busy, ch).await,
            Entry::Resume => while_busy(executor.resume(), &busy, ch).await,
        };
        match ended {
            Ended::Shutdown => return false,
            Ended::Done(Err(e)) => {
                log_error(&format!("fleetd: {e}"), e.name());
                return true;
            }
            Ended::Done(Ok(())) => return true,
            Ended::Interrupted(request) => {
                executor.abandon_plan();
                // The view the call was let in by is from the job's start:
                // a trial may have ended since (a rollback waiting on its
                // reboot). A verdict or cancel acts only on what still is.
                let now = executor.busy_view();
                let still = match request.command {
                    Command::Mark { .. } => now.in_trial,
                    Command::Cancel => now.cancellable,
                    Command::Install { .. } => true,
                };
                if still {
                    answer_call(executor, request, &ch.sink).await;
                } else {
                    let why = "moved-on: the job left the phase the call was for; read State and try again";
                    let _ = request.reply.send(Err(CommandError::NoJob(why.into())));
                }
                // A verdict or a cancel ends the job; had it not, the rest
                // resumes from what is persisted, as after a restart.
                if executor.state().active_job().is_none() {
                    return true;
                }
            }
        }
    }
}

/// Carries out a D-Bus call with the executor idle; true when a job was
/// admitted and is to run.
async fn answer_call(executor: &mut Executor, request: Request, sink: &crate::bus::Sink) -> bool {
    let (answer, has_job) = match request.command {
        Command::Install { message } => {
            let outcome = executor.admit(&message, Source::Local, || {}).await;
            let answer = match outcome {
                Ok(Admission::Accepted { jti, version }) => Ok(format!("accepted update {jti} v{version}")),
                Ok(Admission::Continued) => match executor.job() {
                    // Installed already, waiting for its reboot: that is
                    // this install's end, so it completes now.
                    Some(job) if matches!(job.phase, crate::update::Phase::RebootPending { .. }) => {
                        let done = format!(
                            "update {} v{} is installed and waits for a reboot",
                            job.name, job.version
                        );
                        crate::bus::send(
                            sink,
                            BusEvent::Completed(crate::bus::model::RESULT_OK, done.clone()),
                        );
                        Ok(done)
                    }
                    _ => Ok("the stored update goes on".to_string()),
                },
                Ok(Admission::Duplicate { jti }) => Err(CommandError::Refused(format!(
                    "duplicate: update {jti} was already handled; not run again"
                ))),
                Ok(Admission::Refused(refusal @ (Refusal::Busy { .. } | Refusal::Resuming))) => {
                    Err(CommandError::Busy(refusal.to_string()))
                }
                Ok(Admission::Refused(refusal)) => Err(CommandError::Refused(refusal.to_string())),
                Err(e) => Err(CommandError::Failed(e.to_string())),
            };
            let has_job = answer.is_ok();
            (answer, has_job)
        }
        Command::Mark { good } => {
            let answer = executor.mark_booted(good).await.map_err(|e| match e {
                crate::update::MarkError::UnfinishedTarget(_) => CommandError::Refused(e.to_string()),
                _ => CommandError::Failed(e.to_string()),
            });
            (answer, false)
        }
        Command::Cancel => {
            let answer = match executor.cancel().await {
                Ok(crate::update::Cancel::Done(done)) => Ok(done),
                Ok(crate::update::Cancel::Refused(why)) => Err(CommandError::NoJob(why)),
                Err(e) => Err(CommandError::Failed(e.to_string())),
            };
            (answer, false)
        }
    };
    let _ = request.reply.send(answer);
    has_job
}

enum Ended<T> {
    Done(T),
    Shutdown,
    /// A D-Bus call that needs the job stopped first.
    Interrupted(Request),
}

/// Runs `work` (a job) to its end while answering every update message and
/// call that arrives meanwhile, so neither the MQTT task nor a bus client
/// waits on the worker. On shutdown `work` is dropped at an await point,
/// and the job stays at its last persisted checkpoint, to be resumed at
/// next start.
async fn while_busy<T>(
    work: impl std::future::Future<Output = T>,
    busy: &BusyView,
    ch: &mut Channels,
) -> Ended<T> {
    tokio::pin!(work);
    let (mut inbox_open, mut calls_open) = (true, true);
    loop {
        tokio::select! {
            done = &mut work => return Ended::Done(done),
            _ = ch.shutdown.wait_for(|stop| *stop) => return Ended::Shutdown,
            message = ch.inbox.recv(), if inbox_open => match message {
                Some(Inbound::UpdateMessage { topic, payload, token }) => match busy.answer(&payload) {
                    Ok(jti) => {
                        report_duplicate(&jti, &topic, &ch.outbox);
                        let _ = ch.outbox.send(Outbound::Ack(token));
                    }
                    Err(refusal) => send_refusal(&refusal, &topic, token, &ch.outbox),
                },
                None => inbox_open = false,
            },
            call = ch.requests.recv(), if calls_open => match call {
                Some(request) => {
                    if let Some(request) = answer_while_busy(request, busy) {
                        return Ended::Interrupted(request);
                    }
                }
                None => calls_open = false,
            },
        }
    }
}

/// A call while a job runs: answered at once, or handed back when it must
/// stop the job (a verdict during the trial; a cancel before it).
fn answer_while_busy(request: Request, busy: &BusyView) -> Option<Request> {
    let answer = match &request.command {
        Command::Mark { .. } if busy.in_trial => return Some(request),
        Command::Cancel if busy.cancellable => return Some(request),
        Command::Mark { .. } => Err(CommandError::Busy(
            "busy: an update is being installed; the booted slot is not on trial".into(),
        )),
        Command::Cancel => Err(CommandError::NoJob(
            "cancel-too-late: the booted slot is on trial; MarkBad gives it up".into(),
        )),
        Command::Install { message } => match busy.answer(message) {
            Ok(jti) => Err(CommandError::Refused(format!(
                "duplicate: update {jti} was already handled; not run again"
            ))),
            Err(refusal) => Err(CommandError::Busy(refusal.to_string())),
        },
    };
    let _ = request.reply.send(answer);
    None
}

/// Logs a refusal and hands it to the MQTT task, which acks the message.
fn send_refusal(refusal: &Refusal, topic: &str, token: u64, outbox: &mpsc::UnboundedSender<Outbound>) {
    logging::event(
        Priority::Warning,
        &format!("update refused: {refusal} (on {topic})"),
        &[(logging::ERROR, refusal.name())],
    );
    let _ = outbox.send(Outbound::Refused { token, name: refusal.name(), error: refusal.to_string() });
}

fn report_duplicate(jti: &str, topic: &str, outbox: &mpsc::UnboundedSender<Outbound>) {
    logging::event(
        Priority::Info,
        &format!("update {jti} on {topic}: a second delivery of a message already handled; not run again"),
        &[(logging::JOB, jti)],
    );
    let _ = outbox.send(Outbound::Progress(Progress::Duplicate { jti: jti.to_string() }));
}
