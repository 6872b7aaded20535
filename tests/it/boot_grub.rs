//! The GRUB backend against the real `grub-editenv`, and through the GRUB
//! simulator, which does what the shipped grub.cfg does.

use crate::common::bootsim_grub;

use bootsim_grub::{editenv, grub_editenv_available, power_on};
use fleetd::boot::grub::GrubEnv;
use fleetd::boot::{BootControl, SlotState};
use std::path::{Path, PathBuf};

/// Skips the test (or fails it under CI) without grub-editenv.
macro_rules! require_grub_editenv {
    () => {
        if !grub_editenv_available() {
            return;
        }
    };
}

fn slots() -> Vec<String> {
    vec!["A".into(), "B".into()]
}

struct Env {
    _dir: tempfile::TempDir,
    path: PathBuf,
    grub: GrubEnv,
}

/// A grubenv provisioned by fleetd: ORDER="A B", both OK, no try.
fn provisioned() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    GrubEnv::initialize(&path, &slots()).unwrap();
    let grub = GrubEnv::new(path.clone(), &slots()).unwrap();
    Env { _dir: dir, path, grub }
}

fn listed(path: &Path) -> String {
    editenv(path, &["list"])
}

const FRESH: &str = "ORDER=A B\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=0\n";

#[test]
fn grub_editenv_lists_what_initialize_writes() {
    require_grub_editenv!();
    let env = provisioned();
    assert_eq!(listed(&env.path), FRESH);
    assert_eq!(std::fs::metadata(&env.path).unwrap().len(), 1024);
}

#[test]
fn set_primary_for_trial_before_and_after() {
    require_grub_editenv!();
    let mut env = provisioned();
    editenv(&env.path, &["set", "B_OK=0", "B_TRY=1"]);
    assert_eq!(listed(&env.path), "ORDER=A B\nA_OK=1\nA_TRY=0\nB_OK=0\nB_TRY=1\n");
    env.grub.set_primary_for_trial("B").unwrap();
    assert_eq!(listed(&env.path), "ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=0\n");
    assert_eq!(env.grub.primary().unwrap(), Some("B".into()));
    assert_eq!(env.grub.state("B").unwrap(), SlotState::Good);
}

#[test]
fn mark_good_before_and_after() {
    require_grub_editenv!();
    let mut env = provisioned();
    editenv(&env.path, &["set", "ORDER=B A", "B_TRY=1"]);
    assert_eq!(listed(&env.path), "ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=1\n");
    assert_eq!(env.grub.state("B").unwrap(), SlotState::Trying);
    assert_eq!(env.grub.primary().unwrap(), Some("A".into()));
    env.grub.mark_good("B").unwrap();
    assert_eq!(listed(&env.path), "ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=0\n");
    assert_eq!(env.grub.state("B").unwrap(), SlotState::Good);
    assert_eq!(env.grub.primary().unwrap(), Some("B".into()));
}

#[test]
fn mark_bad_before_and_after() {
    require_grub_editenv!();
    let mut env = provisioned();
    editenv(&env.path, &["set", "ORDER=B A", "B_TRY=1"]);
    env.grub.mark_bad("B").unwrap();
    assert_eq!(listed(&env.path), "ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=0\nB_TRY=0\n");
    assert_eq!(env.grub.state("B").unwrap(), SlotState::Bad);
    assert_eq!(env.grub.primary().unwrap(), Some("A".into()));
}

#[test]
fn unknown_slot_is_refused_and_nothing_written() {
    require_grub_editenv!();
    let mut env = provisioned();
    let before = std::fs::read(&env.path).unwrap();
    assert_eq!(env.grub.mark_good("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(env.grub.mark_bad("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(env.grub.set_primary_for_trial("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(env.grub.state("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(std::fs::read(&env.path).unwrap(), before);
}

#[test]
fn an_env_made_by_grub_editenv_create_reads_as_empty() {
    require_grub_editenv!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    editenv(&path, &["create"]);
    let grub = GrubEnv::new(path.clone(), &slots()).unwrap();
    assert_eq!(grub.read().unwrap().vars().count(), 0);
    assert_eq!(grub.primary().unwrap(), None);
    assert_eq!(grub.state("A").unwrap(), SlotState::Bad);
    assert_eq!(grub.state("B").unwrap(), SlotState::Bad);
}

#[test]
fn fleetd_writes_the_same_bytes_as_grub_editenv() {
    require_grub_editenv!();
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    // Starts from grub-editenv's own block, with its warning comment.
    editenv(&ours, &["create"]);
    editenv(&ours, &["set", "ORDER=A B", "A_OK=1", "A_TRY=1"]);
    std::fs::copy(&ours, &theirs).unwrap();
    let mut grub = GrubEnv::new(ours.clone(), &slots()).unwrap();

    grub.set_primary_for_trial("B").unwrap();
    editenv(&theirs, &["set", "ORDER=B A", "B_OK=1", "B_TRY=0"]);
    assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());

    grub.mark_good("A").unwrap();
    editenv(&theirs, &["set", "A_OK=1", "A_TRY=0"]);
    assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());

    grub.mark_bad("B").unwrap();
    editenv(&theirs, &["set", "B_OK=0", "B_TRY=0"]);
    assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());
}

#[test]
fn variables_set_by_grub_editenv_survive_fleetd_writes() {
    require_grub_editenv!();
    let mut env = provisioned();
    let tricky = "a\\b\nc=d";
    editenv(&env.path, &["set", "X=Y", &format!("TRICKY={tricky}"), "saved_entry=1"]);
    assert_eq!(env.grub.read().unwrap().get("TRICKY"), Some(tricky));
    env.grub.set_primary_for_trial("B").unwrap();
    env.grub.mark_good("B").unwrap();
    env.grub.mark_bad("A").unwrap();
    assert_eq!(
        listed(&env.path),
        format!("ORDER=B A\nA_OK=0\nA_TRY=0\nB_OK=1\nB_TRY=0\nX=Y\nTRICKY={tricky}\nsaved_entry=1\n")
    );
}

#[test]
fn missing_and_corrupt_envs_are_named_errors() {
    require_grub_editenv!();
    let mut env = provisioned();
    let missing = GrubEnv::new(env.path.with_extension("none"), &slots()).unwrap();
    assert_eq!(missing.primary().unwrap_err().name(), "boot-env-io");

    let mut bytes = std::fs::read(&env.path).unwrap();
    bytes.truncate(1000);
    std::fs::write(&env.path, &bytes).unwrap();
    assert_eq!(env.grub.primary().unwrap_err().name(), "boot-env-corrupt");
    assert_eq!(env.grub.mark_good("A").unwrap_err().name(), "boot-env-corrupt");
    assert_eq!(std::fs::read(&env.path).unwrap(), bytes, "left as it was");
}

#[test]
fn update_that_boots_is_tried_once_and_committed() {
    require_grub_editenv!();
    let mut env = provisioned();
    assert_eq!(power_on(&env.path, &|_| true), Some("A".into()));
    assert_eq!(env.grub.state("A").unwrap(), SlotState::Trying);
    env.grub.mark_good("A").unwrap();

    env.grub.set_primary_for_trial("B").unwrap();
    assert_eq!(power_on(&env.path, &|_| true), Some("B".into()));
    assert_eq!(listed(&env.path), "ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=1\n");
    assert_eq!(env.grub.state("B").unwrap(), SlotState::Trying);
    env.grub.mark_good("B").unwrap();
    assert_eq!(env.grub.primary().unwrap(), Some("B".into()));
    assert_eq!(power_on(&env.path, &|_| true), Some("B".into()));
}

#[test]
fn update_that_crashes_gets_one_try_then_falls_back() {
    require_grub_editenv!();
    let mut env = provisioned();
    env.grub.set_primary_for_trial("B").unwrap();
    let tries = std::cell::Cell::new(0);
    let booted = power_on(&env.path, &|slot| {
        if slot == "B" {
            tries.set(tries.get() + 1);
        }
        slot != "B"
    });
    assert_eq!(booted, Some("A".into()));
    assert_eq!(tries.get(), 1, "GRUB gives the new slot exactly one try");
    assert_eq!(listed(&env.path), "ORDER=B A\nA_OK=1\nA_TRY=1\nB_OK=1\nB_TRY=1\n");
    assert_eq!(env.grub.state("B").unwrap(), SlotState::Trying);

    // fleetd, running on A, gives B up and confirms A.
    env.grub.mark_bad("B").unwrap();
    env.grub.mark_good("A").unwrap();
    assert_eq!(listed(&env.path), "ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=0\nB_TRY=0\n");
    assert_eq!(env.grub.primary().unwrap(), Some("A".into()));
    assert_eq!(power_on(&env.path, &|slot| slot != "B"), Some("A".into()));
}

#[test]
fn unconfirmed_boots_move_to_the_other_slot_then_retry() {
    require_grub_editenv!();
    let env = provisioned();
    // Nothing marks good: A uses its try, then B, then both are reset.
    assert_eq!(power_on(&env.path, &|_| true), Some("A".into()));
    assert_eq!(power_on(&env.path, &|_| true), Some("B".into()));
    assert_eq!(power_on(&env.path, &|_| true), Some("A".into()));
    assert_eq!(listed(&env.path), "ORDER=A B\nA_OK=1\nA_TRY=1\nB_OK=1\nB_TRY=0\n");
}

#[test]
fn with_no_good_slot_the_first_in_order_boots_uncounted() {
    require_grub_editenv!();
    let mut env = provisioned();
    env.grub.set_primary_for_trial("B").unwrap();
    env.grub.mark_bad("A").unwrap();
    env.grub.mark_bad("B").unwrap();
    let before = std::fs::read(&env.path).unwrap();
    assert_eq!(power_on(&env.path, &|_| true), Some("B".into()));
    assert_eq!(std::fs::read(&env.path).unwrap(), before);
}

#[test]
fn when_every_boot_crashes_the_simulator_gives_up() {
    require_grub_editenv!();
    let env = provisioned();
    assert_eq!(power_on(&env.path, &|_| false), None);
}
