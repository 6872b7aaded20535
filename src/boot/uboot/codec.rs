//! One copy of the environment block: encode, decode, CRC-32, and which
//! of two redundant copies is current. No IO.

use super::{BACKEND, CRC_LEN, FLAGS_LEN};
use crate::boot::BootError;
use std::collections::BTreeMap;

/// An environment's variables in the byte-wise order U-Boot and libubootenv
/// write them. Bytes, not strings: variables fleetd does not own are carried
/// through unchanged whatever they contain.
pub type Vars = BTreeMap<Vec<u8>, Vec<u8>>;

/// One decoded copy: its flags byte (redundant layout only) and variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub flags: Option<u8>,
    pub vars: Vars,
}

/// Bytes before the variable data: the CRC, and the flags byte when redundant.
pub fn header_len(redundant: bool) -> usize {
    if redundant {
        CRC_LEN + FLAGS_LEN
    } else {
        CRC_LEN
    }
}

pub(super) const CRC_TABLE: [u32; 256] = crc_table();

pub(super) const fn crc_table() -> [u32; 256] {
    // Reflected IEEE polynomial, as zlib's crc32() that libubootenv calls.
    const POLY: u32 = 0xEDB8_8320;
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// The IEEE CRC-32 (zlib's `crc32(0, ...)`).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Encodes `vars` as one copy of `env_size` bytes; `flags` is `Some` for the
/// redundant layout.
pub fn encode_block(vars: &Vars, env_size: usize, flags: Option<u8>) -> Result<Vec<u8>, BootError> {
    let header = header_len(flags.is_some());
    let data_len = env_size.saturating_sub(header);
    let mut data = Vec::with_capacity(data_len);
    for (name, value) in vars {
        check_var(name, value)?;
        data.extend_from_slice(name);
        data.push(b'=');
        data.extend_from_slice(value);
        data.push(0);
    }
    data.push(0);
    if data.len() > data_len {
        return Err(BootError::Config {
            backend: BACKEND,
            detail: format!(
                "the environment needs {} bytes but ENVSIZE {env_size:#x} leaves {data_len}",
                data.len()
            ),
        });
    }
    data.resize(data_len, 0);
    let mut block = Vec::with_capacity(env_size);
    block.extend_from_slice(&crc32(&data).to_le_bytes());
    if let Some(flags) = flags {
        block.push(flags);
    }
    block.extend_from_slice(&data);
    Ok(block)
}

/// Decodes one copy. A CRC mismatch, a block too short for its header or an
/// unterminated variable list is `Corrupt`; entries without `=` or with an
/// empty name are skipped, and a repeated name keeps its last value, as
/// libubootenv does.
pub fn decode_block(block: &[u8], redundant: bool) -> Result<Block, BootError> {
    let header = header_len(redundant);
    let (Some(crc_bytes), Some(data)) = (block.get(..CRC_LEN), block.get(header..)) else {
        return Err(too_short(block.len()));
    };
    if data.is_empty() {
        return Err(too_short(block.len()));
    }
    let mut stored = [0u8; CRC_LEN];
    stored.copy_from_slice(crc_bytes);
    let stored = u32::from_le_bytes(stored);
    let computed = crc32(data);
    if stored != computed {
        return Err(corrupt(format!("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")));
    }
    let flags = if redundant { block.get(CRC_LEN).copied() } else { None };
    Ok(Block { flags, vars: parse_vars(data)? })
}

pub(super) fn too_short(len: usize) -> BootError {
    corrupt(format!("a copy of {len} bytes has no room for variables"))
}

pub(super) fn parse_vars(data: &[u8]) -> Result<Vars, BootError> {
    let mut vars = Vars::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(corrupt("the variable list is not NUL-terminated".into()));
        };
        let (entry, tail) = rest.split_at(end);
        if entry.is_empty() {
            break; // the empty entry: end of the list
        }
        if let Some(eq) = entry.iter().position(|&b| b == b'=') {
            let (name, value) = entry.split_at(eq);
            if !name.is_empty() {
                vars.insert(name.to_vec(), value.get(1..).unwrap_or_default().to_vec());
            }
        }
        rest = tail.get(1..).unwrap_or_default();
    }
    Ok(vars)
}

pub(super) fn check_var(name: &[u8], value: &[u8]) -> Result<(), BootError> {
    let problem = if name.is_empty() {
        Some("an empty variable name")
    } else if name.contains(&b'=') {
        Some("'=' in a variable name")
    } else if name.contains(&0) || value.contains(&0) {
        Some("a NUL byte in a variable")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(BootError::Config {
            backend: BACKEND,
            detail: format!("cannot store {problem}: {:?}", String::from_utf8_lossy(name)),
        }),
        None => Ok(()),
    }
}

/// Which of two valid redundant copies is current, from their flags bytes:
/// the higher counter, except that 0 follows 0xff; equal counters pick copy
/// 0. This is libubootenv's rule for files, block devices, NAND and UBI,
/// and U-Boot's own.
pub fn current_copy(flags0: u8, flags1: u8) -> usize {
    match (flags0, flags1) {
        (0xff, 0) => 1,
        (0, 0xff) => 0,
        (f0, f1) if f1 > f0 => 1,
        _ => 0,
    }
}

/// The flags byte for the copy written after one whose flags are `current`.
pub fn next_flags(current: u8) -> u8 {
    current.wrapping_add(1)
}

pub(super) fn corrupt(detail: String) -> BootError {
    BootError::Corrupt { backend: BACKEND, detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::uboot::tests::{raw_block, vars, SIZE};

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(&[0u8; 32]), 0x190A_55AD);
    }

    #[test]
    fn single_copy_layout_is_crc_then_data_padded_with_zeros() {
        let block = encode_block(&vars(&[("b", "xy"), ("a", "1")]), 32, None).unwrap();
        let mut data = b"a=1\0b=xy\0\0".to_vec();
        data.resize(28, 0);
        assert_eq!(block.len(), 32);
        assert_eq!(&block[..4], &crc32(&data).to_le_bytes());
        assert_eq!(&block[4..], &data[..]);
    }

    #[test]
    fn redundant_layout_has_the_flags_byte_after_the_crc() {
        let block = encode_block(&vars(&[("a", "1")]), 32, Some(7)).unwrap();
        let mut data = b"a=1\0\0".to_vec();
        data.resize(27, 0);
        assert_eq!(&block[..4], &crc32(&data).to_le_bytes());
        assert_eq!(block[4], 7);
        assert_eq!(&block[5..], &data[..]);
    }

    #[test]
    fn codec_round_trips_any_bytes_in_values() {
        let mut original =
            vars(&[("bootcmd", "run distro_bootcmd; echo a=b"), ("BOOT_ORDER", "A B"), ("empty", "")]);
        original.insert(b"binary".to_vec(), vec![0xff, 0x01, b'=', 0x80]);
        for flags in [None, Some(0), Some(0xff)] {
            let block = encode_block(&original, SIZE, flags).unwrap();
            let decoded = decode_block(&block, flags.is_some()).unwrap();
            assert_eq!(decoded, Block { flags, vars: original.clone() });
        }
        let empty = encode_block(&Vars::new(), SIZE, None).unwrap();
        assert_eq!(decode_block(&empty, false).unwrap().vars, Vars::new());
    }

    #[test]
    fn a_wrong_crc_is_corrupt() {
        let mut block = encode_block(&vars(&[("a", "1")]), SIZE, None).unwrap();
        block[SIZE - 1] ^= 0x80; // padding is covered too
        let err = decode_block(&block, false).unwrap_err();
        assert_eq!(err.name(), "boot-env-corrupt");
        assert!(err.to_string().contains("CRC mismatch"), "{err}");
    }

    #[test]
    fn decode_skips_entries_without_a_name_and_keeps_the_last_duplicate() {
        let block = raw_block(b"a=1\0junk\0=x\0a=2\0b=\0\0c=ignored\0", 64, None);
        let decoded = decode_block(&block, false).unwrap();
        assert_eq!(decoded.vars, vars(&[("a", "2"), ("b", "")]));
    }

    #[test]
    fn decode_accepts_a_list_that_ends_at_the_end_of_the_copy() {
        let data = b"a=1\0bb=22\0";
        let block = raw_block(data, 4 + data.len(), None);
        assert_eq!(decode_block(&block, false).unwrap().vars, vars(&[("a", "1"), ("bb", "22")]));
    }

    #[test]
    fn an_unterminated_list_or_a_short_block_is_corrupt() {
        let block = raw_block(b"a=1\0bcdefgh", 4 + 11, None);
        let err = decode_block(&block, false).unwrap_err();
        assert!(err.to_string().contains("NUL-terminated"), "{err}");
        for short in [&[][..], &[1, 2, 3], &[1, 2, 3, 4]] {
            assert!(decode_block(short, true).is_err());
        }
        assert!(decode_block(&[0, 0, 0, 0], false).is_err(), "CRC of nothing is 0");
    }

    #[test]
    fn decoding_garbage_never_panics() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let len = (next() % 80) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| (next() % 4) as u8 * 0x3d).collect();
            if round % 2 == 0 && bytes.len() > 5 {
                // Fix the CRC so the variable parser sees the garbage too.
                let crc = crc32(&bytes[5..]).to_le_bytes();
                bytes[..4].copy_from_slice(&crc);
                let _ = decode_block(&bytes, true);
                let crc = crc32(&bytes[4..]).to_le_bytes();
                bytes[..4].copy_from_slice(&crc);
            }
            let _ = decode_block(&bytes, false);
            let _ = decode_block(&bytes, true);
        }
    }

    #[test]
    fn encode_refuses_what_cannot_be_stored() {
        let err = encode_block(&vars(&[("a", &"x".repeat(SIZE))]), SIZE, None).unwrap_err();
        assert_eq!(err.name(), "boot-config");
        for (name, value) in [("", "v"), ("a=b", "v"), ("a\0", "v"), ("a", "v\0")] {
            let err = encode_block(&vars(&[(name, value)]), SIZE, None).unwrap_err();
            assert_eq!(err.name(), "boot-config", "{name:?}={value:?}");
        }
        // Exactly full: the variable, its NUL and the terminator.
        let fits = vars(&[("a", &"x".repeat(SIZE - 4 - 4))]);
        assert!(encode_block(&fits, SIZE, None).is_ok());
        assert!(encode_block(&fits, SIZE, Some(0)).is_err());
    }

    #[test]
    fn the_higher_counter_is_current_and_zero_follows_ff() {
        for (flags0, flags1, current) in [
            (0, 0, 0),
            (5, 5, 0),
            (1, 0, 0),
            (0, 1, 1),
            (5, 6, 1),
            (0xfe, 0xff, 1),
            (0xff, 0, 1),
            (0, 0xff, 0),
            (0xff, 1, 0),
            (0x80, 0, 0),
        ] {
            assert_eq!(current_copy(flags0, flags1), current, "{flags0:#x} {flags1:#x}");
        }
        assert_eq!(next_flags(0), 1);
        assert_eq!(next_flags(0xff), 0);
    }
}
