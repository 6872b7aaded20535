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

/// Shared by the tests of this folder (codec.rs, fw_env.rs, storage.rs).
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    pub(super) const SIZE: usize = 0x100;

    pub(super) fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    /// A copy around arbitrary `data`, with a correct CRC.
    pub(super) fn raw_block(data: &[u8], size: usize, flags: Option<u8>) -> Vec<u8> {
        let mut data = data.to_vec();
        data.resize(size - header_len(flags.is_some()), 0);
        let mut block = crc32(&data).to_le_bytes().to_vec();
        block.extend(flags);
        block.extend(data);
        block
    }

    /// A temp dir with an env file and its fw_env.config.
    pub(super) struct Fixture {
        pub(super) dir: tempfile::TempDir,
        pub(super) config: PathBuf,
        pub(super) env: PathBuf,
    }

    impl Fixture {
        pub(super) fn new(redundant: bool) -> Self {
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

        pub(super) fn storage(&self) -> EnvStorage {
            EnvStorage::open(&self.config).unwrap()
        }

        pub(super) fn flags(&self) -> (u8, u8) {
            let bytes = fs::read(&self.env).unwrap();
            (bytes[CRC_LEN], bytes[SIZE + CRC_LEN])
        }

        pub(super) fn flip_byte(&self, at: usize) {
            let mut bytes = fs::read(&self.env).unwrap();
            bytes[at] ^= 0x01;
            fs::write(&self.env, bytes).unwrap();
        }

        pub(super) fn uboot(&self) -> UbootEnv {
            UbootEnv::open(&self.config, &["A".into(), "B".into()], 3).unwrap()
        }
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
