//! Crash-safe file writes: temp file, fsync, rename, fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `bytes` so that after a power cut the file holds either
/// the old or the new content, never a mix. `mode` applies to the new file.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates a file that must not exist yet (keys are never overwritten), fsynced.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fsync_dir(parent_dir(path))
}

/// Appends one line and fsyncs before returning (audit logs, histories).
/// The first line also fsyncs the directory, or a power cut could lose the
/// new file's name together with the line it holds.
pub fn append_line_synced(path: &Path, line: &str) -> io::Result<()> {
    let (mut file, created) = match OpenOptions::new().append(true).create_new(true).mode(0o640).open(path) {
        Ok(file) => (file, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            (OpenOptions::new().append(true).open(path)?, false)
        }
        Err(e) => return Err(e),
    };
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    file.write_all(&buf)?;
    file.sync_data()?;
    if created {
        fsync_dir(parent_dir(path))?;
    }
    Ok(())
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An exclusive `flock` on `dir/lock`, held until dropped. The lock file
/// holds the owner's pid, for the message a second process gets.
#[derive(Debug)]
pub struct DirLock {
    /// Unlocked when dropped (and by the kernel when the process dies).
    _file: nix::fcntl::Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("another fleetd{} holds {path}", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { path: std::path::PathBuf, holder: Option<u32> },
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: io::Error },
}

impl DirLock {
    /// Takes the lock at once or fails: a second fleetd must not wait and
    /// then act on state the first has changed under it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        use nix::fcntl::{Flock, FlockArg};
        use std::io::{Read, Seek};
        let path = dir.join("lock");
        let io = |source| LockError::Io { path: path.clone(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held { path, holder: text.trim().parse().ok() });
            }
            Err((_, errno)) => return Err(io(io::Error::from(errno))),
        };
        // Ours now: record who holds it (advisory, for the message above).
        file.set_len(0).and_then(|()| file.rewind()).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// Reads the first `n` bytes at most of a file (`-` = stdin), never more.
pub fn read_prefix(path: &Path, n: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file: Box<dyn io::Read> =
        if path == Path::new("-") { Box::new(io::stdin()) } else { Box::new(File::open(path)?) };
    let mut buf = Vec::new();
    file.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Reads at most `limit` bytes; a longer file is an error rather than an allocation.
pub fn read_capped(path: &Path, limit: usize) -> io::Result<Vec<u8>> {
    let buf = read_prefix(path, limit + 1)?;
    if buf.len() > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {limit} bytes")));
    }
    Ok(buf)
}

crate::error_name::named_error! {
    /// Why a file was not read, by cause: each has a stable name callers report.
    #[derive(Debug, thiserror::Error)]
    pub enum ReadError {
        #[name(hidden = "io")]
        #[error("{0}")]
        Io(#[from] io::Error),
        /// A FIFO, device, socket or directory: reading one could block forever
        /// or never end (`/dev/zero`), so it is refused before any read.
        #[name = "not-regular-file"]
        #[error("{name}: only a regular file is read here")]
        NotRegular,
        #[name = "file-too-large"]
        #[error("{name}: larger than {limit} bytes")]
        TooLarge { limit: usize },
        /// A private key others may read, refused as ssh refuses one.
        #[name = "key-permissions"]
        #[error("{name}: mode {mode:04o} lets others read this private key; `chmod 600` it")]
        KeyPermissions { mode: u32 },
    }
}

/// Opens `path` for reading without ever blocking on it: `O_NONBLOCK` makes
/// opening a FIFO with no writer return at once (and is ignored for the
/// regular files that are read afterwards).
pub fn open_nonblocking(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)
}

/// Reads all of an open regular file from offset 0, at most `limit` bytes.
/// The type is checked on the open file (`fstat`), so nothing is read from
/// a FIFO, a device or a socket, whoever opened it; `pread` keeps the read
/// independent of the descriptor's offset (a caller may pass one it has read).
pub fn read_regular_capped(file: &File, limit: usize) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::fs::FileExt;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular);
    }
    if meta.len() > limit as u64 {
        return Err(ReadError::TooLarge { limit });
    }
    // One byte more than the limit tells a file that grew after the fstat.
    let mut buf = vec![0u8; limit + 1];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if filled > limit {
        return Err(ReadError::TooLarge { limit });
    }
    buf.truncate(filled);
    Ok(buf)
}

/// A regular file at `path`, at most `limit` bytes, opened without blocking.
pub fn read_file_capped(path: &Path, limit: usize) -> Result<Vec<u8>, ReadError> {
    read_regular_capped(&open_nonblocking(path)?, limit)
}

/// The largest private key file read (a PEM key with its chain is far less).
pub const MAX_KEY_FILE_BYTES: usize = 64 * 1024;

/// A private key file, refused when others can read it, as ssh refuses
/// one: no bit for others, and none for the group either when the file is
/// ours (a key shared with a service's group belongs to root, 0640).
pub fn read_private_key(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::fs::MetadataExt;
    let file = open_nonblocking(path)?;
    let meta = file.metadata()?;
    let mode = meta.mode() & 0o7777;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let ours = meta.uid() == unsafe { libc::geteuid() };
    let forbidden = if ours { 0o077 } else { 0o007 };
    if meta.file_type().is_file() && mode & forbidden != 0 {
        return Err(ReadError::KeyPermissions { mode });
    }
    read_regular_capped(&file, MAX_KEY_FILE_BYTES)
}

/// A public key or certificate file: capped, regular files only.
pub fn read_public_file(path: &Path) -> Result<Vec<u8>, ReadError> {
    read_file_capped(path, MAX_KEY_FILE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        atomic_write(&path, b"one", 0o600).unwrap();
        atomic_write(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn create_new_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        create_new(&path, b"a", 0o600).unwrap();
        let err = create_new(&path, b"b", 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"a");
    }

    #[test]
    fn a_second_lock_on_a_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        // flock belongs to the open file: a second open in the same process
        // conflicts exactly as another process would.
        match DirLock::acquire(dir.path()) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn read_capped_rejects_oversize() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        fs::write(&path, vec![b'x'; 11]).unwrap();
        assert!(read_capped(&path, 10).is_err());
        assert_eq!(read_capped(&path, 11).unwrap().len(), 11);
    }

    #[test]
    fn a_fifo_and_a_device_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // No writer: a blocking open or read would hang this test.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send((read_file_capped(&path, 10).map(|_| ()), read_private_key(&path).map(|_| ())));
        });
        let (plain, key) =
            rx.recv_timeout(std::time::Duration::from_secs(5)).expect("reading a FIFO blocked");
        assert_eq!(plain.unwrap_err().name(), "not-regular-file");
        assert_eq!(key.unwrap_err().name(), "not-regular-file");
        // /dev/zero never ends: refused by type, not read until memory runs out.
        assert_eq!(read_file_capped(Path::new("/dev/zero"), 10).unwrap_err().name(), "not-regular-file");
        assert_eq!(read_public_file(dir.path()).unwrap_err().name(), "not-regular-file", "a directory");
    }

    #[test]
    fn a_regular_file_is_read_from_its_start_up_to_the_cap() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        fs::write(&path, b"0123456789").unwrap();
        let mut file = File::open(&path).unwrap();
        let mut first = [0u8; 4];
        file.read_exact(&mut first).unwrap();
        assert_eq!(read_regular_capped(&file, 10).unwrap(), b"0123456789", "whatever the offset");
        assert_eq!(read_regular_capped(&file, 9).unwrap_err().name(), "file-too-large");
    }

    #[test]
    fn private_keys_others_can_read_are_refused_like_ssh_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        fs::write(&path, b"-----BEGIN PRIVATE KEY-----\n").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o644, false), (0o604, false), (0o640, false)] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            match read_private_key(&path) {
                Ok(bytes) => assert!(ok, "mode {mode:o} was accepted: {} bytes", bytes.len()),
                Err(e) => {
                    assert!(!ok, "mode {mode:o}: {e}");
                    assert_eq!(e.name(), "key-permissions");
                    assert!(e.to_string().starts_with("key-permissions:"), "{e}");
                }
            }
        }
    }
}
