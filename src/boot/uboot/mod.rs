//! U-Boot environment backend, native: fleetd reads and writes the same
//! environment block as U-Boot's `saveenv` and libubootenv's `fw_setenv`,
//! without running either. The variables are RAUC's, so a board prepared for
//! RAUC's U-Boot integration boots the same way under fleetd:
//!
//! - `BOOT_ORDER`: slot names separated by spaces, tried first to last;
//! - `BOOT_<slot>_LEFT`: boot attempts left for that slot.
//!
//! The boot script (`packaging/boot/uboot/boot.cmd`) spends one attempt per
//! boot; fleetd restores them when a slot is confirmed.
//!
//! Three layers, one file each: `codec` (one copy of the block, no IO) and
//! `fw_env` (`fw_env.config`, no IO); `storage` (picks the current copy and
//! writes the next one); and, here, [`UbootEnv`], which maps [`BootControl`]
//! onto the variables.
//!
//! # One copy of the environment
//!
//! `crc32 (4 bytes, little-endian) [flags (1 byte), redundant only] data`.
//! `data` is `name=value\0` per variable, then one more `\0`, padded with
//! `\0` to the end of the copy. The CRC is the IEEE CRC-32 of all of `data`,
//! padding included. U-Boot's `saveenv` pads with zeros; libubootenv leaves
//! whatever its buffer held (in practice the bytes it read), which every
//! reader accepts since the CRC covers them; fleetd pads with zeros.
//!
//! # Redundant copies
//!
//! With two lines in `fw_env.config`, each copy carries a flags byte. For
//! files and block devices libubootenv (and U-Boot) treat it as a counter:
//! of two valid copies the higher one is current, except that 0 follows
//! 0xff, and equal counters pick the first copy. A write goes to the other
//! copy with the counter plus one, so a torn write leaves the current copy
//! valid. (NOR flash uses an active/obsolete flag instead; MTD devices are
//! not supported here.)

mod codec;
mod fw_env;
mod storage;

pub use codec::*;
pub use fw_env::*;
pub use storage::initialize;
use storage::*;

use super::{BootControl, BootError, SlotState};
use std::path::Path;

pub(super) const BACKEND: &str = "uboot";

/// The variable holding the slot order.
pub const BOOT_ORDER: &str = "BOOT_ORDER";

/// The most attempts fleetd will configure. The boot script decrements with
/// `setexpr`, which reads and writes hex, while `test -gt` reads decimal:
/// the two agree only on single digits.
pub const MAX_ATTEMPTS: u32 = 9;

/// Larger than any real environment; bounds what a bad config can allocate.
pub(super) const MAX_ENV_SIZE: usize = 16 * 1024 * 1024;
/// Room for the header, one short variable and the terminator.
pub(super) const MIN_ENV_SIZE: usize = 16;
/// fw_env.config is a few lines; anything larger is not one.
pub(super) const MAX_CONFIG_BYTES: usize = 64 * 1024;

pub(super) const CRC_LEN: usize = 4;
pub(super) const FLAGS_LEN: usize = 1;

// ---------------------------------------------------------------------------
// BootControl over BOOT_ORDER and BOOT_<slot>_LEFT.
// ---------------------------------------------------------------------------

/// The boot chooser's variables as the boot script sees them. Where a
/// variable is missing or empty the script uses a default, and so does
/// this view: BOOT_ORDER → the configured slots in order, BOOT_x_LEFT →
/// the configured attempts. The shipped script must use the same defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chooser {
    /// BOOT_ORDER's words, including names fleetd does not know (kept as is).
    order: Vec<Vec<u8>>,
}

impl Chooser {
    fn read(vars: &Vars, slots: &[String]) -> Self {
        let words: Vec<Vec<u8>> = vars
            .get(BOOT_ORDER.as_bytes())
            .map(|v| {
                v.split(|b| *b == b' ' || *b == b'\t').filter(|w| !w.is_empty()).map(<[u8]>::to_vec).collect()
            })
            .unwrap_or_default();
        let order =
            if words.is_empty() { slots.iter().map(|s| s.as_bytes().to_vec()).collect() } else { words };
        Self { order }
    }

    fn contains(&self, slot: &str) -> bool {
        self.order.iter().any(|w| w == slot.as_bytes())
    }

    fn without(&self, slot: &str) -> Vec<Vec<u8>> {
        self.order.iter().filter(|w| *w != slot.as_bytes()).cloned().collect()
    }
}

fn left_var(slot: &str) -> Vec<u8> {
    format!("BOOT_{slot}_LEFT").into_bytes()
}

/// BOOT_<slot>_LEFT as the script's `test ... -gt 0` reads it: leading
/// decimal digits, anything else 0; missing or empty means the default.
fn attempts_left(vars: &Vars, slot: &str, default: u32) -> u32 {
    match vars.get(&left_var(slot)) {
        None => default,
        Some(value) if value.is_empty() => default,
        Some(value) => value
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .fold(0u32, |n, b| n.saturating_mul(10).saturating_add(u32::from(b - b'0'))),
    }
}

/// Sets BOOT_ORDER; an empty order removes it, as `fw_setenv BOOT_ORDER ""`
/// would (the script then falls back to its default order).
fn set_order(vars: &mut Vars, order: &[Vec<u8>]) {
    if order.is_empty() {
        vars.remove(BOOT_ORDER.as_bytes());
    } else {
        vars.insert(BOOT_ORDER.as_bytes().to_vec(), order.join(&b' '));
    }
}

/// The U-Boot boot chooser over a native environment.
#[derive(Debug)]
pub struct UbootEnv {
    storage: EnvStorage,
    slots: Vec<String>,
    attempts: u32,
}

impl UbootEnv {
    /// Reads `env_config` (fw_env.config syntax) and checks the slot names
    /// and attempts; the environment itself is read on each call.
    pub fn open(env_config: &Path, slots: &[String], attempts: u32) -> Result<Self, BootError> {
        Self::open_with(env_config, slots, attempts, false)
    }

    /// As `open`; `single_copy_in_place` accepts a single-copy environment
    /// inside a block device or a larger file, which can only be written in
    /// place: a power cut mid-write leaves no valid environment at all.
    pub fn open_with(
        env_config: &Path,
        slots: &[String],
        attempts: u32,
        single_copy_in_place: bool,
    ) -> Result<Self, BootError> {
        let config_error = |detail: String| BootError::Config { backend: BACKEND, detail };
        if !(1..=MAX_ATTEMPTS).contains(&attempts) {
            return Err(config_error(format!(
                "attempts {attempts}: U-Boot counts with setexpr in hex and compares in decimal; \
                 use 1..={MAX_ATTEMPTS}"
            )));
        }
        if slots.is_empty() {
            return Err(config_error("no slots".into()));
        }
        for (i, slot) in slots.iter().enumerate() {
            // The name becomes part of a variable name and a BOOT_ORDER word.
            let valid = !slot.is_empty() && slot.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(config_error(format!("slot name {slot:?}: use letters, digits and '_'")));
            }
            if slots[..i].contains(slot) {
                return Err(config_error(format!("slot {slot:?} is listed twice")));
            }
        }
        let storage = EnvStorage::open(env_config)?;
        if let [copy] = storage.config.copies.as_slice() {
            let replaceable = whole_file_mode(copy).map_err(|e| io_error(&copy.device, e))?.is_some();
            if !replaceable && !single_copy_in_place {
                return Err(config_error(format!(
                    "{}: one copy of the environment at {:#x} in {} can only be rewritten in place, and a \
                     power cut mid-write would leave none; add a second copy (redundant environment) or \
                     set boot.uboot_single_copy_in_place = true",
                    env_config.display(),
                    copy.offset,
                    copy.device.display()
                )));
            }
        }
        Ok(Self { storage, slots: slots.to_vec(), attempts })
    }

    /// Every variable of the current environment.
    pub fn read_vars(&self) -> Result<Vars, BootError> {
        Ok(self.storage.load()?.vars)
    }

    fn known(&self, slot: &str) -> Result<(), BootError> {
        if self.slots.iter().any(|s| s == slot) {
            Ok(())
        } else {
            Err(BootError::UnknownSlot { backend: BACKEND, slot: slot.to_string() })
        }
    }

    /// Reads, applies `change`, and stores the result as one write; nothing
    /// is written when the variables come out unchanged. A missing or
    /// corrupt environment is refused (`load` fails): writing a fresh one
    /// would drop the board's own variables.
    fn update(&mut self, change: impl FnOnce(&mut Vars, &Chooser)) -> Result<(), BootError> {
        let current = self.storage.load()?;
        let chooser = Chooser::read(&current.vars, &self.slots);
        let mut vars = current.vars.clone();
        change(&mut vars, &chooser);
        if vars == current.vars {
            return Ok(());
        }
        self.storage.store_after(&current, &vars)
    }
}

impl BootControl for UbootEnv {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// The first slot in BOOT_ORDER with attempts left: the one the script
    /// boots next. Words that name no configured slot are skipped, as the
    /// script skips them.
    fn primary(&self) -> Result<Option<String>, BootError> {
        let vars = self.read_vars()?;
        let chooser = Chooser::read(&vars, &self.slots);
        Ok(chooser.order.iter().find_map(|word| {
            self.slots
                .iter()
                .find(|slot| slot.as_bytes() == word.as_slice())
                .filter(|slot| attempts_left(&vars, slot, self.attempts) > 0)
                .cloned()
        }))
    }

    /// Bad when the script would not choose the slot (not in BOOT_ORDER, or
    /// no attempts left); Trying when it has spent attempts since fleetd last
    /// restored them (booted and not yet confirmed); else Good.
    fn state(&self, slot: &str) -> Result<SlotState, BootError> {
        self.known(slot)?;
        let vars = self.read_vars()?;
        let chooser = Chooser::read(&vars, &self.slots);
        let left = attempts_left(&vars, slot, self.attempts);
        Ok(if !chooser.contains(slot) || left == 0 {
            SlotState::Bad
        } else if left < self.attempts {
            SlotState::Trying
        } else {
            SlotState::Good
        })
    }

    fn set_primary_for_trial(&mut self, slot: &str) -> Result<(), BootError> {
        self.known(slot)?;
        let attempts = self.attempts.to_string().into_bytes();
        self.update(|vars, chooser| {
            let mut order = vec![slot.as_bytes().to_vec()];
            order.extend(chooser.without(slot));
            set_order(vars, &order);
            vars.insert(left_var(slot), attempts);
        })
    }

    /// Restores the slot's attempts; its place in BOOT_ORDER is kept, and a
    /// slot missing from the order is appended to it.
    fn mark_good(&mut self, slot: &str) -> Result<(), BootError> {
        self.known(slot)?;
        let attempts = self.attempts.to_string().into_bytes();
        self.update(|vars, chooser| {
            let mut order = chooser.order.clone();
            if !chooser.contains(slot) {
                order.push(slot.as_bytes().to_vec());
            }
            set_order(vars, &order);
            vars.insert(left_var(slot), attempts);
        })
    }

    /// Removes the slot from BOOT_ORDER and zeroes its attempts. Refused for
    /// the last slot in BOOT_ORDER: an empty order would make the boot
    /// script fall back to its default ("A B"), bringing back every slot
    /// fleetd gave up on.
    fn mark_bad(&mut self, slot: &str) -> Result<(), BootError> {
        self.known(slot)?;
        let vars = self.read_vars()?;
        let remaining = Chooser::read(&vars, &self.slots).without(slot);
        let bootable = remaining.iter().any(|w| self.slots.iter().any(|s| s.as_bytes() == w.as_slice()));
        if !bootable {
            return Err(BootError::Config {
                backend: BACKEND,
                detail: format!("refusing to mark {slot:?} bad: no other slot is left in BOOT_ORDER"),
            });
        }
        self.update(|vars, chooser| {
            set_order(vars, &chooser.without(slot));
            vars.insert(left_var(slot), b"0".to_vec());
        })
    }

    /// Restores the spent attempts of a slot that is still in BOOT_ORDER;
    /// one fleetd removed from it stays out.
    fn confirm_booted(&mut self, slot: &str) -> Result<(), BootError> {
        self.known(slot)?;
        let attempts = self.attempts;
        self.update(|vars, chooser| {
            if chooser.contains(slot) && attempts_left(vars, slot, attempts) < attempts {
                vars.insert(left_var(slot), attempts.to_string().into_bytes());
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    const SIZE: usize = 0x100;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    /// A copy around arbitrary `data`, with a correct CRC.
    fn raw_block(data: &[u8], size: usize, flags: Option<u8>) -> Vec<u8> {
        let mut data = data.to_vec();
        data.resize(size - header_len(flags.is_some()), 0);
        let mut block = crc32(&data).to_le_bytes().to_vec();
        block.extend(flags);
        block.extend(data);
        block
    }

    /// A temp dir with an env file and its fw_env.config.
    struct Fixture {
        dir: tempfile::TempDir,
        config: PathBuf,
        env: PathBuf,
    }

    impl Fixture {
        fn new(redundant: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let env = dir.path().join("uboot.env");
            let config = dir.path().join("fw_env.config");
            let mut text = format!("{} 0x0 {SIZE:#x}\n", env.display());
            if redundant {
                text += &format!("{} {SIZE:#x} {SIZE:#x}\n", env.display());
                fs::write(&env, vec![0u8; 2 * SIZE]).unwrap();
            }
            fs::write(&config, text).unwrap();
            Self { dir, config, env }
        }

        fn storage(&self) -> EnvStorage {
            EnvStorage::open(&self.config).unwrap()
        }

        fn flags(&self) -> (u8, u8) {
            let bytes = fs::read(&self.env).unwrap();
            (bytes[CRC_LEN], bytes[SIZE + CRC_LEN])
        }

        fn flip_byte(&self, at: usize) {
            let mut bytes = fs::read(&self.env).unwrap();
            bytes[at] ^= 0x01;
            fs::write(&self.env, bytes).unwrap();
        }

        fn uboot(&self) -> UbootEnv {
            UbootEnv::open(&self.config, &["A".into(), "B".into()], 3).unwrap()
        }
    }

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

    // --- BootControl ---

    fn env_of(fx: &Fixture) -> Vars {
        fx.storage().load().unwrap().vars
    }

    #[test]
    fn confirming_the_booted_slot_restores_its_attempts_but_never_resurrects_a_removed_slot() {
        let fx = Fixture::new(true);
        fx.storage()
            .initialize(&vars(&[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "0")]))
            .unwrap();
        let mut u = fx.uboot();
        // A ran on its last attempt while B was being written.
        u.confirm_booted("A").unwrap();
        assert_eq!(env_of(&fx), vars(&[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")]));
        // B is out of BOOT_ORDER: confirming it (were it somehow running) changes nothing.
        let before = fx.flags();
        u.confirm_booted("B").unwrap();
        assert_eq!(fx.flags(), before, "nothing written");
        assert_eq!(u.state("B").unwrap(), SlotState::Bad);
        // A full slot needs no write either.
        u.confirm_booted("A").unwrap();
        assert_eq!(fx.flags(), before);
    }

    #[test]
    fn the_last_slot_in_boot_order_cannot_be_marked_bad() {
        let fx = Fixture::new(true);
        fx.storage()
            .initialize(&vars(&[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")]))
            .unwrap();
        let mut u = fx.uboot();
        // Removing A would empty BOOT_ORDER, and the script's default
        // ("A B") would bring back the half-written B.
        let err = u.mark_bad("A").unwrap_err();
        assert_eq!(err.name(), "boot-config", "{err}");
        assert_eq!(env_of(&fx)[&b"BOOT_ORDER"[..]], b"A".to_vec());
    }

    #[test]
    fn open_checks_attempts_and_slot_names() {
        let fx = Fixture::new(false);
        let open = |slots: &[&str], attempts| {
            let slots: Vec<String> = slots.iter().map(|s| s.to_string()).collect();
            UbootEnv::open(&fx.config, &slots, attempts)
        };
        assert!(open(&["A", "B"], 9).is_ok());
        for (slots, attempts) in [
            (&["A", "B"][..], 0),
            (&["A", "B"], 10),
            (&[], 3),
            (&["A", "A"], 3),
            (&["A B"], 3),
            (&["A="], 3),
            (&[""], 3),
        ] {
            let err = open(slots, attempts).unwrap_err();
            assert_eq!(err.name(), "boot-config", "{slots:?} {attempts}");
        }
        let missing = UbootEnv::open(&fx.dir.path().join("nope"), &["A".into()], 3);
        assert_eq!(missing.unwrap_err().name(), "boot-env-io");
    }

    #[test]
    fn primary_and_state_follow_the_script() {
        let fx = Fixture::new(false);
        let env = fx.uboot();
        // (environment, primary, state of A, state of B)
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, SlotState, SlotState);
        let cases: &[Case] = &[
            (
                &[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")],
                Some("A"),
                SlotState::Good,
                SlotState::Good,
            ),
            (
                &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "2")],
                Some("B"),
                SlotState::Good,
                SlotState::Trying,
            ),
            (
                &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")],
                Some("A"),
                SlotState::Good,
                SlotState::Bad,
            ),
            (
                &[("BOOT_ORDER", "B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "1")],
                Some("B"),
                SlotState::Bad,
                SlotState::Trying,
            ),
            (
                &[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "junk")],
                None,
                SlotState::Bad,
                SlotState::Bad,
            ),
            // Unknown words are skipped; the missing variables take the
            // script's defaults (BOOT_B_LEFT → attempts).
            (&[("BOOT_ORDER", "X  B\tA")], Some("B"), SlotState::Good, SlotState::Good),
            (&[], Some("A"), SlotState::Good, SlotState::Good),
            (&[("BOOT_ORDER", " "), ("BOOT_A_LEFT", "0")], Some("B"), SlotState::Bad, SlotState::Good),
        ];
        for (env_vars, primary, a, b) in cases {
            initialize(&fx.config, env_vars).unwrap();
            assert_eq!(env.primary().unwrap().as_deref(), *primary, "{env_vars:?}");
            assert_eq!(env.state("A").unwrap(), *a, "{env_vars:?}");
            assert_eq!(env.state("B").unwrap(), *b, "{env_vars:?}");
        }
        assert_eq!(env.state("C").unwrap_err().name(), "unknown-slot");
        assert_eq!(env.backend(), "uboot");
    }

    #[test]
    fn each_operation_changes_exactly_its_variables() {
        let fx = Fixture::new(true);
        let mut env = fx.uboot();
        let base = [("bootcmd", "run boot_fleetd"), ("serial#", "X1")];
        let with = |extra: &[(&str, &str)]| {
            let mut all = vars(&base);
            all.extend(vars(extra));
            all
        };
        let start: Vec<(&str, &str)> = base
            .iter()
            .copied()
            .chain([("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "2"), ("BOOT_B_LEFT", "3")])
            .collect();
        initialize(&fx.config, &start).unwrap();

        env.set_primary_for_trial("B").unwrap();
        assert_eq!(env_of(&fx), with(&[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "2"), ("BOOT_B_LEFT", "3")]));
        assert_eq!(env.primary().unwrap().as_deref(), Some("B"));

        env.mark_bad("B").unwrap();
        assert_eq!(env_of(&fx), with(&[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "2"), ("BOOT_B_LEFT", "0")]));
        assert_eq!(env.primary().unwrap().as_deref(), Some("A"));

        env.mark_good("A").unwrap();
        assert_eq!(env_of(&fx), with(&[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")]));

        env.mark_good("B").unwrap();
        assert_eq!(env_of(&fx), with(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")]));

        env.mark_bad("A").unwrap();
        assert_eq!(env_of(&fx), with(&[("BOOT_ORDER", "B"), ("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "3")]));
        // The last slot in the order stays: an empty BOOT_ORDER would make
        // the script fall back to its default and revive A.
        assert_eq!(env.mark_bad("B").unwrap_err().name(), "boot-config");
        assert_eq!(env_of(&fx), with(&[("BOOT_ORDER", "B"), ("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "3")]));

        // An environment without BOOT_ORDER (a fresh board) reads the default order.
        initialize(
            &fx.config,
            &[("bootcmd", "run boot_fleetd"), ("serial#", "X1"), ("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "0")],
        )
        .unwrap();
        assert_eq!(env.primary().unwrap(), None);
        env.set_primary_for_trial("A").unwrap();
        assert_eq!(
            env_of(&fx),
            with(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")]),
            "the default order, with A first"
        );
        for op in ["trial", "good", "bad"] {
            let err = match op {
                "trial" => env.set_primary_for_trial("C"),
                "good" => env.mark_good("C"),
                _ => env.mark_bad("C"),
            }
            .unwrap_err();
            assert_eq!(err.name(), "unknown-slot");
        }
    }

    #[test]
    fn an_operation_that_changes_nothing_does_not_write() {
        let fx = Fixture::new(true);
        let mut env = fx.uboot();
        initialize(&fx.config, &[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3")]).unwrap();
        env.mark_good("A").unwrap();
        assert_eq!(fx.flags(), (1, 0));
        env.mark_good("B").unwrap();
        assert_eq!(fx.flags(), (1, 2));
    }

    #[test]
    fn operations_on_a_corrupt_environment_are_refused() {
        for redundant in [false, true] {
            let fx = Fixture::new(redundant);
            let copies = if redundant { 2 } else { 1 };
            fs::write(&fx.env, vec![0u8; copies * SIZE]).unwrap();
            let mut env = fx.uboot();
            let before = fs::read(&fx.env).unwrap();
            assert_eq!(env.primary().unwrap_err().name(), "boot-env-corrupt");
            assert_eq!(env.state("A").unwrap_err().name(), "boot-env-corrupt");
            for result in [env.set_primary_for_trial("A"), env.mark_good("A"), env.mark_bad("B")] {
                assert_eq!(result.unwrap_err().name(), "boot-env-corrupt");
            }
            assert_eq!(fs::read(&fx.env).unwrap(), before, "nothing written");
        }
    }
}
