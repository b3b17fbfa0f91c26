//! API keys of `upstream serve`. A key is shown once, when it is made; the store keeps only
//! its BLAKE3 hash (keys are 192 random bits, so a fast hash is enough) and a short prefix
//! by which people can tell keys apart.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::{Store, StoreError};

/// What every key starts with, so that one pasted in the wrong place is recognisable.
pub const KEY_PREFIX: &str = "ups_";

/// A key as listed: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    pub id: i64,
    pub name: String,
    pub tenant: String,
    /// The key's first characters (`ups_3f9a…`).
    pub prefix: String,
    /// Unix time in milliseconds.
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// A key just made: the only time its secret is known.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key: ApiKey,
    pub secret: String,
}

/// Who a presented key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    pub id: i64,
    pub tenant: String,
}

impl Store {
    /// Makes a key for `tenant`; the secret in the answer is not kept anywhere.
    pub fn create_key(&mut self, name: &str, tenant: &str) -> Result<NewKey, StoreError> {
        let mut random = [0u8; 24];
        fill_random(&mut random).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let secret = format!("{KEY_PREFIX}{}", hex(&random));
        let prefix = secret[..KEY_PREFIX.len() + 8].to_string();
        let created_at = crate::now_ms();
        let hash = blake3::hash(secret.as_bytes());
        self.conn
            .execute(
                "INSERT INTO api_keys (name, tenant, prefix, hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, tenant, prefix, hash.as_bytes().as_slice(), created_at],
            )
            .map_err(|e| self.db_err(e))?;
        Ok(NewKey {
            key: ApiKey {
                id: self.conn.last_insert_rowid(),
                name: name.to_string(),
                tenant: tenant.to_string(),
                prefix,
                created_at,
                revoked_at: None,
            },
            secret,
        })
    }

    /// Every key, revoked ones too, oldest first.
    pub fn keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT id, name, tenant, prefix, created_at, revoked_at FROM api_keys
                 ORDER BY id",
            )
            .map_err(|e| self.db_err(e))?;
        statement
            .query_map([], |row| {
                Ok(ApiKey {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    tenant: row.get(2)?,
                    prefix: row.get(3)?,
                    created_at: row.get(4)?,
                    revoked_at: row.get(5)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.db_err(e))
    }

    /// Revokes the key with this id, or every key of this name; returns how many were
    /// revoked (0: none matched, or they were revoked already).
    pub fn revoke_key(&mut self, id_or_name: &str) -> Result<usize, StoreError> {
        let now = crate::now_ms();
        self.conn
            .execute(
                "UPDATE api_keys SET revoked_at = ?2
                 WHERE revoked_at IS NULL AND (CAST(id AS TEXT) = ?1 OR name = ?1)",
                params![id_or_name, now],
            )
            .map_err(|e| self.db_err(e))
    }

    /// The owner of a presented key, if it is a key of this store and not revoked.
    pub fn key_owner(&self, secret: &str) -> Result<Option<KeyOwner>, StoreError> {
        if !secret.starts_with(KEY_PREFIX) {
            return Ok(None);
        }
        let hash = blake3::hash(secret.as_bytes());
        self.conn
            .query_row(
                "SELECT id, tenant FROM api_keys WHERE hash = ?1 AND revoked_at IS NULL",
                params![hash.as_bytes().as_slice()],
                |row| {
                    Ok(KeyOwner {
                        id: row.get(0)?,
                        tenant: row.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.db_err(e))
    }
}

/// Fills `buf` from the kernel's random source (getrandom(2)).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom(2) writes at most `len - filled` bytes into the buffer from
        // `filled` on, which `buf` owns.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_known_by_its_secret_until_revoked_and_only_its_hash_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let made = store.create_key("ci", "acme").unwrap();
        let other = store.create_key("laptop", "globex").unwrap();
        assert!(made.secret.starts_with(KEY_PREFIX));
        assert_eq!(made.secret.len(), KEY_PREFIX.len() + 48);
        assert_ne!(made.secret, other.secret);
        assert_eq!(
            store.key_owner(&made.secret).unwrap(),
            Some(KeyOwner {
                id: made.key.id,
                tenant: "acme".into()
            })
        );
        assert_eq!(store.key_owner("ups_not-a-key").unwrap(), None);
        assert_eq!(store.key_owner("Bearer x").unwrap(), None);
        // The database holds no secret.
        let db = std::fs::read(dir.path().join("store.db")).unwrap();
        let wal = std::fs::read(dir.path().join("store.db-wal")).unwrap_or_default();
        for bytes in [&db, &wal] {
            assert!(
                !bytes
                    .windows(made.secret.len())
                    .any(|w| w == made.secret.as_bytes())
            );
        }
        assert_eq!(store.keys().unwrap().len(), 2);
        assert_eq!(store.revoke_key("ci").unwrap(), 1);
        assert_eq!(store.revoke_key("ci").unwrap(), 0, "revoked already");
        assert_eq!(store.key_owner(&made.secret).unwrap(), None);
        assert!(store.key_owner(&other.secret).unwrap().is_some());
        assert_eq!(store.revoke_key(&other.key.id.to_string()).unwrap(), 1);
        assert_eq!(store.key_owner(&other.secret).unwrap(), None);
        assert!(store.keys().unwrap().iter().all(|k| k.revoked_at.is_some()));
    }
}
