//! Images as `fleetctl image pack` makes them: zstd's seekable format
//! (`seek_table`), the block index (`index`), and the adaptive install's
//! plan (`plan`). Codecs and decisions only; the device reads its slots and
//! fetches, fleetctl compresses.

pub mod index;
pub mod plan;
pub mod seek_table;

/// The unit of the index: every 4 KiB block of the raw image is hashed.
pub const BLOCK: usize = 4096;
/// The largest frame accepted (raw bytes): bounds a frame's buffers on the device.
pub const MAX_FRAME: u32 = 8 << 20;
