//! The portal's HTTP server: hyper (HTTP/1.1) on one listening socket, the
//! access point's address or `provision.listen`, never a wildcard unless
//! configured so. Each request goes to the pure `Portal`; a checked
//! provisioning request goes to the phase driver, which stores it and
//! hands back the answer.

use super::identity::CheckedIdentity;
use super::portal::{Handled, Portal, Request, Response};
use super::request::{ProvisionRequest, MAX_BODY_BYTES};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// What the portal hands the phase driver.
pub enum ToPhase {
    Provision(Box<Accepted>),
    Rescan,
}

/// A request that passed every check, for the phase driver to store.
pub struct Accepted {
    pub request: ProvisionRequest,
    pub identity: CheckedIdentity,
    /// The answer the phone gets, once stored (or not).
    pub answer: oneshot::Sender<Response>,
}

pub type SharedPortal = Arc<Mutex<Portal>>;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 32;
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a client may take to send its request head and body.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves until this future is dropped; its connections go with it (they
/// live in its `JoinSet`), so no keep-alive outlives the portal. `log` gets
/// lock-outs.
pub async fn serve(
    listener: TcpListener,
    portal: SharedPortal,
    accepted: mpsc::Sender<ToPhase>,
    clock: Clock,
    log: fn(&str),
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            // Out of descriptors, say: wait instead of spinning.
            Err(_) => {
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Reap finished connections so the set does not grow; past the cap
        // a new connection is closed at once (a phone needs one or two).
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            continue;
        }
        let portal = portal.clone();
        let accepted = accepted.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let portal = portal.clone();
                let accepted = accepted.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(req, &portal, &accepted, clock, log).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = connection.await;
        });
    }
}

/// Monotonic milliseconds for the portal's lock-outs and nonces, and the
/// wall clock raised to the device's clock floor for certificate validity.
#[derive(Clone, Copy)]
pub struct Clock {
    pub started: Instant,
    pub floor: u64,
}

impl Clock {
    pub fn new(floor: u64) -> Self {
        Self { started: Instant::now(), floor }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn unix_now(&self) -> u64 {
        crate::system_now().max(self.floor)
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    portal: &SharedPortal,
    accepted: &mpsc::Sender<ToPhase>,
    clock: Clock,
    log: fn(&str),
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let authorization =
        req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body =
        match tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(req.into_body(), MAX_BODY_BYTES).collect())
            .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(_)) => {
                return to_hyper(Response::error(413, "malformed", "the body is too large or cut short"))
            }
            Err(_) => return to_hyper(Response::error(408, "malformed", "the body took too long")),
        };
    let mut random = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).is_err() {
        return to_hyper(Response::error(500, "no-randomness", "the system has no randomness"));
    }
    let handled = {
        let Ok(mut portal) = portal.lock() else {
            return to_hyper(Response::error(500, "internal", "portal state poisoned"));
        };
        let request =
            Request { method: &method, path: &path, authorization: authorization.as_deref(), body: &body };
        portal.handle(&request, clock.now_ms(), clock.unix_now(), random)
    };
    match handled {
        Handled::Reply { response, log: line } => {
            if let Some(line) = line {
                log(&line);
            }
            to_hyper(response)
        }
        Handled::Provision { request, identity, nonce } => {
            let (tx, rx) = oneshot::channel();
            let item = Accepted { request: *request, identity: *identity, answer: tx };
            if accepted.send(ToPhase::Provision(Box::new(item))).await.is_err() {
                return to_hyper(Response::error(503, "not-provisioning", "provisioning has ended"));
            }
            match rx.await {
                Ok(mut response) => {
                    if let Ok(portal) = portal.lock() {
                        portal.sign(&nonce, &mut response);
                    }
                    to_hyper(response)
                }
                Err(_) => to_hyper(Response::error(503, "not-provisioning", "provisioning has ended")),
            }
        }
        Handled::Rescan { response, busy } => match accepted.try_send(ToPhase::Rescan) {
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
