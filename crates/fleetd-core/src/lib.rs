//! fleetd's pure core: everything that decides, and nothing that waits.
//!
//! - `trust`: the co-signed update message and its checks;
//! - `update`: the agent (admission, persistence points, health timer)
//!   around the engine (the job's transition table), over the persistent
//!   state, and the reports a job makes;
//! - `status`: the status document; `bus::model`: the D-Bus view of it;
//!   `bus::policy`: how the daemon answers each D-Bus call;
//! - `provision`: the portal's protocol (proof of possession, request
//!   authentication, lock-out, the request, the device's identity);
//! - `image`: the packed image's formats (block index, seek table) and the
//!   adaptive install's plan;
//! - `mqtt::aws`: AWS IoT's job documents; `device_id`: the id from the
//!   hardware; `der`, `admission`, `backoff`,
//!   `wifi`: the small shared pieces.
//!
//! Architecture invariant: no IO and no async runtime. Clocks and
//! randomness come in as arguments, so every decision is table-tested.

pub mod admission;
pub mod backoff;
pub mod der;
pub mod device_id;
pub mod error_name;
pub mod image;
pub mod status;
pub mod trust;
pub mod wifi;

pub mod update {
    //! A job's decisions: `agent` around `engine`, over `state`; `report`
    //! is what a job tells its front ends.
    pub mod agent;
    pub mod engine;
    pub mod report;
    pub mod rollout;
    pub mod state;

    pub use agent::{Agent, Refusal, Source};
    pub use engine::{Event, Job, Phase, Transfer};
    pub use report::Report;
    pub use state::{HistoryEntry, State, HISTORY_LEN};
}

pub mod boot {
    //! The two A/B slots, by name.
    pub mod slot;
}

pub mod bus {
    //! What the D-Bus interface shows, from the reports (`model`), and how
    //! the daemon answers its calls (`policy`).
    pub mod model;
    pub mod policy;
}

pub mod mqtt {
    //! AWS IoT's job documents, mapped to fleetd's reports.
    pub mod aws;
}

pub mod provision {
    //! The provisioning protocol's pure pieces (see each module).
    pub mod auth;
    pub mod enroll;
    pub mod guard;
    pub mod identity;
    pub mod pop;
    pub mod portal;
    pub mod renewal;
    pub mod request;
}

/// fleetd's version, reported in status documents and by the portal.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// When this binary was built (seconds since the epoch): the lowest clock floor.
pub fn build_epoch() -> u64 {
    env!("FLEETD_BUILD_EPOCH").parse().unwrap_or(0)
}
