//! fleetctl's integration tests: the co-signer service, run as a process.
//! They share the workspace's test harness (tests/it/common).

#[path = "../../../../tests/it/common/mod.rs"]
mod common;

mod cosigner;
mod registrar;
mod registrar_postgres;
