//! The HTTP API (axum). Every answer but the page and the CRL is JSON;
//! every refusal, axum's own included (content type, JSON, body size,
//! route), is `{error, detail}`.

use crate::app::App;
use crate::error::{RegistrarError, Result};
use crate::names::Role;
use crate::{audit, claims, db, devices, enroll, users};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{header, request::Parts, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleetd_core::provision::enroll::{
    BrokerSettings, ClaimRequest, EnrollRequest, EnrollResponse, LoginRequest, RenewRequest,
};
use serde::de::DeserializeOwned;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

/// The largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(15);

/// The connection's peer, set by the server for each connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = RegistrarError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self> {
        Ok(parts.extensions.get::<Peer>().copied().unwrap_or(Peer(IpAddr::V4(Ipv4Addr::UNSPECIFIED))))
    }
}

/// A JSON body: `application/json`, at most [`MAX_BODY`], in
/// [`BODY_TIMEOUT`], refused by name otherwise.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = RegistrarError;
    async fn from_request(req: Request, _: &S) -> Result<Self> {
        let headers = req.headers();
        let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json {
            return Err(RegistrarError::ContentType);
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(RegistrarError::BodyTooLarge(MAX_BODY));
        }
        let bytes = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(req.into_body(), MAX_BODY))
            .await
            .map_err(|_| RegistrarError::BodyTimeout)?
            .map_err(|e| {
                if format!("{e:?} {e}").to_lowercase().contains("length limit") {
                    RegistrarError::BodyTooLarge(MAX_BODY)
                } else {
                    RegistrarError::Malformed(format!("reading the body: {e}"))
                }
            })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| RegistrarError::Malformed(e.to_string()))
    }
}

/// The bearer token's user and role.
async fn bearer(app: &App, headers: &HeaderMap) -> Result<(String, Role)> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(RegistrarError::Unauthorized("an Authorization: Bearer token is required"))?;
    users::authenticate(&app.db, token.trim(), db::now()).await
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/v1/login", post(login))
        .route("/v1/claims", post(claim))
        .route("/v1/enroll", post(enroll_device))
        .route("/v1/renew", post(renew_device))
        .route("/v1/devices/{serial}", get(device))
        .route("/v1/crl", get(crl))
        .fallback(|| async { RegistrarError::NotFound })
        .method_not_allowed_fallback(|| async { RegistrarError::MethodNotAllowed })
        .with_state(app)
}

async fn page() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store"), (header::CONTENT_SECURITY_POLICY, crate::page::CSP)],
        Html(crate::page::PAGE),
    )
}

async fn login(
    State(app): State<Arc<App>>,
    peer: Peer,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Result<Response> {
    if !app.login_limiter.allow(peer.0, std::time::Instant::now()) {
        return Err(RegistrarError::RateLimited);
    }
    let answer =
        users::login(&app.db, &body.user, &body.password, app.token_ttl_s, db::now(), &peer.0.to_string())
            .await?;
    Ok(Json(answer).into_response())
}

async fn claim(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ClaimRequest>,
) -> Result<Response> {
    let (user, _role) = bearer(&app, &headers).await?;
    // Admins and installers both may ask for claims.
    let issued = claims::create_claim(&app.db, &user, &body.serial, app.claim_ttl_s, db::now()).await?;
    Ok(Json(issued).into_response())
}

async fn enroll_device(
    State(app): State<Arc<App>>,
    JsonBody(body): JsonBody<EnrollRequest>,
) -> Result<Response> {
    let enrolled = enroll::enroll(
        &app.db,
        &app.issuer,
        app.validity,
        &body.claim,
        &body.csr_pem,
        body.mac.as_deref(),
        db::now(),
    )
    .await;
    let enrolled = audit_refusal(&app, "enroll-refused", enrolled).await?;
    Ok(Json(answer(&app, enrolled).await).into_response())
}

async fn renew_device(
    State(app): State<Arc<App>>,
    JsonBody(body): JsonBody<RenewRequest>,
) -> Result<Response> {
    let enrolled =
        enroll::renew(&app.db, &app.issuer, app.validity, &body.csr_pem, &body.signature, db::now()).await;
    let enrolled = audit_refusal(&app, "renew-refused", enrolled).await?;
    Ok(Json(answer(&app, enrolled).await).into_response())
}

/// A refused enrollment or renewal rolled its transaction back; the trail
/// still records the attempt (by the refusal's name), in a transaction of
/// its own. A trail that cannot be written is logged, not answered.
async fn audit_refusal<T>(app: &App, action: &str, outcome: Result<T>) -> Result<T> {
    if let Err(refusal) = &outcome {
        if refusal.status().is_client_error() {
            if let Err(e) =
                audit::append_alone(&app.db, db::now(), "device", action, "-", refusal.name()).await
            {
                tracing::warn!("audit: {action}: {e}");
            }
        }
    }
    outcome
}

/// The device's answer; a superseded certificate asks for a new CRL.
async fn answer(app: &App, enrolled: enroll::Enrolled) -> EnrollResponse {
    if enrolled.superseded > 0 {
        app.crl_changed();
    }
    EnrollResponse {
        cert_pem: enrolled.issued.cert_pem,
        chain_pem: app.issuer.cert_pem.clone(),
        mqtt: BrokerSettings {
            host: app.mqtt.host.clone(),
            port: app.mqtt.port,
            ca_pem: app.mqtt.ca_pem.clone(),
        },
        groups: enrolled.groups,
    }
}

async fn device(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    serial: std::result::Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response> {
    let (_, role) = bearer(&app, &headers).await?;
    if role != Role::Admin {
        return Err(RegistrarError::Forbidden { role: role.as_str().into(), what: "read device records" });
    }
    let Path(serial) = serial.map_err(|_| RegistrarError::SerialInvalid)?;
    Ok(Json(devices::view(&app.db, &serial).await?).into_response())
}

async fn crl(State(app): State<Arc<App>>) -> Response {
    let pem = app.crl_pem.read().unwrap_or_else(|e| e.into_inner()).clone();
    ([(header::CONTENT_TYPE, "application/pkix-crl")], pem).into_response()
}
