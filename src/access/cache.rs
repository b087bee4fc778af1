//! The decision cache of the queue door (the seed's TokenVerificationCache): per (user,
//! creator, feature), in each replica's memory (moka, `access.cache_memory_ttl_secs`, bounded by
//! `access.cache_memory_max_mib`) and in Redis shared by the replicas
//! (`access.cache_redis_ttl_secs`).
//!
//! A cached decision must never outlive a change the worker has been told about, in any
//! replica. So every entry carries two **epochs** kept in Redis — the user's (bumped when one of
//! their wallets' balances changes, or a wallet is linked or unlinked) and the rule's (bumped
//! when the rule changes) — and an entry counts only while both are unchanged. Every lookup
//! reads the current epochs from Redis after the check arrived, so the moment any replica has
//! bumped an epoch no replica answers from a cache built before it. The lookups of checks that
//! arrive together share one pipelined round trip ([`DecisionCache::get_many`]): Redis is asked
//! once per batch of checks, not once per check. An entry is written only if the epochs it was
//! computed under are still current (a Lua compare-and-set, one script call per batch), so a
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
    /// The entry's estimated size in memory (bytes), the moka weight.
    #[serde(skip)]
    weight: u32,
}

/// What a lookup found: a decision, or the epochs to store the fresh one under.
#[derive(Debug)]
pub enum Lookup {
    Hit(Box<Decision>),
    Miss(Epochs),
}

/// Writes the entries of a batch: entry `i` (from 0) has keys `KEYS[3i+1]` (user epoch),
/// `KEYS[3i+2]` (rule epoch), `KEYS[3i+3]` (the user's hash) and arguments `ARGV[4i+2]`,
/// `ARGV[4i+3]` (the epochs it was computed under), `ARGV[4i+4]` (the entry JSON),
/// `ARGV[4i+5]` (the hash field); `ARGV[1]` is the hash's TTL from its first entry. An entry is
/// written only if both epochs are still the ones it was computed under. Returns 1 (written) or
/// 0 per entry.
const PUT_SCRIPT: &str = r"
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local u = tonumber(redis.call('GET', KEYS[3 * i + 1]) or '0')
  local r = tonumber(redis.call('GET', KEYS[3 * i + 2]) or '0')
  if u == tonumber(ARGV[4 * i + 2]) and r == tonumber(ARGV[4 * i + 3]) then
    redis.call('HSET', KEYS[3 * i + 3], ARGV[4 * i + 5], ARGV[4 * i + 4])
    redis.call('EXPIRE', KEYS[3 * i + 3], ARGV[1], 'NX')
    out[i + 1] = 1
  else
    out[i + 1] = 0
  end
end
return out
";

/// Bytes of memory an entry takes besides its JSON-sized content: the key, the moka node, the
/// `Arc` and the structs' own fields (an estimate: the cap is a bound on memory, not an exact
/// count).
const ENTRY_OVERHEAD_BYTES: usize = 256;

/// The moka weight of an entry whose JSON is `json_len` bytes long. A decision held as Rust
/// values (strings with their capacity, vectors, enum tags) takes about twice its JSON text.
fn weight_of(json_len: usize) -> u32 {
    u32::try_from(json_len.saturating_mul(2) + ENTRY_OVERHEAD_BYTES).unwrap_or(u32::MAX)
}

/// One decision to store with [`DecisionCache::put_many`].
pub struct Put<'a> {
    pub user: Uuid,
    pub rule: &'a str,
    pub epochs: Epochs,
    pub decision: &'a Decision,
}

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
                .max_capacity(cfg.cache_memory_max_mib.saturating_mul(1024 * 1024))
                .weigher(|_key: &Key, entry: &Arc<Entry>| entry.weight)
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
        let mut found = self.get_many(&[(user, rule)]).await?;
        Ok(found
            .pop()
            .unwrap_or(Lookup::Miss(Epochs { user: 0, rule: 0 })))
    }

    /// [`get`](Self::get) for many checks with one Redis round trip: the current epochs of
    /// every check, and the Redis entry of those the replica's memory does not hold.
    pub async fn get_many(&self, checks: &[(Uuid, &str)]) -> Result<Vec<Lookup>, CacheError> {
        let mut in_memory = Vec::with_capacity(checks.len());
        for (user, rule) in checks {
            let entry = match &self.memory {
                Some(memory) => {
                    memory
                        .get(&Key {
                            user: *user,
                            rule: rule.to_string(),
                        })
                        .await
                }
                None => None,
            };
            in_memory.push(entry);
        }
        let mut pipe = redis::pipe();
        for ((user, rule), entry) in checks.iter().zip(&in_memory) {
            pipe.get(self.user_epoch_key(*user))
                .get(self.rule_epoch_key(rule));
            if entry.is_none() && self.redis_ttl_secs > 0 {
                pipe.hget(self.hash_key(*user), *rule);
            }
        }
        let mut conn = self.redis.clone();
        let replies: Vec<Option<String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(redis_err("lookup"))?;
        let mut replies = replies.into_iter();
        let mut found = Vec::with_capacity(checks.len());
        for entry in in_memory {
            let epoch = |v: Option<Option<String>>| {
                v.flatten().and_then(|s| s.parse::<i64>().ok()).unwrap_or(0)
            };
            let epochs = Epochs {
                user: epoch(replies.next()),
                rule: epoch(replies.next()),
            };
            let stored = if entry.is_none() && self.redis_ttl_secs > 0 {
                replies.next().flatten()
            } else {
                None
            };
            found.push((epochs, entry, stored));
        }
        // A memory entry from before an eviction: another replica may have stored the fresh
        // decision in Redis since. Those (rare) are read in a second round trip.
        let outdated: Vec<usize> = found
            .iter()
            .enumerate()
            .filter(|(_, (epochs, entry, _))| entry.as_ref().is_some_and(|e| e.epochs != *epochs))
            .map(|(i, _)| i)
            .collect();
        if !outdated.is_empty() && self.redis_ttl_secs > 0 {
            let mut pipe = redis::pipe();
            for &i in &outdated {
                let (user, rule) = checks[i];
                pipe.hget(self.hash_key(user), rule);
            }
            let stored: Vec<Option<String>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(redis_err("lookup"))?;
            for (&i, json) in outdated.iter().zip(stored) {
                found[i].1 = None;
                found[i].2 = json;
            }
        }
        let mut out = Vec::with_capacity(checks.len());
        for ((user, rule), (epochs, entry, stored)) in checks.iter().zip(found) {
            out.push(self.resolve(*user, rule, epochs, entry, stored).await);
        }
        Ok(out)
    }

    /// The answer of one lookup: the memory entry if its epochs are current, else the Redis
    /// entry if its epochs are (then kept in memory too), else a miss.
    async fn resolve(
        &self,
        user: Uuid,
        rule: &str,
        epochs: Epochs,
        in_memory: Option<Arc<Entry>>,
        stored: Option<String>,
    ) -> Lookup {
        if let Some(entry) = in_memory
            && entry.epochs == epochs
        {
            return Lookup::Hit(Box::new(cached(&entry.decision)));
        }
        if let Some(json) = stored
            && let Ok(mut entry) = serde_json::from_str::<Entry>(&json)
            && entry.epochs == epochs
        {
            let decision = cached(&entry.decision);
            if let Some(memory) = &self.memory {
                entry.weight = weight_of(json.len());
                let key = Key {
                    user,
                    rule: rule.to_string(),
                };
                memory.insert(key, Arc::new(entry)).await;
            }
            return Lookup::Hit(Box::new(decision));
        }
        Lookup::Miss(epochs)
    }

    /// Stores `decision`, computed under `epochs`, unless an eviction happened since.
    pub async fn put(
        &self,
        user: Uuid,
        rule: &str,
        epochs: Epochs,
        decision: &Decision,
    ) -> Result<(), CacheError> {
        self.put_many(&[Put {
            user,
            rule,
            epochs,
            decision,
        }])
        .await
    }

    /// [`put`](Self::put) for many decisions with one Redis script call.
    pub async fn put_many(&self, puts: &[Put<'_>]) -> Result<(), CacheError> {
        if puts.is_empty() {
            return Ok(());
        }
        let entries: Vec<(Entry, String)> = puts
            .iter()
            .map(|p| {
                let mut entry = Entry {
                    epochs: p.epochs,
                    decision: p.decision.clone(),
                    weight: 0,
                };
                let json = serde_json::to_string(&entry).unwrap_or_default();
                entry.weight = weight_of(json.len());
                (entry, json)
            })
            .collect();
        let stored: Vec<i64> = if self.redis_ttl_secs > 0 {
            let mut invocation = self.put.prepare_invoke();
            invocation.arg(self.redis_ttl_secs);
            for (p, (entry, json)) in puts.iter().zip(&entries) {
                invocation
                    .key(self.user_epoch_key(p.user))
                    .key(self.rule_epoch_key(p.rule))
                    .key(self.hash_key(p.user))
                    .arg(entry.epochs.user)
                    .arg(entry.epochs.rule)
                    .arg(json.as_str())
                    .arg(p.rule);
            }
            let mut conn = self.redis.clone();
            invocation
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err("store"))?
        } else {
            vec![1; puts.len()]
        };
        if let Some(memory) = &self.memory {
            for ((p, (entry, _)), ok) in puts.iter().zip(entries).zip(stored) {
                if ok == 1 {
                    let key = Key {
                        user: p.user,
                        rule: p.rule.to_string(),
                    };
                    memory.insert(key, Arc::new(entry)).await;
                }
            }
        }
        Ok(())
    }

    /// The estimated bytes the replica's memory level holds now (0 without it), after moka
    /// has applied its pending evictions: what `access.cache_memory_max_mib` bounds.
    pub async fn memory_bytes(&self) -> u64 {
        match &self.memory {
            Some(memory) => {
                memory.run_pending_tasks().await;
                memory.weighted_size()
            }
            None => 0,
        }
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
