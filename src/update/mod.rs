//! Updates: the pure state machine (`engine`), and the edges that carry its
//! actions out: `fetch` (HTTP with resume), `slot_writer` (hash, compare,
//! write, fsync) and `driver` (boot env, store, reboot, health check).

pub mod driver;
pub mod engine;
pub mod fetch;
pub mod slot_writer;
pub mod state;
mod status_doc;

pub use driver::{DriveError, Report, Updater};
pub use engine::{Action, Event, Job, Phase};
pub use state::{HistoryEntry, State, HISTORY_LEN};
pub use status_doc::status_doc;

/// The store of the update agent's document.
pub type StateStore = crate::store::Store<State>;
