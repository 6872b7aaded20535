//! fleetd: provisioning, co-signed A/B updates and rollback for Linux gateways.
//!
//! The pure cores (`trust`, and later the update engine and boot-environment
//! encoders) perform no IO; the binaries and the daemon wire them to disks and
//! sockets. See `ARCHITECTURE.md` for the map.

pub use fleetd_core::{admission, backoff, der, device_id, error_name, image, status, trust, wifi};

pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fsutil;
pub mod http;
pub mod http_server;
pub mod logging;
pub mod mqtt;
pub mod net;
pub mod policy;
pub mod provision;
pub mod store;
pub mod sys;
pub mod update;

pub use fleetd_core::{build_epoch, VERSION};

/// Seconds since the Unix epoch from the system clock (0 if it reads before 1970).
pub fn system_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Milliseconds since the Unix epoch from the system clock (0 before 1970).
pub fn system_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
