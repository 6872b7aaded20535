//! Power cuts: `kill -9` at random moments of an install, then a restart.
//! Every time the state file parses, the running slot is untouched, the real
//! `fw_printenv` reads a valid environment, and the install either completes
//! on retry or ends cleanly failed with the old slot primary.

use crate::common;
use common::gateway::*;
use common::imageserver::ImageServer;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const SLOT: u64 = 4 << 20;

fn copy_dir(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap().success();
    assert!(ok, "cp -a");
}

#[derive(Default, Debug)]
struct Tally {
    completed_first_time: u32,
    completed_after_restart: u32,
    failed_cleanly: u32,
}

#[test]
fn kill_minus_9_at_random_moments_never_leaves_a_bad_state() {
    let trials: u32 =
        std::env::var("FLEETD_POWER_CUT_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let template = Gateway::new(Bootloader::Uboot, SLOT);
    std::fs::write(template.slot("A"), image_bytes(SLOT as usize, 1)).unwrap();
    let slot_a = std::fs::read(template.slot("A")).unwrap();
    let server = ImageServer::start();
    let image = image_bytes((2 << 20) + 4321, 2);
    let image_file = template.path().join("image.bin");
    std::fs::write(&image_file, &image).unwrap();
    let url = server.add("/img", image.clone());
    let msg = template.message("msg", &url, &image_file, 8);

    // How long an undisturbed install takes here, to spread the kills over it.
    let work = tempfile::tempdir().unwrap();
    let probe = work.path().join("probe");
    copy_dir(template.path(), &probe);
    let config = |dir: &Path| -> std::path::PathBuf {
        let path = dir.join("fleetd.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(template.path().to_str().unwrap(), dir.to_str().unwrap());
        std::fs::write(&path, text).unwrap();
        path
    };
    let start = Instant::now();
    let out = run(fleetd().arg("install").arg("--config").arg(config(&probe)).arg(&msg));
    assert!(out.status.success(), "{}", stderr(&out));
    let full = start.elapsed();
    eprintln!("an undisturbed install takes {full:?}");

    let mut x = seed();
    let mut tally = Tally::default();
    for trial in 0..trials {
        let dir = work.path().join(format!("t{trial}"));
        copy_dir(template.path(), &dir);
        let cfg = config(&dir);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_micros(x % (full.as_micros() as u64 * 12 / 10).max(1));
        let mut child = fleetd()
            .arg("install")
            .arg("--config")
            .arg(&cfg)
            .arg(&msg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let finished_anyway = child.wait().unwrap().success();

        let context = format!("trial {trial}, killed after {delay:?}");
        // The state file (if written yet) parses.
        let state_path = dir.join("state/state.json");
        if state_path.exists() {
            let bytes = std::fs::read(&state_path).unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .unwrap_or_else(|e| panic!("{context}: state.json: {e}"));
        }
        // The running slot is untouched, and the real tool reads the env.
        assert!(std::fs::read(dir.join("slot-a.img")).unwrap() == slot_a, "{context}: slot A was written");
        let env = bootsim_uboot::printenv(&dir.join("fw_env.config"));
        let order = env.get("BOOT_ORDER").cloned().unwrap_or_default();
        assert!(order.split_whitespace().any(|s| s == "A"), "{context}: A not bootable: {env:?}");

        // Restart: the same command again, as a retry would.
        let out = run(fleetd().arg("install").arg("--config").arg(&cfg).arg(&msg));
        let status = run(fleetd().args(["status", "--json", "--config"]).arg(&cfg));
        let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        match st["state"].as_str() {
            Some("reboot-pending") => {
                let b = std::fs::read(dir.join("slot-b.img")).unwrap();
                assert!(b[..image.len()] == image[..], "{context}: slot B differs from the image");
                assert_eq!(st["primary_slot"], "B", "{context}: {st}");
                if finished_anyway {
                    tally.completed_first_time += 1;
                } else {
                    tally.completed_after_restart += 1;
                }
            }
            Some("failed") => {
                assert_eq!(st["primary_slot"], "A", "{context}: {st}");
                assert!(st["last_error"].is_string(), "{context}: {st}");
                tally.failed_cleanly += 1;
            }
            other => panic!("{context}: ended in {other:?}: {st}\n{}", stderr(&out)),
        }
        let env = bootsim_uboot::printenv(&dir.join("fw_env.config"));
        assert!(env.contains_key("BOOT_ORDER"), "{context}: {env:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("power cuts: {trials} trials: {tally:?}");
    assert_eq!(tally.completed_first_time + tally.completed_after_restart + tally.failed_cleanly, trials);
    assert!(tally.completed_after_restart > 0, "some kills must land mid-install: {tally:?}");
}

fn seed() -> u64 {
    let s = std::env::var("FLEETD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| now() | 1);
    eprintln!("seed {s} (set FLEETD_TEST_SEED to repeat)");
    s | 1
}
