//! The device's calls to its registrar (interfaces.md, "Registrar"):
//! `POST {url}/v1/enroll` and `POST {url}/v1/renew`, over hyper + rustls
//! trusting the registrar's CA alone (plain http only to a loopback
//! address, which `request::Registrar` enforces). The registrar is a peer
//! like any other: each call is bounded in time and its answer in size,
//! and what it says is never trusted as text (names are checked, details
//! cut and cleaned before they reach a log or the status).

use super::enroll::{EnrollRequest, EnrollResponse, ErrorBody, RenewRequest};
use super::identity::{self, CheckedIdentity, DeviceKey, IdentityError};
use super::request::Registrar;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::time::Duration;

/// One call, from connecting to the last byte of the answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// An answer holds a certificate, a chain and a CA: far less than this.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Enrollment tries this many times when the registrar cannot be reached
/// (or answers 5xx); a refusal is final.
pub const ENROLL_ATTEMPTS: u32 = 4;
/// The waits between enrollment attempts (full jitter).
pub const ENROLL_BACKOFF: crate::backoff::Backoff =
    crate::backoff::Backoff { base: Duration::from_secs(2), cap: Duration::from_secs(15) };

/// Why a call did not give an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No answer: DNS, TCP, TLS, a timeout. Worth another try.
    Unreachable(String),
    /// 5xx: the registrar is there but cannot answer now. Worth another try.
    Unavailable { status: u16 },
    /// 4xx: the registrar refused, by name (`claim-invalid`, `csr-invalid`,
    /// `device-retired`, `revoked`, …). Final.
    Refused { status: u16, name: String, detail: String },
    /// An answer that is not the protocol's (too large, not JSON, …).
    Invalid(String),
}

impl CallError {
    /// The stable name: the registrar's own for a refusal.
    pub fn name(&self) -> &str {
        match self {
            Self::Unreachable(_) => "registrar-unreachable",
            Self::Unavailable { .. } => "registrar-unavailable",
            Self::Refused { name, .. } => name,
            Self::Invalid(_) => "registrar-answer-invalid",
        }
    }

    /// Whether trying again later may help.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Unreachable(_) | Self::Unavailable { .. })
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(d) | Self::Invalid(d) => write!(f, "{}: {d}", self.name()),
            Self::Unavailable { status } => {
                write!(f, "{}: the registrar answered HTTP {status}", self.name())
            }
            Self::Refused { status, detail, .. } => {
                write!(f, "{}: the registrar refused (HTTP {status}): {detail}", self.name())
            }
        }
    }
}

impl std::error::Error for CallError {}

/// An enrollment or renewal that failed, by cause.
#[derive(Debug, thiserror::Error)]
pub enum EnrollFailure {
    #[error("{0}")]
    Call(CallError),
    /// The registrar's certificate fails the identity check.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Store(#[from] super::store::StoreError),
}

impl EnrollFailure {
    /// The registrar said no, for good (`revoked`, `device-retired`, …).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Call(CallError::Refused { .. }))
    }
}

impl From<CallError> for EnrollFailure {
    fn from(e: CallError) -> Self {
        Self::Call(e)
    }
}

/// `POST /v1/enroll`, retried (bounded) while the registrar cannot be
/// reached; a refusal or a bad answer ends it at once.
pub async fn enroll(
    registrar: &Registrar,
    body: &EnrollRequest,
    log: fn(&str),
) -> Result<EnrollResponse, CallError> {
    let mut attempt = 0;
    loop {
        match call(registrar, "enroll", body).await {
            Err(e) if e.retryable() && attempt + 1 < ENROLL_ATTEMPTS => {
                let wait = ENROLL_BACKOFF.delay(attempt);
                log(&format!("enrollment: {e}; trying again in {} ms", wait.as_millis()));
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// `POST /v1/renew`, once (the renewal task backs off itself).
pub async fn renew(registrar: &Registrar, body: &RenewRequest) -> Result<EnrollResponse, CallError> {
    call(registrar, "renew", body).await
}

/// The registrar's answer checked as an identity for `key`: the
/// certificate (with `chain_pem` as its intermediates) is for the key, its
/// CN is the device id, and it is valid now and chains to the issuing CA
/// (`chain_pem`) or the broker's CA (`mqtt.ca_pem`) for client
/// authentication. The stored certificate is the leaf with its chain.
pub fn check_answer(
    device_id: &str,
    answer: &EnrollResponse,
    key: &DeviceKey,
    now: u64,
) -> Result<CheckedIdentity, IdentityError> {
    let chain = format!("{}\n{}", answer.cert_pem.trim_end(), answer.chain_pem);
    let anchors = format!("{}\n{}", answer.mqtt.ca_pem.trim_end(), answer.chain_pem);
    identity::check(device_id, &chain, None, Some(key), &anchors, now)
}

async fn call<T: serde::Serialize>(
    registrar: &Registrar,
    what: &str,
    body: &T,
) -> Result<EnrollResponse, CallError> {
    let tls = tls_config(registrar)?;
    let client = crate::http::client::<Full<Bytes>>(tls);
    let json = serde_json::to_vec(body).map_err(|e| CallError::Invalid(e.to_string()))?;
    let request = hyper::Request::post(registrar.endpoint(what))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(json)))
        .map_err(|e| CallError::Invalid(format!("{}: {e}", registrar.url)))?;
    let exchange = async {
        let response = client.request(request).await.map_err(|e| CallError::Unreachable(describe(&e)))?;
        let status = response.status().as_u16();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => CallError::Invalid(format!("an answer over {MAX_ANSWER_BYTES} bytes")),
                None => CallError::Unreachable(format!("the answer was cut short: {e}")),
            })?
            .to_bytes();
        Ok::<_, CallError>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| CallError::Unreachable(format!("no answer within {} s", CALL_TIMEOUT.as_secs())))??;
    answer(status, &bytes)
}

/// What an answer means, by its status and body.
fn answer(status: u16, bytes: &[u8]) -> Result<EnrollResponse, CallError> {
    match status {
        200 => {
            let answer: EnrollResponse = serde_json::from_slice(bytes).map_err(|e| {
                CallError::Invalid(format!(
                    "not an enrollment answer ({:?} at column {})",
                    e.classify(),
                    e.column()
                ))
            })?;
            // The broker it names is checked as a portal request's would be.
            if !super::request::valid_host(&answer.mqtt.host) || answer.mqtt.port == 0 {
                return Err(CallError::Invalid("mqtt names no usable broker (host, port)".into()));
            }
            if !super::request::pem_certificates(&answer.mqtt.ca_pem) {
                return Err(CallError::Invalid("mqtt.ca_pem holds no certificate".into()));
            }
            Ok(answer)
        }
        500..=599 => Err(CallError::Unavailable { status }),
        400..=499 => {
            let body: Option<ErrorBody> = serde_json::from_slice(bytes).ok();
            let (name, detail) = match body {
                Some(b) if is_name(&b.error) => (b.error, clean(&b.detail)),
                _ => ("registrar-refused".to_string(), String::new()),
            };
            Err(CallError::Refused { status, name, detail })
        }
        other => Err(CallError::Invalid(format!("HTTP {other}"))),
    }
}

/// An error name as the protocol writes them: lowercase, digits, dashes.
fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A peer's detail, printable and short, before it reaches a log or status.
fn clean(detail: &str) -> String {
    detail.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// hyper's error and its causes, in one line.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn tls_config(registrar: &Registrar) -> Result<rustls::ClientConfig, CallError> {
    let tls_error = |e: &dyn std::fmt::Display| CallError::Unreachable(format!("tls-config: {e}"));
    let Some(ca_pem) = &registrar.ca_pem else {
        // Plain http to a loopback address: no certificate is ever checked.
        return crate::http::plain_tls_config().map_err(|e| tls_error(&e));
    };
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| tls_error(&e))?).map_err(|e| tls_error(&e))?;
    }
    if roots.is_empty() {
        return Err(tls_error(&"the registrar's CA holds no certificate"));
    }
    Ok(crate::http::ring_client_builder()
        .map_err(|e| tls_error(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The registry's groups from an answer; a name fleetd cannot use (topics,
/// the trust policy) is left out and logged.
pub fn groups(answer: &EnrollResponse, log: fn(&str)) -> Vec<String> {
    let (good, bad): (Vec<_>, Vec<_>) =
        answer.groups.iter().cloned().partition(|g| crate::device_id::is_identifier(g));
    if !bad.is_empty() {
        log(&format!(
            "enrollment: {} group name(s) from the registrar are not [A-Za-z0-9._-]{{1,64}}; left out",
            bad.len()
        ));
    }
    good
}

/// The image's registrar (`[provision] registrar`, `registrar_ca`), its CA
/// read now.
pub fn from_config(config: &crate::config::Config) -> Result<Option<Registrar>, String> {
    let Some(settings) = &config.provision else { return Ok(None) };
    let Some(url) = &settings.registrar else { return Ok(None) };
    let ca_pem = match &settings.registrar_ca {
        Some(path) => {
            let bytes =
                crate::fsutil::read_public_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(String::from_utf8(bytes).map_err(|_| format!("{}: not a PEM text file", path.display()))?)
        }
        None => None,
    };
    Registrar::new(url, ca_pem).map_err(|e| format!("provision.registrar: {e}")).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each answer by its status: a name the registrar gives is kept only
    /// when it looks like one; 5xx is worth another try, 4xx is final.
    #[test]
    fn answers_by_status() {
        let refused = answer(403, br#"{"error":"claim-invalid","detail":"used\u0007 already"}"#).unwrap_err();
        assert_eq!(refused.name(), "claim-invalid");
        assert!(!refused.retryable());
        assert_eq!(refused.to_string(), "claim-invalid: the registrar refused (HTTP 403): used already");
        let odd = answer(403, br#"{"error":"<script>","detail":"x"}"#).unwrap_err();
        assert_eq!(odd.name(), "registrar-refused");
        assert_eq!(answer(400, b"not json").unwrap_err().name(), "registrar-refused");
        let busy = answer(503, b"").unwrap_err();
        assert!(busy.retryable() && busy.name() == "registrar-unavailable");
        assert_eq!(answer(200, b"{}").unwrap_err().name(), "registrar-answer-invalid");
        assert_eq!(answer(302, b"").unwrap_err().name(), "registrar-answer-invalid");
        let (ca_pem, _) = ca("broker");
        let ok = |host: &str, port: u16| {
            serde_json::json!({"cert_pem": "C", "chain_pem": "CH",
                "mqtt": {"host": host, "port": port, "ca_pem": ca_pem}, "groups": ["eu"]})
            .to_string()
        };
        assert_eq!(answer(200, ok("broker.example", 8883).as_bytes()).unwrap().groups, ["eu"]);
        for (host, port) in [("bad host", 8883), ("b", 0)] {
            assert_eq!(
                answer(200, ok(host, port).as_bytes()).unwrap_err().name(),
                "registrar-answer-invalid"
            );
        }
        let no_ca = ok("b", 1).replace(&serde_json::to_string(&ca_pem).unwrap(), "\"CA\"");
        assert_eq!(answer(200, no_ca.as_bytes()).unwrap_err().name(), "registrar-answer-invalid");
    }

    fn ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        (pem, rcgen::Issuer::new(params, key))
    }

    /// The registrar's issuing CA comes in `chain_pem` and need not be the
    /// broker's server CA (`mqtt.ca_pem`): the certificate chains to it,
    /// is for the device's key, has its id as CN, and the stored
    /// certificate carries the chain. The validity read back is the
    /// certificate's (what renewal is scheduled from).
    #[test]
    fn an_answer_is_checked_against_the_issuing_ca_and_the_devices_key() {
        let (issuing_pem, issuing) = ca("registrar issuing CA");
        let (broker_ca, _) = ca("broker server CA");
        let key = DeviceKey::generate().unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&key.csr_pem("gw-7").unwrap()).unwrap();
        let mut csr = csr;
        csr.params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        csr.params.not_after = rcgen::date_time_ymd(2026, 1, 31);
        let cert = csr.signed_by(&issuing).unwrap().pem();
        let answer = EnrollResponse {
            cert_pem: cert.clone(),
            chain_pem: issuing_pem.clone(),
            mqtt: crate::provision::enroll::BrokerSettings {
                host: "b".into(),
                port: 8883,
                ca_pem: broker_ca.clone(),
            },
            groups: vec!["eu".into(), "no spaces".into()],
        };
        let now = 1_768_000_000; // 2026-01-09
        let checked = check_answer("gw-7", &answer, &key, now).unwrap();
        assert!(
            checked.cert_pem.starts_with(cert.trim_end())
                && checked.cert_pem.contains(issuing_pem.trim_end())
        );
        assert_eq!(checked.key_pem, key.pem());
        assert_eq!(identity::certificate_validity(&checked.cert_pem), Some((1_767_225_600, 1_769_817_600)));
        assert_eq!(groups(&answer, |_| {}), ["eu"]);

        let other = DeviceKey::generate().unwrap();
        assert_eq!(check_answer("gw-7", &answer, &other, now).unwrap_err().name(), "cert-key-mismatch");
        assert_eq!(check_answer("gw-8", &answer, &key, now).unwrap_err().name(), "cert-cn-mismatch");
        assert_eq!(check_answer("gw-7", &answer, &key, 1_770_000_000).unwrap_err().name(), "cert-expired");
        let (stranger, _) = ca("someone else");
        let untrusted = EnrollResponse { chain_pem: stranger, ..answer };
        assert_eq!(check_answer("gw-7", &untrusted, &key, now).unwrap_err().name(), "cert-untrusted");
    }

    /// Nothing listens: unreachable, after the bounded attempts.
    #[tokio::test(start_paused = true)]
    async fn an_unreachable_registrar_is_retried_a_few_times_then_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let registrar = Registrar::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let body = EnrollRequest { claim: "x".into(), csr_pem: "y".into(), mac: None };
        static TRIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let e = enroll(&registrar, &body, |_| {
            TRIES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .await
        .unwrap_err();
        assert_eq!(e.name(), "registrar-unreachable", "{e}");
        assert_eq!(TRIES.load(std::sync::atomic::Ordering::SeqCst), ENROLL_ATTEMPTS - 1, "retries logged");
    }
}
