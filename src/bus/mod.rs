//! The D-Bus API, `org.fleetd.Daemon1` on the system bus, like RAUC's.
//! `model` is the pure part (properties from the executor's reports, when
//! `Completed` fires), with `policy` (how each call is answered, given what
//! the update worker is doing); `service` serves it; `client` is what `fleetd
//! status | install | mark-good | mark-bad` use while the daemon runs. The
//! bus policy (who may own and call) is `packaging/dbus/`.

pub mod client;
pub use fleetd_core::bus::model;
pub mod service;

pub const NAME: &str = "org.fleetd.Daemon1";
pub const PATH: &str = "/org/fleetd/Daemon1";
pub const INTERFACE: &str = "org.fleetd.Daemon1";

pub use fleetd_core::bus::policy::{self, Command, CommandError};

/// A command and where its answer goes.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub reply: tokio::sync::oneshot::Sender<Result<String, CommandError>>,
}

/// Where the daemon sends what the bus shows; `None` without a bus.
pub type Sink = Option<tokio::sync::mpsc::UnboundedSender<model::Event>>;

pub fn send(sink: &Sink, event: model::Event) {
    if let Some(tx) = sink {
        let _ = tx.send(event);
    }
}
