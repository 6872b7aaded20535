//! The proof of possession (PoP): a per-device secret printed on the label,
//! 80 bits as 16 Crockford base-32 characters (`K7M2-Q9XD-4T0B-HR6W`).
//!
//! Everything a neighbour would need is derived from it with HMAC-SHA256
//! under distinct labels, so one value never serves two purposes:
//! - the access point's WPA2 passphrase (a neighbour cannot even associate);
//! - the key that authenticates each API request.
//!
//! Pure: randomness and the device id are passed in.

use ring::hmac;

/// Bytes of secret: 80 bits.
pub const POP_BYTES: usize = 10;
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The secret. `Debug` never shows it; `display_code` is for the label only.
#[derive(Clone, PartialEq, Eq)]
pub struct Pop([u8; POP_BYTES]);

impl std::fmt::Debug for Pop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pop(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PopError {
    #[error("pop-malformed: a proof of possession is 16 characters of 0-9 and A-Z (no I, L, O, U), got {0}")]
    Malformed(String),
}

/// 80 random bits from the system: a PoP's or a claim code's.
pub fn random_code() -> Result<[u8; POP_BYTES], ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; POP_BYTES];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(bytes)
}

impl Pop {
    pub fn from_bytes(bytes: [u8; POP_BYTES]) -> Self {
        Self(bytes)
    }

    /// A new secret from the system's randomness.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        random_code().map(Self)
    }

    /// Parses a code as people type it (see [`parse_code`]).
    pub fn parse(text: &str) -> Result<Self, PopError> {
        parse_code(text).map(Self).map_err(PopError::Malformed)
    }

    /// The code for the label: four groups of four.
    pub fn display_code(&self) -> String {
        display_code(&self.0)
    }

    pub(crate) fn derive(&self, label: &str, context: &[u8]) -> hmac::Tag {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context);
        ctx.sign()
    }

    /// The access point's WPA2 passphrase: 24 characters (120 bits of the
    /// HMAC) in the same alphabet, so a phone user can type it too.
    pub fn ap_passphrase(&self, device_id: &str) -> String {
        let tag = self.derive("fleetd ap passphrase v1", device_id.as_bytes());
        let mut value: u128 = 0;
        for b in &tag.as_ref()[..15] {
            value = (value << 8) | u128::from(*b);
        }
        (0..24).rev().map(|i| ALPHABET[((value >> (5 * i)) & 31) as usize] as char).collect()
    }

    /// The key that authenticates API requests (never the PoP itself).
    pub fn request_key(&self, device_id: &str) -> hmac::Key {
        let tag = self.derive("fleetd api request key v1", device_id.as_bytes());
        hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref())
    }
}

/// Parses an 80-bit code as people type it: any case, dashes and spaces
/// ignored, `O` read as 0 and `I`/`L` as 1 (Crockford's rules). The error
/// says what is wrong, for the caller's named error.
pub fn parse_code(text: &str) -> Result<[u8; POP_BYTES], String> {
    let mut value: u128 = 0;
    let mut count = 0;
    for c in text.chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' => continue,
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        };
        let digit = ALPHABET.iter().position(|a| *a as char == c).ok_or_else(|| format!("a {c:?}"))?;
        count += 1;
        if count > 16 {
            return Err("more than 16 characters".into());
        }
        value = (value << 5) | digit as u128;
    }
    if count != 16 {
        return Err(format!("{count} characters"));
    }
    let bytes = value.to_be_bytes();
    let mut code = [0u8; POP_BYTES];
    code.copy_from_slice(&bytes[16 - POP_BYTES..]);
    Ok(code)
}

/// An 80-bit code as people read it: four groups of four.
pub fn display_code(bytes: &[u8; POP_BYTES]) -> String {
    let mut value: u128 = 0;
    for b in bytes {
        value = (value << 8) | u128::from(*b);
    }
    let mut chars = Vec::with_capacity(19);
    for i in (0..16).rev() {
        chars.push(ALPHABET[((value >> (5 * i)) & 31) as usize] as char);
        if i % 4 == 0 && i > 0 {
            chars.push('-');
        }
    }
    chars.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_read_as_people_type_them() {
        for seed in 0u8..50 {
            let pop = Pop::from_bytes(std::array::from_fn(|i| {
                seed.wrapping_mul(37).wrapping_add((i as u8).wrapping_mul(91))
            }));
            let code = pop.display_code();
            assert_eq!(code.len(), 19, "{code}");
            assert_eq!(Pop::parse(&code).unwrap(), pop);
            assert_eq!(Pop::parse(&code.to_lowercase().replace('-', " ")).unwrap(), pop);
        }
        let ones = Pop::parse("1111-1111-1111-1111").unwrap();
        assert_eq!(Pop::parse("iIlL-1111-1111-1111").unwrap(), ones);
        assert_eq!(Pop::parse("0000-0000-0000-0000").unwrap(), Pop::parse("oOoO-0000-0000-0000").unwrap());
    }

    #[test]
    fn malformed_codes_are_named() {
        for bad in
            ["", "1111-1111-1111", "1111-1111-1111-1111-1", "1111-1111-1111-111U", "1111-1111-1111-111!"]
        {
            let err = Pop::parse(bad).unwrap_err();
            assert!(err.to_string().starts_with("pop-malformed"), "{bad}: {err}");
        }
    }

    #[test]
    fn generated_codes_differ_and_debug_hides_them() {
        let a = Pop::generate().unwrap();
        let b = Pop::generate().unwrap();
        assert_ne!(a, b);
        let code = a.display_code();
        assert!(!format!("{a:?}").contains(&code));
        assert_eq!(format!("{a:?}"), "Pop(<redacted>)");
    }

    #[test]
    fn derived_values_are_distinct_per_purpose_and_per_device() {
        let pop = Pop::from_bytes([7; POP_BYTES]);
        let psk = pop.ap_passphrase("gw-0042");
        assert_eq!(psk.len(), 24);
        assert!((8..=63).contains(&psk.len()), "a WPA2 passphrase is 8-63 characters");
        assert_eq!(psk, pop.ap_passphrase("gw-0042"), "stable");
        assert_ne!(psk, pop.ap_passphrase("gw-0043"));
        assert!(!psk.contains(&pop.display_code().replace('-', "")), "the PSK does not reveal the PoP");
        let tag = hmac::sign(&pop.request_key("gw-0042"), b"x");
        assert!(hmac::verify(&pop.request_key("gw-0042"), b"x", tag.as_ref()).is_ok());
        assert!(hmac::verify(&pop.request_key("gw-0043"), b"x", tag.as_ref()).is_err());
    }
}
