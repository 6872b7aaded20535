//! `POST /api/v1/provision`: the request body and the checks that need no
//! IO, each refusal a named reason (400 with `{error, detail}`). Nothing is
//! stored unless every check passes; the certificate checks (parse, key
//! match, validity, chain) come with the identity store.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    #[serde(default)]
    pub wifi: Option<Wifi>,
    pub mqtt: Broker,
    pub identity: Identity,
}

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wifi {
    pub ssid: String,
    pub psk: String,
}

/// The passphrase never reaches a log through `Debug`.
impl std::fmt::Debug for Wifi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wifi").field("ssid", &self.ssid).field("psk", &"<redacted>").finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub ca_pem: String,
}

fn default_port() -> u16 {
    8883
}

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub cert_pem: String,
    /// Absent: the certificate is for the key the device made (its CSR).
    #[serde(default)]
    pub key_pem: Option<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = self.key_pem.as_ref().map(|_| "<redacted>");
        f.debug_struct("Identity").field("cert_pem", &self.cert_pem.len()).field("key_pem", &key).finish()
    }
}

crate::error_name::named_error! {
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum RequestError {
        #[name = "malformed"]
        #[error("{name}: {0}")]
        Malformed(String),
        #[name = "ssid-invalid"]
        #[error("{name}: an SSID is 1 to 32 bytes")]
        Ssid,
        #[name = "psk-invalid"]
        #[error("{name}: a WPA2 passphrase is 8 to 63 printable ASCII characters (or 64 hex digits)")]
        Psk,
        #[name = "broker-invalid"]
        #[error("{name}: {0:?} is not a host name or an IP address")]
        BrokerHost(String),
        #[name = "broker-invalid"]
        #[error("{name}: port 0")]
        BrokerPort,
        #[name = "pem-invalid"]
        #[error("{name}: {0} is not PEM")]
        Pem(&'static str),
    }
}

/// Bodies larger than this are refused before parsing.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

impl ProvisionRequest {
    /// Parses and checks a request body.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(RequestError::Malformed(format!("more than {MAX_BODY_BYTES} bytes")));
        }
        let request: Self =
            serde_json::from_slice(body).map_err(|e| RequestError::Malformed(e.to_string()))?;
        request.check()?;
        Ok(request)
    }

    fn check(&self) -> Result<(), RequestError> {
        if let Some(wifi) = &self.wifi {
            if wifi.ssid.is_empty() || wifi.ssid.len() > 32 {
                return Err(RequestError::Ssid);
            }
            let printable =
                (8..=63).contains(&wifi.psk.len()) && wifi.psk.bytes().all(|b| (0x20..=0x7e).contains(&b));
            let raw_hex = wifi.psk.len() == 64 && wifi.psk.bytes().all(|b| b.is_ascii_hexdigit());
            if !(printable || raw_hex) {
                return Err(RequestError::Psk);
            }
        }
        if !valid_host(&self.mqtt.host) {
            return Err(RequestError::BrokerHost(self.mqtt.host.clone()));
        }
        if self.mqtt.port == 0 {
            return Err(RequestError::BrokerPort);
        }
        if !looks_like_pem(&self.mqtt.ca_pem, "CERTIFICATE") {
            return Err(RequestError::Pem("mqtt.ca_pem"));
        }
        if !looks_like_pem(&self.identity.cert_pem, "CERTIFICATE") {
            return Err(RequestError::Pem("identity.cert_pem"));
        }
        if let Some(key) = &self.identity.key_pem {
            if !looks_like_pem(key, "PRIVATE KEY") {
                return Err(RequestError::Pem("identity.key_pem"));
            }
        }
        Ok(())
    }
}

/// A DNS name (labels of letters, digits and hyphens, not at either end) or
/// an IPv4/IPv6 address.
pub fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    host.trim_end_matches('.').split('.').all(|label| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    })
}

fn looks_like_pem(text: &str, kind: &str) -> bool {
    let begin = format!("-----BEGIN {kind}-----");
    let begin_ec = "-----BEGIN EC PRIVATE KEY-----";
    (text.contains(&begin) || (kind == "PRIVATE KEY" && text.contains(begin_ec)))
        && text.contains("-----END ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n";

    fn body(wifi: serde_json::Value, host: &str, port: u16, key: Option<&str>) -> Vec<u8> {
        let mut v = serde_json::json!({
            "mqtt": {"host": host, "port": port, "ca_pem": CERT},
            "identity": {"cert_pem": CERT},
        });
        if !wifi.is_null() {
            v["wifi"] = wifi;
        }
        if let Some(key) = key {
            v["identity"]["key_pem"] = key.into();
        }
        v.to_string().into_bytes()
    }

    fn error(b: Vec<u8>) -> &'static str {
        ProvisionRequest::parse(&b).map(|_| "ok").unwrap_or_else(|e| e.name())
    }

    #[test]
    fn a_good_request_parses() {
        let r = ProvisionRequest::parse(&body(
            serde_json::json!({"ssid": "home", "psk": "correct horse"}),
            "broker.example.com",
            8883,
            Some(KEY),
        ))
        .unwrap();
        assert_eq!(r.mqtt.port, 8883);
        assert!(!format!("{r:?}").contains("correct horse"), "the PSK is never in Debug");
        assert!(!format!("{r:?}").contains("MIGH"), "nor the key");
        assert_eq!(error(body(serde_json::Value::Null, "10.0.0.1", 1883, None)), "ok", "Wi-Fi is optional");
    }

    #[test]
    fn each_refusal_has_its_name() {
        let wifi = |ssid: &str, psk: &str| serde_json::json!({"ssid": ssid, "psk": psk});
        assert_eq!(error(body(wifi("home", "short"), "h", 1, None)), "psk-invalid");
        assert_eq!(error(body(wifi("home", &"x".repeat(64)), "h", 1, None)), "psk-invalid");
        assert_eq!(error(body(wifi("home", &"a1".repeat(32)), "h", 1, None)), "ok", "64 hex digits");
        assert_eq!(error(body(wifi("home", "tab\there!"), "h", 1, None)), "psk-invalid");
        assert_eq!(error(body(wifi("", "correct horse"), "h", 1, None)), "ssid-invalid");
        assert_eq!(error(body(wifi(&"s".repeat(33), "correct horse"), "h", 1, None)), "ssid-invalid");
        for host in ["", "-bad.example", "bad..example", "under_score.example", "a b"] {
            assert_eq!(error(body(serde_json::Value::Null, host, 1, None)), "broker-invalid", "{host:?}");
        }
        assert_eq!(error(body(serde_json::Value::Null, "h", 0, None)), "broker-invalid");
        assert_eq!(error(body(serde_json::Value::Null, "h", 1, Some("garbage"))), "pem-invalid");
        assert_eq!(error(b"{not json".to_vec()), "malformed");
        assert_eq!(error(br#"{"mqtt":{},"identity":{},"extra":1}"#.to_vec()), "malformed");
        assert_eq!(error(vec![b' '; MAX_BODY_BYTES + 1]), "malformed");
    }
}
