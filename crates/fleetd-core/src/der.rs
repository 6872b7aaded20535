//! A few DER reads, without a parser dependency: the TLV walk, and the
//! subject CN of a certificate. Used where webpki keeps a field private
//! (the device's MQTT identity, a certificate's expiry, SEC1 keys).

/// (tag, content, rest) of the first TLV in `input`.
pub fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The subject common name of a DER certificate: the device's MQTT identity
/// (with `use_identity_as_username`, the broker's ACLs key on it). A small
/// DER walk: Certificate → tbsCertificate → subject → the CN attribute.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let (_, certificate, _) = tlv(der).filter(|t| t.0 == 0x30)?;
    let (_, mut tbs, _) = tlv(certificate).filter(|t| t.0 == 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2; // [0] version
    }
    // serial, signature algorithm, issuer, validity; then the subject.
    for _ in 0..4 {
        tbs = tlv(tbs)?.2;
    }
    let (_, mut subject, _) = tlv(tbs).filter(|t| t.0 == 0x30)?;
    while !subject.is_empty() {
        let (_, rdn, rest) = tlv(subject)?;
        subject = rest;
        let (_, attribute, _) = tlv(rdn)?;
        let (tag, oid, value) = tlv(attribute)?;
        if tag == 0x06 && oid == CN_OID {
            let (_, text, _) = tlv(value)?;
            return std::str::from_utf8(text).ok().map(str::to_string);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_is_read_from_real_certificates() {
        for cn in ["gw-0042", "a-much-longer-device-name-to-need-long-lengths-0000000000000000"] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["example.test".into()]).unwrap();
            params.distinguished_name.push(rcgen::DnType::OrganizationName, "Acme");
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(certificate_common_name(cert.der()).as_deref(), Some(cn));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".into()]).unwrap().self_signed(&key).unwrap();
        let mut der = cert.der().to_vec();
        assert!(certificate_common_name(&der[..der.len() / 2]).is_none(), "truncated");
        der[1] = 0xff;
        assert!(certificate_common_name(&der).is_none(), "garbage length");
        assert!(certificate_common_name(&[]).is_none());
    }
}
