//! The audit trail: one row per login (ok or failed), claim, enrollment,
//! renewal, revocation, retirement, import and user added. Each row's hash
//! covers the previous row's hash and its own fields, so a changed or
//! deleted row breaks the chain. Appends update the one-row `audit_head` in
//! the same transaction: its row lock serializes them across instances
//! sharing PostgreSQL (SQLite's `BEGIN IMMEDIATE` already does).

use crate::db::{Db, Tx};
use crate::error::Result;
use sqlx::Row;

/// One row of the trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// SHA-256 hex over the previous hash, a newline, and the row's fields as a
/// JSON array (one canonical encoding: no field can bleed into another).
pub fn chain_hash(
    prev_hash: &str,
    id: i64,
    at: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> String {
    let fields = serde_json::json!([id, at, actor, action, subject, detail]).to_string();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev_hash.as_bytes());
    ctx.update(b"\n");
    ctx.update(fields.as_bytes());
    crate::ca::hex(ctx.finish().as_ref())
}

impl Entry {
    fn expected_hash(&self) -> String {
        chain_hash(&self.prev_hash, self.id, self.at, &self.actor, &self.action, &self.subject, &self.detail)
    }
}

/// The first row that breaks the chain (changed, deleted, reordered), or
/// `None` when every row holds. `head` is `audit_head`'s (last id, last hash):
/// it catches rows deleted from the end.
pub fn verify_chain(entries: &[Entry], head: (i64, &str)) -> Option<i64> {
    let mut prev_hash = "";
    for (i, entry) in entries.iter().enumerate() {
        let id = i as i64 + 1;
        if entry.id != id {
            return Some(id);
        }
        if entry.prev_hash != prev_hash || entry.hash != entry.expected_hash() {
            return Some(entry.id);
        }
        prev_hash = &entry.hash;
    }
    let last = entries.len() as i64;
    if head.0 != last || head.1 != prev_hash {
        return Some(last + 1);
    }
    None
}

/// Appends a row inside the caller's write transaction.
pub async fn append(
    tx: &mut Tx,
    at: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<i64> {
    let row =
        sqlx::query("UPDATE audit_head SET last_id = last_id + 1 WHERE id = 1 RETURNING last_id, last_hash")
            .fetch_one(&mut **tx)
            .await?;
    let id: i64 = row.try_get(0)?;
    let prev_hash: String = row.try_get(1)?;
    let hash = chain_hash(&prev_hash, id, at, actor, action, subject, detail);
    sqlx::query(
        "INSERT INTO audit (id, at, actor, action, subject, detail, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(at)
    .bind(actor)
    .bind(action)
    .bind(subject)
    .bind(detail)
    .bind(&prev_hash)
    .bind(&hash)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE audit_head SET last_hash = $1 WHERE id = 1").bind(&hash).execute(&mut **tx).await?;
    Ok(id)
}

/// Appends a row in a transaction of its own (failed logins).
pub async fn append_alone(
    db: &Db,
    at: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<i64> {
    let mut tx = db.begin().await?;
    let id = append(&mut tx, at, actor, action, subject, detail).await?;
    tx.commit().await?;
    Ok(id)
}

/// The whole trail, oldest first.
pub async fn list(db: &Db) -> Result<Vec<Entry>> {
    let rows =
        sqlx::query("SELECT id, at, actor, action, subject, detail, prev_hash, hash FROM audit ORDER BY id")
            .fetch_all(&db.pool)
            .await?;
    rows.iter()
        .map(|r| {
            Ok(Entry {
                id: r.try_get(0)?,
                at: r.try_get(1)?,
                actor: r.try_get(2)?,
                action: r.try_get(3)?,
                subject: r.try_get(4)?,
                detail: r.try_get(5)?,
                prev_hash: r.try_get(6)?,
                hash: r.try_get(7)?,
            })
        })
        .collect()
}

/// Verifies the stored trail: the first bad row's id, or `None`.
pub async fn verify(db: &Db) -> Result<Option<i64>> {
    let entries = list(db).await?;
    let head =
        sqlx::query("SELECT last_id, last_hash FROM audit_head WHERE id = 1").fetch_one(&db.pool).await?;
    let (last_id, last_hash): (i64, String) = (head.try_get(0)?, head.try_get(1)?);
    Ok(verify_chain(&entries, (last_id, &last_hash)))
}

/// One line of `fleetctl registrar audit`:
/// `ID AT ACTOR ACTION SUBJECT DETAIL` (AT in UTC, DETAIL last, as a JSON
/// string).
pub fn format_line(entry: &Entry) -> String {
    format!(
        "{} {} {} {} {} {}",
        entry.id,
        utc(entry.at),
        entry.actor,
        entry.action,
        entry.subject,
        serde_json::Value::String(entry.detail.clone())
    )
}

/// `2026-12-07T06:59:38Z`, or the seconds when out of range.
fn utc(at: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(at) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => at.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_796_626_778), "2026-12-07T06:59:38Z");
        assert_eq!(utc(i64::MAX), i64::MAX.to_string());
    }

    fn chain(n: i64) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut prev = String::new();
        for id in 1..=n {
            let (actor, action, subject, detail) = ("alice", "claim", format!("gw-{id}"), format!("d{id}"));
            let hash = chain_hash(&prev, id, 1000 + id, actor, action, &subject, &detail);
            entries.push(Entry {
                id,
                at: 1000 + id,
                actor: actor.into(),
                action: action.into(),
                subject,
                detail,
                prev_hash: prev.clone(),
                hash: hash.clone(),
            });
            prev = hash;
        }
        entries
    }

    #[test]
    fn tampering_by_table() {
        let good = chain(5);
        let head = |e: &[Entry]| (e.len() as i64, e.last().map(|e| e.hash.clone()).unwrap_or_default());
        let (n, h) = head(&good);
        assert_eq!(verify_chain(&good, (n, &h)), None);
        assert_eq!(verify_chain(&[], (0, "")), None);
        type Tamper = fn(&mut Vec<Entry>);
        let cases: [(&str, Tamper, i64); 7] = [
            ("changed detail", |e| e[2].detail = "other".into(), 3),
            ("changed actor", |e| e[0].actor = "mallory".into(), 1),
            ("changed time", |e| e[4].at += 1, 5),
            ("deleted middle row", |e| drop(e.remove(1)), 2),
            ("deleted last row", |e| drop(e.pop()), 5),
            (
                "rehashed row",
                |e| {
                    e[1].detail = "x".into();
                    e[1].hash = e[1].expected_hash();
                },
                3,
            ),
            ("swapped rows", |e| e.swap(0, 1), 1),
        ];
        for (why, tamper, first_bad) in cases {
            let mut entries = good.clone();
            tamper(&mut entries);
            assert_eq!(verify_chain(&entries, (n, &h)), Some(first_bad), "{why}");
        }
        // Fields cannot bleed into each other.
        assert_ne!(chain_hash("", 1, 1, "a b", "c", "", ""), chain_hash("", 1, 1, "a", "b c", "", ""));
    }
}
