//! Rollouts kept for `fleetctl rollout`: the message each one published,
//! its halt when there is one, and the last state every device reported
//! for it. In the registrar's database when the fleet has one, else in a
//! SQLite file of its own; a restarted `watch` reads it back.

use crate::db::Db;
use crate::error::Result;
use sqlx::Row;

/// A started rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub jti: String,
    pub project: String,
    pub group: String,
    pub version: u64,
    /// The co-signed message as published.
    pub message: String,
    pub started_at: i64,
    pub halt: Option<Halt>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Halt {
    /// The co-signed halt message as published.
    pub message: String,
    pub at: i64,
    pub reason: String,
}

/// A device's last reported state for one rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub device: String,
    pub wave: u32,
    pub state: String,
    pub bytes_fetched: u64,
    pub updated_at: i64,
}

/// Records a rollout; starting the same jti again keeps the first record
/// (`start` is safe to retry). Returns the stored rollout.
pub async fn start(db: &Db, rollout: &Rollout) -> Result<Rollout> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO rollouts (jti, project, group_name, version, message, started_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (jti) DO NOTHING",
    )
    .bind(&rollout.jti)
    .bind(&rollout.project)
    .bind(&rollout.group)
    .bind(rollout.version as i64)
    .bind(&rollout.message)
    .bind(rollout.started_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(find(db, &rollout.jti).await?.unwrap_or_else(|| rollout.clone()))
}

pub async fn find(db: &Db, jti: &str) -> Result<Option<Rollout>> {
    let row = sqlx::query(
        "SELECT jti, project, group_name, version, message, started_at, halt_message, halted_at, halt_reason \
         FROM rollouts WHERE jti = $1",
    )
    .bind(jti)
    .fetch_optional(&db.pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let halt = match (row.try_get::<Option<String>, _>(6)?, row.try_get::<Option<i64>, _>(7)?) {
        (Some(message), Some(at)) => {
            Some(Halt { message, at, reason: row.try_get::<Option<String>, _>(8)?.unwrap_or_default() })
        }
        _ => None,
    };
    Ok(Some(Rollout {
        jti: row.try_get(0)?,
        project: row.try_get(1)?,
        group: row.try_get(2)?,
        version: row.try_get::<i64, _>(3)?.max(0) as u64,
        message: row.try_get(4)?,
        started_at: row.try_get(5)?,
        halt,
    }))
}

/// Records the halt, unless one is recorded already: the first halt
/// stands, and is what every later `halt` publishes again. Returns it.
pub async fn record_halt(db: &Db, jti: &str, halt: &Halt) -> Result<Halt> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "UPDATE rollouts SET halt_message = $2, halted_at = $3, halt_reason = $4 \
         WHERE jti = $1 AND halt_message IS NULL",
    )
    .bind(jti)
    .bind(&halt.message)
    .bind(halt.at)
    .bind(&halt.reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(find(db, jti).await?.and_then(|r| r.halt).unwrap_or_else(|| halt.clone()))
}

/// Stores devices' states in one transaction.
pub async fn record_devices(db: &Db, jti: &str, rows: &[DeviceRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut tx = db.begin().await?;
    for row in rows {
        sqlx::query(
            "INSERT INTO rollout_devices (jti, device, wave, state, bytes_fetched, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (jti, device) DO UPDATE SET \
             wave = excluded.wave, state = excluded.state, bytes_fetched = excluded.bytes_fetched, \
             updated_at = excluded.updated_at",
        )
        .bind(jti)
        .bind(&row.device)
        .bind(row.wave as i64)
        .bind(&row.state)
        .bind(row.bytes_fetched.min(i64::MAX as u64) as i64)
        .bind(row.updated_at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn devices(db: &Db, jti: &str) -> Result<Vec<DeviceRow>> {
    let rows = sqlx::query(
        "SELECT device, wave, state, bytes_fetched, updated_at FROM rollout_devices WHERE jti = $1 ORDER BY device",
    )
    .bind(jti)
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DeviceRow {
                device: r.try_get(0)?,
                wave: r.try_get::<i64, _>(1)?.clamp(0, u32::MAX as i64) as u32,
                state: r.try_get(2)?,
                bytes_fetched: r.try_get::<i64, _>(3)?.max(0) as u64,
                updated_at: r.try_get(4)?,
            })
        })
        .collect()
}
