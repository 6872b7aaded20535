//! fleetd's fleet side: keys and signing (`cli`), the co-signer service
//! (`cosigner`), image packing (`image`), publishing to and watching devices (`publish`),
//! provisioning a device through its portal, rollouts (`rollout`: start,
//! watch with its pure `tally`, halt), and the guided demo.
//!
//! Architecture invariant: the device build never depends on this crate;
//! it depends on the device's library (`fleetd`) for the message format,
//! the transports and, in the demo, the daemon itself.

pub mod cli;
pub mod cosigner;
pub mod image;
pub mod publish;
pub mod rollout;
