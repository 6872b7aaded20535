//! Writes image bytes into a slot through one fixed block buffer, hashing as
//! it goes and skipping blocks that already hold the same bytes. Memory does
//! not grow with the image; a re-install of the same image writes nothing.

use ring::digest;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_BLOCK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("slot-open: {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("image-too-large: {size} bytes do not fit the {slot_size} bytes of slot {path}")]
    SlotTooSmall { path: PathBuf, size: u64, slot_size: u64 },
    #[error("disk-full: {path}: no space left while writing at offset {offset}")]
    DiskFull { path: PathBuf, offset: u64 },
    #[error("slot-io: {path} at offset {offset}: {source}")]
    Io { path: PathBuf, offset: u64, source: std::io::Error },
    #[error("image-larger-than-claimed: more than the signed {size} bytes arrived")]
    TooManyBytes { size: u64 },
    #[error("image-truncated: {got} of {size} bytes")]
    Truncated { got: u64, size: u64 },
    #[error("hash-mismatch: the image hashes to {got}, the message says {want}")]
    HashMismatch { got: String, want: String },
}

impl WriteError {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Open { .. } => "slot-open",
            Self::SlotTooSmall { .. } => "image-too-large",
            Self::DiskFull { .. } => "disk-full",
            Self::Io { .. } => "slot-io",
            Self::TooManyBytes { .. } => "image-larger-than-claimed",
            Self::Truncated { .. } => "image-truncated",
            Self::HashMismatch { .. } => "hash-mismatch",
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes actually written to the slot.
    pub written: u64,
    /// Bytes whose block already held the same content.
    pub skipped: u64,
}

pub struct SlotWriter {
    path: PathBuf,
    file: File,
    hasher: digest::Context,
    /// Image bytes already handed to the slot (hashed), excluding `pending`.
    offset: u64,
    size: u64,
    pending: Vec<u8>,
    compare: Vec<u8>,
    pub stats: WriteStats,
}

impl SlotWriter {
    /// Opens `path` for an image of `size` bytes, resuming after `prefix`
    /// bytes that are already in the slot: they are read back and hashed.
    pub fn open(path: &Path, size: u64, prefix: u64, block: usize) -> Result<Self, WriteError> {
        let open_err = |source| WriteError::Open { path: path.to_path_buf(), source };
        let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(open_err)?;
        // Regular files and block devices both report their size by seeking.
        let slot_size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size > slot_size {
            return Err(WriteError::SlotTooSmall { path: path.to_path_buf(), size, slot_size });
        }
        let mut writer = Self {
            path: path.to_path_buf(),
            file,
            hasher: digest::Context::new(&digest::SHA256),
            offset: 0,
            size,
            pending: Vec::with_capacity(block),
            compare: vec![0; block],
            stats: WriteStats::default(),
        };
        writer.rehash_prefix(prefix.min(size))?;
        Ok(writer)
    }

    fn rehash_prefix(&mut self, prefix: u64) -> Result<(), WriteError> {
        let mut reader = &self.file;
        reader.seek(SeekFrom::Start(0)).map_err(|e| self.io(0, e))?;
        let mut left = prefix;
        while left > 0 {
            let n = left.min(self.compare.len() as u64) as usize;
            reader.read_exact(&mut self.compare[..n]).map_err(|e| self.io(self.offset, e))?;
            self.hasher.update(&self.compare[..n]);
            self.offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    fn io(&self, offset: u64, source: std::io::Error) -> WriteError {
        if source.raw_os_error() == Some(28) {
            return WriteError::DiskFull { path: self.path.clone(), offset };
        }
        WriteError::Io { path: self.path.clone(), offset, source }
    }

    /// Image bytes received so far (written or buffered).
    pub fn position(&self) -> u64 {
        self.offset + self.pending.len() as u64
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Takes the next bytes of the image. More than the signed size is an error.
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), WriteError> {
        if self.position() + data.len() as u64 > self.size {
            return Err(WriteError::TooManyBytes { size: self.size });
        }
        while !data.is_empty() {
            let room = self.pending.capacity() - self.pending.len();
            let take = room.min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == self.pending.capacity() {
                self.write_pending()?;
            }
        }
        Ok(())
    }

    /// Writes the buffered bytes (a partial block after a cut, say).
    pub fn write_pending(&mut self) -> Result<(), WriteError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len();
        self.hasher.update(&self.pending);
        let same = match self.file.read_exact_at(&mut self.compare[..n], self.offset) {
            Ok(()) => self.compare[..n] == self.pending[..],
            Err(_) => false,
        };
        if same {
            self.stats.skipped += n as u64;
        } else {
            self.file.write_all_at(&self.pending, self.offset).map_err(|e| self.io(self.offset, e))?;
            self.stats.written += n as u64;
        }
        self.offset += n as u64;
        self.pending.clear();
        Ok(())
    }

    /// Writes and fsyncs everything received; returns the durable offset.
    pub fn sync(&mut self) -> Result<u64, WriteError> {
        self.write_pending()?;
        self.file.sync_data().map_err(|e| self.io(self.offset, e))?;
        Ok(self.offset)
    }

    /// Completes the image: every byte present, fsynced, and the hash equal to `sha256_hex`.
    pub fn finish(mut self, sha256_hex: &str) -> Result<WriteStats, WriteError> {
        self.sync()?;
        if self.offset != self.size {
            return Err(WriteError::Truncated { got: self.offset, size: self.size });
        }
        let got = crate::trust::hex(self.hasher.finish().as_ref());
        // Not a secret: the expected hash is public, so a plain comparison is fine.
        if got != sha256_hex {
            return Err(WriteError::HashMismatch { got, want: sha256_hex.to_string() });
        }
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        crate::trust::hex(digest::digest(&digest::SHA256, data).as_ref())
    }

    fn slot(dir: &Path, len: u64) -> PathBuf {
        let p = dir.join("slot");
        File::create(&p).unwrap().set_len(len).unwrap();
        p
    }

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn writes_hashes_then_skips_identical_blocks_on_reinstall() {
        let dir = tempfile::tempdir().unwrap();
        let path = slot(dir.path(), 10_000);
        let img = image(9_000);
        let mut w = SlotWriter::open(&path, 9_000, 0, 1024).unwrap();
        for chunk in img.chunks(777) {
            w.push(chunk).unwrap();
        }
        let stats = w.finish(&sha(&img)).unwrap();
        assert_eq!(stats, WriteStats { written: 9_000, skipped: 0 });
        assert_eq!(&std::fs::read(&path).unwrap()[..9_000], &img[..]);

        let mut w = SlotWriter::open(&path, 9_000, 0, 1024).unwrap();
        w.push(&img).unwrap();
        assert_eq!(w.finish(&sha(&img)).unwrap(), WriteStats { written: 0, skipped: 9_000 });
    }

    #[test]
    fn resume_rehashes_the_prefix_from_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = slot(dir.path(), 4096);
        let img = image(4000);
        let mut w = SlotWriter::open(&path, 4000, 0, 512).unwrap();
        w.push(&img[..1500]).unwrap();
        assert_eq!(w.sync().unwrap(), 1500);
        drop(w);
        let mut w = SlotWriter::open(&path, 4000, 1500, 512).unwrap();
        assert_eq!(w.position(), 1500);
        w.push(&img[1500..]).unwrap();
        w.finish(&sha(&img)).unwrap();
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = slot(dir.path(), 1000);
        assert_eq!(SlotWriter::open(&path, 1001, 0, 256).err().unwrap().name(), "image-too-large");
        assert_eq!(SlotWriter::open(&dir.path().join("none"), 1, 0, 256).err().unwrap().name(), "slot-open");

        let mut w = SlotWriter::open(&path, 100, 0, 256).unwrap();
        assert_eq!(w.push(&[0; 101]).unwrap_err().name(), "image-larger-than-claimed");
        w.push(&[1; 50]).unwrap();
        assert_eq!(w.finish(&sha(&[1; 50])).unwrap_err().name(), "image-truncated");

        let mut w = SlotWriter::open(&path, 100, 0, 256).unwrap();
        w.push(&[1; 100]).unwrap();
        assert_eq!(w.finish(&sha(&[2; 100])).unwrap_err().name(), "hash-mismatch");
    }
}
