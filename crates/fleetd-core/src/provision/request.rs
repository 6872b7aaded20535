//! `POST /api/v1/provision`: the request body and the checks that need no
//! IO, each refusal a named reason (400 with `{error, detail}`). Nothing is
//! stored unless every check passes; the certificate checks (parse, key
//! match, validity, chain) come with the identity store.
//!
//! Two ways to get an identity, exactly one per request: `identity` (a
//! certificate made elsewhere, with `mqtt` for the broker) or `enroll`
//! (the device enrolls itself with the registrar after joining the Wi-Fi;
//! the registrar's answer names the broker, so `mqtt` may be absent).

use super::enroll::ClaimCode;
use serde::Deserialize;

/// A checked request: the Wi-Fi to join, and how the device gets its
/// identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionRequest {
    pub wifi: Option<Wifi>,
    pub how: How,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// A certificate (and maybe its key) made elsewhere, for `mqtt`.
    Identity { mqtt: Broker, identity: Identity },
    /// Enrollment with a registrar once the Wi-Fi is joined.
    Enroll(Enroll),
}

/// The body as sent, before the one-of rule and the defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    wifi: Option<Wifi>,
    #[serde(default)]
    mqtt: Option<Broker>,
    #[serde(default)]
    identity: Option<Identity>,
    #[serde(default)]
    enroll: Option<EnrollBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollBody {
    #[serde(default)]
    url: Option<String>,
    claim: String,
    #[serde(default)]
    ca_pem: Option<String>,
}

/// Where the device enrolls, and with which claim. `Debug` hides the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enroll {
    pub registrar: Registrar,
    pub claim: ClaimCode,
}

/// A registrar: its base URL (`https://…`, or `http://` on a loopback
/// address; no trailing `/`) and the CA its TLS certificate chains to
/// (`None` only for plain http on loopback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registrar {
    pub url: String,
    pub ca_pem: Option<String>,
}

impl Registrar {
    /// Checks a registrar named by a request or by the image's config.
    pub fn new(url: &str, ca_pem: Option<String>) -> Result<Self, RequestError> {
        let https = check_registrar_url(url)?;
        let ca_pem = if https {
            let ca = ca_pem.ok_or(RequestError::RegistrarCaMissing)?;
            if !pem_certificates(&ca) {
                return Err(RequestError::Pem("enroll.ca_pem"));
            }
            Some(ca)
        } else {
            None
        };
        Ok(Self { url: url.trim_end_matches('/').to_string(), ca_pem })
    }

    /// `{url}/v1/{call}`.
    pub fn endpoint(&self, call: &str) -> String {
        format!("{}/v1/{call}", self.url)
    }
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
        #[name = "identity-conflict"]
        #[error("{name}: a request carries either identity or enroll, not both")]
        IdentityConflict,
        #[name = "identity-missing"]
        #[error("{name}: a request carries identity (with mqtt) or enroll")]
        IdentityMissing,
        #[name = "mqtt-missing"]
        #[error("{name}: identity needs mqtt (the broker it is for)")]
        MqttMissing,
        #[name = "enroll-url-invalid"]
        #[error("{name}: {0}")]
        EnrollUrl(String),
        #[name = "enroll-url-invalid"]
        #[error("{name}: enroll.url is required (this device's image names no registrar)")]
        EnrollUrlMissing,
        #[name = "pem-invalid"]
        #[error("{name}: enroll.ca_pem is required for an https registrar (the only CA trusted for it)")]
        RegistrarCaMissing,
        /// The code itself is never quoted: it is a secret.
        #[name = "claim-malformed"]
        #[error("{name}: a claim code is 16 characters of 0-9 and A-Z (no I, L, O, U), dashes optional")]
        Claim,
    }
}

/// Whether `url` may name a registrar: `https://HOST[:PORT][/PATH]`, or
/// `http://` when HOST is a loopback address. `Ok(true)` for https.
pub fn check_registrar_url(url: &str) -> Result<bool, RequestError> {
    let bad = |why: &str| Err(RequestError::EnrollUrl(format!("{url:?}: {why}")));
    let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return bad("the registrar is called over https (http only on a loopback address)");
    };
    if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("not a URL");
    }
    if rest.contains(['?', '#', '@']) {
        return bad("no query, fragment or user information");
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => match port.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return bad("not a URL"),
            },
            None => return bad("not a URL"),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if let Some(port) = port {
        if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
            return bad("the port is 1-65535");
        }
    }
    let ip = host.parse::<std::net::IpAddr>().ok();
    if authority.starts_with('[') && !matches!(ip, Some(std::net::IpAddr::V6(_))) {
        return bad("not an IPv6 address in brackets");
    }
    if ip.is_none() && !valid_host(host) {
        return bad("the host is not a DNS name or an address");
    }
    if !https && !ip.is_some_and(|ip| ip.is_loopback()) {
        return bad("plain http only to a loopback address; use https");
    }
    Ok(https)
}

/// Bodies larger than this are refused before parsing.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

impl ProvisionRequest {
    /// Parses and checks a request body, for a device whose image names no
    /// registrar.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        Self::parse_for(body, None)
    }

    /// Parses and checks a request body; `registrar` is the image's own
    /// (`[provision] registrar`), which an `enroll` without `url` uses.
    pub fn parse_for(body: &[u8], registrar: Option<&Registrar>) -> Result<Self, RequestError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(RequestError::Malformed(format!("more than {MAX_BODY_BYTES} bytes")));
        }
        // The answer goes back to the sender alone (never to a log).
        let body: Body = serde_json::from_slice(body).map_err(|e| RequestError::Malformed(e.to_string()))?;
        check_wifi(body.wifi.as_ref())?;
        if let Some(mqtt) = &body.mqtt {
            check_broker(mqtt)?;
        }
        let how = match (body.identity, body.enroll) {
            (Some(_), Some(_)) => return Err(RequestError::IdentityConflict),
            (None, None) => return Err(RequestError::IdentityMissing),
            (Some(identity), None) => {
                let mqtt = body.mqtt.ok_or(RequestError::MqttMissing)?;
                check_identity(&identity)?;
                How::Identity { mqtt, identity }
            }
            // An `mqtt` beside `enroll` is checked but not used: the
            // registrar's answer names the broker.
            (None, Some(enroll)) => How::Enroll(check_enroll(enroll, registrar)?),
        };
        Ok(Self { wifi: body.wifi, how })
    }
}

fn check_enroll(enroll: EnrollBody, image: Option<&Registrar>) -> Result<Enroll, RequestError> {
    let claim = ClaimCode::parse(&enroll.claim).map_err(|_| RequestError::Claim)?;
    let registrar = match (enroll.url, image) {
        (Some(url), _) => Registrar::new(&url, enroll.ca_pem)?,
        // The image's registrar: its CA too, whatever the request says.
        (None, Some(image)) => image.clone(),
        (None, None) => return Err(RequestError::EnrollUrlMissing),
    };
    Ok(Enroll { registrar, claim })
}

fn check_wifi(wifi: Option<&Wifi>) -> Result<(), RequestError> {
    if let Some(wifi) = wifi {
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
    Ok(())
}

fn check_broker(mqtt: &Broker) -> Result<(), RequestError> {
    if !valid_host(&mqtt.host) {
        return Err(RequestError::BrokerHost(mqtt.host.clone()));
    }
    if mqtt.port == 0 {
        return Err(RequestError::BrokerPort);
    }
    if !looks_like_pem(&mqtt.ca_pem, "CERTIFICATE") {
        return Err(RequestError::Pem("mqtt.ca_pem"));
    }
    Ok(())
}

fn check_identity(identity: &Identity) -> Result<(), RequestError> {
    if !looks_like_pem(&identity.cert_pem, "CERTIFICATE") {
        return Err(RequestError::Pem("identity.cert_pem"));
    }
    if let Some(key) = &identity.key_pem {
        if !looks_like_pem(key, "PRIVATE KEY") {
            return Err(RequestError::Pem("identity.key_pem"));
        }
    }
    Ok(())
}

/// Whether `text` holds one or more PEM certificates, each of which parses.
pub fn pem_certificates(text: &str) -> bool {
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> =
        rustls::pki_types::CertificateDer::pem_slice_iter(text.as_bytes()).collect();
    matches!(certs, Ok(certs) if !certs.is_empty()
        && certs.iter().all(|c| webpki::EndEntityCert::try_from(c).is_ok()))
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
        let How::Identity { mqtt, .. } = &r.how else { panic!("{r:?}") };
        assert_eq!(mqtt.port, 8883);
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

    fn real_ca() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.self_signed(&key).unwrap().pem()
    }

    const CLAIM: &str = "7k2m-9q4r-xw3t-h8vn";

    /// The enroll rules, by name: exactly one of identity and enroll, mqtt
    /// with identity, https (or http to loopback), a typed claim, and a CA
    /// that parses for https; the image's registrar fills url and CA in.
    #[test]
    fn enroll_or_identity_and_the_registrar_url_rules() {
        let ca = real_ca();
        let mqtt = serde_json::json!({"host": "broker", "ca_pem": CERT});
        let identity = serde_json::json!({"cert_pem": CERT});
        let enroll = |url: Option<&str>, claim: &str, ca: Option<&str>| {
            let mut e = serde_json::json!({"claim": claim});
            if let Some(url) = url {
                e["url"] = url.into();
            }
            if let Some(ca) = ca {
                e["ca_pem"] = ca.into();
            }
            e
        };
        let https = |claim: &str| enroll(Some("https://registrar.example.com"), claim, Some(&ca));
        let image = Registrar::new("https://fleet.example.com/reg/", Some(ca.clone())).unwrap();
        let null = serde_json::Value::Null;
        let table: Vec<(serde_json::Value, serde_json::Value, serde_json::Value, Option<&Registrar>, &str)> = vec![
            (mqtt.clone(), identity.clone(), null.clone(), None, "ok"),
            (null.clone(), identity.clone(), null.clone(), None, "mqtt-missing"),
            (mqtt.clone(), identity.clone(), https(CLAIM), None, "identity-conflict"),
            (mqtt.clone(), null.clone(), null.clone(), None, "identity-missing"),
            (null.clone(), null.clone(), https(CLAIM), None, "ok"),
            (mqtt.clone(), null.clone(), https(CLAIM), None, "ok"),
            (null.clone(), null.clone(), https("7K2M9Q4RXW3TH8VN"), None, "ok"),
            (null.clone(), null.clone(), https("7K2M-9Q4R-XW3T"), None, "claim-malformed"),
            (null.clone(), null.clone(), https("7K2M-9Q4R-XW3T-H8VU"), None, "claim-malformed"),
            (null.clone(), null.clone(), enroll(Some("https://r.example"), CLAIM, None), None, "pem-invalid"),
            (
                null.clone(),
                null.clone(),
                enroll(Some("https://r.example"), CLAIM, Some(CERT)),
                None,
                "pem-invalid",
            ),
            (
                null.clone(),
                null.clone(),
                enroll(Some("http://r.example"), CLAIM, Some(&ca)),
                None,
                "enroll-url-invalid",
            ),
            (
                null.clone(),
                null.clone(),
                enroll(Some("http://10.0.0.1:80"), CLAIM, None),
                None,
                "enroll-url-invalid",
            ),
            (null.clone(), null.clone(), enroll(Some("http://127.0.0.1:8443"), CLAIM, None), None, "ok"),
            (null.clone(), null.clone(), enroll(Some("http://[::1]:8443/"), CLAIM, None), None, "ok"),
            (
                null.clone(),
                null.clone(),
                enroll(Some("http://localhost:8443"), CLAIM, None),
                None,
                "enroll-url-invalid",
            ),
            (
                null.clone(),
                null.clone(),
                enroll(Some("ftp://r.example"), CLAIM, Some(&ca)),
                None,
                "enroll-url-invalid",
            ),
            (
                null.clone(),
                null.clone(),
                enroll(Some("https://u:p@r.example"), CLAIM, Some(&ca)),
                None,
                "enroll-url-invalid",
            ),
            (
                null.clone(),
                null.clone(),
                enroll(Some("https://r.example:0"), CLAIM, Some(&ca)),
                None,
                "enroll-url-invalid",
            ),
            (
                null.clone(),
                null.clone(),
                enroll(Some("https://r.example/?x=1"), CLAIM, Some(&ca)),
                None,
                "enroll-url-invalid",
            ),
            (
                null.clone(),
                null.clone(),
                enroll(Some("https://bad_host"), CLAIM, Some(&ca)),
                None,
                "enroll-url-invalid",
            ),
            (null.clone(), null.clone(), enroll(None, CLAIM, None), None, "enroll-url-invalid"),
            (null.clone(), null.clone(), enroll(None, CLAIM, None), Some(&image), "ok"),
        ];
        for (mqtt, identity, enroll, image, expected) in table {
            let mut body = serde_json::json!({});
            for (key, value) in [("mqtt", &mqtt), ("identity", &identity), ("enroll", &enroll)] {
                if !value.is_null() {
                    body[key] = value.clone();
                }
            }
            let got = ProvisionRequest::parse_for(body.to_string().as_bytes(), image)
                .map(|_| "ok")
                .unwrap_or_else(|e| e.name());
            assert_eq!(got, expected, "{body}");
        }
        // The image's registrar fills url and CA; the claim never shows.
        let body = serde_json::json!({"enroll": {"claim": CLAIM}}).to_string();
        let r = ProvisionRequest::parse_for(body.as_bytes(), Some(&image)).unwrap();
        let How::Enroll(e) = &r.how else { panic!("{r:?}") };
        assert_eq!(e.registrar.endpoint("enroll"), "https://fleet.example.com/reg/v1/enroll");
        assert_eq!(e.registrar.ca_pem.as_deref(), Some(ca.as_str()));
        assert_eq!(e.claim.display_code(), CLAIM.to_uppercase());
        assert!(!format!("{r:?}").contains("7K2M"), "{r:?}");
        let bad = serde_json::json!({"enroll": {"claim": "zz-secret-zz"}}).to_string();
        let e = ProvisionRequest::parse_for(bad.as_bytes(), Some(&image)).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
