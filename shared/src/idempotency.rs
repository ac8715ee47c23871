//! Idempotency keys: tasks with the same `idempotency_key`, on one queue and for one tenant,
//! run once. The first to be read holds the key while it waits and runs (through its retries,
//! and a takeover after its worker died); a copy read meanwhile parks until the first ends.
//! Once the first succeeded, its copies are answered with its answer (marked `duplicate_of`,
//! billed $0) for the key's window; once it ended failed or dead, the key is free and the
//! next copy runs. The Redis side is `crate::queue::idem`.

use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::Idempotency;
use crate::envelope::Envelope;
use crate::ids::EntryId;

/// How long a key stays held by a task that has not ended: past this a copy runs even if the
/// first never ended (it can only have been lost: every end frees or keeps its key). As long
/// as a result record is kept by default.
pub const HOLD: Duration = Duration::from_secs(7 * 24 * 3600);

/// The name (under the queue's prefix) of `key` for `tenant`: `idem:<SHA-256 hex>`, so a key
/// of any length or content is a fixed 69 bytes in Redis and can never name another key.
#[must_use]
pub fn key_name(tenant: Option<&str>, key: &str) -> String {
    let tenant = tenant.unwrap_or_default();
    let mut h = Sha256::new();
    // Length-prefixed: tenant `a:b` with key `c` is not tenant `a` with key `b:c`.
    h.update(format!("{}:{tenant}:", tenant.len()).as_bytes());
    h.update(key.as_bytes());
    let mut name = String::with_capacity(69);
    name.push_str("idem:");
    for b in h.finalize() {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// The name of `env`'s key, when it has one.
#[must_use]
pub fn name_of(env: &Envelope) -> Option<String> {
    let key = env.idempotency_key.as_deref()?;
    Some(key_name(env.tenant.as_deref(), key))
}

/// The envelope field, set by workers, that names the run holding a task's key: the stream
/// entry that first took it. Written back with the envelope on every retry, wait and
/// hand-back, so the task's later entries are the same run; another entry sent with the same
/// task id has none (or another), so it is a copy.
pub const RUN_FIELD: &str = "idempotency_run";

/// The run of `env` read from stream entry `entry_id`: the one it carries, else this entry.
#[must_use]
pub fn run_of(env: &Envelope, entry_id: EntryId) -> String {
    env.extra
        .get(RUN_FIELD)
        .and_then(serde_json::Value::as_str)
        .map_or_else(|| entry_id.to_string(), str::to_owned)
}

/// The name of the key a raw payload carries and its run (the one it carries, else
/// `entry_id`), when it is JSON with one: what a task that ends without being parsed (a
/// poison task) frees.
#[must_use]
pub fn key_in(payload: &[u8], entry_id: EntryId) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Keyed {
        idempotency_key: Option<String>,
        tenant: Option<String>,
        idempotency_run: Option<String>,
    }
    let k: Keyed = serde_json::from_slice(payload).ok()?;
    let name = key_name(k.tenant.as_deref(), &k.idempotency_key?);
    Some((
        name,
        k.idempotency_run.unwrap_or_else(|| entry_id.to_string()),
    ))
}

/// How long after `env` succeeded its copies are answered with its answer: its own
/// `idempotency_window`, else its queue's.
#[must_use]
pub fn window(config: &Idempotency, queue: &str, env: &Envelope) -> Duration {
    env.idempotency_window
        .as_deref()
        .and_then(|w| crate::envelope::cache_ttl(w).ok())
        .unwrap_or_else(|| config.window_of(queue))
}

/// The id of the chain submitted with `key` for `tenant` on `queue` when it names no
/// `chain_id`: a UUIDv5 in the OID namespace of `llmq-chain-key:<queue>:<tenant's length>:
/// <tenant>:<key>`, so submitting it twice names one chain (which runs once).
#[must_use]
pub fn chain_id(queue: &str, tenant: Option<&str>, key: &str) -> Uuid {
    let tenant = tenant.unwrap_or_default();
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("llmq-chain-key:{queue}:{}:{tenant}:{key}", tenant.len()).as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_named_by_its_tenant_and_itself_and_nothing_else() {
        let name = key_name(None, "order-1");
        assert_eq!(name.len(), 69);
        assert!(name.starts_with("idem:"));
        assert_eq!(name, key_name(None, "order-1"));
        assert_ne!(name, key_name(Some("acme"), "order-1"));
        assert_ne!(key_name(Some("a:b"), "c"), key_name(Some("a"), "b:c"));
        let long = "k".repeat(100_000);
        assert_eq!(
            key_name(None, &long).len(),
            69,
            "a long key is not stored as is"
        );
        let mut env = Envelope::new("hi");
        env.idempotency_key = Some("order-1".into());
        assert_eq!(name_of(&env), Some(name));
        env.tenant = Some("acme".into());
        let acme = key_name(Some("acme"), "order-1");
        assert_eq!(
            key_in(env.to_json().as_bytes(), crate::ids::EntryId::new(1, 0)),
            Some((acme.clone(), "1-0".into()))
        );
        assert_eq!(run_of(&env, crate::ids::EntryId::new(1, 0)), "1-0");
        env.extra.insert(RUN_FIELD.into(), "0-7".into());
        assert_eq!(
            key_in(env.to_json().as_bytes(), crate::ids::EntryId::new(1, 0)),
            Some((acme, "0-7".into()))
        );
        assert_eq!(
            run_of(&env, crate::ids::EntryId::new(1, 0)),
            "0-7",
            "a retry is the run that took the key"
        );
        assert_eq!(key_in(b"{\"v\":1}", crate::ids::EntryId::new(1, 0)), None);
        assert_eq!(key_in(b"not json", crate::ids::EntryId::new(1, 0)), None);
    }

    #[test]
    fn a_window_is_the_task_s_then_the_queue_s_then_a_day() {
        let mut config = Idempotency::default();
        config
            .queues
            .insert("reports".into(), Duration::from_secs(3600));
        let mut env = Envelope::new("hi");
        assert_eq!(
            window(&config, "default", &env),
            Duration::from_secs(86_400)
        );
        assert_eq!(window(&config, "reports", &env), Duration::from_secs(3600));
        env.idempotency_window = Some("10m".into());
        assert_eq!(window(&config, "reports", &env), Duration::from_secs(600));
    }

    #[test]
    fn a_chain_key_names_one_chain_per_queue_and_tenant() {
        let id = chain_id("q", None, "release-42");
        assert_eq!(id, chain_id("q", None, "release-42"));
        assert_ne!(id, chain_id("other", None, "release-42"));
        assert_ne!(id, chain_id("q", Some("acme"), "release-42"));
    }
}
