//! The keys `llmq serve` accepts: a file of one JSON object a line, each a key's SHA-256
//! (never the key), the tenant it names, the models it may use and the most urgent priority
//! it may ask for. `llmq keys create` makes a key and shows it once; `list` shows the lines
//! without anything secret; `revoke` removes one. The server reads the file again when it
//! changes, so a key revoked stops working within a second, without a restart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// One key, as the file holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Key {
    /// How `list` and `revoke` name it (not secret).
    pub id: String,
    /// The key's SHA-256, in hex.
    pub sha256: String,
    /// The tenant its tasks are charged to and take turns as.
    pub tenant: String,
    /// The models it may name (a pin or `provider/model`); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// The most urgent priority it may ask for (0-9, 0 the most urgent); none: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest_priority: Option<u8>,
    /// The requests it may make a minute (each clock minute, across every replica): past
    /// it, 429 with `retry-after`, the one 429 the server gives. None: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// The tags every task it sends carries (`llmq costs --by tag:NAME`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The keys file, read again when it changes (looked at once a second at most).
pub struct KeyFile {
    path: PathBuf,
    read: Mutex<Read>,
}

/// Each key and its hash, as read.
type Keys = Vec<(Key, [u8; 32])>;

struct Read {
    keys: Keys,
    modified: Option<SystemTime>,
    looked: Instant,
}

impl KeyFile {
    /// Reads `path`.
    ///
    /// # Errors
    /// The file cannot be read or a line is not a key; the sentence names the line.
    pub fn open(path: &Path) -> Result<Self, String> {
        let (keys, modified) = load(path)?;
        Ok(Self {
            path: path.to_owned(),
            read: Mutex::new(Read {
                keys,
                modified,
                looked: Instant::now(),
            }),
        })
    }

    /// The key named `id` (not secret: what `list` shows), as the file holds it (read again
    /// when it changed, at most each second: a key revoked drives no batch).
    pub fn by_id(&self, id: &str) -> Option<Key> {
        let read = self.fresh();
        read.keys
            .iter()
            .find(|(k, _)| k.id == id)
            .map(|(k, _)| k.clone())
    }

    /// The key whose secret is `secret`, compared with every key in constant time.
    pub fn find(&self, secret: &str) -> Option<Key> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let read = self.fresh();
        let mut found = None;
        for (key, hash) in &read.keys {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(key.clone());
            }
        }
        found
    }

    /// The keys, read again first when the file changed (looked at most each second).
    fn fresh(&self) -> std::sync::MutexGuard<'_, Read> {
        let mut read = self
            .read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if read.looked.elapsed() >= Duration::from_secs(1) {
            read.looked = Instant::now();
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified != read.modified {
                // A file that no longer reads keeps the keys read last, and says why.
                match load(&self.path) {
                    Ok((keys, modified)) => {
                        read.keys = keys;
                        read.modified = modified;
                    }
                    Err(e) => tracing::warn!("keeping the keys read before: {e}"),
                }
            }
        }
        read
    }
}

fn load(path: &Path) -> Result<(Keys, Option<SystemTime>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the keys file {}: {e}", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let key: Key = serde_json::from_str(line).map_err(|e| {
            format!(
                "line {} of the keys file {} is not a key ({e}); make keys with `llmq keys create`",
                n + 1,
                path.display()
            )
        })?;
        let hash = hex_digest(&key.sha256).ok_or_else(|| {
            format!(
                "line {} of the keys file {}: `sha256` must be 64 hex digits",
                n + 1,
                path.display()
            )
        })?;
        keys.push((key, hash));
    }
    Ok((keys, modified))
}

fn hex_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `llmq keys create`: a new key for `tenant`, its line added to `file`; the secret is
/// printed once, and only its hash is kept.
///
/// # Errors
/// The file cannot be written, or the tenant or priority is not valid.
pub fn create(file: &Path, grant: Grant, out: &mut dyn Write) -> crate::Result<u8> {
    let Grant {
        tenant,
        models,
        highest_priority,
        requests_per_minute,
        tags,
    } = grant;
    let tenant = tenant.as_str();
    llmq_shared::envelope::check_class(highest_priority.map(i64::from), Some(tenant))
        .map_err(|e| crate::Error::Usage(format!("{e}")))?;
    llmq_shared::envelope::check_tags(&tags).map_err(|e| crate::Error::Usage(format!("{e}")))?;
    if requests_per_minute == Some(0) {
        return Err(crate::Error::Usage(
            "--requests-per-minute 0 would refuse every request; give 1 or more, or leave it out"
                .into(),
        ));
    }
    let secret = format!(
        "llmq-{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let key = Key {
        id: format!("key-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        sha256: to_hex(&Sha256::digest(secret.as_bytes())),
        tenant: tenant.to_owned(),
        models,
        highest_priority,
        requests_per_minute,
        tags,
        created_at: Some(chrono::Utc::now()),
    };
    let line = serde_json::to_string(&key).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|e| crate::Error::Usage(format!("cannot write {}: {e}", file.display())))?;
    writeln!(f, "{line}")
        .map_err(|e| crate::Error::Usage(format!("cannot write {}: {e}", file.display())))?;
    let _ = writeln!(
        out,
        "{secret}\n(key {} for tenant {tenant}; the key is shown only now: {} keeps its hash)",
        key.id,
        file.display()
    );
    Ok(crate::EXIT_OK)
}

/// What `llmq keys create` grants a new key.
pub struct Grant {
    pub tenant: String,
    pub models: Vec<String>,
    pub highest_priority: Option<u8>,
    pub requests_per_minute: Option<u32>,
    pub tags: std::collections::BTreeMap<String, String>,
}

/// `llmq keys list`: each key's id, tenant, models, priority and limit, nothing secret.
///
/// # Errors
/// The file cannot be read.
pub fn list(file: &Path, out: &mut dyn Write) -> crate::Result<u8> {
    let (keys, _) = load(file).map_err(crate::Error::Usage)?;
    for (k, _) in keys {
        let _ = writeln!(
            out,
            "{}\ttenant={}\tmodels={}\thighest_priority={}\trequests_per_minute={}\ttags={}\tcreated={}",
            k.id,
            k.tenant,
            if k.models.is_empty() {
                "any".to_owned()
            } else {
                k.models.join(",")
            },
            k.highest_priority
                .map_or("any".to_owned(), |p| p.to_string()),
            k.requests_per_minute
                .map_or("any".to_owned(), |n| n.to_string()),
            k.tags
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            k.created_at.map_or(String::new(), |t| t.to_rfc3339()),
        );
    }
    Ok(crate::EXIT_OK)
}

/// `llmq keys revoke`: removes key `id` from `file` (a running server stops taking it
/// within a second).
///
/// # Errors
/// The file cannot be read or written, or holds no such key.
pub fn revoke(file: &Path, id: &str, out: &mut dyn Write) -> crate::Result<u8> {
    let (keys, _) = load(file).map_err(crate::Error::Usage)?;
    if !keys.iter().any(|(k, _)| k.id == id) {
        return Err(crate::Error::Usage(format!(
            "{} holds no key {id}; `llmq keys list` shows the ids",
            file.display()
        )));
    }
    let mut text = String::new();
    for (k, _) in keys.iter().filter(|(k, _)| k.id != id) {
        text.push_str(&serde_json::to_string(k).unwrap_or_default());
        text.push('\n');
    }
    // Written whole beside it, then renamed over it: a server never reads half a file.
    let tmp = file.with_extension("revoking");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, file))
        .map_err(|e| crate::Error::Usage(format!("cannot write {}: {e}", file.display())))?;
    let _ = writeln!(out, "revoked {id}");
    Ok(crate::EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_is_found_by_its_secret_only_and_revoked() {
        let dir = std::env::temp_dir().join(format!("llmq-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys.jsonl");
        let mut out = Vec::new();
        let grant = Grant {
            tenant: "acme".into(),
            models: vec!["mock-fast".into()],
            highest_priority: Some(3),
            requests_per_minute: Some(5),
            tags: [("team".to_owned(), "search".to_owned())].into(),
        };
        create(&file, grant, &mut out).unwrap();
        let printed = String::from_utf8(out).unwrap();
        let secret = printed.lines().next().unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains(secret),
            "the file keeps the hash, not the key"
        );
        let keys = KeyFile::open(&file).unwrap();
        let key = keys.find(secret).expect("the key is found by its secret");
        assert_eq!(key.tenant, "acme");
        assert_eq!(key.highest_priority, Some(3));
        assert_eq!(key.tags.get("team").map(String::as_str), Some("search"));
        assert!(keys.find("llmq-wrong").is_none());
        revoke(&file, &key.id, &mut Vec::new()).unwrap();
        assert!(KeyFile::open(&file).unwrap().find(secret).is_none());
        assert!(revoke(&file, &key.id, &mut Vec::new()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_line_is_named() {
        let dir = std::env::temp_dir().join(format!("llmq-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys.jsonl");
        std::fs::write(
            &file,
            "\n{\"id\":\"k\",\"sha256\":\"00\",\"tenant\":\"t\"}\n",
        )
        .unwrap();
        let e = KeyFile::open(&file).err().unwrap();
        assert!(e.contains("line 2") && e.contains("64 hex"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
