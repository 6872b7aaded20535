//! The D-Bus API, `org.fleetd.Daemon1` on the system bus, like RAUC's.
//! `model` is the pure part (properties from the executor's reports, when
//! `Completed` fires); `service` serves it; `client` is what `fleetd
//! status | install | mark-good | mark-bad` use while the daemon runs. The
//! bus policy (who may own and call) is `packaging/dbus/`.

pub mod client;
pub use fleetd_core::bus::model;
pub mod service;

pub const NAME: &str = "org.fleetd.Daemon1";
pub const PATH: &str = "/org/fleetd/Daemon1";
pub const INTERFACE: &str = "org.fleetd.Daemon1";

/// What a bus call asks of the update worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An update message, as `fleetd install FILE` would take it.
    Install {
        message: Vec<u8>,
    },
    /// `MarkGood` / `MarkBad` of the booted slot.
    Mark {
        good: bool,
    },
    Cancel,
}

/// A command and where its answer goes.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub reply: tokio::sync::oneshot::Sender<Result<String, CommandError>>,
}

/// Why a call was not carried out; each becomes a named D-Bus error
/// (`org.fleetd.Daemon1.Error.<Variant>`). The text is `name: detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Another job runs.
    #[error("{0}")]
    Busy(String),
    /// The message or the request was refused (verification, policy).
    #[error("{0}")]
    Refused(String),
    /// Nothing to act on, or too late for it.
    #[error("{0}")]
    NoJob(String),
    /// The update worker has not started (the device is provisioning).
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Failed(String),
}

/// Where the daemon sends what the bus shows; `None` without a bus.
pub type Sink = Option<tokio::sync::mpsc::UnboundedSender<model::Event>>;

pub fn send(sink: &Sink, event: model::Event) {
    if let Some(tx) = sink {
        let _ = tx.send(event);
    }
}
