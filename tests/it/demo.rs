//! `fleetd demo` runs with no setup and tells the story it promises: the
//! real daemon installs v8 (zstd) over MQTT, reboots into it and commits,
//! then v9 adaptively; forged
//! and replayed messages are refused; a revoked server gets 403.

use crate::common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn the_demo_runs_the_whole_flow_in_seconds() {
    let started = Instant::now();
    let out = run(fleetd().arg("demo"));
    let elapsed = started.elapsed();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    for line in [
        "=> accepted: 2026.11-demo v8",
        "device: downloading, ",
        "=> committed v8; booted B",
        "      installed    v8",
        "      booted       B",
        "requires: zstd, adaptive",
        "=> committed v9; booted A",
        "=> refused: signature-missing",
        "=> refused as a duplicate",
        "(403): server-revoked",
        "Demo finished in",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(elapsed < Duration::from_secs(30), "the demo took {elapsed:?}");
}
