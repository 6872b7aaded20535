//! A simulated U-Boot that runs `packaging/boot/uboot/boot.cmd`, for tests.
//!
//! `power_on` is that script step by step, reading and saving the
//! environment with the real `fw_printenv -c` / `fw_setenv -c` (libubootenv),
//! so what it sees is what a board would see. Change both together.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The slots the script knows (its `elif` chain) and its default attempts.
pub const SCRIPT_SLOTS: [&str; 2] = ["A", "B"];
pub const SCRIPT_DEFAULT_ORDER: &str = "A B";
pub const SCRIPT_DEFAULT_LEFT: &str = "3";

/// Power cycles `power_on` allows before it gives up (a slot that crashes
/// forever would otherwise loop for ever, as on a real board).
pub const MAX_POWER_CYCLES: usize = 32;

/// Powers the board on until a slot boots and `boots_ok(slot)` says it
/// stayed up; a `false` is a crash, and the board powers on again. Returns
/// the slot that came up, or `None` when the script found nothing bootable
/// (it has then restored the attempts of the slots in BOOT_ORDER, as the
/// script does before `reset`) or after `MAX_POWER_CYCLES` crashes.
pub fn power_on(env_config: &Path, boots_ok: &dyn Fn(&str) -> bool) -> Option<String> {
    for _ in 0..MAX_POWER_CYCLES {
        let slot = run_boot_script(env_config)?;
        if boots_ok(&slot) {
            return Some(slot);
        }
    }
    None
}

/// One run of boot.cmd: the slot it boots, or `None` for its reset branch.
pub fn run_boot_script(env_config: &Path) -> Option<String> {
    let mut env = Env::load(env_config);

    // test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
    // test -n "${BOOT_x_LEFT}" || setenv BOOT_x_LEFT 3
    if env.get("BOOT_ORDER").is_empty() {
        env.setenv("BOOT_ORDER", SCRIPT_DEFAULT_ORDER);
    }
    for slot in SCRIPT_SLOTS {
        if env.get(&left(slot)).is_empty() {
            env.setenv(&left(slot), SCRIPT_DEFAULT_LEFT);
        }
    }

    // for BOOT_SLOT in "${BOOT_ORDER}"; do ... done
    let mut chosen: Option<&str> = None;
    let order = env.get("BOOT_ORDER");
    for boot_slot in order.split_whitespace() {
        if chosen.is_some() {
            continue; // a slot is chosen; skip the rest
        }
        // elif test "x${BOOT_SLOT}" = "xA"; ... one branch per known slot
        let Some(slot) = SCRIPT_SLOTS.into_iter().find(|s| *s == boot_slot) else {
            continue;
        };
        // if test ${BOOT_x_LEFT} -gt 0; then setexpr BOOT_x_LEFT ${BOOT_x_LEFT} - 1
        let attempts = env.get(&left(slot));
        if test_integer(&attempts) > 0 {
            env.setenv(&left(slot), &setexpr_minus_one(&attempts));
            chosen = Some(slot);
        }
    }

    let Some(slot) = chosen else {
        // Nothing bootable: the slots in BOOT_ORDER (never the order itself)
        // get their attempts back; saveenv, reset.
        let order = env.get("BOOT_ORDER");
        for boot_slot in order.split_whitespace() {
            if let Some(slot) = SCRIPT_SLOTS.into_iter().find(|s| *s == boot_slot) {
                env.setenv(&left(slot), SCRIPT_DEFAULT_LEFT);
            }
        }
        env.saveenv();
        return None;
    };
    // saveenv, then bootargs (not saved) and boot.
    env.saveenv();
    Some(slot.to_string())
}

fn left(slot: &str) -> String {
    format!("BOOT_{slot}_LEFT")
}

/// U-Boot's `test N -gt 0` reads N with simple_strtol: leading decimal digits.
fn test_integer(value: &str) -> i64 {
    let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(0)
}

/// `setexpr X ${X} - 1`: reads hex, writes lowercase hex without prefix.
fn setexpr_minus_one(value: &str) -> String {
    let digits: String = value.chars().take_while(char::is_ascii_hexdigit).collect();
    let n = u64::from_str_radix(&digits, 16).unwrap_or(0);
    format!("{:x}", n.wrapping_sub(1))
}

/// The environment in U-Boot's RAM: what was loaded plus `setenv`s since.
struct Env<'a> {
    config: &'a Path,
    vars: BTreeMap<String, String>,
    changed: BTreeMap<String, String>,
}

impl<'a> Env<'a> {
    fn load(config: &'a Path) -> Self {
        Self { config, vars: printenv(config), changed: BTreeMap::new() }
    }

    fn get(&self, name: &str) -> String {
        self.vars.get(name).cloned().unwrap_or_default()
    }

    fn setenv(&mut self, name: &str, value: &str) {
        self.vars.insert(name.into(), value.into());
        self.changed.insert(name.into(), value.into());
    }

    /// saveenv: one store of everything, here the changed variables in one
    /// `fw_setenv -s` (itself a single write of the whole environment).
    fn saveenv(&mut self) {
        let script: String = self.changed.iter().map(|(name, value)| format!("{name}={value}\n")).collect();
        let mut child = Command::new("fw_setenv")
            .arg("-c")
            .arg(self.config)
            .args(["-s", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn fw_setenv");
        child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write fw_setenv script");
        let status = child.wait().expect("wait for fw_setenv");
        assert!(status.success(), "fw_setenv -s failed: {status}");
        self.changed.clear();
    }
}

/// Every variable, as the real `fw_printenv -c` prints it.
pub fn printenv(env_config: &Path) -> BTreeMap<String, String> {
    let out = Command::new("fw_printenv").arg("-c").arg(env_config).output().expect("spawn fw_printenv");
    assert!(out.status.success(), "fw_printenv failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}
