//! Persistent device state under `state_dir`: one JSON document written
//! atomically, behind the directory's lock. Mutators change memory only;
//! `save()` is the single write. What the document holds is its owner's
//! business (`update::State`); this module only keeps it safe.

use crate::fsutil;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state.json";
const MAX_STATE_BYTES: usize = 4 * 1024 * 1024;

crate::error_name::named_error! {
    #[derive(Debug, thiserror::Error)]
    pub enum StoreError {
        #[name = "state-io"]
        #[error("{name}: {path}: {source}")]
        Io { path: PathBuf, source: std::io::Error },
        #[name = "state-corrupt"]
        #[error("{name}: {path}: {message}")]
        Corrupt { path: PathBuf, message: String },
        /// Another mutating fleetd (daemon, install, mark-*) owns the state.
        #[name = "busy"]
        #[error("{name}: {0}")]
        Busy(String),
    }
}

/// The state of one mutating fleetd process: it holds the state
/// directory's lock for as long as it lives, so two processes can never
/// write the same slot or overwrite each other's state.
#[derive(Debug)]
pub struct Store<T> {
    dir: PathBuf,
    _lock: fsutil::DirLock,
    _doc: std::marker::PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned + Default> Store<T> {
    /// Opens the store for writing, creating the directory (0700) if needed,
    /// and takes its lock at once (a second writer gets `busy`); returns the
    /// document as stored, read under the lock.
    pub fn open(dir: &Path) -> Result<(Self, T), StoreError> {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
        }
        let lock = fsutil::DirLock::acquire(dir).map_err(|e| match e {
            fsutil::LockError::Held { .. } => {
                StoreError::Busy(format!("{e}; try again when it has finished"))
            }
            fsutil::LockError::Io { path, source } => StoreError::Io { path, source },
        })?;
        // Read under the lock: nobody else can be halfway through a save.
        let doc = Self::read(dir)?;
        Ok((Self { dir: dir.to_path_buf(), _lock: lock, _doc: std::marker::PhantomData }, doc))
    }

    /// Reads the state without creating anything (for read-only commands).
    pub fn read(dir: &Path) -> Result<T, StoreError> {
        let path = dir.join(STATE_FILE);
        let bytes = match fsutil::read_capped(&path, MAX_STATE_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt { path, message: e.to_string() })
    }

    /// The one write: `doc` replaces the stored document atomically.
    pub fn save(&self, doc: &T) -> Result<(), StoreError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(doc)
            .map_err(|e| StoreError::Corrupt { path: path.clone(), message: e.to_string() })?;
        fsutil::atomic_write(&path, &bytes, 0o600).map_err(|source| StoreError::Io { path, source })
    }
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Doc {
        n: u64,
    }

    #[test]
    fn missing_state_is_default_and_saves_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut doc) = Store::<Doc>::open(&dir.path().join("s")).unwrap();
        assert_eq!(doc, Doc::default());
        doc.n = 7;
        store.save(&doc).unwrap();
        drop(store);
        assert_eq!(Store::<Doc>::read(&dir.path().join("s")).unwrap(), Doc { n: 7 });
    }

    #[test]
    fn a_second_writer_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::<Doc>::open(dir.path()).unwrap();
        assert_eq!(Store::<Doc>::open(dir.path()).unwrap_err().name(), "busy");
        // Readers take no lock.
        assert!(Store::<Doc>::read(dir.path()).is_ok());
    }

    #[test]
    fn corrupt_state_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = Store::<Doc>::read(dir.path()).unwrap_err();
        assert_eq!(err.name(), "state-corrupt");
    }
}
