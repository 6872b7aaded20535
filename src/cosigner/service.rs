//! `POST /v1/cosign`: the HTTP face of the co-signer.

use super::{CosignerConfig, RateLimiter, Registry, SERVER_KID_PREFIX};
use crate::trust::{self, Claims, Envelope, PublicKey, SigningKey, VerifyError};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Why a co-signing request was refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum CosignError {
    #[error("{0}")]
    Message(VerifyError),
    #[error("server-unknown: {0:?} is not registered")]
    ServerUnknown(String),
    #[error("server-revoked: {0:?} was revoked")]
    ServerRevoked(String),
    #[error("project-refused: this co-signer does not sign for {0:?}")]
    ProjectRefused(String),
    #[error("rate-limited: too many requests from {0:?}")]
    RateLimited(String),
    #[error("version-out-of-range: version {version} is above this co-signer's max_version {max}")]
    VersionOutOfRange { version: u64, max: u64 },
    #[error("internal: {0}")]
    Internal(String),
}

impl CosignError {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Message(e) => e.name(),
            Self::ServerUnknown(_) => "server-unknown",
            Self::ServerRevoked(_) => "server-revoked",
            Self::ProjectRefused(_) => "project-refused",
            Self::RateLimited(_) => "rate-limited",
            Self::VersionOutOfRange { .. } => "version-out-of-range",
            Self::Internal(_) => "internal",
        }
    }

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
    limiter: Mutex<RateLimiter>,
    /// Per peer address, taken before any parsing or signature check.
    peer_limiter: Mutex<RateLimiter>,
    /// Serialises audit appends so lines never interleave.
    audit: Mutex<()>,
}

impl App {
    pub fn new(config: CosignerConfig) -> Result<Self, super::CosignerError> {
        let pem = crate::fsutil::read_private_key(&config.key)
            .map_err(|source| super::CosignerError::KeyFile { path: config.key.clone(), source })?;
        let pem = String::from_utf8(pem).map_err(|_| super::CosignerError::Key {
            path: config.key.clone(),
            source: trust::KeyError::NotP256Private,
        })?;
        let key = SigningKey::from_pem(&pem)
            .map_err(|source| super::CosignerError::Key { path: config.key.clone(), source })?;
        let limiter = Mutex::new(RateLimiter::new(config.rate_limit_per_minute, config.rate_limit_burst));
        let peer_limiter =
            Mutex::new(RateLimiter::new(config.peer_rate_limit_per_minute, config.peer_rate_limit_burst));
        Ok(Self { config, key, limiter, peer_limiter, audit: Mutex::new(()) })
    }

    /// The whole decision, without HTTP: returns the co-signed envelope.
    pub fn cosign(&self, body: &[u8], now: u64) -> Result<Envelope, CosignError> {
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
        if !self.take_token(server) {
            return Err(CosignError::RateLimited(server.to_string()));
        }
        let claims = Claims::parse(&envelope.payload_bytes().map_err(CosignError::Message)?)
            .map_err(CosignError::Message)?;
        claims.check_structure().map_err(CosignError::Message)?;
        if !self.config.projects.contains(&claims.project) {
            return Err(CosignError::ProjectRefused(claims.project));
        }
        trust::check_validity_window(&claims, now, self.config.leeway_s, self.config.max_validity_s)
            .map_err(CosignError::Message)?;
        // The window check already refuses an iat ahead of this clock; a
        // co-signer also refuses one far behind it: a fresh request carries
        // a fresh iat, and an old one is somebody's stored message.
        if now.saturating_sub(claims.iat) > self.config.leeway_s {
            return Err(CosignError::Message(VerifyError::IatInvalid {
                iat: claims.iat,
                why: format!("more than {} s before the co-signer's clock ({now})", self.config.leeway_s),
            }));
        }
        if claims.version > self.config.max_version {
            return Err(CosignError::VersionOutOfRange {
                version: claims.version,
                max: self.config.max_version,
            });
        }
        // The same URL rules as the device: never sign what no device may fetch.
        trust::check_url(&claims.image.url, self.config.allow_http).map_err(CosignError::Message)?;

        let mut signed = Envelope { payload: envelope.payload.clone(), signatures: Vec::new() };
        signed
            .add_signature(&self.key, &self.config.kid)
            .map_err(|e| CosignError::Internal(e.to_string()))?;
        self.audit(server, &claims, now)?;
        Ok(signed)
    }

    fn take_token(&self, server: &str) -> bool {
        match self.limiter.lock() {
            Ok(mut l) => l.allow(server, Instant::now()),
            Err(poisoned) => poisoned.into_inner().allow(server, Instant::now()),
        }
    }

    /// The first gate, before the body is even parsed: one token per request
    /// from `peer`, so an unauthenticated flood costs no signature checks.
    pub fn admit_peer(&self, peer: IpAddr, now: Instant) -> Result<(), CosignError> {
        let mut limiter = self.peer_limiter.lock().unwrap_or_else(|p| p.into_inner());
        if limiter.allow(&peer.to_string(), now) {
            Ok(())
        } else {
            Err(CosignError::RateLimited(peer.to_string()))
        }
    }

    /// Appends and fsyncs the audit record before the signature leaves.
    fn audit(&self, server: &str, claims: &Claims, now: u64) -> Result<(), CosignError> {
        let line = serde_json::json!({
            "time": now,
            "server": server,
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
        })
        .to_string();
        let _guard = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::create_dir_all(&self.config.state_dir)
            .and_then(|_| crate::fsutil::append_line_synced(&self.config.audit_path(), &line))
            .map_err(|e| CosignError::Internal(format!("audit log: {e}")))
    }
}

async fn cosign_handler(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    if let Err(e) = app.admit_peer(peer.ip(), Instant::now()) {
        crate::logging::log(&format!("cosign refused: {e}"));
        return e.into_response();
    }
    let now = crate::system_now();
    let result = tokio::task::spawn_blocking(move || app.cosign(&body, now)).await;
    match result {
        Ok(Ok(envelope)) => {
            ([(axum::http::header::CONTENT_TYPE, "application/json")], envelope.to_json()).into_response()
        }
        Ok(Err(e)) => {
            crate::logging::log(&format!("cosign refused: {e}"));
            e.into_response()
        }
        Err(e) => CosignError::Internal(e.to_string()).into_response(),
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/cosign", post(cosign_handler))
        .layer(DefaultBodyLimit::max(trust::MAX_MESSAGE_BYTES))
        .with_state(app)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = router(app).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service).with_graceful_shutdown(shutdown).await
}
