//! Writes image bytes into a slot through one fixed block buffer, hashing as
//! it goes and skipping blocks that already hold the same bytes. Memory does
//! not grow with the image; a re-install of the same image writes nothing.

use ring::digest;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// 256 KiB: large enough for full-speed writes, small enough that the whole
/// pipeline's buffers stay at 1 MiB (an install peaks under 8 MiB RSS).
pub const DEFAULT_BLOCK: usize = 256 << 10;

crate::error_name::named_error! {
    #[derive(Debug, thiserror::Error)]
    pub enum WriteError {
        #[name = "slot-open"]
        #[error("{name}: {path}: {source}")]
        Open { path: PathBuf, source: std::io::Error },
        /// The kernel refused an exclusive open: the device is mounted, or held
        /// by device-mapper (dm-verity), a RAID, or another exclusive opener.
        #[name = "target-is-booted"]
        #[error("{name}: {path} is in use (mounted or held); refusing to write it")]
        InUse { path: PathBuf },
        #[name = "image-too-large"]
        #[error("{name}: {size} bytes do not fit the {slot_size} bytes of slot {path}")]
        SlotTooSmall { path: PathBuf, size: u64, slot_size: u64 },
        #[name = "disk-full"]
        #[error("{name}: {path}: no space left while writing at offset {offset}")]
        DiskFull { path: PathBuf, offset: u64 },
        #[name = "slot-io"]
        #[error("{name}: {path} at offset {offset}: {source}")]
        Io { path: PathBuf, offset: u64, source: std::io::Error },
        #[name = "image-larger-than-claimed"]
        #[error("{name}: more than the signed {size} bytes arrived")]
        TooManyBytes { size: u64 },
        #[name = "image-truncated"]
        #[error("{name}: {got} of {size} bytes")]
        Truncated { got: u64, size: u64 },
        #[name = "hash-mismatch"]
        #[error("{name}: the image hashes to {got}, the message says {want}")]
        HashMismatch { got: String, want: String },
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes actually written to the slot.
    pub written: u64,
    /// Bytes whose block already held the same content.
    pub skipped: u64,
}

/// Blocks handed to the IO thread and not yet returned: with the block being
/// filled and the IO thread's compare buffer, memory is `(DEPTH + 2) * block`.
const DEPTH: usize = 2;

enum Command {
    Block { offset: u64, data: Vec<u8> },
    Sync,
}

enum Reply {
    Done {
        buffer: Vec<u8>,
        wrote: bool,
    },
    Synced,
    /// A block could not be written (its buffer is dropped).
    Failed(WriteError),
    SyncFailed(WriteError),
}

/// Hashes on the caller's thread and writes on its own IO thread, so hashing
/// and receiving overlap with the disk. Blocks flow through a fixed pool of
/// buffers: memory does not depend on the image size.
pub struct SlotWriter {
    path: PathBuf,
    hasher: digest::Context,
    /// Image bytes handed to the IO thread (and hashed), excluding `pending`.
    offset: u64,
    size: u64,
    block: usize,
    pending: Vec<u8>,
    spare: Vec<Vec<u8>>,
    in_flight: usize,
    commands: Option<std::sync::mpsc::SyncSender<Command>>,
    replies: std::sync::mpsc::Receiver<Reply>,
    io_thread: Option<std::thread::JoinHandle<()>>,
    failed: Option<String>,
    pending_error: Option<WriteError>,
    pub stats: WriteStats,
}

impl SlotWriter {
    /// Opens `path` for an image of `size` bytes, resuming after `prefix`
    /// bytes that are already in the slot: they are read back and hashed.
    pub fn open(path: &Path, size: u64, prefix: u64, block: usize) -> Result<Self, WriteError> {
        let open_err = |source| WriteError::Open { path: path.to_path_buf(), source };
        let mut file = open_exclusive(path)?;
        // Regular files and block devices both report their size by seeking.
        let slot_size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size > slot_size {
            return Err(WriteError::SlotTooSmall { path: path.to_path_buf(), size, slot_size });
        }
        let mut hasher = digest::Context::new(&digest::SHA256);
        let prefix = prefix.min(size);
        let mut buffer = vec![0u8; block];
        file.seek(SeekFrom::Start(0)).map_err(|e| io_error(path, 0, e))?;
        let mut done = 0u64;
        while done < prefix {
            let n = (prefix - done).min(block as u64) as usize;
            file.read_exact(&mut buffer[..n]).map_err(|e| io_error(path, done, e))?;
            hasher.update(&buffer[..n]);
            done += n as u64;
        }
        let (commands, command_rx) = std::sync::mpsc::sync_channel(DEPTH);
        let (reply_tx, replies) = std::sync::mpsc::channel();
        let io_path = path.to_path_buf();
        let io_thread = std::thread::Builder::new()
            .name("slot-io".into())
            .spawn(move || io_loop(file, io_path, block, command_rx, reply_tx))
            .map_err(open_err)?;
        buffer.clear();
        Ok(Self {
            path: path.to_path_buf(),
            hasher,
            offset: prefix,
            size,
            block,
            pending: buffer,
            spare: Vec::new(),
            in_flight: 0,
            commands: Some(commands),
            replies,
            io_thread: Some(io_thread),
            failed: None,
            pending_error: None,
            stats: WriteStats::default(),
        })
    }

    /// Image bytes received so far (written, in flight or buffered).
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
            let take = (self.block - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == self.block {
                self.write_pending()?;
            }
        }
        Ok(())
    }

    /// Takes the next bytes of the image, known to be in the slot already at
    /// this offset (an adaptive install read and checked them there): hashed,
    /// not written.
    pub fn push_unchanged(&mut self, data: &[u8]) -> Result<(), WriteError> {
        if self.position() + data.len() as u64 > self.size {
            return Err(WriteError::TooManyBytes { size: self.size });
        }
        self.write_pending()?;
        self.hasher.update(data);
        self.offset += data.len() as u64;
        self.stats.skipped += data.len() as u64;
        Ok(())
    }

    /// Hands the buffered bytes (a partial block after a cut, say) to the IO thread.
    pub fn write_pending(&mut self) -> Result<(), WriteError> {
        self.check_failed()?;
        if self.pending.is_empty() {
            return Ok(());
        }
        self.hasher.update(&self.pending);
        let next = self.take_spare()?;
        let data = std::mem::replace(&mut self.pending, next);
        let len = data.len() as u64;
        self.send(Command::Block { offset: self.offset, data })?;
        self.in_flight += 1;
        self.offset += len;
        Ok(())
    }

    /// Writes and fsyncs everything received; returns the durable offset.
    pub fn sync(&mut self) -> Result<u64, WriteError> {
        self.write_pending()?;
        self.send(Command::Sync)?;
        loop {
            match self.replies.recv() {
                Ok(Reply::Synced) => break,
                Ok(reply) => self.handle(reply),
                Err(_) => return Err(self.io_thread_gone()),
            }
        }
        self.check_failed()?;
        Ok(self.offset)
    }

    /// Completes the image: every byte present, fsynced, and the hash equal to `sha256_hex`.
    pub fn finish(mut self, sha256_hex: &str) -> Result<WriteStats, WriteError> {
        self.sync()?;
        if self.offset != self.size {
            return Err(WriteError::Truncated { got: self.offset, size: self.size });
        }
        let hasher = std::mem::replace(&mut self.hasher, digest::Context::new(&digest::SHA256));
        let got = crate::trust::hex(hasher.finish().as_ref());
        // Not a secret: the expected hash is public, so a plain comparison is fine.
        if got != sha256_hex {
            return Err(WriteError::HashMismatch { got, want: sha256_hex.to_string() });
        }
        Ok(self.stats)
    }

    /// A free buffer: a returned one, or a new one while the pool is not full.
    fn take_spare(&mut self) -> Result<Vec<u8>, WriteError> {
        loop {
            if let Some(mut buffer) = self.spare.pop() {
                buffer.clear();
                return Ok(buffer);
            }
            if self.in_flight < DEPTH {
                return Ok(Vec::with_capacity(self.block));
            }
            match self.replies.recv() {
                Ok(reply) => self.handle(reply),
                Err(_) => return Err(self.io_thread_gone()),
            }
            self.check_failed()?;
        }
    }

    fn handle(&mut self, reply: Reply) {
        match reply {
            Reply::Done { buffer, wrote } => {
                self.in_flight -= 1;
                let n = buffer.len() as u64;
                if wrote {
                    self.stats.written += n;
                } else {
                    self.stats.skipped += n;
                }
                self.spare.push(buffer);
            }
            Reply::Failed(e) => {
                self.in_flight -= 1;
                self.failed.get_or_insert(e.to_string());
                self.pending_error.get_or_insert(e);
            }
            Reply::SyncFailed(e) => {
                self.failed.get_or_insert(e.to_string());
                self.pending_error.get_or_insert(e);
            }
            Reply::Synced => {}
        }
    }

    fn check_failed(&mut self) -> Result<(), WriteError> {
        match self.pending_error.take() {
            Some(e) => Err(e),
            None => match &self.failed {
                Some(message) => Err(WriteError::Io {
                    path: self.path.clone(),
                    offset: self.offset,
                    source: std::io::Error::other(message.clone()),
                }),
                None => Ok(()),
            },
        }
    }

    fn send(&mut self, command: Command) -> Result<(), WriteError> {
        let sent = self.commands.as_ref().map(|c| c.send(command).is_ok()).unwrap_or(false);
        if sent {
            Ok(())
        } else {
            Err(self.io_thread_gone())
        }
    }

    fn io_thread_gone(&self) -> WriteError {
        WriteError::Io {
            path: self.path.clone(),
            offset: self.offset,
            source: std::io::Error::other("the slot IO thread stopped"),
        }
    }
}

impl Drop for SlotWriter {
    fn drop(&mut self) {
        // Closing the channel ends the IO thread once it has written what it holds.
        self.commands.take();
        if let Some(thread) = self.io_thread.take() {
            let _ = thread.join();
        }
    }
}

/// Decides which blocks to read back before writing. Reading costs time, so
/// after a run of blocks that differed (a new image) only every 2^k-th block
/// is compared, k growing to 6; one identical block brings back comparing
/// every block. A re-install of the same image thus writes nothing, and a new
/// image costs few reads.
#[derive(Debug, Default)]
struct CompareSampler {
    differing_in_a_row: u32,
    until_next: u32,
}

impl CompareSampler {
    const MAX_SHIFT: u32 = 6;

    fn should_compare(&mut self) -> bool {
        if self.until_next == 0 {
            return true;
        }
        self.until_next -= 1;
        false
    }

    /// The outcome of a block that was compared.
    fn record(&mut self, same: bool) {
        if same {
            self.differing_in_a_row = 0;
        } else {
            self.differing_in_a_row = (self.differing_in_a_row + 1).min(Self::MAX_SHIFT);
            self.until_next = (1 << self.differing_in_a_row) - 1;
        }
    }
}

/// Bytes of written data after which writeback is started.
const WRITEBACK_WINDOW: u64 = 8 << 20;

/// Starts writing the range to disk now, without waiting: the disk streams
/// while the next blocks arrive, and the checkpoint fsync finds little left
/// to do. (Left alone, the kernel would hold the pages until the fsync.)
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an fd we own; failure only loses the hint.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn io_error(path: &Path, offset: u64, source: std::io::Error) -> WriteError {
    if source.raw_os_error() == Some(28) {
        return WriteError::DiskFull { path: path.to_path_buf(), offset };
    }
    WriteError::Io { path: path.to_path_buf(), offset, source }
}

/// The IO thread: compare each block with what the slot holds, write it only
/// when it differs, fsync on request. After a failure it only reports.
/// Opens the slot for writing. A block device is opened with `O_EXCL`, so
/// the kernel itself refuses one that is mounted or held, whatever path
/// names it (symlinks, dm-verity, overlay roots): stronger than any check
/// of mountinfo, and without a window between check and open. The
/// exclusive hold lasts as long as the file stays open.
fn open_exclusive(path: &Path) -> Result<std::fs::File, WriteError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let open_err = |source| WriteError::Open { path: path.to_path_buf(), source };
    let is_block = std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false);
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if is_block {
        options.custom_flags(libc::O_EXCL);
    }
    options.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) if is_block => WriteError::InUse { path: path.to_path_buf() },
        _ => open_err(e),
    })
}

fn io_loop(
    file: File,
    path: PathBuf,
    block: usize,
    commands: std::sync::mpsc::Receiver<Command>,
    replies: std::sync::mpsc::Sender<Reply>,
) {
    let mut compare = vec![0u8; block];
    let mut sampler = CompareSampler::default();
    let mut failed = false;
    // Written bytes not yet handed to the disk: flushed in large windows so
    // the kernel can merge them into big requests.
    let mut unflushed: Option<(u64, u64)> = None;
    for command in commands {
        let reply = match command {
            Command::Block { offset, data } if !failed => {
                let n = data.len();
                let compared = sampler.should_compare();
                let same = compared
                    && file.read_exact_at(&mut compare[..n], offset).is_ok()
                    && compare[..n] == data[..];
                if compared {
                    sampler.record(same);
                }
                if same {
                    Reply::Done { buffer: data, wrote: false }
                } else {
                    match file.write_all_at(&data, offset) {
                        Ok(()) => {
                            let (start, end) = unflushed.unwrap_or((offset, offset));
                            let (start, end) = (start.min(offset), end.max(offset + n as u64));
                            if end - start >= WRITEBACK_WINDOW {
                                start_writeback(&file, start, end - start);
                                unflushed = None;
                            } else {
                                unflushed = Some((start, end));
                            }
                            Reply::Done { buffer: data, wrote: true }
                        }
                        Err(e) => Reply::Failed(io_error(&path, offset, e)),
                    }
                }
            }
            Command::Block { offset, .. } => {
                Reply::Failed(io_error(&path, offset, std::io::Error::other("an earlier write failed")))
            }
            Command::Sync if failed => Reply::Synced,
            Command::Sync => {
                unflushed = None;
                if let Err(e) = file.sync_data() {
                    failed = true;
                    let _ = replies.send(Reply::SyncFailed(io_error(&path, 0, e)));
                }
                Reply::Synced
            }
        };
        failed |= matches!(reply, Reply::Failed(_));
        if replies.send(reply).is_err() {
            return;
        }
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
    fn compare_sampling_backs_off_on_differences_and_recovers_on_a_match() {
        let mut s = CompareSampler::default();
        let mut compared = Vec::new();
        // 40 differing blocks: compared at 0, 2, 6, 14, 30 (gaps 2, 4, 8, 16, ...).
        for i in 0..40 {
            if s.should_compare() {
                compared.push(i);
                s.record(false);
            }
        }
        assert_eq!(compared, vec![0, 2, 6, 14, 30]);
        // Skip to the next sample, which matches: back to every block.
        while !s.should_compare() {}
        s.record(true);
        assert!(s.should_compare());
        s.record(true);
        assert!(s.should_compare());
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
