//! Provisioning: a new device raises an access point (or, with backend
//! `none`, only listens), serves a portal, and takes its Wi-Fi and MQTT
//! identity from a phone or `fleetctl provision`. The pure core:
//! - `pop`: the per-device proof of possession, and what is derived from it
//!   (the access point's WPA2 passphrase, the request key);
//! - `auth`: each API request carries an HMAC under that key over the
//!   method, path, a single-use device nonce and the body's hash;
//! - `guard`: wrong proofs are rate-limited with lock-out and back-off;
//! - `request`: the provisioning request and its checks, with named refusals;
//! - `identity`: the device's own key and CSR, and the certificate checks;
//! - `portal`: every HTTP request answered, without IO.
//!
//! The edges: `server` (hyper), `store` (atomic files, keys 0600),
//! `registrar` (the device's enroll and renew calls) and `phase` (the
//! daemon's provisioning phase, over a `net::Backend`).

pub use fleetd_core::provision::{auth, enroll, guard, identity, pop, portal, renewal, request};
pub mod phase;
pub mod registrar;
pub mod server;
pub mod store;
