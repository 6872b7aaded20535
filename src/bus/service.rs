//! `org.fleetd.Daemon1` served on the system bus (zbus on the daemon's
//! main runtime). Properties are read from the shared `Model`; one task
//! applies the daemon's events to it and emits PropertiesChanged and
//! `Completed`. Calls that act go to the update worker as `Request`s; the
//! interface never holds a lock across an await, so a slow call never
//! stalls a property read or a signal.

use super::model::{self, Event, Model, Property};
use super::{Command, CommandError, Request, INTERFACE, NAME, PATH};
use crate::mqtt::Outbound;
use crate::status::StatusDoc;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::Value;

/// How long the daemon waits for the bus and its name before it goes on
/// without D-Bus (updates never depend on it).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A named D-Bus error for each refusal: `org.fleetd.Daemon1.Error.Busy`, ...
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.fleetd.Daemon1.Error")]
pub enum BusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Busy(String),
    Refused(String),
    NoJob(String),
    NotReady(String),
    NotConnected(String),
    /// The caller may not do this (only root may name a path to read).
    AccessDenied(String),
    Failed(String),
}

impl From<CommandError> for BusError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Busy(t) => Self::Busy(t),
            CommandError::Refused(t) => Self::Refused(t),
            CommandError::NoJob(t) => Self::NoJob(t),
            CommandError::NotReady(t) => Self::NotReady(t),
            CommandError::Failed(t) => Self::Failed(t),
        }
    }
}

/// How long reading a message passed by descriptor may take: a regular
/// file on a FUSE or network filesystem the caller controls could stall.
const MESSAGE_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages read at once; a caller stalling reads holds at most these threads.
const MESSAGE_READS_AT_ONCE: usize = 2;

/// The worker's end, once it runs (after provisioning).
#[derive(Clone)]
struct Worker {
    requests: mpsc::Sender<Request>,
    outbox: mpsc::UnboundedSender<Outbound>,
}

#[derive(Clone)]
struct Shared {
    model: Arc<Mutex<Model>>,
    worker: Arc<Mutex<Option<Worker>>>,
    /// The event task's inbox (refused calls complete through it too).
    events: Arc<Mutex<Option<mpsc::UnboundedSender<Event>>>>,
    /// Permits for reading a message from a file (see MESSAGE_READS_AT_ONCE).
    reads: Arc<tokio::sync::Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn new(model: Model) -> Self {
        Self {
            model: Arc::new(Mutex::new(model)),
            worker: Arc::default(),
            events: Arc::default(),
            reads: Arc::new(tokio::sync::Semaphore::new(MESSAGE_READS_AT_ONCE)),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Model) -> T) -> T {
        f(&lock(&self.model))
    }
}

/// The served API. Dropping it leaves the bus (the name is released).
pub struct Bus {
    _conn: zbus::Connection,
    shared: Shared,
    events: mpsc::UnboundedSender<Event>,
}

impl Bus {
    /// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured),
    /// serves the object and owns the name: when this returns, clients can
    /// call (systemd's READY=1 comes after).
    pub async fn start(initial: StatusDoc) -> Result<Bus, zbus::Error> {
        let shared = Shared::new(Model::new(initial));
        let iface = Daemon1 { shared: shared.clone() };
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, async {
            zbus::connection::Builder::system()?.serve_at(PATH, iface)?.name(NAME)?.build().await
        })
        .await
        .map_err(|_| {
            zbus::Error::Failure(format!("no answer from the system bus in {CONNECT_TIMEOUT:?}"))
        })??;
        let (events, mut inbox) = mpsc::unbounded_channel::<Event>();
        *lock(&shared.events) = Some(events.clone());
        let emitter = SignalEmitter::new(&conn, PATH)?.into_owned();
        let task_shared = shared.clone();
        tokio::spawn(async move {
            while let Some(event) = inbox.recv().await {
                let (changes, values) = {
                    let mut m = lock(&task_shared.model);
                    let changes = m.apply(&event);
                    let values: Vec<(&'static str, Value<'static>)> =
                        changes.properties.iter().map(|p| (p.bus_name(), value_of(&m, *p))).collect();
                    (changes, values)
                };
                emit(&emitter, values, changes.completed).await;
            }
        });
        Ok(Bus { _conn: conn, shared, events })
    }

    /// Where the daemon sends its events.
    pub fn sink(&self) -> super::Sink {
        Some(self.events.clone())
    }

    /// The worker runs: calls that act are carried out from now on.
    pub fn attach_worker(&self, requests: mpsc::Sender<Request>, outbox: mpsc::UnboundedSender<Outbound>) {
        *lock(&self.shared.worker) = Some(Worker { requests, outbox });
    }
}

/// Properties first (one PropertiesChanged), then `Completed`.
async fn emit(
    emitter: &SignalEmitter<'static>,
    values: Vec<(&'static str, Value<'static>)>,
    completed: Option<(i32, String)>,
) {
    if !values.is_empty() {
        let changed: HashMap<&str, Value<'_>> = values.into_iter().collect();
        let interface = zbus::names::InterfaceName::from_static_str_unchecked(INTERFACE);
        let _ =
            zbus::fdo::Properties::properties_changed(emitter, interface, changed, (&[][..]).into()).await;
    }
    if let Some((result, detail)) = completed {
        let _ = Daemon1::completed(emitter, result, &detail).await;
    }
}

fn value_of(m: &Model, p: Property) -> Value<'static> {
    match p {
        Property::State => Value::from(m.doc.state.clone()),
        Property::Progress => Value::from((m.progress.0, m.progress.1.as_str())),
        Property::LastError => Value::from(m.last_error()),
        Property::BootedSlot => Value::from(m.booted_slot()),
        Property::PrimarySlot => Value::from(m.primary_slot()),
        Property::InstalledVersion => Value::from(m.doc.installed_version),
        Property::Provisioned => Value::from(m.doc.provisioned),
        Property::Connected => Value::from(m.connected),
    }
}

struct Daemon1 {
    shared: Shared,
}

impl Daemon1 {
    fn worker(&self) -> Result<Worker, BusError> {
        lock(&self.shared.worker).clone().ok_or_else(|| super::policy::not_ready().into())
    }

    /// Hands `command` to the worker and waits for its answer.
    async fn call(&self, command: Command) -> Result<String, BusError> {
        let worker = self.worker()?;
        let (reply, answer) = oneshot::channel();
        worker
            .requests
            .try_send(Request { command, reply })
            .map_err(|_| BusError::Busy("busy: the update worker has calls waiting; try again".into()))?;
        match answer.await {
            Ok(result) => result.map_err(BusError::from),
            Err(_) => Err(BusError::Failed("stopping: the daemon is shutting down".into())),
        }
    }

    /// A refused `Install`: its `Completed` goes out with the error.
    fn refused(&self, error: BusError) -> BusError {
        let (result, text) = match &error {
            BusError::Failed(t) => (model::RESULT_FAILED, t.clone()),
            BusError::Busy(t)
            | BusError::Refused(t)
            | BusError::NoJob(t)
            | BusError::NotReady(t)
            | BusError::NotConnected(t)
            | BusError::AccessDenied(t) => (model::RESULT_REFUSED, t.clone()),
            BusError::ZBus(e) => (model::RESULT_FAILED, e.to_string()),
        };
        if let Some(events) = lock(&self.shared.events).as_ref() {
            let _ = events.send(Event::Completed(result, text));
        }
        error
    }

    fn property<T>(&self, f: impl FnOnce(&Model) -> T) -> T {
        self.shared.read(f)
    }
}

#[zbus::interface(name = "org.fleetd.Daemon1")]
impl Daemon1 {
    /// Per slot: `state` s, `version` t (0 = none), `device` s, `booted` b, `primary` b.
    async fn get_slot_status(&self) -> Vec<(String, HashMap<String, Value<'static>>)> {
        let slots = self.property(Model::slot_status);
        slots
            .into_iter()
            .map(|(name, s)| {
                let facts = HashMap::from([
                    ("state".to_string(), Value::from(s.state)),
                    ("version".to_string(), Value::from(s.version)),
                    ("device".to_string(), Value::from(s.device)),
                    ("booted".to_string(), Value::from(s.booted)),
                    ("primary".to_string(), Value::from(s.primary)),
                ]);
                (name, facts)
            })
            .collect()
    }

    /// The whole status document as JSON, as `fleetd status --json` prints it.
    async fn get_status(&self) -> zbus::fdo::Result<String> {
        let doc = self.property(Model::status);
        serde_json::to_string(&doc).map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }

    async fn mark_good(&self) -> Result<String, BusError> {
        self.call(Command::Mark { good: true }).await
    }

    async fn mark_bad(&self) -> Result<String, BusError> {
        self.call(Command::Mark { good: false }).await
    }

    /// Asks the broker again for update messages (retained ones are sent anew).
    async fn check_for_update(&self) -> Result<(), BusError> {
        let worker = self.worker()?;
        if !self.shared.read(|m| m.connected) {
            return Err(BusError::NotConnected("not-connected: the broker is not reachable now".into()));
        }
        worker
            .outbox
            .send(Outbound::CheckForUpdate)
            .map_err(|_| BusError::Failed("stopping: the daemon is shutting down".into()))
    }

    /// Installs the update message in a file, like `rauc install`: root
    /// only. The daemon opens the path as root, so for anyone else it would
    /// read files the caller cannot (`InstallFd` reads what the caller
    /// opened). Under the shipped unit its /tmp is private, so a file in the
    /// caller's /tmp is not seen.
    async fn install(
        &self,
        message_path: String,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), BusError> {
        let read = async {
            caller_is_root(&header, conn).await?;
            let path = std::path::PathBuf::from(message_path);
            if !path.is_absolute() {
                return Err(BusError::Refused("message-path: the path is not absolute".into()));
            }
            let file = crate::fsutil::open_nonblocking(&path)
                .map_err(|e| BusError::Refused(format!("message-unreadable: {}: {e}", path.display())))?;
            self.read_message(file).await
        };
        let message = match read.await {
            Ok(m) => m,
            Err(e) => return Err(self.refused(e)),
        };
        self.install_message(message).await.map(|_| ())
    }

    /// Installs the update message in the file the caller opened and
    /// passes (`h`, like RAUC's bundle by descriptor): the daemon reads only
    /// what the caller could read. A regular file only, from its start, at
    /// most the message size limit; returns what became of it, as
    /// `InstallMessage` does.
    async fn install_fd(&self, message: zbus::zvariant::OwnedFd) -> Result<String, BusError> {
        let file = std::fs::File::from(std::os::fd::OwnedFd::from(message));
        let message = match self.read_message(file).await {
            Ok(m) => m,
            Err(e) => return Err(self.refused(e)),
        };
        self.install_message(message).await
    }

    /// Installs the update message given (what `fleetd install` sends);
    /// returns what became of it. `Completed` follows in every case: for a
    /// refusal at once, here; for a job when it ends.
    async fn install_message(&self, message: Vec<u8>) -> Result<String, BusError> {
        self.call(Command::Install { message }).await.map_err(|e| self.refused(e))
    }

    /// Gives the running job up before its trial boot.
    async fn cancel(&self) -> Result<(), BusError> {
        self.call(Command::Cancel).await.map(|_| ())
    }

    #[zbus(signal)]
    async fn completed(emitter: &SignalEmitter<'_>, result: i32, detail: &str) -> zbus::Result<()>;

    #[zbus(property)]
    async fn state(&self) -> String {
        self.property(|m| m.doc.state.clone())
    }

    /// (percent, step); 100 only once the install is done.
    #[zbus(property)]
    async fn progress(&self) -> (i32, String) {
        self.property(|m| (m.progress.0, m.progress.1.to_string()))
    }

    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.property(Model::last_error)
    }

    #[zbus(property)]
    async fn booted_slot(&self) -> String {
        self.property(Model::booted_slot)
    }

    #[zbus(property)]
    async fn primary_slot(&self) -> String {
        self.property(Model::primary_slot)
    }

    #[zbus(property)]
    async fn installed_version(&self) -> u64 {
        self.property(|m| m.doc.installed_version)
    }

    #[zbus(property)]
    async fn provisioned(&self) -> bool {
        self.property(|m| m.doc.provisioned)
    }

    /// Connected to the broker now (an addition to RAUC's set).
    #[zbus(property)]
    async fn connected(&self) -> bool {
        self.property(|m| m.connected)
    }
}

/// Refuses a caller that is not root (asked of the bus, which knows the
/// peer's uid from the socket, not from anything the caller says).
async fn caller_is_root(header: &zbus::message::Header<'_>, conn: &zbus::Connection) -> Result<(), BusError> {
    let denied = || {
        BusError::AccessDenied(
            "access-denied: Install reads a path as root and serves root only; pass the open file with InstallFd"
                .into(),
        )
    };
    let sender = header.sender().ok_or_else(denied)?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await.map_err(BusError::ZBus)?;
    let uid = dbus
        .get_connection_unix_user(zbus::names::BusName::Unique(sender.to_owned()))
        .await
        .map_err(|e| BusError::ZBus(e.into()))?;
    if uid == 0 {
        Ok(())
    } else {
        Err(denied())
    }
}

impl Daemon1 {
    /// Reads a message from an open file without ever parking a thread
    /// for good: regular files only (a FIFO, device or socket is refused
    /// before any read), capped, within MESSAGE_READ_TIMEOUT, at most
    /// MESSAGE_READS_AT_ONCE at a time. The refusal never quotes content.
    async fn read_message(&self, file: std::fs::File) -> Result<Vec<u8>, BusError> {
        use crate::fsutil::ReadError;
        let permit = self
            .shared
            .reads
            .clone()
            .try_acquire_owned()
            .map_err(|_| BusError::Busy("busy: other messages are being read; try again".into()))?;
        let limit = crate::trust::MAX_MESSAGE_BYTES;
        let read = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            crate::fsutil::read_regular_capped(&file, limit)
        });
        match tokio::time::timeout(MESSAGE_READ_TIMEOUT, read).await {
            Ok(Ok(Ok(bytes))) => Ok(bytes),
            Ok(Ok(Err(ReadError::TooLarge { limit }))) => {
                Err(BusError::Refused(crate::trust::VerifyError::TooLarge { limit }.to_string()))
            }
            Ok(Ok(Err(e @ ReadError::NotRegular))) => Err(BusError::Refused(e.to_string())),
            Ok(Ok(Err(e))) => Err(BusError::Refused(format!("message-unreadable: {e}"))),
            Ok(Err(e)) => Err(BusError::Failed(e.to_string())),
            Err(_) => Err(BusError::Refused(format!(
                "message-unreadable: reading took longer than {MESSAGE_READ_TIMEOUT:?}"
            ))),
        }
    }
}

/// The result codes of `Completed`, for clients.
pub use model::{RESULT_CANCELLED, RESULT_FAILED, RESULT_OK, RESULT_REFUSED, RESULT_ROLLED_BACK};
