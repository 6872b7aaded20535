//! The device's MQTT identity: the key it makes itself (with a CSR whose CN
//! is the device id), and the checks an uploaded identity passes before
//! anything is stored. Pure: time and the device's key come from the caller.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::SignatureScheme;

crate::error_name::named_error! {
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum IdentityError {
        #[name = "pem-invalid"]
        #[error("{name}: {0} holds no certificate")]
        NoCertificate(&'static str),
        #[name = "key-invalid"]
        #[error("{name}: {0}")]
        Key(String),
        #[name = "csr-missing"]
        #[error("{name}: the certificate is for the device's own key, but the device has made none; GET /api/v1/csr first")]
        NoDeviceKey,
        #[name = "cert-key-mismatch"]
        #[error("{name}: the certificate is not for {0}")]
        Mismatch(&'static str),
        #[name = "cert-cn-mismatch"]
        #[error("{name}: the certificate's CN is {found:?}, the device id is {expected:?}")]
        CommonName { found: String, expected: String },
        #[name = "cert-expired"]
        #[error("{name}: the certificate is not valid after {0}")]
        Expired(u64),
        #[name = "cert-not-yet-valid"]
        #[error("{name}: the certificate is valid from {0} only")]
        NotYetValid(u64),
        #[name = "cert-untrusted"]
        #[error("{name}: the certificate does not chain to the broker CA given (mqtt.ca_pem)")]
        Untrusted,
        #[name = "cert-invalid"]
        #[error("{name}: {0}")]
        Invalid(String),
    }
}

/// A P-256 key made on the device (PKCS#8 PEM). Its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(String);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

impl DeviceKey {
    pub fn generate() -> Result<Self, IdentityError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        Ok(Self(key.serialize_pem()))
    }

    pub fn from_pem(pem: String) -> Result<Self, IdentityError> {
        signer(&pem)?;
        Ok(Self(pem))
    }

    pub fn pem(&self) -> &str {
        &self.0
    }

    /// An ES256 signature (ASN.1 DER) over `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, IdentityError> {
        signer(&self.0)?.sign(message).map_err(|e| IdentityError::Key(format!("cannot sign with it: {e}")))
    }

    /// The public point (SEC1, uncompressed), as a certificate's SPKI holds it.
    pub fn public_key(&self) -> Result<Vec<u8>, IdentityError> {
        use rcgen::PublicKeyData;
        let key = rcgen::KeyPair::from_pem(&self.0).map_err(|e| IdentityError::Key(e.to_string()))?;
        Ok(key.der_bytes().to_vec())
    }

    /// A CSR for this key with CN = `device_id`.
    pub fn csr_pem(&self, device_id: &str) -> Result<String, IdentityError> {
        let key = rcgen::KeyPair::from_pem(&self.0).map_err(|e| IdentityError::Key(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, device_id);
        let csr = params.serialize_request(&key).map_err(|e| IdentityError::Key(e.to_string()))?;
        csr.pem().map_err(|e| IdentityError::Key(e.to_string()))
    }
}

/// An identity that passed every check: what the store writes.
#[derive(Clone, PartialEq, Eq)]
pub struct CheckedIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    /// Seconds since the epoch after which the certificate is expired.
    pub not_after: u64,
}

impl std::fmt::Debug for CheckedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedIdentity").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

/// What chains may be signed with: the broker CA may be RSA (AWS IoT's is)
/// even though the device's own key is P-256.
static CHAIN_ALGORITHMS: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
];

/// Checks an identity before it is stored:
/// - the certificate parses, its CN is the device id;
/// - it is for `key_pem` (uploaded) or, absent that, for the device's own key;
/// - it is valid at `now` and chains to `ca_pem` for client authentication.
///
/// `now` is the later of the system clock and the device's clock floor: a
/// gateway without an RTC may boot in 1970 and has no network yet.
pub fn check(
    device_id: &str,
    cert_pem: &str,
    key_pem: Option<&str>,
    device_key: Option<&DeviceKey>,
    ca_pem: &str,
    now: u64,
) -> Result<CheckedIdentity, IdentityError> {
    let chain = certificates(cert_pem, "identity.cert_pem")?;
    let anchors_der = certificates(ca_pem, "mqtt.ca_pem")?;
    let (key_pem, whose) = match (key_pem, device_key) {
        (Some(key), _) => (key.to_string(), "the key given (identity.key_pem)"),
        (None, Some(own)) => (own.pem().to_string(), "the device's own key (its CSR)"),
        (None, None) => return Err(IdentityError::NoDeviceKey),
    };
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| IdentityError::Invalid(format!("identity.cert_pem: {e}")))?;

    // The certificate is for the key when a signature made with the key
    // verifies under the certificate's public key.
    let proof = b"fleetd identity check";
    let signature =
        signer(&key_pem)?.sign(proof).map_err(|e| IdentityError::Key(format!("cannot sign with it: {e}")))?;
    leaf.verify_signature(webpki::ring::ECDSA_P256_SHA256, proof, &signature)
        .map_err(|_| IdentityError::Mismatch(whose))?;

    match crate::der::certificate_common_name(&chain[0]) {
        Some(cn) if cn == device_id => {}
        found => {
            return Err(IdentityError::CommonName {
                found: found.unwrap_or_default(),
                expected: device_id.to_string(),
            })
        }
    }

    let anchors = anchors_der
        .iter()
        .map(|der| webpki::anchor_from_trusted_cert(der).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Invalid(format!("mqtt.ca_pem: {e}")))?;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now));
    leaf.verify_for_usage(
        CHAIN_ALGORITHMS,
        &anchors,
        &chain[1..],
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { not_after, .. } => IdentityError::Expired(not_after.as_secs()),
        webpki::Error::CertNotValidYet { not_before, .. } => IdentityError::NotYetValid(not_before.as_secs()),
        webpki::Error::UnknownIssuer => IdentityError::Untrusted,
        other => IdentityError::Invalid(other.to_string()),
    })?;
    let not_after = not_after(&chain[0]).unwrap_or(u64::MAX);
    Ok(CheckedIdentity { cert_pem: cert_pem.to_string(), key_pem, not_after })
}

fn certificates(pem: &str, field: &'static str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| IdentityError::NoCertificate(field))?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate(field));
    }
    Ok(certs)
}

/// A P-256 signer for a PKCS#8 or SEC1 PEM key; any other key is refused
/// (ES256 only).
fn signer(key_pem: &str) -> Result<Box<dyn rustls::sign::Signer>, IdentityError> {
    let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| IdentityError::Key("not a PEM private key".into()))?;
    let key = rustls::crypto::ring::sign::any_ecdsa_type(&der)
        .map_err(|_| IdentityError::Key("not an ECDSA P-256 key".into()))?;
    key.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or_else(|| IdentityError::Key("not a P-256 key (only ES256 is accepted)".into()))
}

/// The validity (notBefore, notAfter) of the first certificate in a PEM
/// text: when the renewal is due.
pub fn certificate_validity(cert_pem: &str) -> Option<(u64, u64)> {
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next()?.ok()?;
    validity(&der)
}

/// The certificate's notAfter.
fn not_after(der: &[u8]) -> Option<u64> {
    validity(der).map(|(_, not_after)| not_after)
}

/// The certificate's notBefore and notAfter, from a small DER walk (webpki
/// keeps them private).
fn validity(der: &[u8]) -> Option<(u64, u64)> {
    let (_, certificate, _) = crate::der::tlv(der)?;
    let (_, mut tbs, _) = crate::der::tlv(certificate)?;
    if tbs.first() == Some(&0xa0) {
        tbs = crate::der::tlv(tbs)?.2;
    }
    for _ in 0..3 {
        tbs = crate::der::tlv(tbs)?.2; // serial, signature, issuer
    }
    let (_, validity, _) = crate::der::tlv(tbs)?;
    let (tag, time, rest) = crate::der::tlv(validity)?;
    let not_before = asn1_time(tag, time)?;
    let (tag, time, _) = crate::der::tlv(rest)?;
    Some((not_before, asn1_time(tag, time)?))
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ).
fn asn1_time(tag: u8, text: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        0x18 if text.len() == 14 => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    let days = days_from_civil(year, month, day);
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000; // 2027-01-15

    struct Ca {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        pem: String,
    }

    fn make_ca(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { issuer: rcgen::Issuer::new(params, key), pem }
    }

    fn leaf(ca: &Ca, cn: &str, key: &rcgen::KeyPair, not_after_year: i32) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        params.signed_by(key, &ca.issuer).unwrap().pem()
    }

    fn name(r: Result<CheckedIdentity, IdentityError>) -> &'static str {
        r.map(|_| "ok").unwrap_or_else(|e| e.name())
    }

    #[test]
    fn an_uploaded_identity_must_match_chain_and_be_valid() {
        let ca = make_ca("fleet CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let key_pem = key.serialize_pem();
        let good = leaf(&ca, "gw-1", &key, 2030);
        let checked = check("gw-1", &good, Some(&key_pem), None, &ca.pem, NOW).unwrap();
        assert_eq!(checked.not_after, 1_893_456_000, "2030-01-01T00:00:00Z");
        assert!(!format!("{checked:?}").contains("PRIVATE"), "Debug hides the key");

        let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert_eq!(name(check("gw-1", &good, Some(&other_key), None, &ca.pem, NOW)), "cert-key-mismatch");
        assert_eq!(
            name(check("gw-1", &leaf(&ca, "gw-1", &key, 2026), Some(&key_pem), None, &ca.pem, NOW)),
            "cert-expired"
        );
        assert_eq!(name(check("gw-2", &good, Some(&key_pem), None, &ca.pem, NOW)), "cert-cn-mismatch");
        let foreign = make_ca("someone else");
        assert_eq!(name(check("gw-1", &good, Some(&key_pem), None, &foreign.pem, NOW)), "cert-untrusted");
        assert_eq!(name(check("gw-1", "garbage", Some(&key_pem), None, &ca.pem, NOW)), "pem-invalid");
        assert_eq!(name(check("gw-1", &good, Some("garbage"), None, &ca.pem, NOW)), "key-invalid");
        assert_eq!(name(check("gw-1", &good, None, None, &ca.pem, NOW)), "csr-missing");
        // Before 2025 (the certificate's notBefore).
        assert_eq!(
            name(check("gw-1", &good, Some(&key_pem), None, &ca.pem, 1_700_000_000)),
            "cert-not-yet-valid"
        );
    }

    #[test]
    fn only_p256_keys_are_accepted() {
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap().serialize_pem();
        assert_eq!(DeviceKey::from_pem(ed).map(|_| ()).unwrap_err().name(), "key-invalid");
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap().serialize_pem();
        assert_eq!(DeviceKey::from_pem(p384).map(|_| ()).unwrap_err().name(), "key-invalid");
    }

    #[test]
    fn the_device_key_makes_a_csr_that_a_ca_signs_and_the_check_accepts() {
        let own = DeviceKey::generate().unwrap();
        let csr = own.csr_pem("gw-7").unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let ca = make_ca("fleet CA");
        let params = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let cn = params.params.distinguished_name.get(&rcgen::DnType::CommonName).cloned();
        assert_eq!(cn, Some(rcgen::DnValue::Utf8String("gw-7".into())));
        let cert = params.signed_by(&ca.issuer).unwrap().pem();
        let checked = check("gw-7", &cert, None, Some(&own), &ca.pem, NOW).unwrap();
        assert_eq!(checked.key_pem, own.pem(), "the device's own key is what gets stored");

        let someone_else = DeviceKey::generate().unwrap();
        assert_eq!(name(check("gw-7", &cert, None, Some(&someone_else), &ca.pem, NOW)), "cert-key-mismatch");
    }

    #[test]
    fn asn1_times_read_as_unix_seconds() {
        assert_eq!(asn1_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(asn1_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(asn1_time(0x18, b"20300101000000Z"), Some(1_893_456_000));
        assert_eq!(asn1_time(0x18, b"2030"), None);
    }
}
