//! `POST /v1/cosign`: the HTTP face of the co-signer, on the connection
//! limits of `http_server` (idle and header bounds, a share per source),
//! with the body read within `BODY_TIMEOUT`. Every refusal is audited with
//! the peer's address, within a budget (`REFUSALS_AUDITED_PER_MINUTE`) so
//! a flood cannot fill the disk; what the budget leaves out is counted on
//! the next line.

use super::ratelimit::PeerGate;
use super::{CosignerConfig, RateLimiter, Registry, SERVER_KID_PREFIX};
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use fleetd::admission::{SlotPolicy, Source};
use fleetd::http_server::{Conn, Limits};
use fleetd::trust::{self, Claims, Envelope, PublicKey, SigningKey, VerifyError};
use http_body_util::{BodyExt, Limited};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The co-signer's connection limits: a fleet server may run many requests
/// at once, a stranger no more than its share; well under the default file
/// limit (1,024) in all.
pub const LIMITS: Limits = Limits {
    slots: SlotPolicy { max_total: 512, max_per_source: 32, idle_ms: 10_000 },
    header_read: Duration::from_secs(10),
};

/// How long a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Refusals written to the audit log per minute, at most (burst as many).
pub const REFUSALS_AUDITED_PER_MINUTE: u32 = 60;

fleetd::error_name::named_error! {
    /// Why a co-signing request was refused; each maps to one HTTP status.
    #[derive(Debug, thiserror::Error)]
    pub enum CosignError {
        #[name(of 0)]
        #[error("{0}")]
        Message(VerifyError),
        #[name = "server-unknown"]
        #[error("{name}: {0:?} is not registered")]
        ServerUnknown(String),
        #[name = "server-revoked"]
        #[error("{name}: {0:?} was revoked")]
        ServerRevoked(String),
        #[name = "project-refused"]
        #[error("{name}: this co-signer does not sign for {0:?}")]
        ProjectRefused(String),
        #[name = "rate-limited"]
        #[error("{name}: too many requests from {0:?}")]
        RateLimited(String),
        #[name = "version-out-of-range"]
        #[error("{name}: version {version} is above this co-signer's max_version {max}")]
        VersionOutOfRange { version: u64, max: u64 },
        #[name = "request-timeout"]
        #[error("{name}: the request body did not arrive within {} s", BODY_TIMEOUT.as_secs())]
        Timeout,
        #[name = "internal"]
        #[error("{name}: {0}")]
        Internal(String),
    }
}

impl CosignError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Message(VerifyError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Message(VerifyError::SignatureInvalid(_)) => StatusCode::UNAUTHORIZED,
            Self::Message(
                VerifyError::Malformed(_)
                | VerifyError::AlgRejected(_)
                | VerifyError::HeaderRejected(_)
                | VerifyError::KidUnknown(_)
                | VerifyError::KidDuplicate(_)
                | VerifyError::SignatureMissing(_),
            ) => StatusCode::BAD_REQUEST,
            Self::Message(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::ServerUnknown(_) | Self::ServerRevoked(_) | Self::ProjectRefused(_) => {
                StatusCode::FORBIDDEN
            }
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::VersionOutOfRange { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for CosignError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.name(), "detail": self.to_string() });
        (self.status(), axum::Json(body)).into_response()
    }
}

pub struct App {
    config: CosignerConfig,
    key: SigningKey,
    /// Per authenticated server id, after its signature verified.
    limiter: Mutex<RateLimiter>,
    /// Per source, taken before any parsing or signature check.
    peers: Mutex<PeerGate>,
    /// Serialises audit appends so lines never interleave; holds the
    /// refusals' budget.
    audit: Mutex<RefusalAudit>,
}

/// Refusals are audited within a budget; those left out are counted.
struct RefusalAudit {
    budget: RateLimiter,
    unrecorded: u64,
}

/// What a request showed before it was refused, for its audit line.
#[derive(Default)]
struct Seen {
    /// The server the signature's kid names (verified or not: see `verified`).
    server: Option<String>,
    verified: bool,
    jti: Option<String>,
}

impl App {
    pub fn new(config: CosignerConfig) -> Result<Self, super::CosignerError> {
        let pem = fleetd::fsutil::read_private_key(&config.key)
            .map_err(|source| super::CosignerError::KeyFile { path: config.key.clone(), source })?;
        let pem = String::from_utf8(pem).map_err(|_| super::CosignerError::Key {
            path: config.key.clone(),
            source: trust::KeyError::NotP256Private,
        })?;
        let key = SigningKey::from_pem(&pem)
            .map_err(|source| super::CosignerError::Key { path: config.key.clone(), source })?;
        let limiter = Mutex::new(RateLimiter::new(config.rate_limit_per_minute, config.rate_limit_burst));
        let peers =
            Mutex::new(PeerGate::new(config.peer_rate_limit_per_minute, config.peer_rate_limit_burst));
        let audit = Mutex::new(RefusalAudit {
            budget: RateLimiter::new(REFUSALS_AUDITED_PER_MINUTE, REFUSALS_AUDITED_PER_MINUTE),
            unrecorded: 0,
        });
        Ok(Self { config, key, limiter, peers, audit })
    }

    /// The whole decision, without HTTP: returns the co-signed envelope.
    /// A refusal is audited with `peer` (within the refusals' budget).
    pub fn cosign(&self, body: &[u8], now: u64, peer: SocketAddr) -> Result<Envelope, CosignError> {
        let mut seen = Seen::default();
        let result = self.decide(body, now, peer, &mut seen);
        if let Err(e) = &result {
            self.audit_refusal(e, now, peer, &seen);
        }
        result
    }

    fn decide(
        &self,
        body: &[u8],
        now: u64,
        peer: SocketAddr,
        seen: &mut Seen,
    ) -> Result<Envelope, CosignError> {
        let envelope = Envelope::parse(body).map_err(CosignError::Message)?;
        let kids = envelope.kids();
        let [kid] = kids.as_slice() else {
            return Err(CosignError::Message(VerifyError::Malformed(
                "exactly one signature, by the requesting fleet server, is expected".into(),
            )));
        };
        let Some(server) = kid.strip_prefix(SERVER_KID_PREFIX) else {
            return Err(CosignError::Message(VerifyError::KidUnknown(kid.clone())));
        };
        seen.server = Some(server.to_string());
        let registry =
            Registry::load(&self.config.registry_path()).map_err(|e| CosignError::Internal(e.to_string()))?;
        let entry =
            registry.servers.get(server).ok_or_else(|| CosignError::ServerUnknown(server.to_string()))?;
        if entry.revoked_at.is_some() {
            return Err(CosignError::ServerRevoked(server.to_string()));
        }
        let server_key = PublicKey::from_pem(&entry.public_key)
            .map_err(|e| CosignError::Internal(format!("registry key of {server}: {e}")))?;
        trust::verify_signatures(&envelope, &[(kid.clone(), server_key)]).map_err(CosignError::Message)?;
        seen.verified = true;
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .authenticated(Source::of(peer.ip()), Instant::now());
        if !self.take_token(server) {
            return Err(CosignError::RateLimited(server.to_string()));
        }
        let payload = envelope.payload_bytes().map_err(CosignError::Message)?;
        let audit = if trust::halt::payload_type(&payload).as_deref() == Some(trust::halt::HALT_TYPE) {
            self.check_halt(&payload, now, seen)?
        } else {
            self.check_update(&payload, now, seen)?
        };
        let mut signed = Envelope { payload: envelope.payload.clone(), signatures: Vec::new() };
        signed
            .add_signature(&self.key, &self.config.kid)
            .map_err(|e| CosignError::Internal(e.to_string()))?;
        self.audit_signed(server, audit, now, peer)?;
        Ok(signed)
    }

    /// An update's claims within policy; what its audit line records.
    fn check_update(
        &self,
        payload: &[u8],
        now: u64,
        seen: &mut Seen,
    ) -> Result<serde_json::Value, CosignError> {
        let claims = Claims::parse(payload).map_err(CosignError::Message)?;
        seen.jti = Some(claims.jti.clone());
        claims.check_structure().map_err(CosignError::Message)?;
        self.check_project_and_window(&claims.project, &claims.window(), now)?;
        if claims.version > self.config.max_version {
            return Err(CosignError::VersionOutOfRange {
                version: claims.version,
                max: self.config.max_version,
            });
        }
        // The same URL rules as the device: never sign what no device may fetch.
        trust::check_url(&claims.image.url, self.config.allow_http).map_err(CosignError::Message)?;
        Ok(serde_json::json!({
            "jti": claims.jti,
            "project": claims.project,
            "version": claims.version,
            "name": claims.name,
            "hardware": claims.target.hardware,
            "devices": claims.target.devices,
            "groups": claims.target.groups,
            "nbf": claims.nbf,
            "exp": claims.exp,
            "image_sha256": claims.image.sha256,
            "image_url": claims.image.url,
        }))
    }

    /// A halt's claims within policy: it can stop a rollout, never start
    /// one, so it needs no version or URL rule.
    fn check_halt(
        &self,
        payload: &[u8],
        now: u64,
        seen: &mut Seen,
    ) -> Result<serde_json::Value, CosignError> {
        let claims = trust::halt::HaltClaims::parse(payload).map_err(CosignError::Message)?;
        seen.jti = Some(claims.jti.clone());
        claims.check_structure().map_err(CosignError::Message)?;
        self.check_project_and_window(&claims.project, &claims.window(), now)?;
        Ok(serde_json::json!({
            "typ": claims.typ,
            "jti": claims.jti,
            "project": claims.project,
            "halts": claims.halts,
            "hardware": claims.target.hardware,
            "devices": claims.target.devices,
            "groups": claims.target.groups,
            "nbf": claims.nbf,
            "exp": claims.exp,
        }))
    }

    fn check_project_and_window(
        &self,
        project: &str,
        window: &trust::Window,
        now: u64,
    ) -> Result<(), CosignError> {
        if !self.config.projects.iter().any(|p| p == project) {
            return Err(CosignError::ProjectRefused(project.to_string()));
        }
        trust::check_window(window, now, self.config.leeway_s, self.config.max_validity_s)
            .map_err(CosignError::Message)?;
        // The window check already refuses an iat ahead of this clock; a
        // co-signer also refuses one far behind it: a fresh request carries
        // a fresh iat, and an old one is somebody's stored message.
        if now.saturating_sub(window.iat) > self.config.leeway_s {
            return Err(CosignError::Message(VerifyError::IatInvalid {
                iat: window.iat,
                why: format!("more than {} s before the co-signer's clock ({now})", self.config.leeway_s),
            }));
        }
        Ok(())
    }

    fn take_token(&self, server: &str) -> bool {
        match self.limiter.lock() {
            Ok(mut l) => l.allow(server, Instant::now()),
            Err(poisoned) => poisoned.into_inner().allow(server, Instant::now()),
        }
    }

    /// The first gate, before the body is even read: one token per request
    /// from `peer`'s source, so an unauthenticated flood costs no signature
    /// checks (`PeerGate`).
    pub fn admit_peer(&self, peer: SocketAddr, now: Instant) -> Result<(), CosignError> {
        let source = Source::of(peer.ip());
        let mut gate = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if gate.admit(source, now) {
            Ok(())
        } else {
            Err(CosignError::RateLimited(source.to_string()))
        }
    }

    /// Appends and fsyncs the audit record before the signature leaves.
    fn audit_signed(
        &self,
        server: &str,
        mut record: serde_json::Value,
        now: u64,
        peer: SocketAddr,
    ) -> Result<(), CosignError> {
        if let Some(fields) = record.as_object_mut() {
            fields.insert("time".into(), now.into());
            fields.insert("outcome".into(), "signed".into());
            fields.insert("peer".into(), peer.to_string().into());
            fields.insert("server".into(), server.into());
        }
        let line = record.to_string();
        let _guard = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        self.append_audit(&line).map_err(|e| CosignError::Internal(format!("audit log: {e}")))
    }

    fn append_audit(&self, line: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.config.state_dir)
            .and_then(|_| fleetd::fsutil::append_line_synced(&self.config.audit_path(), line))
    }

    /// Logs a refusal with its peer, and audits it within the budget.
    /// `server` is the kid's server, `"verified": false` when its signature
    /// was never checked (then it is only what the request claimed).
    fn audit_refusal(&self, error: &CosignError, now: u64, peer: SocketAddr, seen: &Seen) {
        fleetd::logging::log(&format!("cosign refused: {peer}: {error}"));
        let mut audit = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        if !audit.budget.allow("refusals", Instant::now()) {
            audit.unrecorded = audit.unrecorded.saturating_add(1);
            return;
        }
        let line = serde_json::json!({
            "time": now,
            "outcome": "refused",
            "peer": peer.to_string(),
            "error": error.name(),
            "server": seen.server,
            "verified": seen.verified,
            "jti": seen.jti,
            "unrecorded_before": audit.unrecorded,
        })
        .to_string();
        match self.append_audit(&line) {
            Ok(()) => audit.unrecorded = 0,
            Err(e) => fleetd::logging::log(&format!("cosign: audit log: {e}")),
        }
    }
}

async fn cosign_handler(
    State(app): State<Arc<App>>,
    Extension(conn): Extension<Conn>,
    body: Body,
) -> Response {
    let peer = conn.peer;
    let in_request = conn.slot.request();
    let refuse = |app: Arc<App>, e: CosignError| async move {
        let now = fleetd::system_now();
        let response = e.to_string();
        let status = e.status();
        let name = e.name();
        let _ = tokio::task::spawn_blocking(move || app.audit_refusal(&e, now, peer, &Seen::default())).await;
        let body = serde_json::json!({ "error": name, "detail": response });
        (status, axum::Json(body)).into_response()
    };
    if let Err(e) = app.admit_peer(peer, Instant::now()) {
        return refuse(app, e).await;
    }
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(body, trust::MAX_MESSAGE_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => {
            let e = CosignError::Message(VerifyError::TooLarge { limit: trust::MAX_MESSAGE_BYTES });
            return refuse(app, e).await;
        }
        Err(_) => return refuse(app, CosignError::Timeout).await,
    };
    // Read in full: from here the answer's time is ours, not the client's.
    in_request.answering();
    let now = fleetd::system_now();
    let result = tokio::task::spawn_blocking(move || app.cosign(&body, now, peer)).await;
    match result {
        Ok(Ok(envelope)) => {
            ([(axum::http::header::CONTENT_TYPE, "application/json")], envelope.to_json()).into_response()
        }
        Ok(Err(e)) => e.into_response(),
        Err(e) => CosignError::Internal(e.to_string()).into_response(),
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new().route("/v1/cosign", post(cosign_handler)).with_state(app)
}

/// Serves until `shutdown` completes; its connections go with it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper::service::Service as _;
    let router = router(app);
    let accepting = fleetd::http_server::serve(listener, LIMITS, move |conn: Conn| {
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(conn.clone());
            service.call(request)
        })
    });
    tokio::select! {
        () = accepting => {}
        () = shutdown => {}
    }
    Ok(())
}
