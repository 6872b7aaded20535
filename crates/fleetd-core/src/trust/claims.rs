//! The claims of an update message and their structural rules (those that
//! need no device state).

use super::VerifyError;
use serde::{Deserialize, Serialize};

pub const CLAIMS_TYPE: &str = "fleetd.update.v1";
const MAX_NAME_CHARS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub typ: String,
    pub jti: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub project: String,
    pub target: Target,
    pub version: u64,
    pub name: String,
    pub image: Image,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Target {
    pub hardware: String,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub url: String,
    pub size: u64,
    pub sha256: String,
}

impl Claims {
    /// Parses claims JSON; unknown claims are ignored so later versions can add fields.
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        super::envelope::parse_bounded(bytes, "claims")
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks the rules that depend only on the claims themselves.
    pub fn check_structure(&self) -> Result<(), VerifyError> {
        if self.typ != CLAIMS_TYPE {
            return Err(VerifyError::WrongType(self.typ.clone()));
        }
        if !valid_jti(&self.jti) {
            return Err(VerifyError::Malformed("jti must be 8-128 characters of [A-Za-z0-9_-]".into()));
        }
        if self.name.chars().count() > MAX_NAME_CHARS {
            return Err(VerifyError::Malformed(format!("name is longer than {MAX_NAME_CHARS} characters")));
        }
        if !valid_sha256(&self.image.sha256) {
            return Err(VerifyError::Malformed("image.sha256 must be 64 lowercase hex digits".into()));
        }
        if self.image.size == 0 {
            return Err(VerifyError::Malformed("image.size must be positive".into()));
        }
        Ok(())
    }
}

pub fn valid_jti(jti: &str) -> bool {
    (8..=128).contains(&jti.len()) && jti.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks an image URL's scheme: `https://` always, `http://` only when
/// allowed. The authority must be present and the URL free of whitespace.
pub fn check_url(url: &str, allow_http: bool) -> Result<(), VerifyError> {
    let reject = |why: &str| Err(VerifyError::UrlSchemeRejected(format!("{url:?}: {why}")));
    let Some((scheme, rest)) = url.split_once("://") else {
        return reject("not an absolute URL");
    };
    match scheme {
        "https" => {}
        "http" if allow_http => {}
        "http" => return reject("plain http is not allowed by the policy (trust.allow_http)"),
        _ => return reject("only https is accepted"),
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return reject("the URL must not carry credentials");
    }
    // host[:port] or [v6]:port. An empty host (`https://:443/x`) would pass
    // here and fail only at the download, after the jti is spent.
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((v6, "")) => (v6, None),
            Some((v6, rest)) => (v6, Some(rest.strip_prefix(':').unwrap_or(rest))),
            None => return reject("the IPv6 address has no closing bracket"),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return reject("the URL needs a host");
    }
    if let Some(port) = port {
        if !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().map_or(true, |p| p == 0) {
            return reject("the port must be a number from 1 to 65535");
        }
    }
    if url.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b >= 0x80) {
        return reject("the URL contains whitespace, control or non-ASCII characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_rules() {
        assert!(check_url("https://h/x.img", false).is_ok());
        assert!(check_url("http://h/x.img", true).is_ok());
        for (url, allow) in [
            ("http://h/x", false),
            ("file:///etc/passwd", true),
            ("ftp://h/x", true),
            ("HTTPS://h/x", true),
            ("https:///x", true),
            ("https://user:pw@h/x", true),
            ("https://h/a b", true),
            ("/x.img", true),
        ] {
            let err = check_url(url, allow).unwrap_err();
            assert_eq!(err.name(), "url-scheme-rejected", "{url}");
        }
    }

    #[test]
    fn jti_and_hash_rules() {
        assert!(valid_jti("01JD3Z6W8V1T3M5Q9R2K4H7N0C"));
        assert!(!valid_jti("short"));
        assert!(!valid_jti(&"a".repeat(129)));
        assert!(!valid_jti("has space in it"));
        assert!(valid_sha256(&"ab".repeat(32)));
        assert!(!valid_sha256(&"AB".repeat(32)));
        assert!(!valid_sha256(&"ab".repeat(31)));
    }
}
