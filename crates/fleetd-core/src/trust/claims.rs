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
    /// Features the message needs (`update-message-v1.md`, later claims).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Waves: when each device of a group may start (`update::rollout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// `rollout`: cumulative percentages in increasing order ending at 100,
/// their times in increasing order, and the spread within a wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub waves: Vec<Wave>,
    #[serde(default)]
    pub spread_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// Cumulative: the share of the fleet started by the end of this wave.
    pub percent: u8,
    pub not_before: u64,
}

/// At most this many waves, and a spread of at most 30 days.
pub const MAX_WAVES: usize = 32;
pub const MAX_SPREAD_S: u64 = 30 * 86_400;

impl Rollout {
    pub fn check(&self) -> Result<(), String> {
        if self.waves.is_empty() || self.waves.len() > MAX_WAVES {
            return Err(format!("rollout.waves must hold 1 to {MAX_WAVES} waves"));
        }
        for pair in self.waves.windows(2) {
            if pair[1].percent <= pair[0].percent {
                return Err("rollout.waves: percentages must increase".into());
            }
            if pair[1].not_before < pair[0].not_before {
                return Err("rollout.waves: times must not go back".into());
            }
        }
        if self.waves.first().is_some_and(|w| w.percent == 0)
            || self.waves.last().map(|w| w.percent) != Some(100)
        {
            return Err("rollout.waves: percentages must be above 0 and end at 100".into());
        }
        if self.spread_s > MAX_SPREAD_S {
            return Err(format!("rollout.spread_s is above {MAX_SPREAD_S}"));
        }
        Ok(())
    }
}

/// The features this build implements: a message that requires another is
/// refused before any download (`requires-unsupported`).
pub const SUPPORTED_FEATURES: &[&str] = &["zstd", "adaptive", "rollout"];

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
    /// Of the raw image, whatever the encoding: the slot is checked against it.
    pub size: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Encoding::is_raw")]
    pub encoding: Encoding,
    /// The block index of a zstd image, for adaptive installs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexRef>,
}

/// How the bytes at `image.url` encode the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Raw,
    /// zstd's seekable format: independent frames plus a seek table.
    Zstd,
}

impl Encoding {
    pub fn is_raw(&self) -> bool {
        *self == Self::Raw
    }
}

/// `image.index`: where the block index is, and what it hashes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRef {
    pub url: String,
    pub size: u64,
    pub sha256: String,
}

/// Largest index accepted: an image of 64 GiB in 4 KiB frames.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

impl Claims {
    /// Parses claims JSON; unknown claims are ignored so later versions can add fields.
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        super::envelope::parse_bounded(bytes, "claims")
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The times every signed message carries.
    pub fn window(&self) -> super::Window {
        super::Window { iat: self.iat, nbf: self.nbf, exp: self.exp }
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
        if let Some(rollout) = &self.rollout {
            rollout.check().map_err(VerifyError::Malformed)?;
        }
        if let Some(index) = &self.image.index {
            if self.image.encoding != Encoding::Zstd {
                return Err(VerifyError::Malformed("image.index needs image.encoding \"zstd\"".into()));
            }
            if !valid_sha256(&index.sha256) {
                return Err(VerifyError::Malformed(
                    "image.index.sha256 must be 64 lowercase hex digits".into(),
                ));
            }
            if index.size == 0 || index.size > MAX_INDEX_BYTES {
                return Err(VerifyError::Malformed(format!(
                    "image.index.size must be from 1 to {MAX_INDEX_BYTES}"
                )));
            }
        }
        Ok(())
    }

    /// The features these claims use, as `fleetctl sign` lists them.
    pub fn features_used(&self) -> Vec<String> {
        let mut used = Vec::new();
        if self.image.encoding == Encoding::Zstd {
            used.push("zstd".to_string());
        }
        if self.image.index.is_some() {
            used.push("adaptive".to_string());
        }
        if self.rollout.is_some() {
            used.push("rollout".to_string());
        }
        used
    }

    /// Adds the features used to `requires`, keeping any already listed.
    pub fn fill_requires(&mut self) {
        for feature in self.features_used() {
            if !self.requires.contains(&feature) {
                self.requires.push(feature);
            }
        }
    }

    /// The first required feature this build does not implement.
    pub fn unsupported_requirement(&self) -> Option<&str> {
        self.requires.iter().map(String::as_str).find(|f| !SUPPORTED_FEATURES.contains(f))
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
    fn requires_is_filled_from_the_claims_used() {
        let mut claims: Claims = serde_json::from_value(serde_json::json!({
            "typ": CLAIMS_TYPE, "jti": "jti-00000001", "iat": 1, "nbf": 1, "exp": 2, "project": "p",
            "target": {"hardware": "h"}, "version": 2, "name": "n",
            "image": {"url": "https://h/x.zst", "size": 1, "sha256": "ab".repeat(32), "encoding": "zstd",
                      "index": {"url": "https://h/x.index", "size": 88, "sha256": "cd".repeat(32)}},
            "requires": ["zstd"],
        }))
        .unwrap();
        claims.fill_requires();
        assert_eq!(claims.requires, ["zstd", "adaptive"]);
        assert_eq!(claims.unsupported_requirement(), None);
        claims.requires.push("teleport".into());
        assert_eq!(claims.unsupported_requirement(), Some("teleport"));
        assert!(claims.check_structure().is_ok());
        claims.image.encoding = Encoding::Raw;
        assert_eq!(claims.check_structure().unwrap_err().name(), "malformed", "an index needs zstd");
        let raw: Claims = serde_json::from_slice(&claims.to_json()).unwrap();
        assert!(!String::from_utf8(claims.to_json()).unwrap().contains("encoding"), "raw is the default");
        assert_eq!(raw.image.encoding, Encoding::Raw);
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
