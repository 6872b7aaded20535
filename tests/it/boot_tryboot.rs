//! The Raspberry Pi tryboot backend: exact autoboot.txt before and after each
//! operation, and whole update cycles through the firmware simulator.

use crate::common::bootsim_tryboot;

use bootsim_tryboot::power_on;
use fleetd::boot::tryboot::RpiTryboot;
use fleetd::boot::{BootControl, SlotState};
use std::path::PathBuf;

const A2_B3: &str = "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n";
const A2_A2: &str = "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=2\n";
const B3_A2: &str = "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n";

struct Pi {
    _dir: tempfile::TempDir,
    autoboot: PathBuf,
    booted: PathBuf,
    tryboot: RpiTryboot,
}

fn partitions() -> Vec<(String, u32)> {
    vec![("A".into(), 2), ("B".into(), 3)]
}

fn pi(autoboot_txt: &str) -> Pi {
    let dir = tempfile::tempdir().unwrap();
    let autoboot = dir.path().join("autoboot.txt");
    let booted = dir.path().join("partition");
    std::fs::write(&autoboot, autoboot_txt).unwrap();
    let tryboot = RpiTryboot::new(autoboot.clone(), partitions(), booted.clone()).unwrap();
    Pi { _dir: dir, autoboot, booted, tryboot }
}

impl Pi {
    fn text(&self) -> String {
        std::fs::read_to_string(&self.autoboot).unwrap()
    }

    fn power_on(&self, tryboot_flag: bool, boots_ok: &dyn Fn(&str) -> bool) -> Option<String> {
        power_on(&self.autoboot, tryboot_flag, &partitions(), &self.booted, boots_ok)
    }

    fn states(&self) -> (SlotState, SlotState) {
        (self.tryboot.state("A").unwrap(), self.tryboot.state("B").unwrap())
    }
}

#[test]
fn backend_and_reboot_argument() {
    let pi = pi(A2_B3);
    assert_eq!(pi.tryboot.backend(), "rpi-tryboot");
    assert_eq!(pi.tryboot.trial_reboot_arg(), Some("0 tryboot"));
}

#[test]
fn initialize_writes_the_canonical_file() {
    let pi = pi("");
    RpiTryboot::initialize(&pi.autoboot, 2, 3).unwrap();
    assert_eq!(pi.text(), A2_B3);
}

#[test]
fn set_primary_for_trial_before_and_after() {
    let mut pi = pi(A2_A2);
    assert_eq!(pi.states(), (SlotState::Good, SlotState::Bad));
    pi.tryboot.set_primary_for_trial("B").unwrap();
    assert_eq!(pi.text(), A2_B3);
    assert_eq!(pi.tryboot.primary().unwrap(), Some("A".into()));
    assert_eq!(pi.states(), (SlotState::Good, SlotState::Good));
}

#[test]
fn mark_good_before_and_after() {
    let mut pi = pi(A2_B3);
    pi.tryboot.mark_good("B").unwrap();
    assert_eq!(pi.text(), B3_A2);
    assert_eq!(pi.tryboot.primary().unwrap(), Some("B".into()));
    pi.tryboot.mark_good("A").unwrap();
    assert_eq!(pi.text(), A2_B3);
}

#[test]
fn mark_bad_of_the_trial_slot_points_tryboot_at_the_committed_one() {
    let mut pi = pi(A2_B3);
    pi.tryboot.mark_bad("B").unwrap();
    assert_eq!(pi.text(), A2_A2);
    assert_eq!(pi.states(), (SlotState::Good, SlotState::Bad));
    // Already bad: nothing to change.
    pi.tryboot.mark_bad("B").unwrap();
    assert_eq!(pi.text(), A2_A2);
}

#[test]
fn mark_bad_of_the_committed_slot_is_refused() {
    let mut pi = pi(A2_B3);
    let err = pi.tryboot.mark_bad("A").unwrap_err();
    assert_eq!(err.name(), "boot-config");
    assert!(err.to_string().contains("committed"), "{err}");
    assert_eq!(pi.text(), A2_B3);
}

#[test]
fn other_lines_survive_rewrites() {
    let before = "# written by the image build\n[all]\ntryboot_a_b=1\nboot_partition=2\n\
                  \n[pi5]\nfoo=bar\n[tryboot]\nboot_partition=2\n";
    let mut pi = pi(before);
    pi.tryboot.set_primary_for_trial("B").unwrap();
    assert_eq!(pi.text(), before.replace("[tryboot]\nboot_partition=2", "[tryboot]\nboot_partition=3"));
    pi.tryboot.mark_good("B").unwrap();
    assert_eq!(
        pi.text(),
        "# written by the image build\n[all]\ntryboot_a_b=1\nboot_partition=3\n\
         \n[pi5]\nfoo=bar\n[tryboot]\nboot_partition=2\n"
    );
}

#[test]
fn unknown_slot_is_refused_and_nothing_written() {
    let mut pi = pi(A2_B3);
    assert_eq!(pi.tryboot.state("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(pi.tryboot.mark_good("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(pi.tryboot.mark_bad("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(pi.tryboot.set_primary_for_trial("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(pi.text(), A2_B3);
}

#[test]
fn missing_and_corrupt_files_are_named_errors() {
    let mut pi = pi("[all]\nboot_partition=2\n");
    assert_eq!(pi.tryboot.primary().unwrap_err().name(), "boot-env-corrupt");
    assert_eq!(pi.tryboot.mark_good("A").unwrap_err().name(), "boot-env-corrupt");
    assert_eq!(pi.text(), "[all]\nboot_partition=2\n");
    std::fs::write(&pi.autoboot, "x".repeat(5000)).unwrap();
    assert_eq!(pi.tryboot.primary().unwrap_err().name(), "boot-env-corrupt");
    std::fs::remove_file(&pi.autoboot).unwrap();
    assert_eq!(pi.tryboot.primary().unwrap_err().name(), "boot-env-io");
}

#[test]
fn booted_hint_reads_the_device_tree_property() {
    let pi = pi(A2_B3);
    assert_eq!(pi.tryboot.booted_hint().unwrap(), None);
    std::fs::write(&pi.booted, 3u32.to_be_bytes()).unwrap();
    assert_eq!(pi.tryboot.booted_hint().unwrap(), Some("B".into()));
    std::fs::write(&pi.booted, 7u32.to_be_bytes()).unwrap();
    assert_eq!(pi.tryboot.booted_hint().unwrap_err().name(), "boot-config");
    std::fs::write(&pi.booted, b"\x00\x02").unwrap();
    assert_eq!(pi.tryboot.booted_hint().unwrap_err().name(), "boot-env-corrupt");
}

#[test]
fn update_that_boots_is_committed() {
    let mut pi = pi(A2_A2);
    assert_eq!(pi.power_on(false, &|_| true), Some("A".into()));
    pi.tryboot.set_primary_for_trial("B").unwrap();
    let arg = pi.tryboot.trial_reboot_arg();
    assert_eq!(pi.power_on(arg.is_some(), &|_| true), Some("B".into()));
    assert_eq!(pi.tryboot.booted_hint().unwrap(), Some("B".into()));
    assert_eq!(pi.states(), (SlotState::Good, SlotState::Trying));
    pi.tryboot.mark_good("B").unwrap();
    assert_eq!(pi.text(), B3_A2);
    assert_eq!(pi.states(), (SlotState::Good, SlotState::Good));
    assert_eq!(pi.power_on(false, &|_| true), Some("B".into()));
}

#[test]
fn update_that_crashes_falls_back_to_the_committed_slot() {
    let mut pi = pi(A2_A2);
    pi.tryboot.set_primary_for_trial("B").unwrap();
    let tries = std::cell::Cell::new(0);
    let booted = pi.power_on(true, &|slot| {
        if slot == "B" {
            tries.set(tries.get() + 1);
        }
        slot != "B"
    });
    assert_eq!(booted, Some("A".into()));
    assert_eq!(tries.get(), 1, "the tryboot flag is one-shot");
    assert_eq!(pi.tryboot.booted_hint().unwrap(), Some("A".into()));
    assert_eq!(pi.text(), A2_B3, "the firmware writes nothing");
    pi.tryboot.mark_bad("B").unwrap();
    assert_eq!(pi.text(), A2_A2);
    assert_eq!(pi.states(), (SlotState::Good, SlotState::Bad));
    // Even a stray tryboot reboot now runs A.
    assert_eq!(pi.power_on(true, &|slot| slot != "B"), Some("A".into()));
}

#[test]
fn a_normal_reboot_during_a_pending_trial_runs_the_committed_slot() {
    let mut pi = pi(A2_A2);
    pi.tryboot.set_primary_for_trial("B").unwrap();
    assert_eq!(pi.power_on(false, &|_| true), Some("A".into()));
    assert_eq!(pi.states(), (SlotState::Good, SlotState::Good));
}
