//! The issuing CA, shared by the registrar and `fleetctl provision
//! --ca-cert`. A certificate is built from FRESH parameters: of the CSR only
//! its public key and its CN (which must be the expected device id) are
//! used; whatever else the CSR asks for (CA:true, names, key usages) is
//! ignored. Pure: the caller passes the time.
//!
//! For OpenSSL (mosquitto) to accept the CRL this CA signs, the CA
//! certificate must carry key usage keyCertSign and cRLSign.

use crate::error::{RegistrarError, Result};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use std::path::Path;

/// Serials are 16 random bytes with the top bit cleared (positive) and the
/// next one set: always 127 bits.
pub const SERIAL_BYTES: usize = 16;

/// The CA that signs device certificates and the CRL.
pub struct Issuer {
    pub(crate) inner: rcgen::Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: the `chain_pem` devices get.
    pub cert_pem: String,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issuer(<key redacted>)")
    }
}

impl Issuer {
    /// From the CA certificate and its key (PKCS#8 or SEC1 PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = fleetd_core::trust::keys::private_key_pem_as_pkcs8(key_pem)
            .map_err(|e| RegistrarError::CaInvalid(format!("the CA key: {e}")))?;
        let key =
            KeyPair::from_pem(&key).map_err(|e| RegistrarError::CaInvalid(format!("the CA key: {e}")))?;
        let inner = rcgen::Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| RegistrarError::CaInvalid(format!("the CA certificate: {e}")))?;
        Ok(Issuer { inner, cert_pem: cert_pem.to_string() })
    }

    /// From the `[ca]` files; the key is refused unless 0600.
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let key_pem = crate::files::read_private_key(key)?;
        let cert_pem = crate::files::read_text(cert)?;
        Self::from_pem(&cert_pem, &key_pem)
    }
}

/// A device's CSR, checked: its signature verifies, its key is P-256.
#[derive(Debug, Clone)]
pub struct Csr {
    pub cn: String,
    /// The SEC1 uncompressed point (what renewal signatures verify under).
    pub public_key: Vec<u8>,
    params: CertificateSigningRequestParams,
}

/// Parses and checks a CSR (`csr-invalid` otherwise).
pub fn parse_csr(csr_pem: &str) -> Result<Csr> {
    if csr_pem.len() > 16 * 1024 {
        return Err(RegistrarError::CsrInvalid("larger than 16 KiB".into()));
    }
    let params = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| RegistrarError::CsrInvalid(e.to_string()))?;
    let public_key = params.public_key.der_bytes().to_vec();
    // ES256 only: the signature algorithm and a P-256 point (65 bytes, 0x04).
    if params.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256
        || public_key.len() != 65
        || public_key[0] != 0x04
    {
        return Err(RegistrarError::CsrInvalid("only P-256 keys (ES256) are accepted".into()));
    }
    let cn = match params.params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(cn)) => cn.clone(),
        Some(DnValue::PrintableString(cn)) => cn.as_str().to_string(),
        _ => return Err(RegistrarError::CsrInvalid("the CSR has no CN".into())),
    };
    Ok(Csr { cn, public_key, params })
}

/// What [`issue`] made.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    /// Lowercase hex of the serial's 16 bytes.
    pub serial_hex: String,
    /// The SEC1 point of the certified key.
    pub public_key: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
}

/// How long a certificate is valid, counted from its issue: `[ca]
/// validity_days` (default 30), or `validity_s` for short-lived fleets and
/// renewal tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub seconds: i64,
}

impl Validity {
    pub fn days(days: u32) -> Self {
        Validity { seconds: i64::from(days) * 86400 }
    }
}

/// How far notBefore lies before the issue: a device's clock may lag.
pub const BACKDATE_S: i64 = 3600;

impl Validity {
    /// An hour, or a tenth of the validity when that is shorter: a device
    /// renews at two thirds of notBefore..notAfter, which an hour's
    /// backdating would put in the past for a certificate of minutes.
    pub fn backdate_s(self) -> i64 {
        BACKDATE_S.min(self.seconds / 10)
    }
}

/// A client certificate for `expected_cn` over the CSR's key, valid from an
/// hour before `now` (a device's clock may lag; [`Validity::backdate_s`])
/// until `validity` after it.
pub fn issue(
    csr_pem: &str,
    expected_cn: &str,
    issuer: &Issuer,
    validity: Validity,
    now: i64,
) -> Result<Issued> {
    let csr = parse_csr(csr_pem)?;
    issue_for(&csr, expected_cn, issuer, validity, now)
}

/// [`issue`] for a CSR already parsed.
pub fn issue_for(
    csr: &Csr,
    expected_cn: &str,
    issuer: &Issuer,
    validity: Validity,
    now: i64,
) -> Result<Issued> {
    if csr.cn != expected_cn {
        return Err(RegistrarError::CsrCnMismatch { got: csr.cn.clone(), expected: expected_cn.to_string() });
    }
    let serial = random_serial()?;
    let not_before = now - validity.backdate_s();
    let not_after = now + validity.seconds;
    let params = device_params(expected_cn, &serial, not_before, not_after)?;
    let cert = params
        .signed_by(&csr.params.public_key, &issuer.inner)
        .map_err(|e| RegistrarError::Internal(format!("signing: {e}")))?;
    Ok(Issued {
        cert_pem: cert.pem(),
        serial_hex: hex(&serial),
        public_key: csr.public_key.clone(),
        not_before,
        not_after,
    })
}

/// The certificate's parameters, all of them: nothing comes from the CSR.
fn device_params(cn: &str, serial: &[u8], not_before: i64, not_after: i64) -> Result<CertificateParams> {
    let time = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .map_err(|e| RegistrarError::Internal(format!("time: {e}")))
    };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, DnValue::Utf8String(cn.to_string()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::NoCa;
    params.subject_alt_names = Vec::new();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.custom_extensions = Vec::new();
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.not_before = time(not_before)?;
    params.not_after = time(not_after)?;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn random_serial() -> Result<[u8; SERIAL_BYTES]> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; SERIAL_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| RegistrarError::Internal("no randomness".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(bytes)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// Test material: a CA (with keyCertSign and cRLSign) and device CSRs.
pub mod test_ca {
    use super::*;

    /// A self-signed P-256 CA: (cert PEM, key PEM).
    pub fn make_ca() -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "fleet test issuing CA");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.pem(), key.serialize_pem())
    }

    /// A CSR for `cn` over a new P-256 key: (CSR PEM, key).
    pub fn make_csr(cn: &str) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        (params.serialize_request(&key).expect("csr").pem().expect("pem"), key)
    }
}

#[cfg(test)]
mod tests {
    use super::test_ca::*;
    use super::*;

    fn greedy_csr(cn: &str) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::CodeSigning];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_greedy_csr_gets_a_plain_client_certificate() {
        let (ca_cert, ca_key) = make_ca();
        let issuer = Issuer::from_pem(&ca_cert, &ca_key).unwrap();
        let issued =
            issue(&greedy_csr("gw-0042"), "gw-0042", &issuer, Validity::days(30), 1_800_000_000).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert!(cert.basic_constraints().unwrap().is_none_or(|bc| !bc.value.ca), "no CA:true");
        assert!(cert.subject_alternative_name().unwrap().is_none(), "no SANs");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.code_signing && !eku.any && eku.other.is_empty());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
        let extensions: Vec<String> = cert.extensions().iter().map(|e| e.oid.to_id_string()).collect();
        // Only key usage, extended key usage, basic constraints (if any) and the key identifiers.
        for oid in &extensions {
            assert!(
                ["2.5.29.15", "2.5.29.37", "2.5.29.19", "2.5.29.35", "2.5.29.14"].contains(&oid.as_str()),
                "{oid}"
            );
        }
        assert_eq!(cert.subject().to_string(), "CN=gw-0042");
        assert_eq!(issued.not_after, 1_800_000_000 + 30 * 86400, "30 days from the issue");
        let short =
            issue(&greedy_csr("gw-0042"), "gw-0042", &issuer, Validity { seconds: 90 }, 1_800_000_000)
                .unwrap();
        assert_eq!((short.not_before, short.not_after), (1_800_000_000 - 9, 1_800_000_090), "a tenth back");
        assert_eq!(issued.not_before, 1_800_000_000 - 3600);
        if let Some(text) = openssl_text(&issued.cert_pem) {
            assert!(!text.contains("CA:TRUE"), "{text}");
            assert!(!text.contains("evil.example.com"), "{text}");
            assert!(!text.contains("Code Signing") && !text.contains("Server Authentication"), "{text}");
            assert!(text.contains("TLS Web Client Authentication"), "{text}");
            assert!(text.contains("Subject: CN=gw-0042") || text.contains("Subject: CN = gw-0042"), "{text}");
        }
    }

    #[test]
    fn csr_refusals_by_table() {
        let (ca_cert, ca_key) = make_ca();
        let issuer = Issuer::from_pem(&ca_cert, &ca_key).unwrap();
        let p384 = {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, "gw-1");
            params.serialize_request(&key).unwrap().pem().unwrap()
        };
        let ed25519 = {
            let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, "gw-1");
            params.serialize_request(&key).unwrap().pem().unwrap()
        };
        let (good, _) = make_csr("gw-1");
        let tampered = {
            use base64::Engine;
            let b64: String = good.lines().filter(|l| !l.starts_with("-----")).collect();
            let mut der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
            let middle = der.len() / 2;
            der[middle] ^= 1;
            let body = base64::engine::general_purpose::STANDARD.encode(der);
            format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n")
        };
        let cases: [(&str, &str); 6] = [
            ("not a csr", "csr-invalid"),
            (&p384, "csr-invalid"),
            (&ed25519, "csr-invalid"),
            (&tampered, "csr-invalid"),
            (&ca_cert, "csr-invalid"),
            (&good, "csr-cn-mismatch"),
        ];
        for (csr, name) in cases {
            let err = issue(csr, "gw-2", &issuer, Validity::days(30), 1_800_000_000).unwrap_err();
            assert_eq!(err.name(), name, "{csr}");
        }
    }

    #[test]
    fn serials_are_long_positive_and_distinct() {
        let (ca_cert, ca_key) = make_ca();
        let issuer = Issuer::from_pem(&ca_cert, &ca_key).unwrap();
        let (csr, _) = make_csr("gw-1");
        let csr = parse_csr(&csr).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let issued = issue_for(&csr, "gw-1", &issuer, Validity::days(1), 1_800_000_000).unwrap();
            let bytes = unhex(&issued.serial_hex).unwrap();
            let bits = bytes.len() * 8 - bytes[0].leading_zeros() as usize;
            assert!(bits >= 120, "{}", issued.serial_hex);
            assert!(bytes[0] & 0x80 == 0, "positive");
            assert!(seen.insert(issued.serial_hex), "distinct");
        }
        let issued = issue_for(&csr, "gw-1", &issuer, Validity::days(1), 1_800_000_000).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert_eq!(cert.raw_serial_as_string().replace(':', ""), issued.serial_hex);
        assert!(cert.tbs_certificate.serial.bits() >= 120);
    }

    /// `openssl x509 -text`, when openssl is installed.
    pub(crate) fn openssl_text(pem: &str) -> Option<String> {
        use std::io::Write;
        let mut child = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(pem.as_bytes()).ok()?;
        let out = child.wait_with_output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
