//! `fw_env.config`, read as libubootenv reads it. No IO.

use super::{BACKEND, MAX_ENV_SIZE, MIN_ENV_SIZE};
use crate::boot::BootError;
use std::path::{Path, PathBuf};

/// Where one copy of the environment lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvCopy {
    pub device: PathBuf,
    pub offset: u64,
    pub env_size: usize,
    /// Erase-block geometry; only MTD devices use it, kept for completeness.
    pub sector_size: Option<u64>,
    pub sectors: Option<u64>,
}

/// The parsed `fw_env.config`: one copy, or two for a redundant environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwEnvConfig {
    pub copies: Vec<EnvCopy>,
}

impl FwEnvConfig {
    pub fn redundant(&self) -> bool {
        self.copies.len() == 2
    }

    pub fn env_size(&self) -> usize {
        self.copies.first().map_or(0, |c| c.env_size)
    }
}

/// Parses `DEVICE OFFSET ENVSIZE [SECTORSIZE [NUMSECTORS]]` lines; `#`
/// starts a comment. Numbers are read as fw_printenv reads them, so both
/// agree on every config: OFFSET is C's `%lli` (`0x` hex, leading `0` octal,
/// else decimal); the sizes are always hex, with or without `0x`.
pub fn parse_fw_env_config(text: &str) -> Result<FwEnvConfig, BootError> {
    let mut copies: Vec<EnvCopy> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.split('#').next().unwrap_or_default();
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let bad = |why: String| BootError::Config {
            backend: BACKEND,
            detail: format!("fw_env.config line {line_no}: {why}: {:?}", raw.trim()),
        };
        if copies.len() == 2 {
            return Err(bad("more than two copies".into()));
        }
        let [device, offset, env_size, rest @ ..] = fields.as_slice() else {
            return Err(bad("expected DEVICE OFFSET ENVSIZE".into()));
        };
        if rest.len() > 2 {
            return Err(bad("more fields than DEVICE OFFSET ENVSIZE SECTORSIZE NUMSECTORS".into()));
        }
        if !device.starts_with('/') {
            // fw_printenv resolves a relative path against its working directory.
            return Err(bad("the device path must be absolute".into()));
        }
        if device.starts_with("/dev/mtd") || device.starts_with("/dev/ubi") {
            return Err(bad("MTD and UBI devices need erase handling; use a block device or file".into()));
        }
        let offset = parse_c_integer(offset).ok_or_else(|| bad(format!("bad OFFSET {offset:?}")))?;
        let env_size = parse_hex(env_size)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad(format!("bad ENVSIZE {env_size:?}")))?;
        if !(MIN_ENV_SIZE..=MAX_ENV_SIZE).contains(&env_size) {
            return Err(bad(format!(
                "ENVSIZE {env_size:#x} is outside {MIN_ENV_SIZE:#x}..={MAX_ENV_SIZE:#x}"
            )));
        }
        let optional = |field: Option<&&str>, what: &str| match field {
            None => Ok(None),
            Some(text) => parse_hex(text).map(Some).ok_or_else(|| bad(format!("bad {what} {text:?}"))),
        };
        let sector_size = optional(rest.first(), "SECTORSIZE")?;
        let sectors = optional(rest.get(1), "NUMSECTORS")?;
        if let Some(first) = copies.first() {
            if first.env_size != env_size {
                return Err(bad("both copies must have the same ENVSIZE".into()));
            }
            let end = |c: u64, size: usize| c.saturating_add(size as u64);
            let overlaps = first.device == Path::new(device)
                && first.offset < end(offset, env_size)
                && offset < end(first.offset, first.env_size);
            if overlaps {
                return Err(bad("the two copies overlap".into()));
            }
        }
        copies.push(EnvCopy { device: PathBuf::from(device), offset, env_size, sector_size, sectors });
    }
    if copies.is_empty() {
        return Err(BootError::Config {
            backend: BACKEND,
            detail: "fw_env.config names no environment".into(),
        });
    }
    Ok(FwEnvConfig { copies })
}

/// C's `strtoll(s, NULL, 0)` for a whole, non-negative token.
pub(super) fn parse_c_integer(text: &str) -> Option<u64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        parse_digits(hex, 16)
    } else if let Some(octal) = text.strip_prefix('0').filter(|rest| !rest.is_empty()) {
        parse_digits(octal, 8)
    } else {
        parse_digits(text, 10)
    }
}

/// C's `%x`: hex digits with an optional `0x`.
pub(super) fn parse_hex(text: &str) -> Option<u64> {
    let digits = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")).unwrap_or(text);
    parse_digits(digits, 16)
}

pub(super) fn parse_digits(digits: &str, radix: u32) -> Option<u64> {
    // from_str_radix accepts a sign; C's conversions here must not see one.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_single_and_redundant() {
        let single = parse_fw_env_config("/dev/mmcblk0 0x400000 0x4000\n").unwrap();
        assert!(!single.redundant());
        assert_eq!(
            single.copies,
            vec![EnvCopy {
                device: "/dev/mmcblk0".into(),
                offset: 0x40_0000,
                env_size: 0x4000,
                sector_size: None,
                sectors: None,
            }]
        );
        let text = "# eMMC, two copies\n\n  # indented comment\n\
                    /dev/mmcblk0\t0x3F0000 0x10000 0x10000 1 # first\n\
                    /dev/mmcblk0 4194304 10000\n";
        let redundant = parse_fw_env_config(text).unwrap();
        assert!(redundant.redundant());
        assert_eq!(redundant.env_size(), 0x10000);
        assert_eq!(redundant.copies[0].sector_size, Some(0x10000));
        assert_eq!(redundant.copies[0].sectors, Some(1));
        assert_eq!(redundant.copies[1].offset, 4_194_304);
    }

    #[test]
    fn config_numbers_read_as_fw_printenv_reads_them() {
        let copy = |line: &str| parse_fw_env_config(line).unwrap().copies[0].clone();
        // OFFSET: strtoll base 0.
        assert_eq!(copy("/f 0 0x100").offset, 0);
        assert_eq!(copy("/f 0x20 0x100").offset, 0x20);
        assert_eq!(copy("/f 0X20 0x100").offset, 0x20);
        assert_eq!(copy("/f 020 0x100").offset, 0o20);
        assert_eq!(copy("/f 20 0x100").offset, 20);
        // Sizes: always hex.
        assert_eq!(copy("/f 0 100").env_size, 0x100);
        assert_eq!(copy("/f 0 2000 1000 2").sector_size, Some(0x1000));
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let text = include_str!("../../../packaging/boot/uboot/fw_env.config.example");
        let config = parse_fw_env_config(text).unwrap();
        assert!(config.redundant());
        assert_eq!(config.env_size(), 0x4000);
        assert_eq!(config.copies[1].offset, 0x3F_C000);
    }

    #[test]
    fn config_errors_name_the_line() {
        for (text, line, why) in [
            ("/f 0\n", 1, "expected DEVICE OFFSET ENVSIZE"),
            ("# c\n/f 0 0x100\n/f zz 0x100\n", 3, "bad OFFSET"),
            ("/f -1 0x100\n", 1, "bad OFFSET"),
            ("/f 0 0x1g0\n", 1, "bad ENVSIZE"),
            ("/f 0 +100\n", 1, "bad ENVSIZE"),
            ("/f 0 0x4\n", 1, "outside"),
            ("/f 0 0x100 0x100 1 0 9\n", 1, "more fields"),
            ("/f 0 0x100 0x100 x\n", 1, "bad NUMSECTORS"),
            ("rel/f 0 0x100\n", 1, "absolute"),
            ("/dev/mtd1 0 0x100\n", 1, "MTD"),
            ("/dev/ubi0:env 0 0x100\n", 1, "MTD"),
            ("/f 0 0x100\n/g 0 0x200\n", 2, "same ENVSIZE"),
            ("/f 0 0x100\n/f 0x80 0x100\n", 2, "overlap"),
            ("/f 0 0x100\n/g 0 0x100\n/h 0 0x100\n", 3, "more than two"),
        ] {
            let err = parse_fw_env_config(text).unwrap_err();
            let message = err.to_string();
            assert_eq!(err.name(), "boot-config");
            assert!(message.contains(&format!("line {line}:")), "{text:?}: {message}");
            assert!(message.contains(why), "{text:?}: {message}");
        }
        assert!(parse_fw_env_config("# nothing\n\n").is_err());
        // Adjacent copies in one file are fine.
        assert!(parse_fw_env_config("/f 0 0x100\n/f 0x100 0x100\n").is_ok());
    }
}
