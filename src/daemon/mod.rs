//! `fleetd run`: its phases (provisioning, then connected), the update
//! worker on its own thread (`worker`: its slot IO never stalls the MQTT
//! keep-alive), the MQTT task on the main runtime (`mqtt`), and the
//! messages between them. Messages are acknowledged to the broker only after
//! what they carry is persisted. How D-Bus calls are answered is
//! `bus::policy`.

mod mqtt;
mod renewal;
#[cfg(feature = "test-hooks")]
mod test_hooks;
mod worker;

use crate::bus::model::Event as BusEvent;
use crate::bus::service::Bus;
use crate::bus::Request;
use crate::config::{Broker, Config};
use crate::logging::{self, Priority};
use crate::mqtt::{Inbound, Outbound};
use crate::provision::phase::PhaseError;
use crate::provision::store::{ProvisionStore, Provisioned};
use crate::sys::notify;
use crate::update::{Executor, OpenError};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use worker::Channels;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no [mqtt] section: nothing to connect to")]
    NoMqtt,
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
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
    mut config: Config,
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
        #[cfg(feature = "test-hooks")]
        test_hooks::wedge_main_loop();
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
        // Enrolled just now: the registry's groups are the device's.
        if let Some(groups) = record.and_then(|r| r.groups.clone()) {
            if groups != config.device.groups {
                logging::log(&format!("provisioning: the device's groups are now [{}]", groups.join(", ")));
                config.device.groups = groups.clone();
                executor.set_groups(groups);
            }
        }
        let broker = config
            .broker(record.map(|p| (p.broker_host.as_str(), p.broker_port)))
            .ok_or(DaemonError::NoMqtt)?;
        executor.set_provisioning(crate::provision::phase::facts(&config));
        crate::bus::send(
            &sink,
            BusEvent::Report(crate::update::Report::Status(Box::new(executor.status_doc()))),
        );
        // A renewal a power cut interrupted after its commit is put in
        // place before the identity is read.
        if config.provision.is_some() {
            match ProvisionStore::new(&config.device.state_dir).finish_renewal() {
                Ok(true) => logging::log("renewal: put in place the renewed identity an interruption left"),
                Ok(false) => {}
                Err(e) => logging::log(&format!("renewal: {e}")),
            }
        }
        crate::mqtt::check_identity(&broker.cert_file, &config.device.id)?;
        let tls = crate::mqtt::tls_config(&broker.ca_file, &broker.cert_file, &broker.key_file)?;
        let renewed = renewal::registrar_for(&config).map(|registrar| {
            let (tx, rx) = mpsc::channel(1);
            let task = renewal::Renewal {
                config: config.clone(),
                broker: broker.clone(),
                registrar,
                clock_floor,
                renewed: tx,
            };
            tokio::spawn(renewal::run(task));
            rx
        });
        notify::status(&format!("connecting to {}:{}", broker.host, broker.port));
        connected(config, broker, Some(tls), renewed, executor, shutdown, bus.as_ref()).await
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
    runtime.block_on(connected(config, broker, tls, None, executor, shutdown, None))
}

/// Connected: the MQTT task here, the update worker on its own thread.
async fn connected(
    config: Config,
    broker: Broker,
    tls: Option<rustls::ClientConfig>,
    renewed: Option<mpsc::Receiver<rustls::ClientConfig>>,
    executor: Executor,
    shutdown: impl std::future::Future<Output = ()>,
    bus: Option<&Bus>,
) -> Result<(), DaemonError> {
    let mut setup = mqtt::setup(&config, &broker, tls);
    setup.renewed = renewed;

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
    let channels = Channels { inbox: worker_inbox, requests, outbox, sink, shutdown: shutdown_rx.clone() };
    let worker = worker::spawn(executor, channels, connected_rx)?;

    let client =
        crate::mqtt::run(setup, to_worker, from_worker, connected_tx, shutdown_rx, mqtt::log_client_event);
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
