//! Registered fleet servers, persisted atomically as JSON. The service reads
//! it on every request, so a revocation applies to the very next one.

use super::CosignerError;
use fleetd::fsutil;
use fleetd::trust::PublicKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Registry {
    pub servers: BTreeMap<String, ServerEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerEntry {
    pub public_key: String,
    pub registered_at: u64,
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

impl Registry {
    pub fn load(path: &Path) -> Result<Self, CosignerError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| CosignerError::Corrupt { path: path.to_path_buf(), message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(CosignerError::Io { path: path.to_path_buf(), source }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), CosignerError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|source| CosignerError::Io { path: dir.to_path_buf(), source })?;
        }
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| CosignerError::Corrupt { path: path.to_path_buf(), message: e.to_string() })?;
        fsutil::atomic_write(path, &bytes, 0o600)
            .map_err(|source| CosignerError::Io { path: path.to_path_buf(), source })
    }

    /// Registers (or re-registers with a new key) a server id. A revoked
    /// server stays revoked unless `reinstate` says otherwise: re-running a
    /// provisioning script must not quietly undo a revocation.
    pub fn register(
        &mut self,
        id: &str,
        key: &PublicKey,
        now: u64,
        reinstate: bool,
    ) -> Result<(), CosignerError> {
        if !(1..=128).contains(&id.len())
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(CosignerError::BadServerId(id.into()));
        }
        if let Some(at) = self.servers.get(id).and_then(|e| e.revoked_at) {
            if !reinstate {
                return Err(CosignerError::Revoked { id: id.into(), at });
            }
        }
        self.servers.insert(
            id.to_string(),
            ServerEntry { public_key: key.to_pem(), registered_at: now, revoked_at: None },
        );
        Ok(())
    }

    pub fn revoke(&mut self, id: &str, now: u64) -> Result<(), CosignerError> {
        let entry = self.servers.get_mut(id).ok_or_else(|| CosignerError::Unknown(id.into()))?;
        entry.revoked_at.get_or_insert(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registering_a_revoked_server_again_needs_reinstate() {
        let key = fleetd::trust::SigningKey::generate().unwrap().public_key();
        let mut registry = Registry::default();
        registry.register("fs1", &key, 10, false).unwrap();
        registry.revoke("fs1", 20).unwrap();
        let err = registry.register("fs1", &key, 30, false).unwrap_err().to_string();
        assert!(err.starts_with("server-revoked"), "{err}");
        assert_eq!(registry.servers["fs1"].revoked_at, Some(20), "still revoked");
        registry.register("fs1", &key, 40, true).unwrap();
        assert_eq!(registry.servers["fs1"].revoked_at, None);
        assert_eq!(registry.servers["fs1"].registered_at, 40);
    }
}
