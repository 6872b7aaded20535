//! The files the registrar reads: private keys (refused when others may
//! read them) and small texts (certificates), each bounded.

use crate::error::{RegistrarError, Result};
use std::path::Path;

/// A private key file, refused when its group or others may read it.
pub fn read_private_key(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let file_error = |source| RegistrarError::File { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(file_error)?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_file() {
        return Err(RegistrarError::CaInvalid(format!("{}: not a regular file", path.display())));
    }
    if mode & 0o077 != 0 {
        return Err(RegistrarError::KeyPermissions { path: path.to_path_buf(), mode });
    }
    read_text(path)
}

/// A certificate or other small text file (at most 1 MiB).
pub fn read_text(path: &Path) -> Result<String> {
    let file_error = |source| RegistrarError::File { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(file_error)?;
    if !meta.is_file() || meta.len() > 1 << 20 {
        return Err(RegistrarError::Config {
            path: path.to_path_buf(),
            message: "not a regular file of at most 1 MiB".into(),
        });
    }
    std::fs::read_to_string(path).map_err(file_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read_private_key(&key).unwrap_err().name(), "key-permissions");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private_key(&key).unwrap(), "x");
    }
}
