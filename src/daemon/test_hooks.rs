//! Hooks only tests use, compiled in with the `test-hooks` feature (on
//! whenever cargo builds tests; see Cargo.toml), never into the device
//! build. Each one is armed by an environment variable the test sets.

use std::time::Duration;

/// With `FLEETD_TEST_WEDGE_MAIN_LOOP_FILE=PATH`, the main loop's thread
/// blocks for good once PATH exists, so a test can see the watchdog pings
/// stop (tests/it/systemd.rs). Nothing else reads the variable.
pub(super) fn wedge_main_loop() {
    let Some(trigger) = std::env::var_os("FLEETD_TEST_WEDGE_MAIN_LOOP_FILE") else { return };
    let trigger = std::path::PathBuf::from(trigger);
    tokio::spawn(async move {
        while !trigger.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        crate::logging::log("test hook: wedging the main loop");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    });
}
