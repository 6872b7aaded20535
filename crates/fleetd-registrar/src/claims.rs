//! Claims: a single-use code an installer gets for one serial, stored by
//! its digest, living at most `claim_ttl_s`.

use crate::audit;
use crate::db::Db;
use crate::error::{RegistrarError, Result};
use crate::names::check_serial;
use fleetd_core::provision::enroll::{ClaimCode, ClaimResponse};
use serde::Serialize;
use sqlx::Row;

/// The answer to `POST /v1/claims`: the claim and its QR code (SVG) for the
/// installer page.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedClaim {
    #[serde(flatten)]
    pub claim: ClaimResponse,
    pub qr_svg: String,
}

/// A new claim for `serial`, by `user`.
pub async fn create_claim(db: &Db, user: &str, serial: &str, ttl_s: u64, now: i64) -> Result<IssuedClaim> {
    check_serial(serial)?;
    let code = ClaimCode::generate().map_err(|_| RegistrarError::Internal("no randomness".into()))?;
    let expires_at = now + ttl_s.min(fleetd_core::provision::enroll::MAX_CLAIM_TTL_S) as i64;
    let mut tx = db.begin().await?;
    let state: String = sqlx::query("SELECT state FROM devices WHERE serial = $1")
        .bind(serial)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| RegistrarError::SerialUnknown(serial.to_string()))?
        .try_get(0)?;
    if state != "active" {
        return Err(RegistrarError::DeviceRetired(serial.to_string()));
    }
    sqlx::query(
        "INSERT INTO claims (digest, serial, user_name, expires_at, used_at) VALUES ($1, $2, $3, $4, NULL)",
    )
    .bind(code.digest_hex())
    .bind(serial)
    .bind(user)
    .bind(expires_at)
    .execute(&mut *tx)
    .await?;
    audit::append(&mut tx, now, user, "claim", serial, &format!("expires_at={expires_at}")).await?;
    tx.commit().await?;
    let display = code.display_code();
    Ok(IssuedClaim {
        qr_svg: qr_svg(&display),
        claim: ClaimResponse { claim: display, expires_at: expires_at as u64 },
    })
}

/// Forgets expired tokens and claims that expired a day ago (the periodic
/// timer's work, kept out of the requests' transactions).
pub async fn forget_expired(db: &Db, now: i64) -> Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("DELETE FROM tokens WHERE expires_at <= $1").bind(now).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM claims WHERE expires_at <= $1").bind(now - 86400).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// The code as a QR code, SVG.
pub fn qr_svg(code: &str) -> String {
    match qrcode::QrCode::new(code.as_bytes()) {
        Ok(qr) => qr.render::<qrcode::render::svg::Color<'_>>().min_dimensions(200, 200).build(),
        Err(_) => String::new(),
    }
}
