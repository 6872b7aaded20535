//! The storage edge: reads every copy, picks the current one, writes the
//! next one (the other copy with the next counter, or the whole file by
//! rename).

use super::codec::*;
use super::fw_env::*;
use super::{BACKEND, MAX_CONFIG_BYTES};
use crate::boot::BootError;
use crate::fsutil;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

/// The environment as read: its variables and which copy they came from.
#[derive(Debug, Clone)]
pub(super) struct Loaded {
    pub(super) vars: Vars,
    pub(super) copy: usize,
    pub(super) flags: Option<u8>,
}

#[derive(Debug, Clone)]
pub(super) struct EnvStorage {
    pub(super) config: FwEnvConfig,
}

impl EnvStorage {
    pub(super) fn open(env_config: &Path) -> Result<Self, BootError> {
        let bytes = fsutil::read_capped(env_config, MAX_CONFIG_BYTES)
            .map_err(|source| io_error(env_config, source))?;
        let text = String::from_utf8(bytes).map_err(|_| BootError::Config {
            backend: BACKEND,
            detail: format!("{}: not UTF-8", env_config.display()),
        })?;
        let config = parse_fw_env_config(&text).map_err(|err| match err {
            BootError::Config { detail, .. } => {
                BootError::Config { backend: BACKEND, detail: format!("{}: {detail}", env_config.display()) }
            }
            other => other,
        })?;
        Ok(Self { config })
    }

    /// Reads every copy and returns the current valid one.
    pub(super) fn load(&self) -> Result<Loaded, BootError> {
        let redundant = self.config.redundant();
        let mut valid: Vec<(usize, Block)> = Vec::new();
        let mut problems: Vec<String> = Vec::new();
        for (index, copy) in self.config.copies.iter().enumerate() {
            let block = match read_copy(copy)? {
                Some(bytes) => decode_block(&bytes, redundant),
                None => Err(corrupt("the device ends before the copy does".into())),
            };
            match block {
                Ok(block) => valid.push((index, block)),
                Err(err) => problems.push(format!(
                    "copy {index} ({} at {:#x}): {}",
                    copy.device.display(),
                    copy.offset,
                    detail_of(&err)
                )),
            }
        }
        let chosen = match valid.as_slice() {
            [] => None,
            [_] => valid.pop(),
            [(_, first), (_, second)] => {
                let pick = current_copy(first.flags.unwrap_or(0), second.flags.unwrap_or(0));
                Some(valid.swap_remove(pick))
            }
            _ => None,
        };
        match chosen {
            Some((copy, block)) => Ok(Loaded { vars: block.vars, copy, flags: block.flags }),
            None => Err(corrupt(format!("no valid copy of the environment: {}", problems.join("; ")))),
        }
    }

    /// Writes `vars` as the environment that follows `current`: the other
    /// copy with the next counter when redundant, else the only copy.
    pub(super) fn store_after(&self, current: &Loaded, vars: &Vars) -> Result<(), BootError> {
        if self.config.redundant() {
            let target = 1 - current.copy.min(1);
            let flags = next_flags(current.flags.unwrap_or(0));
            self.write_copy(target, vars, Some(flags))
        } else {
            self.write_copy(0, vars, None)
        }
    }

    /// Writes a fresh environment whatever was there. Redundant: both copies,
    /// the second first, so that either outcome of a power cut is whole.
    pub(super) fn initialize(&self, vars: &Vars) -> Result<(), BootError> {
        if self.config.redundant() {
            self.write_copy(1, vars, Some(0))?;
            self.write_copy(0, vars, Some(1))
        } else {
            self.write_copy(0, vars, None)
        }
    }

    pub(super) fn write_copy(&self, index: usize, vars: &Vars, flags: Option<u8>) -> Result<(), BootError> {
        let Some(copy) = self.config.copies.get(index) else {
            return Err(BootError::Config {
                backend: BACKEND,
                detail: format!("no copy {index} in fw_env.config"),
            });
        };
        let block = encode_block(vars, copy.env_size, flags)?;
        let path = &copy.device;
        if flags.is_none() {
            if let Some(mode) = whole_file_mode(copy).map_err(|e| io_error(path, e))? {
                // The copy is the whole file: replace it, so a power cut leaves
                // the old or the new environment and never a mix.
                let target = fs::canonicalize(path).unwrap_or_else(|_| path.clone());
                return fsutil::atomic_write(&target, &block, mode).map_err(|e| io_error(&target, e));
            }
        }
        // A copy inside a larger file or a block device is written in place.
        // Redundant copies make that safe; a single copy on a block device
        // cannot be atomic (README: use two copies).
        let file = OpenOptions::new().write(true).open(path).map_err(|e| io_error(path, e))?;
        file.write_all_at(&block, copy.offset).and_then(|()| file.sync_all()).map_err(|e| io_error(path, e))
    }
}

/// `Some(mode)` when the copy is a whole regular file (offset 0, size equal
/// to ENVSIZE) or no file yet, so it can be replaced by rename.
pub(super) fn whole_file_mode(copy: &EnvCopy) -> io::Result<Option<u32>> {
    if copy.offset != 0 {
        return Ok(None);
    }
    match fs::metadata(&copy.device) {
        Ok(meta) if meta.is_file() && meta.len() == copy.env_size as u64 => {
            Ok(Some(meta.permissions().mode() & 0o7777))
        }
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(0o600)),
        Err(e) => Err(e),
    }
}

/// Reads one copy; `None` when the device ends before the copy does.
pub(super) fn read_copy(copy: &EnvCopy) -> Result<Option<Vec<u8>>, BootError> {
    let path = &copy.device;
    let file = fs::File::open(path).map_err(|e| io_error(path, e))?;
    let mut buf = vec![0u8; copy.env_size];
    match file.read_exact_at(&mut buf, copy.offset) {
        Ok(()) => Ok(Some(buf)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(io_error(path, e)),
    }
}

pub(super) fn io_error(path: &Path, source: io::Error) -> BootError {
    BootError::Io { backend: BACKEND, path: path.to_path_buf(), source }
}

pub(super) fn detail_of(err: &BootError) -> String {
    match err {
        BootError::Corrupt { detail, .. } | BootError::Config { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}

/// Writes a fresh environment holding exactly `vars`, replacing whatever the
/// storage holds: for provisioning and tests. [`UbootEnv`] never does this
/// on its own, because a fresh environment drops the board's variables.
pub fn initialize(env_config: &Path, vars: &[(&str, &str)]) -> Result<(), BootError> {
    let storage = EnvStorage::open(env_config)?;
    let vars: Vars =
        vars.iter().map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec())).collect();
    storage.initialize(&vars)
}

#[cfg(test)]
mod tests {
    use crate::boot::uboot::tests::{raw_block, vars, Fixture, SIZE};
    use crate::boot::uboot::UbootEnv;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn redundant_writes_alternate_copies_with_the_next_counter() {
        let fx = Fixture::new(true);
        let storage = fx.storage();
        storage.initialize(&vars(&[("n", "0")])).unwrap();
        assert_eq!(fx.flags(), (1, 0));
        let loaded = storage.load().unwrap();
        assert_eq!((loaded.copy, loaded.flags), (0, Some(1)));
        storage.store_after(&loaded, &vars(&[("n", "1")])).unwrap();
        assert_eq!(fx.flags(), (1, 2));
        let loaded = storage.load().unwrap();
        assert_eq!((loaded.copy, &loaded.vars), (1, &vars(&[("n", "1")])));
        storage.store_after(&loaded, &vars(&[("n", "2")])).unwrap();
        assert_eq!(fx.flags(), (3, 2));
        assert_eq!(storage.load().unwrap().vars, vars(&[("n", "2")]));
    }

    #[test]
    fn a_corrupt_newest_copy_falls_back_to_the_older_one() {
        let fx = Fixture::new(true);
        let storage = fx.storage();
        storage.initialize(&vars(&[("n", "old")])).unwrap();
        let loaded = storage.load().unwrap();
        storage.store_after(&loaded, &vars(&[("n", "new")])).unwrap();
        assert_eq!(fx.flags(), (1, 2));
        fx.flip_byte(SIZE + 5); // copy 1, the newest: a torn write
        let loaded = storage.load().unwrap();
        assert_eq!((loaded.copy, loaded.flags), (0, Some(1)));
        assert_eq!(loaded.vars, vars(&[("n", "old")]));
        // The next write replaces the broken copy, newer than the survivor.
        storage.store_after(&loaded, &vars(&[("n", "again")])).unwrap();
        assert_eq!(fx.flags(), (1, 2));
        assert_eq!(storage.load().unwrap().vars, vars(&[("n", "again")]));
    }

    #[test]
    fn the_counter_wraps_from_ff_to_zero() {
        let fx = Fixture::new(true);
        let mut bytes = raw_block(b"n=ff\0\0", SIZE, Some(0xff));
        bytes.extend(raw_block(b"n=zero\0\0", SIZE, Some(0)));
        fs::write(&fx.env, bytes).unwrap();
        let storage = fx.storage();
        let loaded = storage.load().unwrap();
        assert_eq!((loaded.copy, loaded.vars.clone()), (1, vars(&[("n", "zero")])));
        storage.store_after(&loaded, &vars(&[("n", "one")])).unwrap();
        assert_eq!(fx.flags(), (1, 0));
        assert_eq!(storage.load().unwrap().vars, vars(&[("n", "one")]));
    }

    #[test]
    fn no_valid_copy_is_corrupt_and_names_each_copy() {
        let fx = Fixture::new(true);
        let err = fx.storage().load().unwrap_err();
        let message = err.to_string();
        assert_eq!(err.name(), "boot-env-corrupt");
        assert!(message.contains("copy 0") && message.contains("copy 1"), "{message}");
        // A file too short for the second copy: that copy is invalid, not an error.
        fs::write(&fx.env, raw_block(b"a=1\0\0", SIZE, Some(4))).unwrap();
        let loaded = fx.storage().load().unwrap();
        assert_eq!((loaded.copy, loaded.vars), (0, vars(&[("a", "1")])));
    }

    #[test]
    fn a_single_copy_that_is_the_whole_file_is_replaced_atomically() {
        let fx = Fixture::new(false);
        let storage = fx.storage();
        storage.initialize(&vars(&[("a", "1")])).unwrap();
        fs::set_permissions(&fx.env, fs::Permissions::from_mode(0o640)).unwrap();
        let before = fs::metadata(&fx.env).unwrap();
        let loaded = storage.load().unwrap();
        storage.store_after(&loaded, &vars(&[("a", "2")])).unwrap();
        let after = fs::metadata(&fx.env).unwrap();
        assert_ne!(before.ino(), after.ino(), "renamed into place");
        assert_eq!(after.permissions().mode() & 0o777, 0o640);
        assert_eq!(after.len(), SIZE as u64);
        assert_eq!(storage.load().unwrap().vars, vars(&[("a", "2")]));
        let leftovers = fs::read_dir(fx.dir.path()).unwrap().count();
        assert_eq!(leftovers, 2, "env and config only");
    }

    #[test]
    fn a_single_copy_inside_a_larger_file_is_written_in_place() {
        let fx = Fixture::new(false);
        fs::write(&fx.config, format!("{} 0x40 {SIZE:#x}\n", fx.env.display())).unwrap();
        fs::write(&fx.env, vec![0xaa; 0x40 + SIZE + 0x10]).unwrap();
        let storage = fx.storage();
        storage.initialize(&vars(&[("a", "1")])).unwrap();
        let before = fs::metadata(&fx.env).unwrap();
        let loaded = storage.load().unwrap();
        storage.store_after(&loaded, &vars(&[("a", "2")])).unwrap();
        let after = fs::metadata(&fx.env).unwrap();
        assert_eq!(before.ino(), after.ino());
        let bytes = fs::read(&fx.env).unwrap();
        assert_eq!(&bytes[..0x40], &[0xaa; 0x40][..], "before the copy untouched");
        assert_eq!(&bytes[0x40 + SIZE..], &[0xaa; 0x10][..], "after it too");
        assert_eq!(storage.load().unwrap().vars, vars(&[("a", "2")]));
    }

    #[test]
    fn a_single_copy_that_can_only_be_written_in_place_is_refused_unless_opted_in() {
        let fx = Fixture::new(false);
        fs::write(&fx.config, format!("{} 0x40 {SIZE:#x}\n", fx.env.display())).unwrap();
        fs::write(&fx.env, vec![0xaa; 0x40 + SIZE + 0x10]).unwrap();
        fx.storage().initialize(&vars(&[("a", "1")])).unwrap();
        let slots = ["A".to_string(), "B".to_string()];
        let err = UbootEnv::open(&fx.config, &slots, 3).unwrap_err();
        assert_eq!(err.name(), "boot-config");
        assert!(err.to_string().contains("uboot_single_copy_in_place"), "{err}");
        assert!(UbootEnv::open_with(&fx.config, &slots, 3, true).is_ok());
        // The whole-file single copy (replaced by rename) needs no opt-in.
        let whole = Fixture::new(false);
        assert!(UbootEnv::open(&whole.config, &slots, 3).is_ok());
    }
}
