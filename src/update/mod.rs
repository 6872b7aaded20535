//! Updates. The pure core: `agent` (admission, the job's persistence
//! points, its end, the health timer) around `engine` (the job's transition
//! table), over `state` (the persistent document). The edges: `executor`
//! carries the agent's actions out, through `fetch` (HTTP with resume) and
//! `slot_writer` (hash, compare, write, fsync).

pub use fleetd_core::update::{agent, engine, report, rollout, state};
pub mod executor;
pub mod fetch;
pub mod slot_writer;
mod status_doc;

pub use agent::{Agent, Refusal, Source};
pub use engine::{Event, Job, Phase, Transfer};
pub use executor::{open, Admission, Cancel, ExecError, Executor, MarkError, OpenError, Report, Reporter};
pub use state::{HistoryEntry, State, HISTORY_LEN};
pub use status_doc::{apply_identity, status_doc};

/// The store of the update agent's document.
pub type StateStore = crate::store::Store<State>;
