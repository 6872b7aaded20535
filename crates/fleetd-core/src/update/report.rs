//! What an update tells its front ends (CLI progress, MQTT, D-Bus): plain
//! data, so the pure bus model can read it without the executor.

use super::engine::Failure;
use crate::status::UpdateState;

/// What the executor tells its front end (CLI progress, MQTT reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A new phase or an event: the status `state` and a sentence, why
    /// the job failed (in `failed`), and the job's jti and version when
    /// there is one (journal fields).
    Step { state: UpdateState, detail: String, failure: Option<Failure>, job: Option<(String, u64)> },
    /// Download progress, at most once per percent.
    /// `fetched`: bytes from the network (index included); `reused`: image
    /// bytes copied from the local slots.
    Progress { jti: String, version: u64, done: u64, total: u64, fetched: u64, reused: u64 },
    /// The status document, after every persisted change.
    Status(Box<crate::status::StatusDoc>),
}
