//! The portal's HTTP server: hyper (HTTP/1.1) on one listening socket, the
//! access point's address or `provision.listen`, never a wildcard unless
//! configured so, with the connection limits of `http_server`. Each request
//! goes to the pure `Portal`; a checked provisioning request goes to the
//! phase driver, which stores it and hands back the answer. A wrong proof
//! is written to disk (`GuardFile`) before it is answered.

use super::portal::{Handled, Plan, Portal, Request, Response};
use super::request::{Wifi, MAX_BODY_BYTES};
use super::store::GuardFile;
use crate::admission::SlotPolicy;
use crate::http_server::{Conn, Limits};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// What the portal hands the phase driver.
pub enum ToPhase {
    Provision(Box<Accepted>),
    Rescan,
}

/// A request that passed every check, for the phase driver to store.
pub struct Accepted {
    pub wifi: Option<Wifi>,
    pub plan: Plan,
    /// The answer the phone gets, once stored (or not).
    pub answer: oneshot::Sender<Response>,
}

pub type SharedPortal = Arc<Mutex<Portal>>;

/// The portal's connection limits: a phone's browser opens up to 6
/// connections, so each address holds 8; 64 in all, where the largest
/// holder gives up an idle one for a newcomer (`admission`).
pub const LIMITS: Limits = Limits {
    slots: SlotPolicy { max_total: 64, max_per_source: 8, idle_ms: 10_000 },
    header_read: Duration::from_secs(10),
};

/// How long a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the portal keeps what it must not forget across a restart.
pub struct Persist {
    pub guard: Arc<GuardFile>,
}

/// Serves until this future is dropped; its connections go with it (they
/// live in its `JoinSet`), so no keep-alive outlives the portal. `log` gets
/// lock-outs.
pub async fn serve(
    listener: TcpListener,
    portal: SharedPortal,
    accepted: mpsc::Sender<ToPhase>,
    clock: Clock,
    log: fn(&str),
    persist: Persist,
) {
    let guard_file = persist.guard;
    crate::http_server::serve(listener, LIMITS, move |conn: Conn| {
        let portal = portal.clone();
        let accepted = accepted.clone();
        let guard_file = guard_file.clone();
        hyper::service::service_fn(move |req| {
            let portal = portal.clone();
            let accepted = accepted.clone();
            let guard_file = guard_file.clone();
            let conn = conn.clone();
            async move {
                let at = Edge { portal: &portal, accepted: &accepted, clock, log, guard_file: &guard_file };
                Ok::<_, std::convert::Infallible>(answer(req, &conn, at).await)
            }
        })
    })
    .await
}

/// Monotonic milliseconds for the portal's lock-outs and nonces, resumed
/// from where the last portal left them (`offset_ms`), and the wall clock
/// raised to the device's clock floor for certificate validity.
#[derive(Clone, Copy)]
pub struct Clock {
    pub started: Instant,
    pub floor: u64,
    pub offset_ms: u64,
}

impl Clock {
    pub fn new(floor: u64) -> Self {
        Self::resume(floor, 0)
    }

    pub fn resume(floor: u64, offset_ms: u64) -> Self {
        Self { started: Instant::now(), floor, offset_ms }
    }

    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.saturating_add(elapsed)
    }

    fn unix_now(&self) -> u64 {
        crate::system_now().max(self.floor)
    }
}

struct Edge<'a> {
    portal: &'a SharedPortal,
    accepted: &'a mpsc::Sender<ToPhase>,
    clock: Clock,
    log: fn(&str),
    guard_file: &'a Arc<GuardFile>,
}

fn lock(portal: &SharedPortal) -> std::sync::MutexGuard<'_, Portal> {
    portal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes the guard before the wrong proof is answered. The state is read
/// under the file's own lock, so a later write never carries older state.
async fn persist_guard(at: &Edge<'_>) {
    let (portal, file, clock) = (at.portal.clone(), at.guard_file.clone(), at.clock);
    let written = tokio::task::spawn_blocking(move || {
        let _writing = file.writing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = lock(&portal).guard_state(clock.now_ms());
        file.save(&state, crate::system_now_ms())
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => (at.log)(&format!("provisioning: {e}")),
        Err(e) => (at.log)(&format!("provisioning: saving the guard: {e}")),
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    conn: &Conn,
    at: Edge<'_>,
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let header = |name| {
        req.headers().get(name).and_then(|v: &hyper::header::HeaderValue| v.to_str().ok()).map(str::to_string)
    };
    let authorization = header(hyper::header::AUTHORIZATION);
    let host = header(hyper::header::HOST);
    let in_request = conn.slot.request();
    let body =
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), MAX_BODY_BYTES).collect())
            .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(_)) => {
                return to_hyper(Response::error(413, "malformed", "the body is too large or cut short"))
            }
            Err(_) => return to_hyper(Response::error(408, "request-timeout", "the body took too long")),
        };
    // Read in full: from here the answer's time is ours, not the client's.
    in_request.answering();
    let mut random = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).is_err() {
        return to_hyper(Response::error(500, "no-randomness", "the system has no randomness"));
    }
    let handled = {
        let request = Request {
            method: &method,
            path: &path,
            host: host.as_deref(),
            authorization: authorization.as_deref(),
            body: &body,
            peer: conn.peer.ip(),
            local: conn.local.ip(),
        };
        lock(at.portal).handle(&request, at.clock.now_ms(), at.clock.unix_now(), random)
    };
    match handled {
        Handled::Reply { response, log: line, guard_changed } => {
            if guard_changed {
                persist_guard(&at).await;
            }
            if let Some(line) = line {
                (at.log)(&line);
            }
            to_hyper(response)
        }
        Handled::Provision { wifi, plan, nonce } => {
            let (tx, rx) = oneshot::channel();
            let item = Accepted { wifi, plan: *plan, answer: tx };
            if at.accepted.send(ToPhase::Provision(Box::new(item))).await.is_err() {
                return to_hyper(Response::error(503, "not-provisioning", "provisioning has ended"));
            }
            match rx.await {
                Ok(mut response) => {
                    lock(at.portal).sign(&nonce, &mut response);
                    to_hyper(response)
                }
                Err(_) => to_hyper(Response::error(503, "not-provisioning", "provisioning has ended")),
            }
        }
        Handled::Rescan { response, busy } => match at.accepted.try_send(ToPhase::Rescan) {
            Ok(()) => to_hyper(response),
            Err(_) => to_hyper(busy),
        },
    }
}

fn to_hyper(response: Response) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder()
        .status(response.status)
        .header(hyper::header::CONTENT_TYPE, response.content_type);
    for (name, value) in &response.headers {
        builder = builder.header(*name, value.as_str());
    }
    builder.body(Full::new(Bytes::from(response.body))).unwrap_or_else(|_| {
        let mut fallback = hyper::Response::new(Full::new(Bytes::from_static(b"{}")));
        *fallback.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        fallback
    })
}
