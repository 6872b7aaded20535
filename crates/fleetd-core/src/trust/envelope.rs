//! The JWS general JSON serialization (RFC 7515 §7.2.1) as this project
//! restricts it: ES256 only, `kid` required, no `crit`, no unprotected `alg`/`kid`.

use super::keys::SigningKey;
use super::{b64url_decode, b64url_encode, VerifyError};
use serde::{Deserialize, Serialize};

/// Inputs larger than this are refused before any parsing.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub payload: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub protected: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<serde_json::Map<String, serde_json::Value>>,
    pub signature: String,
}

/// A decoded protected header. Duplicate members are a parse error.
#[derive(Debug, Deserialize)]
struct ProtectedHeader {
    alg: Option<serde_json::Value>,
    kid: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

/// One signature after its header passed the checks: the kid it claims, the
/// bytes it signs, and the raw signature.
#[derive(Debug)]
pub(crate) struct CheckedSignature {
    pub kid: String,
    pub signing_input: Vec<u8>,
    pub signature: Vec<u8>,
}

impl Envelope {
    /// Parses the outer JSON, refusing compact and flattened serializations
    /// with a message that says so.
    pub fn parse(input: &[u8]) -> Result<Self, VerifyError> {
        if input.len() > MAX_MESSAGE_BYTES {
            return Err(VerifyError::TooLarge { limit: MAX_MESSAGE_BYTES });
        }
        let text =
            std::str::from_utf8(input).map_err(|_| VerifyError::Malformed("message is not UTF-8".into()))?;
        let trimmed = text.trim();
        if !trimmed.starts_with('{') {
            if trimmed.split('.').count() == 3 {
                return Err(VerifyError::Malformed(
                    "compact serialization is not accepted; use the general JSON serialization".into(),
                ));
            }
            return Err(VerifyError::Malformed("message is not a JSON object".into()));
        }
        // serde_json stops at 128 levels of nesting, so hostile depth is an
        // error, not a stack overflow.
        let value: serde_json::Value = serde_json::from_str(trimmed)
            .map_err(|e| VerifyError::Malformed(describe_json_error("message", &e, None)))?;
        if let Some(obj) = value.as_object() {
            if obj.contains_key("signature") || obj.contains_key("protected") {
                return Err(VerifyError::Malformed(
                    "flattened serialization is not accepted; use the general JSON serialization".into(),
                ));
            }
        }
        // Typed from the text, not the Value: a Value keeps only the last of
        // two `payload` (or `signatures`) members, the derive refuses both.
        drop(value);
        parse_typed(trimmed.as_bytes(), "envelope")
    }

    pub fn to_json(&self) -> String {
        // Serializing plain strings and maps cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// A new envelope over `claims_json`, with no signature yet.
    pub fn new(claims_json: &[u8]) -> Self {
        Self { payload: b64url_encode(claims_json), signatures: Vec::new() }
    }

    /// Adds one ES256 signature by `key` under `kid`.
    pub fn add_signature(&mut self, key: &SigningKey, kid: &str) -> Result<(), super::KeyError> {
        let header = serde_json::json!({ "alg": "ES256", "kid": kid });
        let protected = b64url_encode(header.to_string().as_bytes());
        let input = format!("{protected}.{}", self.payload);
        let sig = key.sign(input.as_bytes())?;
        self.signatures.push(Signature { protected, header: None, signature: b64url_encode(&sig) });
        Ok(())
    }

    /// The kids this envelope claims to be signed by, in order (unchecked).
    pub fn kids(&self) -> Vec<String> {
        self.signatures.iter().filter_map(|s| check_header(s, "").ok().map(|c| c.kid)).collect()
    }

    pub(crate) fn checked_signatures(&self) -> Result<Vec<CheckedSignature>, VerifyError> {
        // The payload's encoding is checked first so that padding is reported
        // as malformed rather than as a signature that fails to verify.
        self.payload_bytes()?;
        if self.signatures.is_empty() {
            return Err(VerifyError::Malformed("no signatures".into()));
        }
        self.signatures.iter().map(|s| check_header(s, &self.payload)).collect()
    }

    pub fn payload_bytes(&self) -> Result<Vec<u8>, VerifyError> {
        b64url_decode(&self.payload)
            .ok_or_else(|| VerifyError::Malformed("payload is not unpadded base64url".into()))
    }
}

/// Parses JSON into `T` with serde_json's depth limit applied to every value,
/// including members `T` ignores (skipped values are otherwise unbounded),
/// and with duplicate members of `T` refused. `what` names the part in the
/// error, which says where and never quotes the input.
pub(crate) fn parse_bounded<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, VerifyError> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .map_err(|e| VerifyError::Malformed(describe_json_error(what, &e, None)))?;
    parse_typed(bytes, what)
}

fn parse_typed<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, VerifyError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| VerifyError::Malformed(describe_json_error(what, e.inner(), Some(e.path()))))?;
    de.end().map_err(|e| VerifyError::Malformed(describe_json_error(what, &e, None)))?;
    Ok(value)
}

/// An error about JSON that may be anything (a token, a key, a password
/// file named by mistake): serde's own texts quote values and unknown
/// member names, so the text here is built from the position, the kind of
/// error, and the path through the schema's own field names only.
fn describe_json_error(
    what: &str,
    e: &serde_json::Error,
    path: Option<&serde_path_to_error::Path>,
) -> String {
    use serde_json::error::Category;
    let at = format!("line {} column {}", e.line(), e.column());
    match e.classify() {
        Category::Eof => format!("{what}: the JSON ends early ({at})"),
        Category::Syntax | Category::Io => format!("{what}: not valid JSON, or nested too deeply ({at})"),
        Category::Data => {
            let place =
                path.map(schema_path).filter(|p| !p.is_empty()).unwrap_or_else(|| "the top level".into());
            format!("{what}: {place} does not fit the format (a wrong type, or a missing, unknown or repeated member; {at})")
        }
    }
}

/// `target.hardware`, `signatures[1].protected`: member names the input
/// chose are shown only when the format itself has a field of that name.
fn schema_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let known = schema_field_names();
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } if known.contains(&key.as_str()) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Map { .. } | Segment::Enum { .. } | Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    if out.is_empty() {
        out
    } else {
        format!("`{out}`")
    }
}

/// Every field name of the message's types, asked of the types themselves
/// (so a field added later is known without a list to keep).
fn schema_field_names() -> Vec<&'static str> {
    use super::claims::{Claims, Image, Target};
    let mut names = Vec::new();
    names.extend(fields_of::<Envelope>());
    names.extend(fields_of::<Signature>());
    names.extend(fields_of::<ProtectedHeader>());
    names.extend(fields_of::<Claims>());
    names.extend(fields_of::<Target>());
    names.extend(fields_of::<Image>());
    names
}

/// The field names a derived `Deserialize` for a struct asks for.
fn fields_of<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    struct Introspect<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Introspect<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("fields taken"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Introspect(&mut fields));
    fields
}

/// Registered JWS algorithm names (RFC 7518 and RFC 8037): shown in an
/// `alg-rejected` error; any other value is not quoted.
const JWS_ALGORITHMS: &[&str] = &[
    "none", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256",
    "PS384", "PS512", "EdDSA", "ES256K",
];

fn check_header(sig: &Signature, payload: &str) -> Result<CheckedSignature, VerifyError> {
    if let Some(unprotected) = &sig.header {
        for name in ["alg", "kid", "crit"] {
            if unprotected.contains_key(name) {
                return Err(VerifyError::HeaderRejected(format!(
                    "unprotected header names {name:?}; it must be in the protected header"
                )));
            }
        }
    }
    let raw = b64url_decode(&sig.protected)
        .ok_or_else(|| VerifyError::Malformed("protected header is not unpadded base64url".into()))?;
    let header: ProtectedHeader = parse_bounded(&raw, "protected header")?;
    match &header.alg {
        Some(serde_json::Value::String(alg)) if alg == "ES256" => {}
        Some(serde_json::Value::String(alg)) if JWS_ALGORITHMS.contains(&alg.as_str()) => {
            return Err(VerifyError::AlgRejected(alg.clone()))
        }
        Some(serde_json::Value::String(_)) => return Err(VerifyError::AlgRejected("<unregistered>".into())),
        Some(_) => return Err(VerifyError::AlgRejected("<not a string>".into())),
        None => return Err(VerifyError::AlgRejected("<missing>".into())),
    }
    if header.crit.is_some() {
        return Err(VerifyError::HeaderRejected("crit is not supported".into()));
    }
    let kid = match header.kid {
        Some(serde_json::Value::String(kid)) => kid,
        _ => return Err(VerifyError::Malformed("protected header has no string kid".into())),
    };
    let signature = b64url_decode(&sig.signature)
        .ok_or_else(|| VerifyError::Malformed("signature is not unpadded base64url".into()))?;
    let mut signing_input = Vec::with_capacity(sig.protected.len() + 1 + payload.len());
    signing_input.extend_from_slice(sig.protected.as_bytes());
    signing_input.push(b'.');
    signing_input.extend_from_slice(payload.as_bytes());
    Ok(CheckedSignature { kid, signing_input, signature })
}
