//! Installers and admins: Argon2id password hashes, logins with a lock-out
//! stored in the database (every instance sees it), and bearer tokens
//! stored by their SHA-256.

use crate::audit;
use crate::db::Db;
use crate::error::{RegistrarError, Result};
use crate::names::{check_user, Role};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fleetd_core::provision::enroll::LoginResponse;
use sqlx::Row;

/// Consecutive failures that lock a user out, and for how long.
pub const MAX_FAILED_LOGINS: i64 = 5;
pub const LOCKOUT_S: i64 = 15 * 60;
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longer passwords are refused before hashing (Argon2 of megabytes costs).
pub const MAX_PASSWORD_LEN: usize = 1024;

/// After a failed login that made `failed` consecutive failures: the lock's
/// end, when this failure locks the user (the count then starts again).
pub fn lockout_after(failed: i64, now: i64) -> Option<i64> {
    (failed >= MAX_FAILED_LOGINS).then_some(now + LOCKOUT_S)
}

fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| RegistrarError::Internal(format!("argon2: {e}")))
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A hash no password matches, verified for unknown users so that the time
/// of an answer does not tell whether the user exists.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("fleetd registrar dummy password").unwrap_or_default())
}

/// Adds a user (`user-exists` if the name is taken).
pub async fn add_user(db: &Db, name: &str, role: Role, password: &str, now: i64) -> Result<()> {
    check_user(name)?;
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(RegistrarError::PasswordTooShort);
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(RegistrarError::Malformed(format!("a password is at most {MAX_PASSWORD_LEN} bytes")));
    }
    let password = password.to_string();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| RegistrarError::Internal(e.to_string()))??;
    let mut tx = db.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (name, role, password_hash, failed_logins, locked_until, created_at) \
         VALUES ($1, $2, $3, 0, 0, $4) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(&hash)
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(RegistrarError::UserExists(name.to_string()));
    }
    audit::append(&mut tx, now, "cli", "user-add", name, role.as_str()).await?;
    tx.commit().await?;
    Ok(())
}

/// A login: a token, or `login-failed` (same answer for an unknown user and
/// a wrong password), `locked-out` after [`MAX_FAILED_LOGINS`] failures.
pub async fn login(
    db: &Db,
    user: &str,
    password: &str,
    token_ttl_s: u64,
    now: i64,
    source: &str,
) -> Result<LoginResponse> {
    if check_user(user).is_err() || password.len() > MAX_PASSWORD_LEN {
        return Err(RegistrarError::LoginFailed);
    }
    let row = sqlx::query("SELECT password_hash, locked_until FROM users WHERE name = $1")
        .bind(user)
        .fetch_optional(&db.pool)
        .await?;
    let (hash, locked_until) = match &row {
        Some(r) => (Some(r.try_get::<String, _>(0)?), r.try_get::<i64, _>(1)?),
        None => (None, 0),
    };
    if locked_until > now {
        audit::append_alone(db, now, user, "login-locked-out", user, source).await?;
        return Err(RegistrarError::LockedOut { until: locked_until });
    }
    let candidate = hash.clone().unwrap_or_else(|| dummy_hash().to_string());
    let given = password.to_string();
    let ok = tokio::task::spawn_blocking(move || verify_password(&candidate, &given))
        .await
        .map_err(|e| RegistrarError::Internal(e.to_string()))?
        && hash.is_some();
    let mut tx = db.begin().await?;
    if !ok {
        if hash.is_some() {
            // The first write locks the user's row: concurrent failures count one by one.
            let failed: i64 = sqlx::query(
                "UPDATE users SET failed_logins = failed_logins + 1 WHERE name = $1 RETURNING failed_logins",
            )
            .bind(user)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            if let Some(until) = lockout_after(failed, now) {
                sqlx::query("UPDATE users SET failed_logins = 0, locked_until = $2 WHERE name = $1")
                    .bind(user)
                    .bind(until)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        audit::append(&mut tx, now, user, "login-failed", user, source).await?;
        tx.commit().await?;
        return Err(RegistrarError::LoginFailed);
    }
    // A lock set by a concurrent failure while this password was checked wins.
    let locked: i64 =
        sqlx::query("UPDATE users SET failed_logins = 0 WHERE name = $1 RETURNING locked_until")
            .bind(user)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
    if locked > now {
        drop(tx);
        return Err(RegistrarError::LockedOut { until: locked });
    }
    let token = random_token()?;
    let expires_at = now.saturating_add(token_ttl_s as i64);
    sqlx::query("INSERT INTO tokens (hash, user_name, expires_at) VALUES ($1, $2, $3)")
        .bind(token_hash(&token))
        .bind(user)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
    audit::append(&mut tx, now, user, "login", user, source).await?;
    tx.commit().await?;
    Ok(LoginResponse { token, expires_at: expires_at as u64 })
}

/// Who holds `token`: (user, role), or `unauthorized`.
pub async fn authenticate(db: &Db, token: &str, now: i64) -> Result<(String, Role)> {
    if token.is_empty() || token.len() > 128 {
        return Err(RegistrarError::Unauthorized("no valid bearer token"));
    }
    let row = sqlx::query(
        "SELECT u.name, u.role FROM tokens t JOIN users u ON u.name = t.user_name \
         WHERE t.hash = $1 AND t.expires_at > $2",
    )
    .bind(token_hash(token))
    .bind(now)
    .fetch_optional(&db.pool)
    .await?
    .ok_or(RegistrarError::Unauthorized("no valid bearer token"))?;
    let role = Role::parse(&row.try_get::<String, _>(1)?)?;
    Ok((row.try_get(0)?, role))
}

fn random_token() -> Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| RegistrarError::Internal("no randomness".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// What is stored for a token.
pub fn token_hash(token: &str) -> String {
    crate::ca::hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockout_by_table() {
        let cases = [(1, None), (4, None), (5, Some(1000 + LOCKOUT_S)), (6, Some(1000 + LOCKOUT_S))];
        for (failed, expected) in cases {
            assert_eq!(lockout_after(failed, 1000), expected, "{failed}");
        }
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horsE"));
        assert!(!verify_password(dummy_hash(), "correct horse"));
        assert!(!verify_password("garbage", "x"));
    }
}
