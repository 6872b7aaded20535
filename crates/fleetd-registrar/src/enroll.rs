//! Enrollment (by a claim) and renewal (by the device's current key). Each
//! is ONE transaction whose first write locks the device's row, so two
//! enrollments of one device run one after the other: the second sees the
//! first's certificate and supersedes it. At most one certificate per
//! device is active (also a partial unique index).

use crate::audit;
use crate::ca::{self, Issued, Issuer};
use crate::db::{Db, Tx};
use crate::error::{RegistrarError, Result};
use crate::names::check_serial;
use fleetd_core::provision::enroll::{verify_renewal, ClaimCode, EnrollmentKey};
use sqlx::Row;

/// What an enrollment or renewal produced; the caller adds the broker
/// settings for the answer.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub serial: String,
    pub issued: Issued,
    pub groups: Vec<String>,
    /// Certificates superseded by this one (the CRL must be regenerated).
    pub superseded: u64,
}

/// `POST /v1/enroll`.
pub async fn enroll(
    db: &Db,
    issuer: &Issuer,
    validity: ca::Validity,
    claim: &str,
    csr_pem: &str,
    mac: Option<&str>,
    now: i64,
) -> Result<Enrolled> {
    let code = ClaimCode::parse(claim).map_err(|_| RegistrarError::ClaimInvalid("not a claim code"))?;
    let csr = ca::parse_csr(csr_pem)?;
    let mut tx = db.begin().await?;
    let row = sqlx::query("SELECT serial, expires_at, used_at FROM claims WHERE digest = $1")
        .bind(code.digest_hex())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(RegistrarError::ClaimInvalid("unknown claim"))?;
    let serial: String = row.try_get(0)?;
    let expires_at: i64 = row.try_get(1)?;
    let used_at: Option<i64> = row.try_get(2)?;
    if used_at.is_some() {
        return Err(RegistrarError::ClaimInvalid("the claim was used"));
    }
    if expires_at <= now {
        return Err(RegistrarError::ClaimInvalid("the claim has expired"));
    }
    if csr.cn != serial {
        return Err(RegistrarError::ClaimInvalid("the CSR's CN is not the claim's serial"));
    }
    let (state, pop_key, groups) = lock_device(&mut tx, &serial, now).await?;
    // Used once: a concurrent enrollment with this claim waited for this
    // row and now finds it used.
    let marked = sqlx::query("UPDATE claims SET used_at = $2 WHERE digest = $1 AND used_at IS NULL")
        .bind(code.digest_hex())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if marked != 1 {
        return Err(RegistrarError::ClaimInvalid("the claim was used"));
    }
    if state != "active" {
        return Err(RegistrarError::DeviceRetired(serial));
    }
    if let Some(pop_key) = pop_key.filter(|k| !k.is_empty()) {
        let key =
            EnrollmentKey::parse(&pop_key).map_err(|e| RegistrarError::Internal(format!("{serial}: {e}")))?;
        if !mac.is_some_and(|mac| key.verify_mac(&code, csr_pem, mac)) {
            return Err(RegistrarError::ClaimInvalid("the MAC does not bind this claim to this CSR"));
        }
    }
    let issued = ca::issue_for(&csr, &serial, issuer, validity, now)?;
    let superseded = supersede_and_insert(&mut tx, &serial, &issued, now).await?;
    audit::append(&mut tx, now, "device", "enroll", &serial, &format!("certificate={}", issued.serial_hex))
        .await?;
    tx.commit().await?;
    Ok(Enrolled { serial, issued, groups, superseded })
}

/// `POST /v1/renew`: a new CSR signed by the key of the device's ACTIVE
/// certificate.
pub async fn renew(
    db: &Db,
    issuer: &Issuer,
    validity: ca::Validity,
    csr_pem: &str,
    signature: &str,
    now: i64,
) -> Result<Enrolled> {
    let csr = ca::parse_csr(csr_pem)?;
    let serial =
        check_serial(&csr.cn).map_err(|_| RegistrarError::CsrInvalid("the CN is not a serial".into()))?;
    let mut tx = db.begin().await?;
    let (state, _, groups) = match lock_device(&mut tx, serial, now).await {
        Err(RegistrarError::SerialUnknown(_)) => return Err(RegistrarError::RenewalInvalid),
        other => other?,
    };
    if state != "active" {
        return Err(RegistrarError::RenewRetired(serial.to_string()));
    }
    let rows = sqlx::query("SELECT public_key, state, not_after FROM certificates WHERE device = $1")
        .bind(serial)
        .fetch_all(&mut *tx)
        .await?;
    let mut refusal = RegistrarError::RenewalInvalid;
    let mut ok = false;
    for row in &rows {
        let key: Vec<u8> = row.try_get(0)?;
        if !verify_renewal(&key, csr_pem, signature) {
            continue;
        }
        let cert_state: String = row.try_get(1)?;
        let not_after: i64 = row.try_get(2)?;
        if cert_state != "active" {
            refusal = RegistrarError::Revoked;
        } else if not_after <= now {
            refusal = RegistrarError::CertificateExpired;
        } else {
            ok = true;
        }
    }
    if !ok {
        return Err(refusal);
    }
    let issued = ca::issue_for(&csr, serial, issuer, validity, now)?;
    let superseded = supersede_and_insert(&mut tx, serial, &issued, now).await?;
    audit::append(&mut tx, now, "device", "renew", serial, &format!("certificate={}", issued.serial_hex))
        .await?;
    tx.commit().await?;
    Ok(Enrolled { serial: serial.to_string(), issued, groups, superseded })
}

/// The transaction's first write: locks the device's row (PostgreSQL waits
/// here for a concurrent enrollment of the same device). (state, pop_key, groups).
pub(crate) async fn lock_device(
    tx: &mut Tx,
    serial: &str,
    now: i64,
) -> Result<(String, Option<String>, Vec<String>)> {
    let row = sqlx::query(
        "UPDATE devices SET enrolled_at = $2 WHERE serial = $1 RETURNING state, pop_key, groups_list",
    )
    .bind(serial)
    .bind(now)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| RegistrarError::SerialUnknown(serial.to_string()))?;
    let groups: String = row.try_get(2)?;
    Ok((row.try_get(0)?, row.try_get(1)?, split_groups(&groups)))
}

pub(crate) fn split_groups(groups: &str) -> Vec<String> {
    groups.split(';').filter(|g| !g.is_empty()).map(str::to_string).collect()
}

/// Supersedes the device's active certificates and stores the new one.
async fn supersede_and_insert(tx: &mut Tx, serial: &str, issued: &Issued, now: i64) -> Result<u64> {
    let superseded = sqlx::query(
        "UPDATE certificates SET state = 'superseded', revoked_at = $2, reason = 'superseded' \
         WHERE device = $1 AND state = 'active'",
    )
    .bind(serial)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    sqlx::query(
        "INSERT INTO certificates (serial_hex, device, public_key, not_before, not_after, state, revoked_at, reason, pem, created_at) \
         VALUES ($1, $2, $3, $4, $5, 'active', NULL, NULL, $6, $7)",
    )
    .bind(&issued.serial_hex)
    .bind(serial)
    .bind(issued.public_key.clone())
    .bind(issued.not_before)
    .bind(issued.not_after)
    .bind(&issued.cert_pem)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(superseded)
}
