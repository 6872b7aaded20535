//! Provisioning (being built): the pure protocol core comes first.
//! - `pop`: the per-device proof of possession, and what is derived from it
//!   (the access point's WPA2 passphrase, the request key);
//! - `auth`: each API request carries an HMAC under that key over the
//!   method, path, a single-use device nonce and the body's hash;
//! - `guard`: wrong proofs are rate-limited with lock-out and back-off;
//! - `request`: the provisioning request and its checks, with named refusals.
//!
//! The HTTP server, the NetworkManager and hostapd backends and the
//! daemon's phases build on these.

pub mod auth;
pub mod guard;
pub mod pop;
pub mod request;
