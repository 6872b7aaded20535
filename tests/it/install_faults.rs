//! Downloads that are cut, a daemon killed mid-write, and every kind of bad
//! input: each ends in a named error or a completed install, and the device
//! stays bootable on its old slot.

use crate::common;
use common::gateway::*;
use common::imageserver::{Fault, ImageServer};
use common::*;
use std::path::{Path, PathBuf};

const SLOT: u64 = 8 << 20;
const MIB: u64 = 1 << 20;
const TWENTY_S: std::time::Duration = std::time::Duration::from_secs(20);

struct Case {
    g: Gateway,
    server: ImageServer,
    image: Vec<u8>,
    slot_a_before: Vec<u8>,
}

fn case(image_len: usize) -> Case {
    let g = Gateway::new(Bootloader::Grub, SLOT);
    // Slot A holds the running system: it must never change.
    std::fs::write(g.slot("A"), image_bytes(SLOT as usize, 99)).unwrap();
    let slot_a_before = std::fs::read(g.slot("A")).unwrap();
    Case { g, server: ImageServer::start(), image: image_bytes(image_len, 5), slot_a_before }
}

impl Case {
    /// Serves `served` at /img and signs a message describing `self.image`.
    fn message(&self, served: Vec<u8>, extra: &[&str]) -> PathBuf {
        let file = self.g.path().join("image.bin");
        std::fs::write(&file, &self.image).unwrap();
        let url = self.server.add("/img", served);
        let mut args = vec!["--url", url.as_str(), "--image", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.g.dev.cosigned("msg", &args)
    }

    fn assert_old_slot_still_boots(&self) {
        assert_eq!(
            std::fs::read(self.g.slot("A")).unwrap(),
            self.slot_a_before,
            "the running slot was written"
        );
        let st = self.g.status();
        assert_eq!(st["primary_slot"], "A", "{st}");
        assert_eq!(st["slots"]["B"]["state"], "bad", "{st}");
    }

    fn assert_failed_with(&self, name: &str) {
        let st = self.g.status();
        assert_eq!(st["state"], "failed", "{st}");
        let err = st["last_error"].as_str().unwrap_or_default();
        assert!(err.starts_with(name), "expected {name}, got {err}");
        self.assert_old_slot_still_boots();
    }

    fn assert_installed(&self) {
        let st = self.g.status();
        assert_eq!(st["state"], "reboot-pending", "{st}");
        assert_eq!(st["primary_slot"], "B", "{st}");
        assert_eq!(&std::fs::read(self.g.slot("B")).unwrap()[..self.image.len()], &self.image[..]);
        assert_eq!(std::fs::read(self.g.slot("A")).unwrap(), self.slot_a_before);
    }
}

#[test]
fn a_stored_job_for_a_slot_no_longer_configured_fails_cleanly() {
    // state.json survives a config change that renamed the slots.
    let c = case(MIB as usize);
    c.g.kill_install_when(&c.message(c.image.clone(), &[]), "the job to be stored", TWENTY_S, |state| {
        state["job"].is_object()
    });
    let path = c.g.path().join("state/state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state["job"]["target_slot"] = "C".into();
    std::fs::write(&path, state.to_string()).unwrap();
    let out = c.g.run_once();
    assert!(out.status.success(), "{}", stderr(&out));
    let st = c.g.status();
    assert_eq!(st["state"], "failed", "{st}");
    assert!(st["last_error"].as_str().unwrap().contains("not in the configuration"), "{st}");
}

fn seed() -> u64 {
    let s = std::env::var("FLEETD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now() ^ std::process::id() as u64);
    eprintln!("seed {s} (set FLEETD_TEST_SEED to repeat)");
    s
}

#[test]
fn cuts_at_random_offsets_resume_with_range_requests() {
    let c = case((6 * MIB + 777) as usize);
    let mut x = seed() | 1;
    let cuts = 6;
    for i in 0..cuts {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // The first cut lands inside the image for sure; later ones may not.
        c.server.fault(Fault::CutAfter(x % if i == 0 { MIB } else { 2 * MIB }));
    }
    let msg = c.message(c.image.clone(), &[]);
    let out = c.g.install(&msg);
    assert!(out.status.success(), "{}", stderr(&out));
    c.assert_installed();
    let log = c.server.log();
    // Cuts past the end of the image never happen; the first always does.
    assert!(log.len() >= 2, "the first cut led to a Range request: {log:?}");
    let served: u64 = log.iter().map(|r| r.body_bytes).sum();
    let resent = served - c.image.len() as u64;
    let cut = log.len() as u64 - 1;
    eprintln!("{} requests, {resent} bytes downloaded twice over {cut} cuts", log.len());
    for pair in log.windows(2) {
        let received = pair[0].range_start + pair[0].body_bytes;
        assert!(pair[1].range_start <= received, "no gap: {log:?}");
        assert!(received - pair[1].range_start <= MIB, "at most 1 MiB fetched again per cut: {log:?}");
    }
    let last = log.last().unwrap();
    assert_eq!(last.range_start + last.body_bytes, c.image.len() as u64, "{log:?}");
}

#[test]
fn a_server_that_ignores_range_still_yields_the_right_image() {
    let c = case((3 * MIB) as usize);
    c.server.fault(Fault::CutAfter(MIB + 5));
    c.server.fault(Fault::IgnoreRange);
    let msg = c.message(c.image.clone(), &[]);
    let out = c.g.install(&msg);
    assert!(out.status.success(), "{}", stderr(&out));
    c.assert_installed();
}

#[test]
fn killed_mid_download_resumes_after_restart() {
    let c = case((6 * MIB) as usize);
    // The first response sends 3 MiB and then hangs, like a dying link.
    c.server.fault(Fault::Stall(3 * MIB, std::time::Duration::from_secs(20)));
    let msg = c.message(c.image.clone(), &[]);
    c.g.kill_install_when(&msg, "a checkpoint past 2 MiB", TWENTY_S, |state| {
        state["job"]["written"].as_u64().unwrap_or(0) >= 2 * MIB
    });
    assert_eq!(c.g.status()["state"], "downloading");

    let out = c.g.run_once();
    assert!(out.status.success(), "{}", stderr(&out));
    c.assert_installed();
    let log = c.server.log();
    let resumed = log.last().unwrap();
    assert!(resumed.range_start >= 2 * MIB, "resumed with a Range request: {log:?}");
    // The log says so, from the checkpoint the request started at.
    let said = format!("from byte {}, its last checkpoint", resumed.range_start);
    assert!(stderr(&out).contains(&said), "no '{said}' in:\n{}", stderr(&out));
}

#[test]
fn a_truncated_image_is_named_and_nothing_boots_it() {
    let c = case((2 * MIB) as usize);
    let short = c.image[..c.image.len() - 1000].to_vec();
    let msg = c.message(short, &[]);
    let out = c.g.install(&msg);
    assert_eq!(out.status.code(), Some(1));
    c.assert_failed_with("image-truncated");
}

#[test]
fn more_bytes_than_signed_is_named() {
    // A larger object (Content-Length says so)...
    let c = case((2 * MIB) as usize);
    let mut long = c.image.clone();
    long.extend_from_slice(&[0u8; 4096]);
    let msg = c.message(long, &[]);
    assert_eq!(c.g.install(&msg).status.code(), Some(1));
    c.assert_failed_with("image-larger-than-claimed");

    // ...and an endless stream with no length at all.
    let c = case((2 * MIB) as usize);
    c.server.fault(Fault::Extra(10 * MIB));
    let msg = c.message(c.image.clone(), &[]);
    assert_eq!(c.g.install(&msg).status.code(), Some(1));
    c.assert_failed_with("image-larger-than-claimed");
}

#[test]
fn a_wrong_hash_makes_nothing_bootable() {
    let c = case((2 * MIB) as usize);
    let mut other = c.image.clone();
    other[12345] ^= 0xff;
    let msg = c.message(other, &[]);
    assert_eq!(c.g.install(&msg).status.code(), Some(1));
    c.assert_failed_with("hash-mismatch");
}

#[test]
fn an_image_larger_than_the_slot_is_refused_before_download() {
    let c = case((2 * MIB) as usize);
    let url = c.server.add("/img", c.image.clone());
    let size = (SLOT + 1).to_string();
    let msg = c.g.dev.cosigned("big", &["--url", &url, "--size", &size, "--sha256", &"ab".repeat(32)]);
    let out = c.g.install(&msg);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("rejected: image-too-large"), "{}", stdout(&out));
    assert!(c.server.log().is_empty(), "nothing was downloaded");
    assert_eq!(c.g.status()["primary_slot"], "A");
}

#[test]
fn http_errors_are_named() {
    let c = case(MIB as usize);
    for _ in 0..20 {
        c.server.fault(Fault::Status(404));
    }
    let msg = c.message(c.image.clone(), &[]);
    assert_eq!(c.g.install(&msg).status.code(), Some(1));
    c.assert_failed_with("download-refused");
}

/// A server that drips bytes slower than `min_rate_bps`: every attempt
/// "makes progress", which used to reset the retries for ever. The whole
/// download's floor ends it by name soon after its grace.
#[test]
fn a_slow_drip_server_is_given_up_as_too_slow() {
    let mut c = case(MIB as usize);
    let (stall_s, give_up_s, min_rate) = (2, 2, 1024);
    c.g.give_up_after_s = give_up_s;
    c.g.extra_config = format!("stall_timeout_s = {stall_s}\nmin_rate_bps = {min_rate}\n");
    c.g.write_config();
    c.server.set_rate(Some(min_rate / 5));
    let msg = c.message(c.image.clone(), &[]);
    let mut child = fleetd()
        .args(["install", "--no-reboot", "--config"])
        .arg(c.g.dev.config())
        .arg(&msg)
        .spawn()
        .unwrap();
    // The floor's grace, one more stall timeout for the check to come
    // round, and start-up: the product's own bounds.
    let bound = std::time::Duration::from_secs(give_up_s + 2 * stall_s + 5);
    let deadline = std::time::Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still downloading after {bound:?}: {}", c.g.status());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    c.assert_failed_with("download-too-slow");
}

#[test]
fn a_corrupt_boot_env_is_named_and_nothing_is_written() {
    let c = case(MIB as usize);
    std::fs::write(c.g.grubenv(), b"garbage that is not a grub environment block").unwrap();
    let slot_b_before = std::fs::read(c.g.slot("B")).unwrap();
    let msg = c.message(c.image.clone(), &[]);
    let out = c.g.install(&msg);
    assert_eq!(out.status.code(), Some(1));
    let st = c.g.status();
    assert!(st["last_error"].as_str().unwrap().contains("boot-env-corrupt"), "{st}");
    assert_eq!(std::fs::read(c.g.slot("B")).unwrap(), slot_b_before, "no byte written to the target");
    assert_eq!(std::fs::read(c.g.slot("A")).unwrap(), c.slot_a_before);
    assert!(c.server.log().is_empty());
}

fn require_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI runs as root: {what} must run");
    eprintln!("SKIP {what}: needs root (mount, loop devices)");
    false
}

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_full_disk_is_named_and_the_device_stays_bootable() {
    if !require_root("full-disk test") {
        return;
    }
    let c = case((3 * MIB) as usize);
    // The target slot is a sparse file on a 2 MiB tmpfs: it cannot hold 3 MiB.
    let small = c.g.path().join("small");
    std::fs::create_dir(&small).unwrap();
    sh(&format!("mount -t tmpfs -o size=2m tmpfs {}", small.display()));
    let _m = Mount(small.clone());
    let slot_b = small.join("slot-b.img");
    std::fs::File::create(&slot_b).unwrap().set_len(SLOT).unwrap();
    std::fs::remove_file(c.g.slot("B")).unwrap();
    std::os::unix::fs::symlink(&slot_b, c.g.slot("B")).unwrap();
    let msg = c.message(c.image.clone(), &[]);
    let out = c.g.install(&msg);
    assert_eq!(out.status.code(), Some(1));
    c.assert_failed_with("disk-full");
}

/// A loop device with a GPT holding two partitions: the slots are real block devices.
#[test]
fn installs_into_a_gpt_partition_on_a_loop_device_and_refuses_a_mounted_one() {
    if !require_root("loop-device test") {
        return;
    }
    let c = case((3 * MIB) as usize);
    let disk = c.g.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(20 * MIB).unwrap();
    sh(&format!("printf 'label: gpt\\n,8M\\n,8M\\n' | sfdisk -q {}", disk.display()));
    let loop_dev = sh(&format!("losetup -f --show -P {}", disk.display()));
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _l = Loop(loop_dev.clone());
    let (p1, p2) = (format!("{loop_dev}p1"), format!("{loop_dev}p2"));
    for _ in 0..100 {
        if Path::new(&p2).exists() {
            break;
        }
        let _ = std::process::Command::new("partx").args(["-a", &loop_dev]).output();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(Path::new(&p2).exists(), "partition device {p2} did not appear");
    // Slot A (running) is partition 1; its content must not change.
    sh(&format!("dd if={} of={p1} bs=1M conv=fsync status=none", c.g.slot("A").display()));
    let config = std::fs::read_to_string(c.g.dev.config()).unwrap();
    std::fs::write(c.g.dev.config(), config.replace("slot-a.img", &p1).replace("slot-b.img", &p2)).unwrap();

    let msg = c.message(c.image.clone(), &[]);
    let out = c.g.install(&msg);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let written = std::fs::read(&p2).unwrap();
    assert_eq!(&written[..c.image.len()], &c.image[..]);
    assert_eq!(std::fs::read(&p1).unwrap()[..(SLOT as usize)], c.slot_a_before[..], "partition 1 untouched");

    // A target held by another exclusive opener (as device-mapper or a
    // RAID holds its members) is not in mountinfo: the kernel refuses
    // fleetd's O_EXCL open, and nothing is written.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let held = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&p2).unwrap();
        let c3 = case(MIB as usize);
        let config = std::fs::read_to_string(c3.g.dev.config()).unwrap();
        std::fs::write(c3.g.dev.config(), config.replace("slot-b.img", &p2)).unwrap();
        let before = std::fs::read(&p2).unwrap();
        let out = c3.g.install(&c3.message(c3.image.clone(), &[]));
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("target-is-booted") && stderr(&out).contains("in use"),
            "{}",
            stderr(&out)
        );
        assert_eq!(std::fs::read(&p2).unwrap(), before, "a held device was written");
        drop(held);
    }

    // A target that is mounted is refused (the same check guards `/`).
    let c2 = case(MIB as usize);
    sh(&format!("mkfs.ext4 -q -F {p2}"));
    let mnt = c2.g.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!("mount {p2} {}", mnt.display()));
    let _m = Mount(mnt);
    let config = std::fs::read_to_string(c2.g.dev.config()).unwrap();
    std::fs::write(c2.g.dev.config(), config.replace("slot-b.img", &p2)).unwrap();
    let msg = c2.message(c2.image.clone(), &[]);
    let out = c2.g.install(&msg);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("target-is-booted"), "{}", stderr(&out));
}

#[test]
fn a_target_that_is_now_the_booted_slot_is_never_written() {
    // A download into B is interrupted; then the device reports B as booted
    // (misconfiguration, or a bootloader surprise). Resuming must refuse.
    let c = case((4 * MIB) as usize);
    c.server.fault(Fault::Stall(2 * MIB, std::time::Duration::from_secs(20)));
    let msg = c.message(c.image.clone(), &[]);
    c.g.kill_install_when(&msg, "the download to start", TWENTY_S, |state| {
        state["job"]["phase"]["phase"] == "downloading"
    });
    let slot_b_before = std::fs::read(c.g.slot("B")).unwrap();
    let config = std::fs::read_to_string(c.g.dev.config()).unwrap();
    std::fs::write(c.g.dev.config(), config.replace("booted_slot = \"A\"", "booted_slot = \"B\"")).unwrap();
    let out = c.g.run_once();
    assert!(out.status.success(), "{}", stderr(&out));
    let st = c.g.status();
    assert_eq!(st["state"], "failed", "{st}");
    assert!(st["last_error"].as_str().unwrap().starts_with("target-is-booted"), "{st}");
    assert_eq!(std::fs::read(c.g.slot("B")).unwrap(), slot_b_before, "the booted slot was written");
}
