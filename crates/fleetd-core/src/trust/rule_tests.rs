//! Every rule of update-message-v1.md, as a table of inputs and the named
//! error each must produce. Pure: no sockets, no disks.

use super::*;
use std::collections::BTreeMap;

const NOW: u64 = 1_795_000_000;

struct Fixture {
    fleet: SigningKey,
    cosigner: SigningKey,
    policy: Policy,
}

fn fixture() -> Fixture {
    let fleet = SigningKey::generate().unwrap();
    let cosigner = SigningKey::generate().unwrap();
    let policy = Policy {
        keys: vec![("fleet".into(), fleet.public_key()), ("cosigner".into(), cosigner.public_key())],
        project: "acme-gateways".into(),
        hardware: "rpi4-gw".into(),
        device_id: "gw-0042".into(),
        groups: vec!["pilot".into()],
        leeway_s: 60,
        max_validity_s: DEFAULT_MAX_VALIDITY_S,
        allow_http: false,
        max_image_size: Some(1 << 30),
    };
    Fixture { fleet, cosigner, policy }
}

fn claims() -> Claims {
    Claims {
        typ: CLAIMS_TYPE.into(),
        jti: "01JD3Z6W8V1T3M5Q9R2K4H7N0C".into(),
        iat: NOW,
        nbf: NOW,
        exp: NOW + 3600,
        project: "acme-gateways".into(),
        target: Target { hardware: "rpi4-gw".into(), devices: vec!["gw-0042".into()], groups: vec![] },
        version: 42,
        name: "2026.11.1".into(),
        image: Image {
            url: "https://updates.example.com/rpi4-gw/2026.11.1.img".into(),
            size: 268_435_456,
            sha256: "c7be90c1253943c94f256c17c430305e300d117d8a70adaf749bf2488913b184".into(),
            encoding: Default::default(),
            index: None,
        },
        requires: vec![],
        rollout: None,
    }
}

impl Fixture {
    fn signed(&self, claims: &Claims) -> Envelope {
        let mut e = Envelope::new(&claims.to_json());
        e.add_signature(&self.fleet, "fleet").unwrap();
        e.add_signature(&self.cosigner, "cosigner").unwrap();
        e
    }

    fn check_at(&self, input: &[u8], now: u64, state: &TrustState<'_>) -> Result<Verified, VerifyError> {
        self.policy.verify(input, state, now)
    }

    fn check(&self, input: &[u8]) -> Result<Verified, VerifyError> {
        let seen = BTreeMap::new();
        self.check_at(input, NOW + 10, &fresh(&seen))
    }

    fn error(&self, input: &[u8]) -> String {
        match self.check(input) {
            Ok(_) => "accepted".into(),
            Err(e) => e.name().into(),
        }
    }

    /// Any payload, signed by both keys.
    fn signed_payload(&self, payload: &[u8]) -> Envelope {
        let mut e = Envelope::new(payload);
        e.add_signature(&self.fleet, "fleet").unwrap();
        e.add_signature(&self.cosigner, "cosigner").unwrap();
        e
    }

    fn claims_error(&self, claims: &Claims) -> String {
        self.error(self.signed(claims).to_json().as_bytes())
    }
}

fn fresh(seen: &BTreeMap<String, u64>) -> TrustState<'_> {
    TrustState { installed_version: 7, clock_floor: 0, seen_jtis: seen }
}

/// A protected header as given, signed by `key` over `payload`.
fn raw_signature(key: &SigningKey, header: &str, payload: &str) -> Signature {
    let protected = b64url_encode(header.as_bytes());
    let sig = key.sign(format!("{protected}.{payload}").as_bytes()).unwrap();
    Signature { protected, header: None, signature: b64url_encode(&sig) }
}

fn der_integer(bytes: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    if v.first().is_some_and(|b| b & 0x80 != 0) {
        v.insert(0, 0);
    }
    let mut out = vec![0x02, v.len() as u8];
    out.extend(v);
    out
}

#[test]
fn a_correct_message_is_accepted() {
    let f = fixture();
    let v = f.check(f.signed(&claims()).to_json().as_bytes()).unwrap();
    assert_eq!(v.claims, claims());
    assert_eq!(v.effective_now, NOW + 10);
}

#[test]
fn signature_order_of_kids_does_not_matter() {
    let f = fixture();
    let mut e = Envelope::new(&claims().to_json());
    e.add_signature(&f.cosigner, "cosigner").unwrap();
    e.add_signature(&f.fleet, "fleet").unwrap();
    assert_eq!(f.error(e.to_json().as_bytes()), "accepted");
}

#[test]
fn alg_none_is_rejected() {
    let f = fixture();
    let mut e = f.signed(&claims());
    e.signatures[0].protected = b64url_encode(br#"{"alg":"none","kid":"fleet"}"#);
    e.signatures[0].signature = String::new();
    assert_eq!(f.error(e.to_json().as_bytes()), "alg-rejected");
}

#[test]
fn hs256_with_the_public_key_as_secret_is_rejected() {
    // The classic algorithm-confusion attack: HMAC keyed with the public PEM.
    let f = fixture();
    let mut e = f.signed(&claims());
    let protected = b64url_encode(br#"{"alg":"HS256","kid":"fleet"}"#);
    let secret = f.fleet.public_key().to_pem();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{protected}.{}", e.payload).as_bytes());
    e.signatures[0] = Signature { protected, header: None, signature: b64url_encode(tag.as_ref()) };
    assert_eq!(f.error(e.to_json().as_bytes()), "alg-rejected");
}

#[test]
fn other_algorithms_and_odd_alg_values_are_rejected() {
    let f = fixture();
    for header in [
        r#"{"alg":"ES384","kid":"fleet"}"#,
        r#"{"alg":"es256","kid":"fleet"}"#,
        r#"{"alg":"RS256","kid":"fleet"}"#,
        r#"{"alg":["ES256"],"kid":"fleet"}"#,
        r#"{"kid":"fleet"}"#,
    ] {
        let mut e = f.signed(&claims());
        e.signatures[0] = raw_signature(&f.fleet, header, &e.payload);
        assert_eq!(f.error(e.to_json().as_bytes()), "alg-rejected", "{header}");
    }
}

#[test]
fn a_der_encoded_signature_is_invalid() {
    let f = fixture();
    let mut e = f.signed(&claims());
    let raw = b64url_decode(&e.signatures[1].signature).unwrap();
    let mut body = der_integer(&raw[..32]);
    body.extend(der_integer(&raw[32..]));
    let mut der = vec![0x30, body.len() as u8];
    der.extend(body);
    e.signatures[1].signature = b64url_encode(&der);
    assert_eq!(f.error(e.to_json().as_bytes()), "signature-invalid");
}

#[test]
fn duplicate_unknown_and_missing_kids() {
    let f = fixture();
    let c = claims();

    let mut dup = f.signed(&c);
    dup.add_signature(&f.fleet, "fleet").unwrap();
    assert_eq!(f.error(dup.to_json().as_bytes()), "kid-duplicate");

    let mut unknown = f.signed(&c);
    unknown.add_signature(&SigningKey::generate().unwrap(), "intruder").unwrap();
    assert_eq!(f.error(unknown.to_json().as_bytes()), "kid-unknown");

    let mut only_fleet = Envelope::new(&c.to_json());
    only_fleet.add_signature(&f.fleet, "fleet").unwrap();
    let err = f.check(only_fleet.to_json().as_bytes()).unwrap_err();
    assert_eq!(err, VerifyError::SignatureMissing("cosigner".into()));

    let mut no_sigs = f.signed(&c);
    no_sigs.signatures.clear();
    assert_eq!(f.error(no_sigs.to_json().as_bytes()), "malformed");
}

#[test]
fn the_right_kid_with_the_wrong_key_is_invalid() {
    let f = fixture();
    let mut e = Envelope::new(&claims().to_json());
    e.add_signature(&f.fleet, "fleet").unwrap();
    e.add_signature(&SigningKey::generate().unwrap(), "cosigner").unwrap();
    let err = f.check(e.to_json().as_bytes()).unwrap_err();
    assert_eq!(err, VerifyError::SignatureInvalid("cosigner".into()));
}

#[test]
fn a_tampered_payload_is_invalid() {
    let f = fixture();
    let mut e = f.signed(&claims());
    let mut evil = claims();
    evil.image.url = "https://evil.example/x.img".into();
    e.payload = b64url_encode(&evil.to_json());
    assert_eq!(f.error(e.to_json().as_bytes()), "signature-invalid");
}

#[test]
fn padded_or_standard_base64_is_malformed() {
    let f = fixture();
    // Make the payload length need padding so '=' appears.
    let mut c = claims();
    for pad in 0..3 {
        c.name = format!("n{}", "x".repeat(pad));
        let e = f.signed(&c);
        if e.payload.len() % 4 != 0 {
            let mut padded = e.clone();
            while padded.payload.len() % 4 != 0 {
                padded.payload.push('=');
            }
            assert_eq!(f.error(padded.to_json().as_bytes()), "malformed");
        }
    }
    let mut e = f.signed(&claims());
    e.signatures[0].signature = e.signatures[0].signature.replace('-', "+").replace('_', "/");
    e.signatures[0].signature.push_str("==");
    assert_eq!(f.error(e.to_json().as_bytes()), "malformed");
    let mut e = f.signed(&claims());
    e.signatures[1].protected.push('=');
    assert_eq!(f.error(e.to_json().as_bytes()), "malformed");
}

#[test]
fn compact_and_flattened_serializations_are_refused() {
    let f = fixture();
    let e = f.signed(&claims());
    let compact = format!("{}.{}.{}", e.signatures[0].protected, e.payload, e.signatures[0].signature);
    let err = f.check(compact.as_bytes()).unwrap_err();
    assert_eq!(err.name(), "malformed");
    assert!(err.to_string().contains("compact"), "{err}");

    let flattened = serde_json::json!({
        "payload": e.payload,
        "protected": e.signatures[0].protected,
        "signature": e.signatures[0].signature,
    });
    let err = f.check(flattened.to_string().as_bytes()).unwrap_err();
    assert!(err.to_string().contains("flattened"), "{err}");
}

#[test]
fn crit_and_unprotected_alg_or_kid_are_rejected() {
    let f = fixture();
    let mut e = f.signed(&claims());
    e.signatures[0] = raw_signature(&f.fleet, r#"{"alg":"ES256","kid":"fleet","crit":["exp"]}"#, &e.payload);
    assert_eq!(f.error(e.to_json().as_bytes()), "header-rejected");

    for name in ["alg", "kid"] {
        let mut e = f.signed(&claims());
        let mut header = serde_json::Map::new();
        header.insert(name.into(), serde_json::json!("x"));
        e.signatures[1].header = Some(header);
        assert_eq!(f.error(e.to_json().as_bytes()), "header-rejected", "{name}");
    }
    // An unprotected header that names neither is allowed.
    let mut e = f.signed(&claims());
    let mut header = serde_json::Map::new();
    header.insert("note".into(), serde_json::json!("hello"));
    e.signatures[1].header = Some(header);
    assert_eq!(f.error(e.to_json().as_bytes()), "accepted");
}

#[test]
fn duplicate_members_in_a_protected_header_are_malformed() {
    let f = fixture();
    let mut e = f.signed(&claims());
    e.signatures[0] =
        raw_signature(&f.fleet, r#"{"alg":"ES256","kid":"fleet","kid":"cosigner"}"#, &e.payload);
    assert_eq!(f.error(e.to_json().as_bytes()), "malformed");
}

#[test]
fn validity_window_rules() {
    let f = fixture();
    let seen = BTreeMap::new();
    let msg = f.signed(&claims()).to_json();
    let at = |now| f.check_at(msg.as_bytes(), now, &fresh(&seen)).map_err(|e| e.name());
    // nbf - leeway <= now < exp + leeway
    assert!(at(NOW - 60).is_ok());
    assert_eq!(at(NOW - 61).unwrap_err(), "not-yet-valid");
    assert!(at(NOW + 3600 + 59).is_ok());
    assert_eq!(at(NOW + 3600 + 60).unwrap_err(), "expired");

    let mut long = claims();
    long.exp = long.nbf + DEFAULT_MAX_VALIDITY_S + 1;
    assert_eq!(f.claims_error(&long), "validity-too-long");
    long.exp = long.nbf + DEFAULT_MAX_VALIDITY_S;
    assert_eq!(f.claims_error(&long), "accepted");

    let mut backwards = claims();
    backwards.exp = backwards.nbf - 1;
    assert_eq!(f.claims_error(&backwards), "malformed");
}

#[test]
fn iat_must_not_be_in_the_future_nor_after_exp() {
    let f = fixture();
    let seen = BTreeMap::new();
    // One message with iat in 2100 would raise the clock floor past every
    // later message: refused, whatever its window says.
    let mut future = claims();
    future.iat = 4_102_444_800;
    future.nbf = NOW;
    future.exp = NOW + 3600;
    assert_eq!(f.claims_error(&future), "iat-invalid");
    let mut after_exp = claims();
    after_exp.iat = after_exp.exp + 1;
    assert_eq!(f.claims_error(&after_exp), "iat-invalid");
    // iat <= now + leeway, at the boundary.
    let mut ahead = claims();
    ahead.iat = NOW + 10 + 60;
    assert_eq!(f.claims_error(&ahead), "accepted");
    ahead.iat = NOW + 10 + 61;
    assert_eq!(f.claims_error(&ahead), "iat-invalid");
    // Issued a month ago with a current window: still fine.
    let mut old = claims();
    old.iat = NOW - 30 * 86_400;
    assert_eq!(f.claims_error(&old), "accepted");
    // The rule uses the clock floor when the system clock reads earlier.
    let floor = TrustState { installed_version: 7, clock_floor: NOW + 5, seen_jtis: &seen };
    let msg = f.signed(&claims()).to_json();
    assert!(f.check_at(msg.as_bytes(), 1_000_000_000, &floor).is_ok());
}

#[test]
fn duplicate_envelope_members_are_malformed() {
    let f = fixture();
    let good = f.signed(&claims());
    let mut other = claims();
    other.version = 99;
    let evil = f.signed(&other);
    let sigs = serde_json::to_string(&good.signatures).unwrap();
    // Two payloads: a Value-based parser keeps the last one silently.
    let twice =
        format!(r#"{{"payload":"{}","payload":"{}","signatures":{sigs}}}"#, good.payload, evil.payload);
    assert_eq!(f.error(twice.as_bytes()), "malformed");
    let sigs_twice = format!(r#"{{"payload":"{}","signatures":[],"signatures":{sigs}}}"#, good.payload);
    assert_eq!(f.error(sigs_twice.as_bytes()), "malformed");
    // The same document without the duplicates is accepted.
    let once = format!(r#"{{"payload":"{}","signatures":{sigs}}}"#, good.payload);
    assert_eq!(f.error(once.as_bytes()), "accepted");
}

#[test]
fn the_clock_floor_stands_in_for_a_clock_that_reads_earlier() {
    let f = fixture();
    let seen = BTreeMap::new();
    let msg = f.signed(&claims()).to_json();
    // The system clock was reset to 2001; the floor remembers a later time.
    let reset_clock = 1_000_000_000;
    let floor_after_expiry = TrustState { installed_version: 7, clock_floor: NOW + 7200, seen_jtis: &seen };
    let err = f.check_at(msg.as_bytes(), reset_clock, &floor_after_expiry).unwrap_err();
    assert_eq!(err, VerifyError::Expired { exp: NOW + 3600, now: NOW + 7200 });
    // By the wrong clock alone the message would be merely not yet valid;
    // with a floor inside the window it is accepted.
    let floor_inside = TrustState { installed_version: 7, clock_floor: NOW + 5, seen_jtis: &seen };
    let v = f.check_at(msg.as_bytes(), reset_clock, &floor_inside).unwrap();
    assert_eq!(v.effective_now, NOW + 5);
}

#[test]
fn a_replayed_jti_is_rejected() {
    let f = fixture();
    let mut seen = BTreeMap::new();
    seen.insert(claims().jti, NOW + 3660);
    let err = f.check_at(f.signed(&claims()).to_json().as_bytes(), NOW + 10, &fresh(&seen)).unwrap_err();
    assert_eq!(err.name(), "replayed");
}

#[test]
fn version_must_be_newer() {
    let f = fixture();
    for (version, expected) in [(6, "version-not-newer"), (7, "version-not-newer"), (8, "accepted")] {
        let mut c = claims();
        c.version = version;
        assert_eq!(f.claims_error(&c), expected, "version {version}");
    }
}

#[test]
fn project_hardware_and_targeting() {
    let f = fixture();
    let mut c = claims();
    c.project = "other".into();
    assert_eq!(f.claims_error(&c), "wrong-project");

    let mut c = claims();
    c.target.hardware = "rpi3-gw".into();
    assert_eq!(f.claims_error(&c), "wrong-hardware");

    let mut c = claims();
    c.target.devices = vec!["gw-0043".into()];
    assert_eq!(f.claims_error(&c), "not-targeted");
    c.target.groups = vec!["beta".into()];
    assert_eq!(f.claims_error(&c), "not-targeted");
    c.target.groups.push("pilot".into());
    assert_eq!(f.claims_error(&c), "accepted", "targeted through its group");

    let mut c = claims();
    c.target.devices.clear();
    c.target.groups.clear();
    assert_eq!(f.claims_error(&c), "not-targeted", "both empty");
}

#[test]
fn image_size_and_url_rules() {
    let mut f = fixture();
    let mut c = claims();
    c.image.size = (1 << 30) + 1;
    assert_eq!(f.claims_error(&c), "image-too-large");
    c.image.size = 1 << 30;
    assert_eq!(f.claims_error(&c), "accepted");
    c.image.size = 0;
    assert_eq!(f.claims_error(&c), "malformed");

    let mut c = claims();
    c.image.url = "file:///dev/mmcblk0p2".into();
    assert_eq!(f.claims_error(&c), "url-scheme-rejected");
    c.image.url = "http://updates.example.com/x.img".into();
    assert_eq!(f.claims_error(&c), "url-scheme-rejected");
    f.policy.allow_http = true;
    assert_eq!(f.claims_error(&c), "accepted");

    let mut c = claims();
    c.image.sha256 = c.image.sha256.to_uppercase();
    assert_eq!(f.claims_error(&c), "malformed");
}

#[test]
fn a_required_feature_this_build_lacks_is_refused_by_name() {
    let mut f = fixture();
    f.policy.allow_http = true;
    let mut c = claims();
    c.requires = vec!["zstd".into(), "adaptive".into()];
    assert_eq!(f.claims_error(&c), "accepted");
    c.requires.push("teleport".into());
    assert_eq!(f.claims_error(&c), "requires-unsupported");
    let mut c = claims();
    c.image.encoding = crate::trust::Encoding::Zstd;
    c.image.index =
        Some(crate::trust::IndexRef { url: "ftp://h/x.index".into(), size: 100, sha256: "ab".repeat(32) });
    assert_eq!(f.claims_error(&c), "url-scheme-rejected", "the index URL follows the image URL's rules");
    c.image.index.as_mut().unwrap().url = "https://h/x.index".into();
    assert_eq!(f.claims_error(&c), "accepted");
    c.image.index.as_mut().unwrap().size = crate::trust::MAX_INDEX_BYTES + 1;
    assert_eq!(f.claims_error(&c), "malformed");
}

#[test]
fn structural_claim_rules() {
    let f = fixture();
    let mut c = claims();
    c.typ = "fleetd.update.v2".into();
    assert_eq!(f.claims_error(&c), "wrong-type");
    let mut c = claims();
    c.jti = "short".into();
    assert_eq!(f.claims_error(&c), "malformed");
    let mut c = claims();
    c.name = "n".repeat(129);
    assert_eq!(f.claims_error(&c), "malformed");

    // Missing and mistyped claims, and claims that are not JSON.
    for payload in [
        serde_json::json!({"typ": CLAIMS_TYPE}).to_string(),
        claims_value_with("version", serde_json::json!(-1)),
        claims_value_with("exp", serde_json::json!("tomorrow")),
        "not json".to_string(),
    ] {
        let mut e = Envelope::new(payload.as_bytes());
        e.add_signature(&f.fleet, "fleet").unwrap();
        e.add_signature(&f.cosigner, "cosigner").unwrap();
        assert_eq!(f.error(e.to_json().as_bytes()), "malformed", "{payload}");
    }
    // Deep nesting inside an unknown (ignored) claim is still bounded.
    {
        let payload = claims_value_with("x", serde_json::Value::Null)
            .replace("\"x\":null", &format!("\"x\":{}{}", "[".repeat(5_000), "]".repeat(5_000)));
        let mut e = Envelope::new(payload.as_bytes());
        e.add_signature(&f.fleet, "fleet").unwrap();
        e.add_signature(&f.cosigner, "cosigner").unwrap();
        assert_eq!(f.error(e.to_json().as_bytes()), "malformed");
    }
}

fn claims_value_with(key: &str, value: serde_json::Value) -> String {
    let mut v = serde_json::to_value(claims()).unwrap();
    v[key] = value;
    v.to_string()
}

#[test]
fn unknown_claims_are_ignored() {
    let f = fixture();
    let payload = claims_value_with("future_field", serde_json::json!({"deep": [1, 2, 3]}));
    let mut e = Envelope::new(payload.as_bytes());
    e.add_signature(&f.fleet, "fleet").unwrap();
    e.add_signature(&f.cosigner, "cosigner").unwrap();
    assert_eq!(f.error(e.to_json().as_bytes()), "accepted");
}

#[test]
fn signatures_are_checked_before_claims() {
    // Garbage claims with a missing signature report the signature, not the claims.
    let f = fixture();
    let mut e = Envelope::new(b"not json at all");
    e.add_signature(&f.fleet, "fleet").unwrap();
    assert_eq!(f.error(e.to_json().as_bytes()), "signature-missing");
}

#[test]
fn hostile_sizes_and_nesting() {
    let f = fixture();
    let huge = vec![b'{'; 20 * 1024 * 1024];
    assert_eq!(f.error(&huge), "message-too-large");

    let nested = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    assert_eq!(f.error(nested.as_bytes()), "message-too-large");
    // Deep nesting that fits under the size cap is refused by the depth limit.
    let deep = format!("{{\"payload\":{}{}}}", "[".repeat(30_000), "]".repeat(30_000));
    assert_eq!(f.error(deep.as_bytes()), "malformed");
    // ... also inside a signed protected header.
    let mut e = f.signed(&claims());
    let header =
        format!("{{\"alg\":\"ES256\",\"kid\":\"fleet\",\"x\":{}{}}}", "[".repeat(5_000), "]".repeat(5_000));
    e.signatures[0] = raw_signature(&f.fleet, &header, &e.payload);
    assert_eq!(f.error(e.to_json().as_bytes()), "malformed");
}

#[test]
fn arbitrary_bytes_never_panic() {
    let f = fixture();
    let valid = f.signed(&claims()).to_json().into_bytes();
    // Deterministic pseudo-random mutations of a valid message.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..2000 {
        let mut m = valid.clone();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % m.len();
            m[i] = (x >> 32) as u8;
        }
        let _ = f.check(&m);
    }
    for input in [&b""[..], b"\xff\xfe", b"{}", b"null", b"[]", b"{\"payload\":1}"] {
        assert!(f.check(input).is_err());
    }
}

/// Refusals reach `LastError`, D-Bus signals and the retained MQTT status:
/// a file that is not a message (a token, a key) must not come back in them.
#[test]
fn errors_about_a_message_never_quote_its_content() {
    let f = fixture();
    const SECRET: &str = "TOPSECRET-api-token-9f8e7d";
    let mut inputs: Vec<Vec<u8>> = vec![
        format!("{{\"payload\": \"{SECRET}\", \"signatures\": \"{SECRET}\"}}").into_bytes(),
        format!("{{\"{SECRET}\": 1}}").into_bytes(),
        format!("{{\"payload\": 1, \"{SECRET}\": 2}}").into_bytes(),
        format!("{{\"api_token\": \"{SECRET}\"}}").into_bytes(),
        format!("{{\"payload\": \"x\", \"signatures\": [{{\"protected\": \"{SECRET}\"}}]}}").into_bytes(),
        format!("[\"{SECRET}\"]").into_bytes(),
        format!("{{\"payload\": \"{SECRET}").into_bytes(),
    ];
    // Signed claims of the wrong shape, and a protected header of the wrong shape.
    for payload in [
        claims_value_with("version", serde_json::json!(SECRET)),
        claims_value_with("target", serde_json::json!({ "hardware": [SECRET] })),
        claims_value_with("image", serde_json::json!({ SECRET: 1 })),
        format!("{{\"token\": \"{SECRET}\"}}"),
    ] {
        inputs.push(f.signed_payload(payload.as_bytes()).to_json().into_bytes());
    }
    let payload = b64url_encode(&claims().to_json());
    let header = format!("{{\"alg\": \"ES256\", \"kid\": [\"{SECRET}\"]}}");
    let e =
        Envelope { payload: payload.clone(), signatures: vec![raw_signature(&f.fleet, &header, &payload)] };
    inputs.push(e.to_json().into_bytes());
    let header = format!("{{\"alg\": {{\"{SECRET}\": 1}}, \"kid\": \"fleet\"}}");
    let e =
        Envelope { payload: payload.clone(), signatures: vec![raw_signature(&f.fleet, &header, &payload)] };
    inputs.push(e.to_json().into_bytes());
    for input in inputs {
        let err = f.check(&input).expect_err("not a valid message");
        let text = err.to_string();
        assert!(!text.contains("TOPSECRET"), "{text}\n(for {})", String::from_utf8_lossy(&input));
        assert!(text.starts_with(err.name()), "{text}");
    }
    // What it may say: where, and the schema's own field names.
    let err = f
        .check(
            &f.signed_payload(claims_value_with("version", serde_json::json!(SECRET)).as_bytes())
                .to_json()
                .into_bytes(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("version"), "{err}");
    assert!(err.to_string().contains("column"), "{err}");
}

/// ECDSA signatures come in pairs: (r, s) and (r, n - s) both verify. Only
/// the low-S one is accepted, so a signature has one encoding (replay and
/// audit records keyed on it cannot be split), and ours are always low-S.
#[test]
fn high_s_signatures_are_refused_and_ours_are_low_s() {
    let f = fixture();
    let mut e = f.signed(&claims());
    let raw = b64url_decode(&e.signatures[0].signature).unwrap();
    let mut twin = raw[..32].to_vec();
    twin.extend(p256_order_minus(&raw[32..]));
    let (low, high) = if raw[32..] <= P256_HALF_ORDER[..] { (raw, twin) } else { (twin, raw) };
    e.signatures[0].signature = b64url_encode(&low);
    assert_eq!(f.error(e.to_json().as_bytes()), "accepted");
    e.signatures[0].signature = b64url_encode(&high);
    assert_eq!(f.error(e.to_json().as_bytes()), "signature-invalid", "the high-S twin of a valid signature");
    for _ in 0..32 {
        for sig in &f.signed(&claims()).signatures {
            let raw = b64url_decode(&sig.signature).unwrap();
            assert!(raw[32..] <= P256_HALF_ORDER[..], "our signer made a high-S signature");
        }
    }
}

/// floor(n / 2) for P-256's group order n: the largest low `s`.
const P256_HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xde,
    0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8,
];

/// n - s for P-256's group order n (big-endian, 32 bytes).
fn p256_order_minus(s: &[u8]) -> Vec<u8> {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc,
        0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
    ];
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        out[i] = (d + 256 * borrow) as u8;
    }
    out
}

#[test]
fn a_url_without_a_host_is_refused_before_the_jti_is_spent() {
    let f = fixture();
    for url in ["https://:443/x", "https://:/x", "https://[]/x", "https://h:port/x", "https://h:99999/x"] {
        let mut c = claims();
        c.image.url = url.into();
        assert_eq!(f.claims_error(&c), "url-scheme-rejected", "{url}");
    }
    for url in ["https://h:443/x", "https://[::1]:8443/x", "https://10.0.0.1/x?a=b", "https://h"] {
        let mut c = claims();
        c.image.url = url.into();
        assert_eq!(f.claims_error(&c), "accepted", "{url}");
    }
}
