//! fleetd's registrar (see ARCHITECTURE.md): the serial-number registry,
//! installers and their logins, single-use claims, certificates issued from
//! the device's own CSR, renewal, revocation and the CRL, with a hash-chained
//! audit trail. SQLite or PostgreSQL; several instances may share one
//! PostgreSQL.
//!
//! Pure parts (no IO): `names`, `config::Config::parse`, `ca::issue`,
//! `audit::chain_hash`, `import::parse_csv`, `users::lockout_after`.

pub mod app;
pub mod audit;
pub mod ca;
pub mod claims;
pub mod config;
pub mod crl;
pub mod db;
pub mod devices;
pub mod enroll;
pub mod error;
pub mod files;
pub mod http;
pub mod import;
pub mod limiter;
pub mod names;
pub mod page;
pub mod rollouts;
pub mod serve;
pub mod testing;
pub mod users;

pub use app::App;
pub use ca::{issue, Issued, Issuer};
pub use config::Config;
pub use db::Db;
pub use error::RegistrarError;
pub use serve::run;
