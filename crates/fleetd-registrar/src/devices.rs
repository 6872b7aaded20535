//! A device's record for admins, and revoking or retiring a device.

use crate::audit;
use crate::db::Db;
use crate::enroll::{lock_device, split_groups};
use crate::error::{RegistrarError, Result};
use crate::names::check_serial;
use serde::Serialize;
use sqlx::Row;

/// `GET /v1/devices/{serial}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceView {
    pub serial: String,
    pub project: String,
    pub hardware: String,
    pub groups: Vec<String>,
    pub state: String,
    pub certificates: Vec<CertificateView>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertificateView {
    pub serial: String,
    pub state: String,
    pub not_before: i64,
    pub not_after: i64,
    pub revoked_at: Option<i64>,
    pub reason: Option<String>,
}

pub async fn view(db: &Db, serial: &str) -> Result<DeviceView> {
    check_serial(serial)?;
    let row = sqlx::query("SELECT project, hardware, groups_list, state FROM devices WHERE serial = $1")
        .bind(serial)
        .fetch_optional(&db.pool)
        .await?
        .ok_or_else(|| RegistrarError::SerialUnknown(serial.to_string()))?;
    let certs = sqlx::query(
        "SELECT serial_hex, state, not_before, not_after, revoked_at, reason FROM certificates \
         WHERE device = $1 ORDER BY created_at, serial_hex",
    )
    .bind(serial)
    .fetch_all(&db.pool)
    .await?;
    let certificates = certs
        .iter()
        .map(|r| {
            Ok(CertificateView {
                serial: r.try_get(0)?,
                state: r.try_get(1)?,
                not_before: r.try_get(2)?,
                not_after: r.try_get(3)?,
                revoked_at: r.try_get(4)?,
                reason: r.try_get(5)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(DeviceView {
        serial: serial.to_string(),
        project: row.try_get(0)?,
        hardware: row.try_get(1)?,
        groups: split_groups(&row.try_get::<String, _>(2)?),
        state: row.try_get(3)?,
        certificates,
    })
}

/// Revokes every certificate of `serial` not revoked yet (`reason`:
/// keyCompromise or unspecified); `retire` also refuses the device from
/// then on (reason cessationOfOperation). The number revoked.
pub async fn revoke(db: &Db, actor: &str, serial: &str, retire: bool, reason: &str, now: i64) -> Result<u64> {
    check_serial(serial)?;
    let mut tx = db.begin().await?;
    lock_device(&mut tx, serial, now).await?;
    let reason = if retire { "cessationOfOperation" } else { reason };
    let revoked = sqlx::query(
        "UPDATE certificates SET state = 'revoked', revoked_at = $2, reason = $3 \
         WHERE device = $1 AND state <> 'revoked'",
    )
    .bind(serial)
    .bind(now)
    .bind(reason)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if retire {
        sqlx::query("UPDATE devices SET state = 'retired' WHERE serial = $1")
            .bind(serial)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE claims SET used_at = $2 WHERE serial = $1 AND used_at IS NULL")
            .bind(serial)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    let action = if retire { "retire" } else { "revoke" };
    audit::append(&mut tx, now, actor, action, serial, &format!("certificates={revoked} reason={reason}"))
        .await?;
    tx.commit().await?;
    Ok(revoked)
}
