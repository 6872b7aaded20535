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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("pop-required: no {SCHEME} authorization")]
    Missing,
    #[error("pop-malformed: {0}")]
    Malformed(String),
    #[error("pop-nonce: the nonce is unknown, used or expired; ask /api/v1/info for a new one")]
    Nonce,
    #[error("pop-wrong: the proof of possession does not match")]
    Wrong,
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

/// Nonces issued by the device: each accepted once, within `ttl_ms`.
#[derive(Debug, Clone)]
pub struct Nonces {
    ttl_ms: u64,
    capacity: usize,
    issued: BTreeMap<String, u64>,
}

impl Nonces {
    pub fn new(ttl_ms: u64, capacity: usize) -> Self {
        Self { ttl_ms, capacity, issued: BTreeMap::new() }
    }

    /// A new nonce from 16 random bytes; the oldest is dropped when full.
    pub fn issue(&mut self, random: [u8; 16], now_ms: u64) -> String {
        self.issued.retain(|_, at| now_ms.saturating_sub(*at) < self.ttl_ms);
        while self.issued.len() >= self.capacity {
            let oldest = self.issued.iter().min_by_key(|(_, at)| **at).map(|(n, _)| n.clone());
            match oldest {
                Some(n) => self.issued.remove(&n),
                None => break,
            };
        }
        let nonce = crate::trust::b64url_encode(&random);
        self.issued.insert(nonce.clone(), now_ms);
        nonce
    }

    fn take(&mut self, nonce: &str, now_ms: u64) -> bool {
        match self.issued.remove(nonce) {
            Some(at) => now_ms.saturating_sub(at) < self.ttl_ms,
            None => false,
        }
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

/// Checks a request; on success, the nonce it used (for the answer's MAC).
/// The nonce is spent whatever the outcome, so a wrong MAC cannot be
/// retried with the same nonce.
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
    if !nonces.take(&nonce, now_ms) {
        return Err(AuthError::Nonce);
    }
    hmac::verify(key, &signed_bytes(method, path, &nonce, body), &mac).map_err(|_| AuthError::Wrong)?;
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

    #[test]
    fn a_request_signed_with_the_pop_passes_once() {
        let mut nonces = Nonces::new(60_000, 8);
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
        let mut nonces = Nonces::new(60_000, 8);
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
        let mut nonces = Nonces::new(60_000, 8);
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

    #[test]
    fn the_nonce_store_stays_bounded() {
        let mut nonces = Nonces::new(60_000, 4);
        let first = nonces.issue([0; 16], 0);
        for i in 1..10u8 {
            nonces.issue([i; 16], u64::from(i));
        }
        assert!(nonces.issued.len() <= 4);
        assert!(!nonces.take(&first, 20), "the oldest was dropped");
    }
}
