//! GRUB backend: RAUC's variables in GRUB's environment block (`grubenv`).
//!
//! `ORDER` lists the slots, first is primary; `<slot>_OK` (0/1) says a slot
//! may boot; `<slot>_TRY` (0/1) says GRUB has booted it once since it was last
//! confirmed. The shipped `grub.cfg` boots the first slot in `ORDER` with
//! `OK=1` and `TRY=0` and sets its `TRY=1` first, so a new slot gets exactly
//! one try: fleetd's `mark_good` clears `TRY` again on a healthy boot.
//!
//! [`EnvBlock`] is the codec (no IO); [`GrubEnv`] reads and atomically
//! rewrites the file around it.

use super::{BootControl, BootError, SlotState};
use crate::fsutil;
use std::path::{Path, PathBuf};

const BACKEND: &str = "grub";

/// GRUB's environment block is exactly this long; `save_env` writes it in
/// place, so it can never grow.
pub const ENV_BLOCK_SIZE: usize = 1024;
const HEADER: &[u8] = b"# GRUB Environment Block\n";
const PADDING: u8 = b'#';
const ORDER: &str = "ORDER";

/// One line between the header and the padding, kept in file order so a
/// rewrite changes only what it must (as `grub-editenv set` does).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// A line starting with `#` (grub-editenv writes a warning there), raw.
    Comment(String),
    Var {
        name: String,
        value: String,
    },
}

/// The decoded environment block: variables and comments in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvBlock {
    lines: Vec<Line>,
}

impl EnvBlock {
    /// An empty block (what `grub-editenv create` makes, minus its comment).
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes a block as GRUB reads it. Values are unescaped (`\\` → `\`,
    /// `\` newline → newline). Anything GRUB would misread is `Corrupt`.
    pub fn decode(bytes: &[u8]) -> Result<Self, BootError> {
        if bytes.len() != ENV_BLOCK_SIZE {
            return Err(corrupt(format!("grubenv is {} bytes, expected {ENV_BLOCK_SIZE}", bytes.len())));
        }
        let body = bytes
            .strip_prefix(HEADER)
            .ok_or_else(|| corrupt("missing \"# GRUB Environment Block\" header".into()))?;
        let mut lines = Vec::new();
        let mut rest = body;
        while let Some(&first) = rest.first() {
            let (line, after) = split_line(rest);
            let Some(after) = after else {
                // Only padding may run to the end without a newline.
                if first == PADDING && line.iter().all(|&b| b == PADDING) {
                    break;
                }
                return Err(corrupt("last line is not terminated".into()));
            };
            rest = after;
            if first == PADDING {
                lines.push(Line::Comment(utf8(line)?));
                continue;
            }
            // GRUB takes the name raw up to the first '=' and unescapes only
            // the value.
            let Some(eq) = line.iter().position(|&b| b == b'=') else {
                return Err(corrupt(format!("line without '=': {:?}", String::from_utf8_lossy(line))));
            };
            let name = utf8(&line[..eq])?;
            if name.contains(['\\', '\n']) {
                return Err(corrupt(format!("variable name {name:?}")));
            }
            let value = unescape(&line[eq + 1..])?;
            if lines.iter().any(|l| matches!(l, Line::Var { name: n, .. } if *n == name)) {
                return Err(corrupt(format!("variable {name:?} appears twice")));
            }
            lines.push(Line::Var { name, value });
        }
        Ok(Self { lines })
    }

    /// Encodes the block, padded with `#` to exactly [`ENV_BLOCK_SIZE`] bytes.
    pub fn encode(&self) -> Result<Vec<u8>, BootError> {
        let mut out = Vec::with_capacity(ENV_BLOCK_SIZE);
        out.extend_from_slice(HEADER);
        for line in &self.lines {
            match line {
                Line::Comment(text) => out.extend_from_slice(text.as_bytes()),
                Line::Var { name, value } => {
                    out.extend_from_slice(name.as_bytes());
                    out.push(b'=');
                    escape_into(&mut out, value);
                }
            }
            out.push(b'\n');
        }
        if out.len() > ENV_BLOCK_SIZE {
            return Err(BootError::Config {
                backend: BACKEND,
                detail: format!(
                    "grubenv is full: its variables need {} of {ENV_BLOCK_SIZE} bytes",
                    out.len()
                ),
            });
        }
        out.resize(ENV_BLOCK_SIZE, PADDING);
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Sets a variable in place, or appends it (as `grub-editenv set` does).
    /// `name` must not contain `=`, a backslash or a newline, nor start with `#`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), BootError> {
        if name.is_empty() || name.contains(['=', '\n', '\\']) || name.starts_with('#') {
            return Err(BootError::Config {
                backend: BACKEND,
                detail: format!("{name:?} cannot be a grubenv variable name"),
            });
        }
        for line in &mut self.lines {
            if let Line::Var { name: n, value: v } = line {
                if n == name {
                    *v = value.to_string();
                    return Ok(());
                }
            }
        }
        self.lines.push(Line::Var { name: name.to_string(), value: value.to_string() });
        Ok(())
    }

    /// The variables in file order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|line| match line {
            Line::Var { name, value } => Some((name.as_str(), value.as_str())),
            Line::Comment(_) => None,
        })
    }
}

/// Splits at the first newline not escaped by a backslash (GRUB's rule, which
/// applies to comments too). The second part is `None` if there is none.
fn split_line(bytes: &[u8]) -> (&[u8], Option<&[u8]>) {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'\n' => return (&bytes[..i], Some(&bytes[i + 1..])),
            _ => i += 1,
        }
    }
    (bytes, None)
}

fn unescape(line: &[u8]) -> Result<String, BootError> {
    let mut out = Vec::with_capacity(line.len());
    let mut bytes = line.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            // split_line never ends a line right after a backslash.
            let &escaped = bytes.next().ok_or_else(|| corrupt("line ends in a lone backslash".into()))?;
            out.push(escaped);
        } else {
            out.push(b);
        }
    }
    utf8(&out)
}

// fleetd rewrites the whole block; refusing beats mangling bytes it cannot
// represent.
fn utf8(bytes: &[u8]) -> Result<String, BootError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("a line is not UTF-8".into()))
}

/// grub-editenv escapes only backslash and newline, each with a backslash.
fn escape_into(out: &mut Vec<u8>, text: &str) {
    for &b in text.as_bytes() {
        if b == b'\\' || b == b'\n' {
            out.push(b'\\');
        }
        out.push(b);
    }
}

fn corrupt(detail: String) -> BootError {
    BootError::Corrupt { backend: BACKEND, detail }
}

fn ok_var(slot: &str) -> String {
    format!("{slot}_OK")
}

fn try_var(slot: &str) -> String {
    format!("{slot}_TRY")
}

/// Reads a 0/1 flag; missing means `0`, as in grub.cfg's defaults.
fn flag(env: &EnvBlock, name: &str) -> Result<bool, BootError> {
    match env.get(name) {
        None | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(corrupt(format!("{name}={other:?} is neither 0 nor 1"))),
    }
}

/// The slot grub.cfg would boot next without falling back: the first in
/// `ORDER` with `OK=1` and `TRY=0`. Names not in `slots` are skipped.
pub fn primary_in(env: &EnvBlock, slots: &[String]) -> Result<Option<String>, BootError> {
    for name in env.get(ORDER).unwrap_or("").split_whitespace() {
        if !slots.iter().any(|s| s == name) {
            continue;
        }
        if flag(env, &ok_var(name))? && !flag(env, &try_var(name))? {
            return Ok(Some(name.to_string()));
        }
    }
    Ok(None)
}

/// `OK=0` → Bad; `OK=1, TRY=1` → Trying (booted once, unconfirmed); else Good.
pub fn state_in(env: &EnvBlock, slot: &str) -> Result<SlotState, BootError> {
    Ok(match (flag(env, &ok_var(slot))?, flag(env, &try_var(slot))?) {
        (false, _) => SlotState::Bad,
        (true, true) => SlotState::Trying,
        (true, false) => SlotState::Good,
    })
}

/// Puts `slot` first in `ORDER` (the rest keep their order; configured slots
/// missing from it are appended so a fallback exists) with `OK=1`, `TRY=0`.
pub fn set_primary_for_trial_in(env: &mut EnvBlock, slot: &str, slots: &[String]) -> Result<(), BootError> {
    let mut order = vec![slot];
    let current = env.get(ORDER).unwrap_or("").to_string();
    for name in current.split_whitespace().chain(slots.iter().map(String::as_str)) {
        if !order.contains(&name) {
            order.push(name);
        }
    }
    env.set(ORDER, &order.join(" "))?;
    set_flags(env, slot, true, false)
}

fn set_flags(env: &mut EnvBlock, slot: &str, ok: bool, tried: bool) -> Result<(), BootError> {
    let digit = |b: bool| if b { "1" } else { "0" };
    env.set(&ok_var(slot), digit(ok))?;
    env.set(&try_var(slot), digit(tried))
}

/// The GRUB environment file, read fresh on every call because GRUB changes
/// it at each boot.
#[derive(Debug)]
pub struct GrubEnv {
    grubenv: PathBuf,
    slots: Vec<String>,
}

impl GrubEnv {
    /// Slot names must be letters or digits (they become GRUB variable names).
    /// The file is not read until it is needed.
    pub fn new(grubenv: PathBuf, slots: &[String]) -> Result<Self, BootError> {
        validate_slots(slots)?;
        Ok(Self { grubenv, slots: slots.to_vec() })
    }

    /// Writes a fresh environment for provisioning and tests: `ORDER` lists
    /// the slots in the given order, each with `OK=1`, `TRY=0`.
    pub fn initialize(path: &Path, slots: &[String]) -> Result<(), BootError> {
        validate_slots(slots)?;
        let mut env = EnvBlock::new();
        env.set(ORDER, &slots.join(" "))?;
        for slot in slots {
            set_flags(&mut env, slot, true, false)?;
        }
        write_env(path, &env)
    }

    /// The whole environment as it is now.
    pub fn read(&self) -> Result<EnvBlock, BootError> {
        let bytes = fsutil::read_prefix(&self.grubenv, ENV_BLOCK_SIZE + 1)
            .map_err(|source| BootError::Io { backend: BACKEND, path: self.grubenv.clone(), source })?;
        EnvBlock::decode(&bytes)
    }

    fn known(&self, slot: &str) -> Result<(), BootError> {
        if self.slots.iter().any(|s| s == slot) {
            Ok(())
        } else {
            Err(BootError::UnknownSlot { backend: BACKEND, slot: slot.to_string() })
        }
    }

    /// Read, change, and store in one atomic write.
    fn update(
        &self,
        slot: &str,
        change: impl FnOnce(&mut EnvBlock) -> Result<(), BootError>,
    ) -> Result<(), BootError> {
        self.known(slot)?;
        let mut env = self.read()?;
        change(&mut env)?;
        write_env(&self.grubenv, &env)
    }
}

fn validate_slots(slots: &[String]) -> Result<(), BootError> {
    if slots.is_empty() {
        return Err(BootError::Config { backend: BACKEND, detail: "no slots".into() });
    }
    for (i, slot) in slots.iter().enumerate() {
        if slot.is_empty() || !slot.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(BootError::Config {
                backend: BACKEND,
                detail: format!("slot name {slot:?} is not letters and digits"),
            });
        }
        if slots[..i].contains(slot) {
            return Err(BootError::Config {
                backend: BACKEND,
                detail: format!("slot {slot:?} is listed twice"),
            });
        }
    }
    Ok(())
}

fn write_env(path: &Path, env: &EnvBlock) -> Result<(), BootError> {
    let bytes = env.encode()?;
    fsutil::atomic_write(path, &bytes, 0o644).map_err(|source| BootError::Io {
        backend: BACKEND,
        path: path.to_path_buf(),
        source,
    })
}

impl BootControl for GrubEnv {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn primary(&self) -> Result<Option<String>, BootError> {
        primary_in(&self.read()?, &self.slots)
    }

    fn state(&self, slot: &str) -> Result<SlotState, BootError> {
        self.known(slot)?;
        state_in(&self.read()?, slot)
    }

    fn set_primary_for_trial(&mut self, slot: &str) -> Result<(), BootError> {
        let slots = self.slots.clone();
        self.update(slot, |env| set_primary_for_trial_in(env, slot, &slots))
    }

    fn mark_good(&mut self, slot: &str) -> Result<(), BootError> {
        self.update(slot, |env| set_flags(env, slot, true, false))
    }

    fn mark_bad(&mut self, slot: &str) -> Result<(), BootError> {
        self.update(slot, |env| set_flags(env, slot, false, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<String> {
        vec!["A".into(), "B".into()]
    }

    fn block(vars: &str) -> Vec<u8> {
        let mut bytes = HEADER.to_vec();
        bytes.extend_from_slice(vars.as_bytes());
        bytes.resize(ENV_BLOCK_SIZE, b'#');
        bytes
    }

    fn env(vars: &str) -> EnvBlock {
        EnvBlock::decode(&block(vars)).unwrap()
    }

    fn pairs(env: &EnvBlock) -> Vec<(String, String)> {
        env.vars().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn empty_block_round_trips() {
        let empty = EnvBlock::new();
        let bytes = empty.encode().unwrap();
        assert_eq!(bytes, block(""));
        assert_eq!(EnvBlock::decode(&bytes).unwrap(), empty);
    }

    #[test]
    fn decodes_variables_in_order() {
        let env = env("ORDER=B A\nA_OK=1\n");
        assert_eq!(pairs(&env), [("ORDER".into(), "B A".into()), ("A_OK".into(), "1".into())]);
        assert_eq!(env.get("A_OK"), Some("1"));
        assert_eq!(env.get("B_OK"), None);
    }

    #[test]
    fn value_may_contain_equals() {
        assert_eq!(env("X=a=b\n").get("X"), Some("a=b"));
    }

    #[test]
    fn escapes_backslash_and_newline_like_grub_editenv() {
        let mut env = EnvBlock::new();
        env.set("X", "a\\b\nc").unwrap();
        let bytes = env.encode().unwrap();
        assert_eq!(bytes, block("X=a\\\\b\\\nc\n"));
        assert_eq!(EnvBlock::decode(&bytes).unwrap().get("X"), Some("a\\b\nc"));
    }

    #[test]
    fn comments_are_kept_in_place() {
        let text = "# WARNING: keep me\\x\nX=1\n";
        let mut env = env(text);
        env.set("X", "2").unwrap();
        env.set("Y", "3").unwrap();
        assert_eq!(env.encode().unwrap(), block("# WARNING: keep me\\x\nX=2\nY=3\n"));
    }

    #[test]
    fn set_replaces_in_place_and_appends_new() {
        let mut env = env("A=1\nB=2\n");
        env.set("A", "9").unwrap();
        env.set("C", "3").unwrap();
        assert_eq!(env.encode().unwrap(), block("A=9\nB=2\nC=3\n"));
    }

    #[test]
    fn set_refuses_names_grub_would_misread() {
        let mut env = EnvBlock::new();
        for name in ["", "a=b", "a\nb", "#x", "a\\b"] {
            assert!(env.set(name, "1").is_err(), "{name:?}");
        }
    }

    #[test]
    fn a_block_that_fills_exactly_1024_bytes_encodes() {
        let room = ENV_BLOCK_SIZE - HEADER.len() - "X=\n".len();
        let mut env = EnvBlock::new();
        env.set("X", &"v".repeat(room)).unwrap();
        let bytes = env.encode().unwrap();
        assert_eq!(bytes.len(), ENV_BLOCK_SIZE);
        assert_eq!(bytes.last(), Some(&b'\n'));
        assert_eq!(EnvBlock::decode(&bytes).unwrap(), env);
    }

    #[test]
    fn overfull_block_is_a_config_error() {
        let mut env = EnvBlock::new();
        env.set("X", &"v".repeat(ENV_BLOCK_SIZE)).unwrap();
        assert_eq!(env.encode().unwrap_err().name(), "boot-config");
    }

    #[test]
    fn wrong_size_is_corrupt() {
        let mut bytes = block("");
        bytes.pop();
        assert_eq!(EnvBlock::decode(&bytes).unwrap_err().name(), "boot-env-corrupt");
        bytes.extend_from_slice(b"##");
        assert_eq!(EnvBlock::decode(&bytes).unwrap_err().name(), "boot-env-corrupt");
        assert!(EnvBlock::decode(&[]).is_err());
    }

    #[test]
    fn wrong_header_is_corrupt() {
        let mut bytes = block("");
        bytes[2] = b'g';
        assert_eq!(EnvBlock::decode(&bytes).unwrap_err().name(), "boot-env-corrupt");
    }

    /// The header, `body`, then `fill` up to the block size.
    fn raw(body: &str, fill: u8) -> Vec<u8> {
        let mut bytes = HEADER.to_vec();
        bytes.extend_from_slice(body.as_bytes());
        bytes.resize(ENV_BLOCK_SIZE, fill);
        bytes
    }

    #[test]
    fn malformed_bodies_are_corrupt() {
        for bytes in [
            raw("X=1", b'x'),        // the last line runs to the end
            raw("X=1", b'\\'),       // ends in backslashes, escaping to the end
            raw("X=1\n#x", b'#'),    // padding with something else in it
            raw("novalue\n", b'#'),  // no '='
            raw("X=1\nX=2\n", b'#'), // duplicate
        ] {
            assert_eq!(
                EnvBlock::decode(&bytes).unwrap_err().name(),
                "boot-env-corrupt",
                "{:?}",
                String::from_utf8_lossy(&bytes[HEADER.len()..HEADER.len() + 12])
            );
        }
    }

    #[test]
    fn non_utf8_is_corrupt() {
        let mut bytes = block("X=\u{1}\n");
        bytes[HEADER.len() + 2] = 0xff;
        assert_eq!(EnvBlock::decode(&bytes).unwrap_err().name(), "boot-env-corrupt");
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A cheap deterministic sweep over small mutations of a valid block.
        let base = block("ORDER=A B\nA_OK=1\\\\\nB_TRY=0\n# c\n");
        let mut seed: u32 = 1;
        for _ in 0..5000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let mut bytes = base.clone();
            let at = (seed as usize >> 8) % bytes.len();
            bytes[at] = [b'\\', b'\n', b'=', b'#', 0xff, b'x'][(seed as usize >> 4) % 6];
            let _ = EnvBlock::decode(&bytes);
        }
    }

    #[test]
    fn primary_is_first_in_order_with_ok_and_no_try() {
        let s = slots();
        assert_eq!(primary_in(&env("ORDER=A B\nA_OK=1\nB_OK=1\n"), &s).unwrap(), Some("A".into()));
        assert_eq!(primary_in(&env("ORDER=B A\nA_OK=1\nB_OK=1\nB_TRY=1\n"), &s).unwrap(), Some("A".into()));
        assert_eq!(primary_in(&env("ORDER=B A\nA_OK=0\nB_OK=1\n"), &s).unwrap(), Some("B".into()));
        assert_eq!(primary_in(&env("ORDER=A B\n"), &s).unwrap(), None);
        assert_eq!(primary_in(&env(""), &s).unwrap(), None);
        // Names grub.cfg has no entry for are skipped.
        assert_eq!(primary_in(&env("ORDER=C A\nC_OK=1\nA_OK=1\n"), &s).unwrap(), Some("A".into()));
    }

    #[test]
    fn state_mapping() {
        let env = env("A_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=1\nC_OK=0\n");
        assert_eq!(state_in(&env, "A").unwrap(), SlotState::Good);
        assert_eq!(state_in(&env, "B").unwrap(), SlotState::Trying);
        assert_eq!(state_in(&env, "C").unwrap(), SlotState::Bad);
        assert_eq!(state_in(&env, "D").unwrap(), SlotState::Bad, "missing OK is 0");
    }

    #[test]
    fn flags_other_than_0_or_1_are_corrupt() {
        let env = env("A_OK=yes\n");
        assert_eq!(state_in(&env, "A").unwrap_err().name(), "boot-env-corrupt");
    }

    #[test]
    fn trial_moves_slot_first_and_keeps_the_rest() {
        let s = slots();
        let mut env = env("ORDER=A B\nA_OK=1\nA_TRY=0\nB_OK=0\nB_TRY=1\nX=y\n");
        set_primary_for_trial_in(&mut env, "B", &s).unwrap();
        assert_eq!(env.encode().unwrap(), block("ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=0\nX=y\n"));
        // From an empty env the fallback is added too.
        let mut env = EnvBlock::new();
        set_primary_for_trial_in(&mut env, "B", &s).unwrap();
        assert_eq!(env.encode().unwrap(), block("ORDER=B A\nB_OK=1\nB_TRY=0\n"));
    }

    #[test]
    fn new_validates_slot_names() {
        let p = PathBuf::from("/nonexistent/grubenv");
        assert!(GrubEnv::new(p.clone(), &slots()).is_ok());
        for bad in [vec![], vec!["A".to_string(), "A".into()], vec!["A B".into()], vec!["".into()]] {
            assert_eq!(GrubEnv::new(p.clone(), &bad).unwrap_err().name(), "boot-config");
        }
    }

    #[test]
    fn file_operations_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let mut grub = GrubEnv::new(path.clone(), &slots()).unwrap();
        assert_eq!(grub.primary().unwrap_err().name(), "boot-env-io");
        GrubEnv::initialize(&path, &slots()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), block("ORDER=A B\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=0\n"));
        grub.set_primary_for_trial("B").unwrap();
        assert_eq!(grub.primary().unwrap(), Some("B".into()));
        grub.mark_bad("B").unwrap();
        assert_eq!(grub.state("B").unwrap(), SlotState::Bad);
        assert_eq!(grub.primary().unwrap(), Some("A".into()));
        assert_eq!(grub.mark_good("C").unwrap_err().name(), "unknown-slot");
        assert_eq!(grub.state("C").unwrap_err().name(), "unknown-slot");
    }
}
