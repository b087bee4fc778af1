//! The decision cache of the queue door (the seed's TokenVerificationCache): per (user,
//! creator, feature), in each replica's memory (moka, `access.cache_memory_ttl_secs`) and in
//! Redis shared by the replicas (`access.cache_redis_ttl_secs`).
//!
//! A cached decision must never outlive a change the worker has been told about, in any
//! replica. So every entry carries two **epochs** kept in Redis — the user's (bumped when one of
//! their wallets' balances changes, or a wallet is linked or unlinked) and the rule's (bumped
//! when the rule changes) — and an entry counts only while both are unchanged. Every lookup
//! reads the current epochs (one pipelined round trip with the Redis entry), so the moment any
//! replica bumps an epoch no replica answers from a cache built before it. An entry is written
//! only if the epochs it was computed under are still current (a Lua compare-and-set), so a
//! check racing an eviction cannot put back a stale answer.
//!
//! Keys: `{prefix}:access:epoch:user:{user}`, `{prefix}:access:epoch:rule:{creator}\x1f{feature}`,
//! `{prefix}:access:decisions:{user}` (a hash: field `{creator}\x1f{feature}` → entry JSON; the
//! hash expires `cache_redis_ttl_secs` after its first entry).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::decision::{Decision, Source};
use crate::config::AccessConfig;

/// A Redis failure of the cache (callers fall back to the index: a cache error never denies).
#[derive(Debug, thiserror::Error)]
#[error("decision cache: {what}: {source}")]
pub struct CacheError {
    what: &'static str,
    #[source]
    source: redis::RedisError,
}

fn redis_err(what: &'static str) -> impl FnOnce(redis::RedisError) -> CacheError {
    move |source| CacheError { what, source }
}

/// The epochs a decision was computed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epochs {
    user: i64,
    rule: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    user: Uuid,
    rule: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    epochs: Epochs,
    decision: Decision,
}

/// What a lookup found: a decision, or the epochs to store the fresh one under.
#[derive(Debug)]
pub enum Lookup {
    Hit(Box<Decision>),
    Miss(Epochs),
}

/// Writes `ARGV[3]` into hash `KEYS[3]` field `ARGV[4]` only if the epochs in `KEYS[1]`,
/// `KEYS[2]` still equal `ARGV[1]`, `ARGV[2]`; the hash expires after `ARGV[5]` seconds from
/// its first entry.
const PUT_SCRIPT: &str = r"
local u = tonumber(redis.call('GET', KEYS[1]) or '0')
local r = tonumber(redis.call('GET', KEYS[2]) or '0')
if u ~= tonumber(ARGV[1]) or r ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[3], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[5], 'NX')
return 1
";

/// The two-level decision cache.
#[derive(Clone)]
pub struct DecisionCache {
    memory: Option<moka::future::Cache<Key, Arc<Entry>>>,
    redis: ConnectionManager,
    prefix: String,
    redis_ttl_secs: u64,
    put: Arc<redis::Script>,
}

impl DecisionCache {
    pub fn new(redis: ConnectionManager, prefix: &str, cfg: &AccessConfig) -> Self {
        let memory = (cfg.cache_memory_ttl_secs > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(cfg.cache_memory_capacity)
                .time_to_live(Duration::from_secs(cfg.cache_memory_ttl_secs))
                .build()
        });
        Self {
            memory,
            redis,
            prefix: prefix.to_string(),
            redis_ttl_secs: cfg.cache_redis_ttl_secs,
            put: Arc::new(redis::Script::new(PUT_SCRIPT)),
        }
    }

    fn user_epoch_key(&self, user: Uuid) -> String {
        format!("{}:access:epoch:user:{user}", self.prefix)
    }

    fn rule_epoch_key(&self, rule: &str) -> String {
        format!("{}:access:epoch:rule:{rule}", self.prefix)
    }

    fn hash_key(&self, user: Uuid) -> String {
        format!("{}:access:decisions:{user}", self.prefix)
    }

    /// The cached decision of `user` on rule `rule` (`{creator}\x1f{feature}`), if it is still
    /// valid; its `source` is then `cache`.
    pub async fn get(&self, user: Uuid, rule: &str) -> Result<Lookup, CacheError> {
        let mut conn = self.redis.clone();
        let (user_epoch, rule_epoch, stored): (Option<i64>, Option<i64>, Option<String>) =
            redis::pipe()
                .get(self.user_epoch_key(user))
                .get(self.rule_epoch_key(rule))
                .hget(self.hash_key(user), rule)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("lookup"))?;
        let epochs = Epochs {
            user: user_epoch.unwrap_or(0),
            rule: rule_epoch.unwrap_or(0),
        };
        let key = Key {
            user,
            rule: rule.to_string(),
        };
        if let Some(memory) = &self.memory
            && let Some(entry) = memory.get(&key).await
            && entry.epochs == epochs
        {
            return Ok(Lookup::Hit(Box::new(cached(&entry.decision))));
        }
        if self.redis_ttl_secs > 0
            && let Some(entry) = stored.and_then(|s| serde_json::from_str::<Entry>(&s).ok())
            && entry.epochs == epochs
        {
            let decision = cached(&entry.decision);
            if let Some(memory) = &self.memory {
                memory.insert(key, Arc::new(entry)).await;
            }
            return Ok(Lookup::Hit(Box::new(decision)));
        }
        Ok(Lookup::Miss(epochs))
    }

    /// Stores `decision`, computed under `epochs`, unless an eviction happened since.
    pub async fn put(
        &self,
        user: Uuid,
        rule: &str,
        epochs: Epochs,
        decision: &Decision,
    ) -> Result<(), CacheError> {
        let entry = Entry {
            epochs,
            decision: decision.clone(),
        };
        if self.redis_ttl_secs > 0 {
            let json = serde_json::to_string(&entry).unwrap_or_default();
            let mut conn = self.redis.clone();
            let stored: i64 = self
                .put
                .key(self.user_epoch_key(user))
                .key(self.rule_epoch_key(rule))
                .key(self.hash_key(user))
                .arg(epochs.user)
                .arg(epochs.rule)
                .arg(json)
                .arg(rule)
                .arg(self.redis_ttl_secs)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err("store"))?;
            if stored == 0 {
                return Ok(());
            }
        }
        if let Some(memory) = &self.memory {
            memory
                .insert(
                    Key {
                        user,
                        rule: rule.to_string(),
                    },
                    Arc::new(entry),
                )
                .await;
        }
        Ok(())
    }

    /// Drops every cached decision of `users`, in every replica.
    pub async fn evict_users(&self, users: &[Uuid]) -> Result<(), CacheError> {
        if users.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for u in users {
            let epoch = self.user_epoch_key(*u);
            pipe.incr(&epoch, 1)
                .ignore()
                .expire(&epoch, epoch_ttl(self.redis_ttl_secs))
                .ignore()
                .del(self.hash_key(*u))
                .ignore();
        }
        let mut conn = self.redis.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("evict users"))?;
        metrics::counter!("tokenwarden_access_cache_evictions_total", "cause" => "user")
            .increment(users.len() as u64);
        Ok(())
    }

    /// Drops every cached decision of rule `rule`, in every replica.
    pub async fn evict_rule(&self, rule: &str) -> Result<(), CacheError> {
        let epoch = self.rule_epoch_key(rule);
        let mut conn = self.redis.clone();
        redis::pipe()
            .incr(&epoch, 1)
            .ignore()
            .expire(&epoch, epoch_ttl(self.redis_ttl_secs))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("evict a rule"))?;
        metrics::counter!("tokenwarden_access_cache_evictions_total", "cause" => "rule")
            .increment(1);
        Ok(())
    }
}

/// An epoch key must outlive every entry computed under it (else a reset to 0 could match
/// an old entry): twice the Redis TTL, at least a day.
fn epoch_ttl(redis_ttl_secs: u64) -> i64 {
    i64::try_from(redis_ttl_secs.saturating_mul(2).max(86_400)).unwrap_or(i64::MAX)
}

fn cached(d: &Decision) -> Decision {
    let mut d = d.clone();
    d.source = Source::Cache;
    d
}

/// The cache's name of a rule: `{creator}\x1f{feature}` (a separator no name contains).
pub fn rule_key(creator_id: &str, feature: &str) -> String {
    format!("{creator_id}\u{1f}{feature}")
}
