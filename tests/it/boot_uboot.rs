//! The native U-Boot backend against the real libubootenv tools
//! (`fw_printenv`, `fw_setenv`: Debian's libubootenv-tool): each side reads
//! what the other wrote, in single and redundant layouts, including a torn
//! newest copy and the flags counter wrapping. Then the boot chooser end to
//! end with the simulated U-Boot running the shipped boot script.
//!
//! Without the tools these tests skip with a message, except under CI
//! (`CI` set), where a missing tool is a failure.

use crate::common::bootsim_uboot;

use bootsim_uboot::{power_on, printenv, run_boot_script};
use fleetd::boot::uboot::{self, UbootEnv, Vars};
use fleetd::boot::{BootControl, SlotState};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SIZE: usize = 0x4000;
const ATTEMPTS: u32 = 3;

/// Whether the tools are here; under CI their absence fails the test.
fn tools_available() -> bool {
    let found = ["fw_printenv", "fw_setenv"]
        .iter()
        .all(|tool| Command::new(tool).arg("-V").output().is_ok_and(|out| out.status.success()));
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but fw_printenv/fw_setenv are missing: install libubootenv-tool"
        );
        eprintln!("skipping: fw_printenv/fw_setenv not found (apt install libubootenv-tool)");
    }
    found
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Single,
    Redundant,
}

const LAYOUTS: [Layout; 2] = [Layout::Single, Layout::Redundant];

/// An environment in a temp file and the fw_env.config naming it.
struct Board {
    _dir: tempfile::TempDir,
    config: PathBuf,
    env: PathBuf,
    layout: Layout,
}

impl Board {
    fn new(layout: Layout) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("uboot.env");
        let config = dir.path().join("fw_env.config");
        let mut text = format!("# test board\n{} 0x0 {SIZE:#x}\n", env.display());
        let copies = match layout {
            Layout::Single => 1,
            Layout::Redundant => {
                text += &format!("{} {SIZE:#x} {SIZE:#x}\n", env.display());
                2
            }
        };
        fs::write(&env, vec![0u8; copies * SIZE]).unwrap();
        fs::write(&config, text).unwrap();
        Self { _dir: dir, config, env, layout }
    }

    fn uboot(&self) -> UbootEnv {
        UbootEnv::open(&self.config, &["A".into(), "B".into()], ATTEMPTS).unwrap()
    }

    fn initialize(&self, vars: &[(&str, &str)]) {
        uboot::initialize(&self.config, vars).unwrap();
    }

    /// What the real fw_printenv reads.
    fn printenv(&self) -> BTreeMap<String, String> {
        printenv(&self.config)
    }

    /// What fleetd reads, as strings.
    fn fleetd_vars(&self) -> BTreeMap<String, String> {
        strings(&self.uboot().read_vars().unwrap())
    }

    /// Sets variables with one real `fw_setenv -s` (one store).
    fn setenv(&self, vars: &[(&str, &str)]) {
        fw_setenv(&self.config, &[], vars);
    }

    /// The flags byte of each redundant copy.
    fn flags(&self) -> (u8, u8) {
        let bytes = fs::read(&self.env).unwrap();
        (bytes[4], bytes[SIZE + 4])
    }

    /// Flips one bit in a copy's data: a torn write.
    fn corrupt_copy(&self, copy: usize) {
        let mut bytes = fs::read(&self.env).unwrap();
        bytes[copy * SIZE + 8] ^= 0x04;
        fs::write(&self.env, bytes).unwrap();
    }

    /// Both readers agree the environment is exactly `expected`.
    #[track_caller]
    fn assert_env(&self, expected: &[(&str, &str)], context: &str) {
        let expected = map(expected);
        assert_eq!(self.printenv(), expected, "{:?} fw_printenv, {context}", self.layout);
        assert_eq!(self.fleetd_vars(), expected, "{:?} fleetd, {context}", self.layout);
    }
}

fn fw_setenv(config: &Path, extra_args: &[&str], vars: &[(&str, &str)]) {
    let script: String = vars.iter().map(|(n, v)| format!("{n}={v}\n")).collect();
    let mut child = Command::new("fw_setenv")
        .arg("-c")
        .arg(config)
        .args(extra_args)
        .args(["-s", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "fw_setenv: {}", String::from_utf8_lossy(&out.stderr));
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

fn strings(vars: &Vars) -> BTreeMap<String, String> {
    vars.iter()
        .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

/// Variables a board's environment holds besides the chooser's.
const BOARD_VARS: [(&str, &str); 3] =
    [("bootcmd", "run distro_bootcmd; echo x=y"), ("bootdelay", "2"), ("ethaddr", "02:00:00:00:00:01")];

fn with_board_vars(chooser: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    BOARD_VARS.iter().chain(chooser).copied().collect()
}

#[test]
fn fw_printenv_reads_what_fleetd_writes() {
    if !tools_available() {
        return;
    }
    for layout in LAYOUTS {
        let board = Board::new(layout);
        let start = with_board_vars(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")]);
        board.initialize(&start);
        board.assert_env(&start, "after initialize");
        let mut env = board.uboot();
        env.set_primary_for_trial("B").unwrap();
        board.assert_env(
            &with_board_vars(&[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")]),
            "after set_primary_for_trial(B)",
        );
        // Several rounds, so the redundant counter advances.
        for round in 0..4 {
            env.mark_bad("B").unwrap();
            env.mark_good("B").unwrap();
            board.assert_env(
                &with_board_vars(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")]),
                &format!("round {round}"),
            );
        }
        if layout == Layout::Redundant {
            assert_eq!(board.flags(), (9, 10), "initialize wrote 1 and 0; nine writes since");
        }
    }
}

#[test]
fn fleetd_reads_what_fw_setenv_writes() {
    if !tools_available() {
        return;
    }
    for layout in LAYOUTS {
        let board = Board::new(layout);
        // A fresh environment made by the tools alone, from a defaults file.
        let defaults = board.config.with_file_name("defaults.env");
        fs::write(&defaults, "bootdelay=2\nBOOT_ORDER=A B\n").unwrap();
        let defaults_arg = defaults.to_str().unwrap();
        fw_setenv(&board.config, &["-f", defaults_arg], &[("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")]);
        let mut expected =
            map(&[("bootdelay", "2"), ("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")]);
        assert_eq!(board.fleetd_vars(), expected, "{layout:?}");

        // Several tool rounds; each time fleetd reads the latest.
        for round in 0..5u32 {
            let value = format!("v{round}");
            board.setenv(&[("round", &value), ("BOOT_B_LEFT", &(round % 4).to_string())]);
            expected.insert("round".into(), value);
            expected.insert("BOOT_B_LEFT".into(), (round % 4).to_string());
            assert_eq!(board.fleetd_vars(), expected, "{layout:?} round {round}");
        }
        let env = board.uboot();
        assert_eq!(env.primary().unwrap().as_deref(), Some("A"));
        assert_eq!(env.state("B").unwrap(), SlotState::Bad, "BOOT_B_LEFT=0");

        if layout == Layout::Redundant {
            // Fresh write went to copy 1 (flags 1), then five alternating rounds.
            let (flags0, flags1) = board.flags();
            assert_eq!((flags0, flags1), (6, 5));
            // fleetd continues the counter where fw_setenv left it.
            let mut env = board.uboot();
            env.mark_good("B").unwrap();
            assert_eq!(board.flags(), (6, 7));
            expected.insert("BOOT_B_LEFT".into(), "3".into());
            assert_eq!(board.printenv(), expected);
            board.setenv(&[("round", "after")]);
            assert_eq!(board.flags(), (8, 7));
            expected.insert("round".into(), "after".into());
            assert_eq!(board.fleetd_vars(), expected);
        }
    }
}

#[test]
fn a_torn_newest_copy_falls_back_to_the_older_one_in_both_readers() {
    if !tools_available() {
        return;
    }
    let board = Board::new(Layout::Redundant);
    let older = with_board_vars(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3")]);
    board.initialize(&older); // copy 0 is current, flags 1
    board.setenv(&[("BOOT_ORDER", "B A")]); // copy 1, flags 2
    assert_eq!(board.flags(), (1, 2));
    assert_eq!(board.printenv()["BOOT_ORDER"], "B A");

    board.corrupt_copy(1);
    board.assert_env(&older, "newest copy (fw_setenv's) torn");

    // fleetd's next write replaces the torn copy and is read by both.
    let mut env = board.uboot();
    env.set_primary_for_trial("B").unwrap();
    assert_eq!(board.flags(), (1, 2));
    let newer = with_board_vars(&[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")]);
    board.assert_env(&newer, "after fleetd rewrote the torn copy");

    // And the other way round: fleetd's newest copy torn.
    env.mark_bad("B").unwrap(); // copy 0, flags 3
    assert_eq!(board.flags(), (3, 2));
    board.corrupt_copy(0);
    board.assert_env(&newer, "newest copy (fleetd's) torn");

    // Both copies torn: fleetd refuses to read or write, fw_printenv fails.
    board.corrupt_copy(1);
    let before = fs::read(&board.env).unwrap();
    assert_eq!(env.primary().unwrap_err().name(), "boot-env-corrupt");
    assert_eq!(env.mark_good("A").unwrap_err().name(), "boot-env-corrupt");
    assert_eq!(fs::read(&board.env).unwrap(), before, "nothing written");
    let out = Command::new("fw_printenv").arg("-c").arg(&board.config).output().unwrap();
    assert!(!out.status.success(), "fw_printenv also finds no valid copy");
}

#[test]
fn the_flags_counter_wraps_the_same_way_in_both() {
    if !tools_available() {
        return;
    }
    let board = Board::new(Layout::Redundant);
    let block = |value: &str, flags: u8| {
        let vars: Vars = [(b"n".to_vec(), value.as_bytes().to_vec())].into();
        uboot::encode_block(&vars, SIZE, Some(flags)).unwrap()
    };
    for (flags0, flags1, current) in [
        (0xff, 0x00, "copy1"),
        (0x00, 0xff, "copy0"),
        (0xfe, 0xff, "copy1"),
        (0xff, 0x01, "copy0"),
        (0x05, 0x05, "copy0"),
    ] {
        let mut bytes = block("copy0", flags0);
        bytes.extend(block("copy1", flags1));
        fs::write(&board.env, bytes).unwrap();
        let context = format!("flags {flags0:#04x} {flags1:#04x}");
        board.assert_env(&[("n", current)], &context);
    }

    // From 0xff/0x00 (copy 1 current), fleetd writes copy 0 with 1, then
    // fw_setenv writes copy 1 with 2.
    let mut bytes = block("copy0", 0xff);
    bytes.extend(block("copy1", 0x00));
    fs::write(&board.env, bytes).unwrap();
    board.uboot().mark_good("A").unwrap();
    assert_eq!(board.flags(), (1, 0));
    board.assert_env(&[("n", "copy1"), ("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3")], "after fleetd's write");
    board.setenv(&[("n", "tool")]);
    assert_eq!(board.flags(), (1, 2));
    board
        .assert_env(&[("n", "tool"), ("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3")], "after fw_setenv's write");
}

/// RAUC's test/bootchooser.c style: each operation from a known environment
/// to exactly the expected one, checked by fw_printenv and by fleetd.
#[test]
fn every_operation_from_and_to_an_exact_environment() {
    if !tools_available() {
        return;
    }
    type Op = fn(&mut UbootEnv) -> Result<(), fleetd::boot::BootError>;
    type Env = &'static [(&'static str, &'static str)];
    // (name, environment before, operation, environment after)
    let cases: [(&str, Env, Op, Env); 10] = [
        (
            "trial B from A B",
            &[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")],
            |e| e.set_primary_for_trial("B"),
            &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")],
        ),
        (
            "trial B after it was marked bad",
            &[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "2"), ("BOOT_B_LEFT", "0")],
            |e| e.set_primary_for_trial("B"),
            &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "2"), ("BOOT_B_LEFT", "3")],
        ),
        (
            "trial A on an unprovisioned environment",
            &[],
            |e| e.set_primary_for_trial("A"),
            &[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3")],
        ),
        (
            "good B after a trial boot",
            &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "2")],
            |e| e.mark_good("B"),
            &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")],
        ),
        (
            "good A keeps its place behind B",
            &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "1"), ("BOOT_B_LEFT", "3")],
            |e| e.mark_good("A"),
            &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")],
        ),
        (
            "good B re-enters the order at the end",
            &[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")],
            |e| e.mark_good("B"),
            &[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")],
        ),
        (
            "bad B",
            &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "1")],
            |e| e.mark_bad("B"),
            &[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")],
        ),
        (
            "bad A, keeping an unknown word",
            &[("BOOT_ORDER", "A R B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")],
            |e| e.mark_bad("A"),
            &[("BOOT_ORDER", "R B"), ("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "3")],
        ),
        (
            "confirm A, drained while B was written, gets its attempts back",
            &[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "0")],
            |e| e.confirm_booted("A"),
            &[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")],
        ),
        (
            "confirm B, removed from the order, changes nothing",
            &[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "2"), ("BOOT_B_LEFT", "1")],
            |e| e.confirm_booted("B"),
            &[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "2"), ("BOOT_B_LEFT", "1")],
        ),
    ];
    for layout in LAYOUTS {
        for (name, before, op, after) in &cases {
            let board = Board::new(layout);
            let before = with_board_vars(before);
            board.initialize(&before);
            board.assert_env(&before, &format!("{name}: before"));
            op(&mut board.uboot()).unwrap();
            board.assert_env(&with_board_vars(after), &format!("{name}: after"));
        }
        // Bad on the last slot in the order is refused: an empty BOOT_ORDER
        // would take the script's default and bring every slot back.
        let board = Board::new(layout);
        let before = with_board_vars(&[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")]);
        board.initialize(&before);
        assert_eq!(board.uboot().mark_bad("A").unwrap_err().name(), "boot-config");
        board.assert_env(&before, "a refused mark-bad writes nothing");
    }
}

#[test]
fn a_trial_that_keeps_crashing_rolls_back_under_the_boot_script() {
    if !tools_available() {
        return;
    }
    for layout in LAYOUTS {
        let board = Board::new(layout);
        board.initialize(&with_board_vars(&[
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "3"),
        ]));
        let mut env = board.uboot();
        assert_eq!(power_on(&board.config, &|_| true).as_deref(), Some("A"));
        assert_eq!(env.state("A").unwrap(), SlotState::Trying);
        env.mark_good("A").unwrap();
        assert_eq!(env.state("A").unwrap(), SlotState::Good);

        // Install to B and try it; B crashes on every boot.
        env.set_primary_for_trial("B").unwrap();
        assert_eq!(env.primary().unwrap().as_deref(), Some("B"));
        let crashes = std::cell::Cell::new(0);
        let booted = power_on(&board.config, &|slot| {
            if slot == "B" {
                crashes.set(crashes.get() + 1);
            }
            slot != "B"
        });
        assert_eq!(booted.as_deref(), Some("A"), "{layout:?}");
        assert_eq!(crashes.get(), ATTEMPTS, "every attempt spent on B");
        board.assert_env(
            &with_board_vars(&[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "2"), ("BOOT_B_LEFT", "0")]),
            "after the rollback boot",
        );
        assert_eq!(env.primary().unwrap().as_deref(), Some("A"));
        assert_eq!(env.state("B").unwrap(), SlotState::Bad);
        // fleetd on A notices and gives B up, then confirms A.
        env.mark_bad("B").unwrap();
        env.mark_good("A").unwrap();
        board.assert_env(
            &with_board_vars(&[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")]),
            "after fleetd's rollback",
        );
    }
}

#[test]
fn a_healthy_trial_is_committed_and_stays() {
    if !tools_available() {
        return;
    }
    let board = Board::new(Layout::Redundant);
    board.initialize(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")]);
    let mut env = board.uboot();
    env.set_primary_for_trial("B").unwrap();
    assert_eq!(power_on(&board.config, &|_| true).as_deref(), Some("B"));
    assert_eq!(env.state("B").unwrap(), SlotState::Trying);
    env.mark_good("B").unwrap();
    for _ in 0..5 {
        assert_eq!(power_on(&board.config, &|_| true).as_deref(), Some("B"));
        env.mark_good("B").unwrap();
    }
    board.assert_env(
        &[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")],
        "after six confirmed boots of B",
    );
}

#[test]
fn the_boot_script_fills_in_defaults_and_resets_when_nothing_boots() {
    if !tools_available() {
        return;
    }
    let board = Board::new(Layout::Single);
    board.initialize(&BOARD_VARS);
    let env = board.uboot();
    // fleetd reads the missing variables as the script's defaults.
    assert_eq!(env.primary().unwrap().as_deref(), Some("A"));
    assert_eq!(power_on(&board.config, &|_| true).as_deref(), Some("A"));
    board.assert_env(
        &with_board_vars(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "2"), ("BOOT_B_LEFT", "3")]),
        "after the first boot",
    );

    // Nothing boots: A's two attempts, B's three, then the script restores
    // the defaults and resets.
    let tries = std::cell::RefCell::new(Vec::new());
    let booted = power_on(&board.config, &|slot| {
        tries.borrow_mut().push(slot.to_string());
        false
    });
    assert_eq!(booted, None);
    assert_eq!(tries.into_inner(), ["A", "A", "B", "B", "B"]);
    board.assert_env(
        &with_board_vars(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")]),
        "after the reset branch",
    );
}

#[test]
fn the_reset_branch_never_brings_back_a_slot_fleetd_removed() {
    if !tools_available() {
        return;
    }
    let board = Board::new(Layout::Redundant);
    // B is half-written (fleetd removed it from BOOT_ORDER and zeroed it);
    // A has crashed through all its attempts.
    let start = with_board_vars(&[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "0")]);
    board.initialize(&start);
    assert_eq!(run_boot_script(&board.config), None, "nothing bootable: reset");
    board.assert_env(
        &with_board_vars(&[("BOOT_ORDER", "A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")]),
        "only the slots in BOOT_ORDER get their attempts back",
    );
    // A keeps crashing: only A is ever tried, reset after reset.
    let tries = std::cell::RefCell::new(Vec::new());
    for _ in 0..3 {
        let booted = power_on(&board.config, &|slot| {
            tries.borrow_mut().push(slot.to_string());
            false
        });
        assert_eq!(booted, None);
    }
    assert_eq!(tries.into_inner(), ["A"; 9], "B never booted");
    assert_eq!(board.uboot().state("B").unwrap(), SlotState::Bad);
}
