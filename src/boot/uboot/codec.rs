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
