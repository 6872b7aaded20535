//! The CRL: every revoked or superseded certificate, signed by the issuing
//! CA, numbered from the database. Regenerated at start, after every change
//! and daily; written atomically to `crl_file`, then `on_crl_change` runs.
//!
//! The issuing CA certificate must carry key usage keyCertSign and cRLSign,
//! or OpenSSL (mosquitto's `crlfile`) refuses the CRL.

use crate::ca::{unhex, Issuer};
use crate::db::Db;
use crate::error::{RegistrarError, Result};
use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use sqlx::Row;
use std::path::Path;
use std::time::Duration;

/// A CRL promises the next one within this.
pub const NEXT_UPDATE_S: i64 = 7 * 86400;
/// How long `on_crl_change` may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// One revoked certificate, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub serial_hex: String,
    pub revoked_at: i64,
    pub reason: String,
}

fn reason_code(reason: &str) -> RevocationReason {
    match reason {
        "superseded" => RevocationReason::Superseded,
        "keyCompromise" => RevocationReason::KeyCompromise,
        "cessationOfOperation" => RevocationReason::CessationOfOperation,
        _ => RevocationReason::Unspecified,
    }
}

fn time(t: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(t).map_err(|e| RegistrarError::Internal(format!("time: {e}")))
}

/// How far ahead of the clock a CRL's thisUpdate may be pushed by changes
/// in quick succession before it is published anyway.
const MAX_CRL_AHEAD_S: i64 = 5;

/// The CRL, PEM. Pure.
pub fn build(issuer: &Issuer, number: i64, revoked: &[Revoked], now: i64) -> Result<String> {
    let revoked_certs = revoked
        .iter()
        .map(|r| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(
                    &unhex(&r.serial_hex)
                        .ok_or_else(|| RegistrarError::Internal(format!("serial {}", r.serial_hex)))?,
                ),
                revocation_time: time(r.revoked_at)?,
                reason_code: Some(reason_code(&r.reason)),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = CertificateRevocationListParams {
        this_update: time(now)?,
        next_update: time(now + NEXT_UPDATE_S)?,
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&issuer.inner)
        .map_err(|e| RegistrarError::CaInvalid(format!("signing the CRL: {e}")))?;
    crl.pem().map_err(|e| RegistrarError::Internal(format!("CRL PEM: {e}")))
}

/// Takes the next CRL number, its thisUpdate and the revoked certificates
/// in one transaction. thisUpdate is `now`, or one second after the last
/// CRL's when that is not earlier (two changes in one second): a broker
/// that reloads its CRL file keeps the old CRLs and trusts the latest.
pub async fn next_number_and_revoked(db: &Db, now: i64) -> Result<(i64, i64, Vec<Revoked>)> {
    let mut tx = db.begin().await?;
    let row = sqlx::query(
        "UPDATE crl_state SET number = number + 1, \
         this_update = CASE WHEN this_update >= $1 THEN this_update + 1 ELSE $1 END \
         WHERE id = 1 RETURNING number, this_update",
    )
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let (number, this_update): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    let rows = sqlx::query(
        "SELECT serial_hex, revoked_at, reason FROM certificates WHERE state <> 'active' ORDER BY serial_hex",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let revoked = rows
        .iter()
        .map(|r| {
            Ok(Revoked {
                serial_hex: r.try_get(0)?,
                revoked_at: r.try_get::<Option<i64>, _>(1)?.unwrap_or(0),
                reason: r.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok((number, this_update, revoked))
}

/// A new CRL from the database, written to `crl_file`, then `on_change`
/// run (its failure is logged, not fatal). Returns the PEM.
pub async fn regenerate(
    db: &Db,
    issuer: &Issuer,
    crl_file: &Path,
    on_change: Option<&str>,
    now: i64,
) -> Result<String> {
    let (number, this_update, revoked) = next_number_and_revoked(db, now).await?;
    // Never publish a CRL dated in the future (OpenSSL refuses it, and with
    // it every client): wait out the second or two it may be ahead.
    let ahead = this_update.saturating_sub(now).clamp(0, MAX_CRL_AHEAD_S);
    if ahead > 0 {
        tokio::time::sleep(std::time::Duration::from_secs(ahead as u64)).await;
    }
    let pem = build(issuer, number, &revoked, this_update)?;
    write_atomic(crl_file, pem.as_bytes())
        .map_err(|source| RegistrarError::File { path: crl_file.to_path_buf(), source })?;
    if let Some(command) = on_change.filter(|c| !c.trim().is_empty()) {
        run_hook(command).await;
    }
    Ok(pem)
}

async fn run_hook(command: &str) {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(HOOK_TIMEOUT, child).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => eprintln!("registrar: on_crl_change {command:?}: {status}"),
        Ok(Err(e)) => eprintln!("registrar: on_crl_change {command:?}: {e}"),
        Err(_) => {
            eprintln!("registrar: on_crl_change {command:?}: killed after {} s", HOOK_TIMEOUT.as_secs())
        }
    }
}

/// Temp file, fsync, rename, fsync the directory: the file is the old CRL
/// or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
