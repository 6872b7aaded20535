//! Each API request proves the PoP without sending it: an HMAC-SHA256, under
//! the key derived from the PoP (`Pop::request_key`), over the method, the
//! path, a nonce the device issued, and the SHA-256 of the body:
//!
//! ```text
//! Authorization: FLEETD-POP nonce=<nonce>, mac=<base64url(HMAC(key, METHOD \n PATH \n NONCE \n hex(sha256(body))))>
//! ```
//!
//! A nonce is good for one request and a short time, so a captured request
//! cannot be replayed, and the MAC binds the body, so it cannot be altered.
//! Verification runs in constant time (`ring::hmac::verify`). Pure: the
//! nonce store takes the time and the random bytes from its caller.

use ring::hmac;
use std::collections::BTreeMap;

pub const SCHEME: &str = "FLEETD-POP";

crate::error_name::named_error! {
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum AuthError {
        #[name = "pop-required"]
        #[error("{name}: no {SCHEME} authorization")]
        Missing,
        #[name = "pop-malformed"]
        #[error("{name}: {0}")]
        Malformed(String),
        #[name = "pop-nonce"]
        #[error("{name}: the nonce is unknown, used or expired; ask /api/v1/info for a new one")]
        Nonce,
        #[name = "pop-wrong"]
        #[error("{name}: the proof of possession does not match")]
        Wrong,
    }
}

/// The bytes the MAC covers.
pub fn signed_bytes(method: &str, path: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    format!("{method}\n{path}\n{nonce}\n{}", crate::trust::hex(digest.as_ref())).into_bytes()
}

/// The header value a client sends.
pub fn authorization(key: &hmac::Key, method: &str, path: &str, nonce: &str, body: &[u8]) -> String {
    let tag = hmac::sign(key, &signed_bytes(method, path, nonce, body));
    format!("{SCHEME} nonce={nonce}, mac={}", crate::trust::b64url_encode(tag.as_ref()))
}

/// Reads `FLEETD-POP nonce=…, mac=…` into (nonce, mac bytes).
pub fn parse_authorization(header: Option<&str>) -> Result<(String, Vec<u8>), AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let rest = header.strip_prefix(SCHEME).and_then(|r| r.strip_prefix(' ')).ok_or(AuthError::Missing)?;
    let (mut nonce, mut mac) = (None, None);
    for part in rest.split(',') {
        match part.trim().split_once('=') {
            Some(("nonce", v)) if nonce.is_none() => nonce = Some(v.to_string()),
            Some(("mac", v)) if mac.is_none() => mac = Some(v.to_string()),
            _ => return Err(AuthError::Malformed(format!("unexpected {part:?}"))),
        }
    }
    let nonce = nonce.ok_or_else(|| AuthError::Malformed("no nonce".into()))?;
    let mac = mac.ok_or_else(|| AuthError::Malformed("no mac".into()))?;
    let mac = crate::trust::b64url_decode(&mac)
        .ok_or_else(|| AuthError::Malformed("mac is not base64url".into()))?;
    Ok((nonce, mac))
}

/// Nonces that cost the device nothing to issue: each carries the time it
/// was issued and a MAC under a key that lives only in this process, so a
/// nonce is checked without being stored, and a flood of `/api/v1/info`
/// evicts nobody's. Only nonces that authenticated a request are kept
/// (until they expire), to refuse replays; an attacker cannot add to that
/// set without the PoP. (A nonce spent on a wrong MAC is not kept: anyone
/// can have fresh nonces, so a retry with the same one gains nothing, and
/// the guard counts each wrong proof.)
pub struct Nonces {
    key: hmac::Key,
    ttl_ms: u64,
    /// Authenticated requests kept at once, at most: beyond that (only the
    /// PoP's holder can get there) a nonce is refused until one expires.
    capacity: usize,
    spent: BTreeMap<String, u64>,
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nonces").field("ttl_ms", &self.ttl_ms).field("spent", &self.spent.len()).finish()
    }
}

const NONCE_TIME_BYTES: usize = 8;
const NONCE_RANDOM_BYTES: usize = 8;
const NONCE_BODY_BYTES: usize = NONCE_TIME_BYTES + NONCE_RANDOM_BYTES;
const NONCE_LABEL: &[u8] = b"fleetd-portal-nonce\n";

impl Nonces {
    /// `secret`: fresh random bytes for each portal (never stored).
    pub fn new(secret: [u8; 32], ttl_ms: u64, capacity: usize) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, &secret), ttl_ms, capacity, spent: BTreeMap::new() }
    }

    fn tag(&self, body: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(NONCE_LABEL);
        ctx.update(body);
        ctx.sign()
    }

    /// A new nonce: the time, 8 random bytes, and their MAC.
    pub fn issue(&self, random: [u8; 16], now_ms: u64) -> String {
        let mut bytes = Vec::with_capacity(NONCE_BODY_BYTES + 32);
        bytes.extend_from_slice(&now_ms.to_be_bytes());
        bytes.extend_from_slice(&random[..NONCE_RANDOM_BYTES]);
        let tag = self.tag(&bytes);
        bytes.extend_from_slice(tag.as_ref());
        crate::trust::b64url_encode(&bytes)
    }

    /// Issued here, not expired, not spent.
    fn usable(&self, nonce: &str, now_ms: u64) -> bool {
        let Some(bytes) = crate::trust::b64url_decode(nonce) else { return false };
        if bytes.len() <= NONCE_BODY_BYTES {
            return false;
        }
        let (body, tag) = bytes.split_at(NONCE_BODY_BYTES);
        let mut ctx_input = Vec::with_capacity(NONCE_LABEL.len() + body.len());
        ctx_input.extend_from_slice(NONCE_LABEL);
        ctx_input.extend_from_slice(body);
        if hmac::verify(&self.key, &ctx_input, tag).is_err() {
            return false;
        }
        let mut time = [0u8; NONCE_TIME_BYTES];
        time.copy_from_slice(&body[..NONCE_TIME_BYTES]);
        let issued = u64::from_be_bytes(time);
        issued <= now_ms && now_ms - issued < self.ttl_ms && !self.spent.contains_key(nonce)
    }

    /// Keeps an authenticating nonce until it expires.
    fn spend(&mut self, nonce: &str, now_ms: u64) -> bool {
        let ttl = self.ttl_ms;
        self.spent.retain(|_, at| now_ms.saturating_sub(*at) < ttl);
        if self.spent.len() >= self.capacity {
            return false;
        }
        self.spent.insert(nonce.to_string(), now_ms);
        true
    }
}

/// The header a device signs its answers to authenticated requests with,
/// so a client knows the answer (a CSR, "provisioned") came from the
/// device that holds the PoP, not from something posing as its portal.
pub const RESPONSE_HEADER: &str = "X-Fleetd-Response-Mac";

fn response_bytes(nonce: &str, status: u16, body: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    format!("response\n{nonce}\n{status}\n{}", crate::trust::hex(digest.as_ref())).into_bytes()
}

/// The MAC over an answer to the request that used `nonce`.
pub fn response_mac(key: &hmac::Key, nonce: &str, status: u16, body: &[u8]) -> String {
    crate::trust::b64url_encode(hmac::sign(key, &response_bytes(nonce, status, body)).as_ref())
}

/// Checks an answer's MAC (constant time).
pub fn verify_response(
    key: &hmac::Key,
    nonce: &str,
    status: u16,
    body: &[u8],
    header: Option<&str>,
) -> Result<(), AuthError> {
    let mac = header.ok_or_else(|| AuthError::Malformed(format!("no {RESPONSE_HEADER}")))?;
    let mac = crate::trust::b64url_decode(mac.trim())
        .ok_or_else(|| AuthError::Malformed(format!("{RESPONSE_HEADER} is not base64url")))?;
    hmac::verify(key, &response_bytes(nonce, status, body), &mac).map_err(|_| AuthError::Wrong)
}

/// Checks a request; on success, the nonce it used (for the answer's MAC),
/// now spent.
pub fn verify(
    key: &hmac::Key,
    nonces: &mut Nonces,
    header: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<String, AuthError> {
    let (nonce, mac) = parse_authorization(header)?;
    if !nonces.usable(&nonce, now_ms) {
        return Err(AuthError::Nonce);
    }
    hmac::verify(key, &signed_bytes(method, path, &nonce, body), &mac).map_err(|_| AuthError::Wrong)?;
    if !nonces.spend(&nonce, now_ms) {
        return Err(AuthError::Nonce);
    }
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::pop::{Pop, POP_BYTES};

    fn key(seed: u8) -> hmac::Key {
        Pop::from_bytes([seed; POP_BYTES]).request_key("gw-0042")
    }

    #[test]
    fn an_answer_is_bound_to_its_request_status_and_body() {
        let mac = response_mac(&key(7), "n1", 200, b"{\"csr_pem\":\"x\"}");
        assert_eq!(verify_response(&key(7), "n1", 200, b"{\"csr_pem\":\"x\"}", Some(&mac)), Ok(()));
        assert_eq!(
            verify_response(&key(8), "n1", 200, b"{\"csr_pem\":\"x\"}", Some(&mac)),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            verify_response(&key(7), "n2", 200, b"{\"csr_pem\":\"x\"}", Some(&mac)),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            verify_response(&key(7), "n1", 400, b"{\"csr_pem\":\"x\"}", Some(&mac)),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            verify_response(&key(7), "n1", 200, b"{\"csr_pem\":\"y\"}", Some(&mac)),
            Err(AuthError::Wrong)
        );
        assert!(verify_response(&key(7), "n1", 200, b"", None).is_err());
    }

    fn nonces() -> Nonces {
        Nonces::new([3; 32], 60_000, 8)
    }

    #[test]
    fn a_request_signed_with_the_pop_passes_once() {
        let mut nonces = nonces();
        let nonce = nonces.issue([1; 16], 0);
        let header = authorization(&key(7), "POST", "/api/v1/provision", &nonce, b"{}");
        assert_eq!(
            verify(&key(7), &mut nonces, Some(&header), "POST", "/api/v1/provision", b"{}", 10),
            Ok(nonce.clone())
        );
        // The same request again: the nonce is spent.
        assert_eq!(
            verify(&key(7), &mut nonces, Some(&header), "POST", "/api/v1/provision", b"{}", 20),
            Err(AuthError::Nonce)
        );
    }

    #[test]
    fn wrong_pop_altered_body_or_path_and_stale_nonces_are_refused() {
        let mut nonces = nonces();
        let check = |nonces: &mut Nonces, signer: u8, body: &[u8], path: &str, at: u64| {
            let nonce = nonces.issue([signer; 16], 0);
            let header = authorization(&key(signer), "POST", "/api/v1/provision", &nonce, b"{}");
            verify(&key(7), nonces, Some(&header), "POST", path, body, at).map(|_| ())
        };
        assert_eq!(check(&mut nonces, 8, b"{}", "/api/v1/provision", 1), Err(AuthError::Wrong));
        assert_eq!(check(&mut nonces, 7, b"{\"x\":1}", "/api/v1/provision", 1), Err(AuthError::Wrong));
        assert_eq!(check(&mut nonces, 7, b"{}", "/api/v1/csr", 1), Err(AuthError::Wrong));
        assert_eq!(check(&mut nonces, 7, b"{}", "/api/v1/provision", 60_000), Err(AuthError::Nonce));
        assert_eq!(check(&mut nonces, 7, b"{}", "/api/v1/provision", 59_999), Ok(()));
    }

    #[test]
    fn headers_are_parsed_strictly() {
        let mut nonces = nonces();
        for bad in [
            None,
            Some("Bearer x"),
            Some("FLEETD-POP"),
            Some("FLEETD-POP nonce=a"),
            Some("FLEETD-POP nonce=a, mac=!!"),
        ] {
            let err = verify(&key(7), &mut nonces, bad, "GET", "/", b"", 0).unwrap_err();
            assert!(matches!(err, AuthError::Missing | AuthError::Malformed(_)), "{bad:?}: {err}");
        }
        let twice = "FLEETD-POP nonce=a, nonce=b, mac=AAAA";
        assert!(matches!(parse_authorization(Some(twice)), Err(AuthError::Malformed(_))));
    }

    /// The issue's flood: unauthenticated requests for nonces take nothing
    /// from anyone, and only authenticated requests are remembered.
    #[test]
    fn a_flood_of_nonces_evicts_nobody_and_spent_nonces_stay_bounded() {
        let mut nonces = nonces();
        let installer = nonces.issue([1; 16], 0);
        for i in 0..100_000u64 {
            let _ = nonces.issue([(i % 251) as u8; 16], i / 100);
        }
        let header = authorization(&key(7), "GET", "/api/v1/csr", &installer, b"");
        assert_eq!(
            verify(&key(7), &mut nonces, Some(&header), "GET", "/api/v1/csr", b"", 1_000),
            Ok(installer)
        );
        assert_eq!(nonces.spent.len(), 1);
        // Wrong MACs are not kept.
        for i in 0..100u8 {
            let n = nonces.issue([i; 16], 1_000);
            let header = authorization(&key(8), "GET", "/api/v1/csr", &n, b"");
            assert_eq!(
                verify(&key(7), &mut nonces, Some(&header), "GET", "/api/v1/csr", b"", 1_000),
                Err(AuthError::Wrong)
            );
        }
        assert_eq!(nonces.spent.len(), 1);
        // Past the capacity (8 good requests within the TTL) a nonce waits.
        for i in 0..7u8 {
            let n = nonces.issue([i; 16], 2_000);
            let header = authorization(&key(7), "GET", "/", &n, b"");
            assert!(verify(&key(7), &mut nonces, Some(&header), "GET", "/", b"", 2_000).is_ok());
        }
        let n = nonces.issue([9; 16], 2_000);
        let header = authorization(&key(7), "GET", "/", &n, b"");
        assert_eq!(
            verify(&key(7), &mut nonces, Some(&header), "GET", "/", b"", 2_000),
            Err(AuthError::Nonce)
        );
        assert_eq!(
            verify(&key(7), &mut nonces, Some(&header), "GET", "/", b"", 61_000),
            Ok(n),
            "expired ones go"
        );
        assert!(nonces.spent.len() <= 8);
    }

    #[test]
    fn nonces_from_elsewhere_or_the_future_are_refused() {
        let mut nonces = nonces();
        let other = Nonces::new([4; 32], 60_000, 8).issue([1; 16], 0);
        let future = nonces.issue([1; 16], 5_000);
        for (nonce, why) in [
            (other.as_str(), "another portal's (or a restarted one's)"),
            (future.as_str(), "issued after now"),
            ("AAAAAAAAAAAAAAAAAAAAAA", "made up"),
            ("", "empty"),
        ] {
            let header = format!("{SCHEME} nonce={nonce}, mac=AAAA");
            assert_eq!(
                verify(&key(7), &mut nonces, Some(&header), "GET", "/", b"", 1_000),
                Err(AuthError::Nonce),
                "{why}"
            );
        }
        assert_eq!(AuthError::Nonce.name(), "pop-nonce");
        assert!(AuthError::Wrong.to_string().starts_with(AuthError::Wrong.name()));
    }
}
