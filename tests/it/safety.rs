//! Never brick, never lock out: power cuts that must not drain the running
//! slot, two fleetd processes at once, a trial ended by hand after a manual
//! reboot, and a failed trial that could not reboot. Each runs the real
//! binaries against a boot environment the bootloader's own tools read.

use crate::common;
use common::gateway::*;
use common::imageserver::ImageServer;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const SLOT: u64 = 8 << 20;
const MIB: u64 = 1 << 20;

fn spawn_fleetd(g: &Gateway, args: &[&str]) -> Child {
    fleetd()
        .args(args)
        .arg("--config")
        .arg(g.dev.config())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn spawn_install(g: &Gateway, message: &Path) -> Child {
    fleetd()
        .args(["install", "--no-reboot", "--config"])
        .arg(g.dev.config())
        .arg(message)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn stored_state(g: &Gateway) -> serde_json::Value {
    std::fs::read(g.path().join("state/state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Waits until the stored state satisfies `ready` (the download's pace is
/// the image server's rate, so the wait is bounded by image size / rate).
fn wait_state(g: &Gateway, what: &str, within: Duration, ready: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + within;
    while !ready(&stored_state(g)) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {}", stored_state(g));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn power_cut(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

struct Setup {
    g: Gateway,
    server: ImageServer,
    image: Vec<u8>,
    message: PathBuf,
}

/// A gateway on slot A, a 7 MiB image served at 1 MiB/s (a checkpoint per MiB).
fn setup(bootloader: Bootloader) -> Setup {
    let g = Gateway::new(bootloader, SLOT);
    std::fs::write(g.slot("A"), image_bytes(SLOT as usize, 99)).unwrap();
    let server = ImageServer::start();
    server.set_rate(Some(MIB));
    let image = image_bytes((7 * MIB) as usize, 8);
    let file = g.path().join("v8.img");
    std::fs::write(&file, &image).unwrap();
    let url = server.add("/v8.img", image.clone());
    let message = g.message("v8", &url, &file, 8);
    Setup { g, server, image, message }
}

/// Attempt drain: four power cuts during one download, each followed by a
/// boot through the boot script (which spends one of A's attempts) and a
/// restart of fleetd. The running slot gets its attempts back at every
/// start, the half-written slot never boots, and the update still lands.
#[test]
fn power_cuts_during_a_download_never_drain_the_running_slot() {
    if !grub_and_uboot_tools() {
        return;
    }
    for bootloader in [Bootloader::Uboot, Bootloader::Grub, Bootloader::Tryboot] {
        let mut s = setup(bootloader);
        let slot_a = std::fs::read(s.g.slot("A")).unwrap();
        let env_at_start = s.g.boot_env();
        let written = |g: &Gateway| stored_state(g)["job"]["written"].as_u64().unwrap_or(0);
        let check_confirmed = |g: &Gateway, cut: u64| {
            let env = g.boot_env();
            match bootloader {
                Bootloader::Uboot => {
                    assert_eq!(env["BOOT_A_LEFT"], ATTEMPTS.to_string(), "after cut {cut}: {env:?}");
                    assert_eq!(env["BOOT_ORDER"], "A", "after cut {cut}: B stays out: {env:?}");
                    assert_eq!(env["BOOT_B_LEFT"], "0", "after cut {cut}: {env:?}");
                }
                Bootloader::Grub => {
                    assert_eq!(env["A_TRY"], "0", "after cut {cut}: A confirmed again: {env:?}");
                    assert_eq!(env["B_OK"], "0", "after cut {cut}: {env:?}");
                }
                // Nothing to drain, and nothing written before the commit.
                Bootloader::Tryboot => assert_eq!(env, env_at_start, "after cut {cut}"),
            }
        };
        let mut child = spawn_install(&s.g, &s.message);
        let mut at_cut = 0;
        for cut in 0..=4u64 {
            // This fleetd has started (and confirmed the slot, which comes
            // first) once a new checkpoint lands.
            wait_state(&s.g, "a checkpoint", Duration::from_secs(30), |st| {
                st["job"]["written"].as_u64().unwrap_or(0) > at_cut
            });
            if cut > 0 {
                check_confirmed(&s.g, cut);
            }
            if cut == 4 {
                break;
            }
            power_cut(child);
            at_cut = written(&s.g);
            let booted = s.g.power_on(&|_| true);
            assert_eq!(booted.as_deref(), Some("A"), "{bootloader:?} cut {}: {:?}", cut + 1, s.g.boot_env());
            child = spawn_fleetd(&s.g, &["run", "--once"]);
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let st = s.g.status();
        assert_eq!(st["state"], "reboot-pending", "{bootloader:?}: {st}");
        assert_eq!(&std::fs::read(s.g.slot("B")).unwrap()[..s.image.len()], &s.image[..]);
        assert_eq!(std::fs::read(s.g.slot("A")).unwrap(), slot_a, "the running slot was never written");
        assert!(s.server.log().iter().filter(|r| r.range_start > 0).count() >= 4, "resumed with Range");
        // The trial boot runs B, and B commits.
        assert_eq!(s.g.power_on(&|_| true).as_deref(), Some("B"), "{bootloader:?}");
        assert!(s.g.run_once().status.success());
        let st = s.g.status();
        assert_eq!(
            (st["state"].as_str(), st["installed_version"].as_u64()),
            (Some("committed"), Some(8)),
            "{st}"
        );
        eprintln!("{bootloader:?}: 4 power cuts in one download, the running slot kept its attempts");
    }
}

fn grub_and_uboot_tools() -> bool {
    let present = |tool: &str| std::process::Command::new(tool).arg("--version").output().is_ok();
    let ok = present("grub-editenv") && present("fw_printenv");
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have grub-editenv and fw_printenv (scripts/setup)"
        );
        eprintln!("SKIP: needs grub-editenv and fw_printenv (scripts/setup)");
    }
    ok
}

/// Two mutating fleetd processes at once: the second is refused at once
/// with `busy`, and the first finishes as if alone.
#[test]
fn a_second_fleetd_is_refused_at_once_and_the_first_is_untouched() {
    let s = setup(Bootloader::Grub);
    let file = s.g.path().join("v9.img");
    std::fs::write(&file, image_bytes(MIB as usize, 9)).unwrap();
    let url = s.server.add("/v9.img", image_bytes(MIB as usize, 9));
    let second_message = s.g.message("v9", &url, &file, 9);
    let first = spawn_install(&s.g, &s.message);
    wait_state(&s.g, "the first download", Duration::from_secs(30), |st| {
        st["job"]["written"].as_u64().unwrap_or(0) >= MIB
    });
    for args in [
        vec!["install", "--no-reboot", second_message.to_str().unwrap()],
        vec!["install", "--no-reboot", s.message.to_str().unwrap()],
        vec!["run", "--once"],
        vec!["mark-good"],
        vec!["mark-bad"],
    ] {
        let started = Instant::now();
        let out = s.g.fleetd(&args);
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("busy: another fleetd (pid"), "{args:?}: {}", stderr(&out));
        assert!(took < Duration::from_secs(1), "{args:?} took {took:?}: refused at once, not after waiting");
    }
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success());
    let st = s.g.status();
    assert_eq!(st["state"], "reboot-pending", "{st}");
    assert_eq!(st["job"]["version"], 8, "{st}");
    assert_eq!(&std::fs::read(s.g.slot("B")).unwrap()[..s.image.len()], &s.image[..], "slot B holds v8");
    let state = stored_state(&s.g);
    assert_eq!(state["replay_cache"].as_object().unwrap().len(), 1, "v9 was never accepted: {state}");
    // Once the first is done, the lock is free again.
    assert!(s.g.fleetd(&["run", "--once"]).status.success());
}

/// RAUC's manual flow: `install --no-reboot`, reboot by hand into the new
/// slot, `mark-good`. The job ends exactly as the daemon's health check
/// would end it; `mark-bad` likewise rolls back.
#[test]
fn mark_good_or_bad_after_a_manual_reboot_finishes_the_job() {
    if !grub_and_uboot_tools() {
        return;
    }
    for (bootloader, good) in [(Bootloader::Uboot, true), (Bootloader::Grub, true), (Bootloader::Grub, false)]
    {
        let mut s = setup(bootloader);
        s.server.set_rate(None);
        let out = s.g.fleetd(&["install", "--no-reboot", s.message.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(s.g.power_on(&|_| true).as_deref(), Some("B"));
        let out = s.g.fleetd(&[if good { "mark-good" } else { "mark-bad" }]);
        assert!(out.status.success(), "{}", stderr(&out));
        let st = s.g.status();
        if good {
            assert_eq!(st["state"], "committed", "{bootloader:?}: {st}");
            assert_eq!(st["installed_version"], 8, "{st}");
            assert_eq!(st["slots"]["B"]["version"], 8, "{st}");
            assert_eq!(st["slots"]["B"]["state"], "good", "{st}");
            assert_eq!(st["job"]["step"], "committed", "{st}");
            assert_eq!(st["last_error"], serde_json::Value::Null, "{st}");
            // And it stays: the next boot runs B.
            assert_eq!(s.g.power_on(&|_| true).as_deref(), Some("B"));
        } else {
            assert_eq!(st["state"], "rolled-back", "{st}");
            assert_eq!(st["installed_version"], 0, "{st}");
            assert_eq!(st["slots"]["B"]["state"], "bad", "{st}");
            assert!(st["last_error"].as_str().unwrap().contains("marked bad by hand"), "{st}");
            assert_eq!(s.g.power_on(&|_| true).as_deref(), Some("A"), "the next boot runs the old slot");
        }
    }
}

/// A failed trial whose reboot did not happen (`reboot = none`, or a
/// reboot command that fails): the rejected slot still runs and the other
/// slot is the only good one. No new job may write it until the device
/// has booted a good slot.
#[test]
fn after_a_failed_trial_without_a_reboot_no_job_may_write_the_only_good_slot() {
    for reboot in ["reboot = \"none\"", "reboot = \"command\"\nreboot_command = \"exit 1\""] {
        let mut s = setup(Bootloader::Grub);
        s.server.set_rate(None);
        let slot_a = std::fs::read(s.g.slot("A")).unwrap();
        let out = s.g.install(&s.message);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(s.g.power_on(&|_| true).as_deref(), Some("B"));
        set_reboot(&s.g, reboot);
        s.g.set_health(false);
        assert!(s.g.run_once().status.success());
        let st = s.g.status();
        assert_eq!(st["state"], "rolled-back", "{reboot}: {st}");
        assert_eq!(st["booted_slot"], "B", "still running the rejected slot: {st}");
        if reboot.contains("exit 1") {
            assert!(st["last_error"].as_str().unwrap().contains("reboot-failed"), "{st}");
        }

        let file = s.g.path().join("v9.img");
        std::fs::write(&file, image_bytes(MIB as usize, 9)).unwrap();
        let url = s.server.add("/v9.img", image_bytes(MIB as usize, 9));
        let v9 = s.g.message("v9", &url, &file, 9);
        let out = s.g.install(&v9);
        assert_eq!(out.status.code(), Some(1), "{reboot}: {}", stderr(&out));
        assert!(stderr(&out).contains("reboot-required"), "{reboot}: {}", stderr(&out));
        assert_eq!(std::fs::read(s.g.slot("A")).unwrap(), slot_a, "{reboot}: the only good slot was written");
        assert_eq!(s.g.status()["slots"]["A"]["state"], "good");

        // Rebooted into A, the device takes the update into B.
        s.g.set_health(true);
        set_reboot(&s.g, "reboot = \"none\"");
        assert_eq!(s.g.power_on(&|_| true).as_deref(), Some("A"));
        let out = s.g.install(&v9);
        assert!(out.status.success(), "{reboot}: {}", stderr(&out));
        let st = s.g.status();
        assert_eq!(
            (st["state"].as_str(), st["job"]["target_slot"].as_str()),
            (Some("reboot-pending"), Some("B"))
        );
    }
}

fn set_reboot(g: &Gateway, reboot: &str) {
    let config = std::fs::read_to_string(g.dev.config()).unwrap();
    let start = config.find("reboot = ").unwrap();
    let end = config[start..].find("\nretry_base_ms").unwrap() + start;
    let config = format!("{}{reboot}{}", &config[..start], &config[end..]);
    // Until the next power_on, which writes the gateway's config afresh.
    std::fs::write(g.dev.config(), &config).unwrap();
}

/// One message with `iat` in 2100, co-signed and otherwise valid, is
/// refused, and the clock floor stays where it was: later messages verify.
#[test]
fn an_iat_in_the_future_never_raises_the_clock_floor() {
    let s = setup(Bootloader::Grub);
    let file = s.g.path().join("v8.img");
    let url = s.server.add("/x.img", std::fs::read(&file).unwrap());
    let hostile = s
        .g
        .dev
        .cosigned("future", &["--url", &url, "--image", file.to_str().unwrap(), "--issued-at", "4102444800"]);
    let out = s.g.install(&hostile);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("rejected: iat-invalid"), "{}{}", stdout(&out), stderr(&out));
    let floor = stored_state(&s.g)["clock_floor"].as_u64().unwrap_or(0);
    assert!(floor < 4_102_444_800, "the floor rose to {floor}");
    assert_eq!(s.g.dev.verify(&s.message, false).0, 0, "a current message still verifies");
}

/// `fleetd status | head -n 1`: the reader is gone before a byte is
/// written, and fleetd ends by SIGPIPE like `cat`, not by a panic on the
/// failed write (an abort in the release build).
#[test]
fn status_into_a_closed_pipe_ends_by_sigpipe_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let g = Gateway::new(Bootloader::Grub, 1 << 20);
    let mut child = fleetd()
        .args(["status", "--json", "--config"])
        .arg(g.dev.config())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {}", out.status, stderr(&out));
}
