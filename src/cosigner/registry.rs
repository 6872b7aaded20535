//! Registered fleet servers, persisted atomically as JSON. The service reads
//! it on every request, so a revocation applies to the very next one.

use crate::fsutil;
use crate::trust::PublicKey;
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
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        fsutil::atomic_write(path, &bytes, 0o600).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Registers (or re-registers with a new key) a server id. A revoked
    /// server stays revoked unless `reinstate` says otherwise: re-running a
    /// provisioning script must not quietly undo a revocation.
    pub fn register(&mut self, id: &str, key: &PublicKey, now: u64, reinstate: bool) -> Result<(), String> {
        if !(1..=128).contains(&id.len())
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!("server id {id:?} must be 1-128 characters of [A-Za-z0-9_-]"));
        }
        if let Some(revoked_at) = self.servers.get(id).and_then(|e| e.revoked_at) {
            if !reinstate {
                return Err(format!(
                    "server-revoked: {id:?} was revoked at {revoked_at}; pass --reinstate to register it again"
                ));
            }
        }
        self.servers.insert(
            id.to_string(),
            ServerEntry { public_key: key.to_pem(), registered_at: now, revoked_at: None },
        );
        Ok(())
    }

    pub fn revoke(&mut self, id: &str, now: u64) -> Result<(), String> {
        let entry = self.servers.get_mut(id).ok_or_else(|| format!("server {id:?} is not registered"))?;
        entry.revoked_at.get_or_insert(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registering_a_revoked_server_again_needs_reinstate() {
        let key = crate::trust::SigningKey::generate().unwrap().public_key();
        let mut registry = Registry::default();
        registry.register("fs1", &key, 10, false).unwrap();
        registry.revoke("fs1", 20).unwrap();
        let err = registry.register("fs1", &key, 30, false).unwrap_err();
        assert!(err.starts_with("server-revoked"), "{err}");
        assert_eq!(registry.servers["fs1"].revoked_at, Some(20), "still revoked");
        registry.register("fs1", &key, 40, true).unwrap();
        assert_eq!(registry.servers["fs1"].revoked_at, None);
        assert_eq!(registry.servers["fs1"].registered_at, 40);
    }
}
