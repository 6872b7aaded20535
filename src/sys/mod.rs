//! Linux specifics at the device's edge: probes and notifications the rest
//! of the daemon uses through small, safe interfaces.

pub mod block;
pub mod netlink;
pub mod notify;
pub mod signals;
