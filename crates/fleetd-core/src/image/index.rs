//! The block index (`NAME.index`, made by `fleetctl image pack`): what an
//! adaptive install needs to know about an image before fetching any of it.
//!
//! Little-endian, fixed layout (`docs/image-index.md` in words):
//!
//! ```text
//! 0    8   magic "FLEETIDX"
//! 8    4   format version (1)
//! 12   4   block size (4096)
//! 16   8   image size in bytes
//! 24   32  image SHA-256
//! 56   4   frame size: raw bytes per zstd frame, a multiple of the block size
//! 60   4   frame count = ceil(size / frame size)
//! 64   8   size of the .zst file (frames plus seek table)
//! 72   16  per block: the first 16 bytes of the block's SHA-256
//! ...  4   per frame: its compressed length (offsets are the running sum)
//! ```
//!
//! A block hash is truncated to 128 bits: it only chooses where a block is
//! copied from, and the whole image's SHA-256 decides, as on every install.
//! That halves the index (4 MiB per GiB, 0.39 %), which is fetched whole.

use super::{BLOCK, MAX_FRAME};

pub const MAGIC: &[u8; 8] = b"FLEETIDX";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 72;
pub const HASH_LEN: usize = 16;

/// A block's identity: the first 16 bytes of its SHA-256.
pub type BlockHash = [u8; HASH_LEN];

pub fn block_hash(data: &[u8]) -> BlockHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&digest.as_ref()[..HASH_LEN]);
    out
}

crate::named_error! {
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum IndexError {
        #[name = "index-malformed"]
        #[error("{name}: {0}")]
        Malformed(String),
        /// The index describes another image than the message.
        #[name = "index-mismatch"]
        #[error("{name}: {0}")]
        Mismatch(String),
    }
}

/// One zstd frame of the `.zst` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Offset of the frame in the `.zst` file.
    pub offset: u64,
    pub len: u32,
}

/// The index in memory: the block hashes stay in the buffer they arrived
/// in (4 MiB per GiB, held once), the frames as offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub size: u64,
    pub sha256: [u8; 32],
    pub frame_size: u32,
    pub zst_size: u64,
    /// `HASH_LEN` bytes per block.
    hashes: Vec<u8>,
    pub frames: Vec<Frame>,
}

fn malformed(why: impl Into<String>) -> IndexError {
    IndexError::Malformed(why.into())
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Bytes of an index for an image of `size` bytes in frames of `frame_size`.
pub fn encoded_len(size: u64, frame_size: u32) -> Option<u64> {
    let blocks = size.div_ceil(BLOCK as u64);
    let frames = size.div_ceil(u64::from(frame_size.max(1)));
    (HEADER_LEN as u64).checked_add(blocks.checked_mul(HASH_LEN as u64)?)?.checked_add(frames.checked_mul(4)?)
}

impl Index {
    /// An index from its parts (`fleetctl image pack`); `hashes` holds
    /// `HASH_LEN` bytes per block.
    pub fn from_parts(
        size: u64,
        sha256: [u8; 32],
        frame_size: u32,
        zst_size: u64,
        hashes: Vec<u8>,
        frames: Vec<Frame>,
    ) -> Self {
        Self { size, sha256, frame_size, zst_size, hashes, frames }
    }

    pub fn block_count(&self) -> usize {
        self.hashes.len() / HASH_LEN
    }

    /// Block `i`'s hash (`i` below `block_count`).
    pub fn block(&self, i: usize) -> &BlockHash {
        let at = i * HASH_LEN;
        self.hashes[at..at + HASH_LEN].try_into().unwrap_or(&[0; HASH_LEN])
    }

    /// Raw bytes of block `i` (the last may be short).
    pub fn block_len(&self, i: usize) -> usize {
        let start = i as u64 * BLOCK as u64;
        (self.size - start).min(BLOCK as u64) as usize
    }

    pub fn blocks_per_frame(&self) -> usize {
        self.frame_size as usize / BLOCK
    }

    /// The image bytes frame `f` decompresses to.
    pub fn frame_raw_range(&self, f: usize) -> std::ops::Range<u64> {
        let start = f as u64 * u64::from(self.frame_size);
        start..(start + u64::from(self.frame_size)).min(self.size)
    }

    /// Takes the buffer over: the hashes are moved to its front, not copied.
    pub fn parse(mut bytes: Vec<u8>) -> Result<Self, IndexError> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(malformed("not a fleetd block index (magic)"));
        }
        if le_u32(&bytes, 8) != VERSION {
            return Err(malformed(format!("format version {} is not 1", le_u32(&bytes, 8))));
        }
        if le_u32(&bytes, 12) as usize != BLOCK {
            return Err(malformed(format!("block size {} is not {BLOCK}", le_u32(&bytes, 12))));
        }
        let size = le_u64(&bytes, 16);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&bytes[24..56]);
        let frame_size = le_u32(&bytes, 56);
        if frame_size == 0 || frame_size as usize % BLOCK != 0 || frame_size > MAX_FRAME {
            return Err(malformed(format!(
                "frame size {frame_size} is not a multiple of {BLOCK} up to {MAX_FRAME}"
            )));
        }
        if size == 0 {
            return Err(malformed("the image is empty"));
        }
        let frame_count = le_u32(&bytes, 60) as u64;
        if frame_count != size.div_ceil(u64::from(frame_size)) {
            return Err(malformed(format!("{frame_count} frames do not cover {size} bytes")));
        }
        let zst_size = le_u64(&bytes, 64);
        if encoded_len(size, frame_size) != Some(bytes.len() as u64) {
            return Err(malformed(format!("{} bytes for an image of {size} bytes", bytes.len())));
        }
        let block_count = size.div_ceil(BLOCK as u64) as usize;
        let hashes_end = HEADER_LEN + block_count * HASH_LEN;
        let mut at = hashes_end;
        let mut frames = Vec::with_capacity(frame_count as usize);
        let mut offset = 0u64;
        for _ in 0..frame_count {
            let len = le_u32(&bytes, at);
            at += 4;
            if len == 0 {
                return Err(malformed("a frame of 0 bytes"));
            }
            frames.push(Frame { offset, len });
            offset += u64::from(len);
        }
        if offset > zst_size {
            return Err(malformed(format!("frames of {offset} bytes in a .zst of {zst_size}")));
        }
        bytes.truncate(hashes_end);
        bytes.drain(..HEADER_LEN);
        bytes.shrink_to_fit();
        Ok(Self { size, sha256, frame_size, zst_size, hashes: bytes, frames })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(encoded_len(self.size, self.frame_size).unwrap_or(0) as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.frame_size.to_le_bytes());
        out.extend_from_slice(&(self.frames.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.zst_size.to_le_bytes());
        out.extend_from_slice(&self.hashes);
        for f in &self.frames {
            out.extend_from_slice(&f.len.to_le_bytes());
        }
        out
    }

    /// The index must describe the image the message signs.
    pub fn check_image(&self, size: u64, sha256_hex: &str) -> Result<(), IndexError> {
        if self.size != size {
            return Err(IndexError::Mismatch(format!(
                "the index is for {} bytes, the message says {size}",
                self.size
            )));
        }
        let hex = crate::trust::hex(&self.sha256);
        if hex != sha256_hex {
            return Err(IndexError::Mismatch(format!(
                "the index is for image {hex}, the message says {sha256_hex}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(size: u64, frame_size: u32) -> Index {
        let hashes = (0..size.div_ceil(BLOCK as u64)).flat_map(|i| block_hash(&i.to_le_bytes())).collect();
        let frame_count = size.div_ceil(u64::from(frame_size));
        let frames = (0..frame_count).map(|i| Frame { offset: i * 100, len: 100 }).collect();
        Index::from_parts(size, [7; 32], frame_size, frame_count * 100 + 20, hashes, frames)
    }

    #[test]
    fn round_trip_and_size() {
        let index = sample(10 * 4096 + 5, 8192);
        let bytes = index.encode();
        assert_eq!(bytes.len() as u64, encoded_len(index.size, 8192).unwrap());
        assert_eq!(Index::parse(bytes).unwrap(), index);
        assert_eq!(index.block(3), &block_hash(&3u64.to_le_bytes()));
        assert_eq!(index.block_len(10), 5);
        assert_eq!(index.frame_raw_range(5), 40960..40965);
        // 1 GiB in 64 KiB frames: 4 MiB of block hashes and 64 KiB of frame lengths.
        assert_eq!(encoded_len(1 << 30, 64 << 10), Some(72 + (4 << 20) + (64 << 10)));
    }

    #[test]
    fn every_malformation_is_named() {
        let good = sample(3 * 4096, 4096).encode();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("magic", [b"FLEETIDY".as_slice(), &good[8..]].concat()),
            ("version", {
                let mut b = good.clone();
                b[8] = 2;
                b
            }),
            ("block size", {
                let mut b = good.clone();
                b[13] = 0x20;
                b
            }),
            ("frame size not a multiple", {
                let mut b = good.clone();
                b[56] = 1;
                b
            }),
            ("frame size 0", {
                let mut b = good.clone();
                b[56..60].copy_from_slice(&[0; 4]);
                b
            }),
            ("frame count", {
                let mut b = good.clone();
                b[60] = 4;
                b
            }),
            ("size 0", {
                let mut b = good.clone();
                b[16..24].copy_from_slice(&[0; 8]);
                b
            }),
            ("huge size", {
                let mut b = good.clone();
                b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            }),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("trailing", [good.as_slice(), &[0]].concat()),
            ("zst too small", {
                let mut b = good.clone();
                b[64..72].copy_from_slice(&10u64.to_le_bytes());
                b
            }),
            ("zero-length frame", {
                let mut b = good.clone();
                let n = b.len();
                b[n - 4..].copy_from_slice(&[0; 4]);
                b
            }),
        ];
        for (what, bytes) in cases {
            let err = Index::parse(bytes).unwrap_err();
            assert_eq!(err.name(), "index-malformed", "{what}: {err}");
        }
    }

    #[test]
    fn the_index_must_describe_the_signed_image() {
        let index = sample(4096, 4096);
        assert!(index.check_image(4096, &"07".repeat(32)).is_ok());
        assert_eq!(index.check_image(4097, &"07".repeat(32)).unwrap_err().name(), "index-mismatch");
        assert_eq!(index.check_image(4096, &"08".repeat(32)).unwrap_err().name(), "index-mismatch");
    }
}
