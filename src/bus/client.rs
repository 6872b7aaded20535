//! The CLI's side of the D-Bus API: `fleetd status | install | mark-good |
//! mark-bad` talk to the running daemon this way instead of fighting it for
//! the state lock.

use super::{INTERFACE, NAME, PATH};
use crate::status::StatusDoc;
use futures_util::StreamExt;
use std::time::Duration;

/// How long the CLI waits for the bus before it treats the daemon as absent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Every call's answer: a wedged daemon must not hang `fleetd status`
/// (which then reads the disk). Admission verifies and persists: quick.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("d-bus: {0}")]
    Bus(#[from] zbus::Error),
    /// The daemon answered with one of its named errors (`name: detail`).
    #[error("{0}")]
    Refused(String),
    #[error("access-denied: the bus policy lets only root and the fleetd group call the daemon")]
    AccessDenied,
    #[error("daemon-stopped: the daemon left the bus before the install completed")]
    Gone,
    #[error("status: the daemon's status does not parse: {0}")]
    Status(String),
}

impl ClientError {
    fn from_call(e: zbus::Error) -> Self {
        match e {
            zbus::Error::MethodError(name, _, _)
                if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied" =>
            {
                Self::AccessDenied
            }
            zbus::Error::MethodError(name, text, _) if name.as_str().starts_with("org.fleetd.") => {
                Self::Refused(text.unwrap_or_else(|| name.to_string()))
            }
            zbus::Error::FDO(fdo) if matches!(*fdo, zbus::fdo::Error::AccessDenied(_)) => Self::AccessDenied,
            other => Self::Bus(other),
        }
    }
}

/// An update message as the CLI hands it over.
#[derive(Debug)]
pub enum Message {
    /// A regular file the caller opened: the daemon reads it through the
    /// descriptor (`InstallFd`), so it sees only what the caller may read.
    File(std::fs::File),
    /// The bytes themselves (stdin, a pipe): `InstallMessage`.
    Bytes(Vec<u8>),
}

/// The daemon on the bus.
#[derive(Clone)]
pub struct Daemon {
    conn: zbus::Connection,
    proxy: zbus::Proxy<'static>,
    /// Its status when it was found (read to tell whose daemon it is).
    pub found: StatusDoc,
}

/// The daemon of device `device_id` when one is on the system bus
/// (`DBUS_SYSTEM_BUS_ADDRESS` is honoured). `None`: no bus, no daemon, or
/// another device's (the CLI then works on the state on disk).
pub async fn find(device_id: &str) -> Option<Result<Daemon, ClientError>> {
    let builder = zbus::connection::Builder::system().ok()?.method_timeout(CALL_TIMEOUT);
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, builder.build()).await.ok()?.ok()?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.ok()?;
    let name = zbus::names::BusName::from_static_str(NAME).ok()?;
    if !dbus.name_has_owner(name).await.ok()? {
        return None;
    }
    let proxy = zbus::proxy::Builder::new(&conn)
        .destination(NAME)
        .ok()?
        .path(PATH)
        .ok()?
        .interface(INTERFACE)
        .ok()?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .ok()?;
    match status(&proxy).await {
        Ok(found) if found.device == device_id => Some(Ok(Daemon { conn, proxy, found })),
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    }
}

async fn status(proxy: &zbus::Proxy<'static>) -> Result<StatusDoc, ClientError> {
    let json: String = proxy.call("GetStatus", &()).await.map_err(ClientError::from_call)?;
    serde_json::from_str(&json).map_err(|e| ClientError::Status(e.to_string()))
}

impl Daemon {
    pub async fn mark(&self, good: bool) -> Result<String, ClientError> {
        let method = if good { "MarkGood" } else { "MarkBad" };
        self.proxy.call(method, &()).await.map_err(ClientError::from_call)
    }

    /// Hands `message` to the daemon and follows the install to its
    /// `Completed`; `on_progress` gets each (percent, step) on the way.
    pub async fn install(
        &self,
        message: Message,
        mut on_progress: impl FnMut(i32, &str),
    ) -> Result<(i32, String), ClientError> {
        // Subscribed before the call: nothing the daemon emits is missed.
        let mut completed = self.proxy.receive_signal("Completed").await?;
        let properties = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination(NAME)?
            .path(PATH)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let mut changes = properties.receive_properties_changed().await?;
        let dbus = zbus::fdo::DBusProxy::new(&self.conn).await?;
        let mut owner_changes = dbus.receive_name_owner_changed_with_args(&[(0, NAME)]).await?;
        let accepted: String = match message {
            Message::File(file) => {
                let fd = zbus::zvariant::Fd::from(std::os::fd::AsFd::as_fd(&file));
                self.proxy.call("InstallFd", &(fd,)).await
            }
            Message::Bytes(bytes) => self.proxy.call("InstallMessage", &(bytes,)).await,
        }
        .map_err(ClientError::from_call)?;
        on_progress(0, &accepted);
        loop {
            tokio::select! {
                signal = completed.next() => {
                    let Some(signal) = signal else { return Err(ClientError::Gone) };
                    let (result, detail): (i32, String) = signal.body().deserialize()?;
                    // Our install was accepted: a refusal is another caller's.
                    if result != super::model::RESULT_REFUSED {
                        return Ok((result, detail));
                    }
                }
                change = changes.next() => {
                    let Some(change) = change else { return Err(ClientError::Gone) };
                    let Ok(args) = change.args() else { continue };
                    if let Some(value) = args.changed_properties().get("Progress") {
                        let parsed = value.try_clone().ok().and_then(|v| <(i32, String)>::try_from(v).ok());
                        if let Some((percent, step)) = parsed {
                            on_progress(percent, &step);
                        }
                    }
                }
                gone = owner_changes.next() => {
                    let vanished = gone
                        .and_then(|s| s.args().ok().map(|a| a.new_owner().is_none()))
                        .unwrap_or(true);
                    if vanished {
                        return Err(ClientError::Gone);
                    }
                }
            }
        }
    }
}
