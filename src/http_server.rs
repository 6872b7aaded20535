//! The accept loop of the servers strangers can reach (the provisioning
//! portal, the co-signer): hyper HTTP/1.1, one task per connection, the
//! slots decided by `admission::Slots`. What this adds to hyper's own
//! header timeout:
//! - a connection waiting for its client longer than the idle bound is
//!   closed, whatever it trickles (the bound starts at the accept and after
//!   each answer, and bytes do not reset it);
//! - a connection the slots give away is closed at once;
//! - every connection lives in this future's `JoinSet`, so none outlives it.
//!
//! The service marks each request (`SlotHandle::request`): from then its
//! body is read (bounded by the service), then it is answered
//! (`InRequest::answering`); the connection is idle again when the guard
//! drops.

use crate::admission::{Admission, SlotId, SlotPolicy, Slots, Source};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub slots: SlotPolicy,
    /// hyper's bound on reading a request head.
    pub header_read: Duration,
}

impl Limits {
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.slots.idle_ms)
    }
}

/// What a service knows about its connection.
#[derive(Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    /// The address the client reached (the `Host` check compares with it).
    pub local: SocketAddr,
    pub slot: SlotHandle,
}

struct Table {
    slots: Slots,
    started: Instant,
    /// Dropping or sending closes the connection.
    closers: HashMap<SlotId, oneshot::Sender<()>>,
}

impl Table {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

type SharedTable = Arc<Mutex<Table>>;

fn lock(table: &SharedTable) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Clone)]
pub struct SlotHandle {
    table: SharedTable,
    id: SlotId,
}

impl SlotHandle {
    /// A request head has arrived: its body is read now, within the
    /// service's own bound. Idle again when the guard drops.
    pub fn request(&self) -> InRequest {
        let mut table = lock(&self.table);
        let now = table.now_ms();
        table.slots.reading(self.id, now);
        InRequest(self.clone())
    }
}

pub struct InRequest(SlotHandle);

impl InRequest {
    /// Read in full: the connection is not given away while it is answered.
    pub fn answering(&self) {
        lock(&self.0.table).slots.busy(self.0.id);
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        let mut table = lock(&self.0.table);
        let now = table.now_ms();
        table.slots.idle(self.0.id, now);
    }
}

const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves until this future is dropped. `service` makes the hyper service
/// for each admitted connection.
pub async fn serve<F, S, B>(listener: TcpListener, limits: Limits, service: F)
where
    F: Fn(Conn) -> S,
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let table: SharedTable = Arc::new(Mutex::new(Table {
        slots: Slots::new(limits.slots),
        started: Instant::now(),
        closers: HashMap::new(),
    }));
    let local = listener.local_addr().ok();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors, say: wait instead of spinning.
            Err(_) => {
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let (close_tx, closed) = oneshot::channel();
        let id = {
            let mut t = lock(&table);
            let now = t.now_ms();
            match t.slots.admit(Source::of(peer.ip()), now) {
                // Every slot is answering: the new connection is dropped.
                Admission::Refused => continue,
                Admission::Admitted { id, replaced } => {
                    if let Some(replaced) = replaced {
                        if let Some(close) = t.closers.remove(&replaced) {
                            let _ = close.send(());
                        }
                    }
                    t.closers.insert(id, close_tx);
                    id
                }
            }
        };
        let local = stream.local_addr().ok().or(local).unwrap_or(peer);
        let conn = Conn { peer, local, slot: SlotHandle { table: table.clone(), id } };
        let service = service(conn);
        let table = table.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            run_until_closed(connection, closed, &table, id, limits.idle()).await;
            let mut t = lock(&table);
            t.slots.close(id);
            t.closers.remove(&id);
        });
    }
}

/// Drives the connection until it ends, is given away, or idles past its
/// deadline (looked up again after every wake: an answer moves it).
async fn run_until_closed(
    connection: impl std::future::Future,
    mut closed: oneshot::Receiver<()>,
    table: &SharedTable,
    id: SlotId,
    idle: Duration,
) {
    tokio::pin!(connection);
    loop {
        let wait = {
            let t = lock(table);
            if !t.slots.is_open(id) {
                return;
            }
            let now = t.now_ms();
            match t.slots.idle_deadline(id) {
                Some(deadline) if deadline <= now => return,
                Some(deadline) => Duration::from_millis(deadline - now),
                // Reading or answering: the handler bounds it; look again later.
                None => idle,
            }
        };
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = &mut closed => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
