//! The shared tier: cache entries in Redis, so a reply fetched by one replica serves all.
//!
//! Layout, per cache node (hash tag `{n:NODE}`, one Redis Cluster slot per node):
//! - `…{n:NODE}:c:HEX` the entry (HEX = the 128-bit key digest), a compact binary value
//!   (see [`encode`]); it expires at `ttl + stale window` after it was stored, like L1;
//! - `…{n:NODE}:kn` / `:ke` sets of the entry digests of the node itself / of its edges, so
//!   a write can delete exactly those entries;
//! - `…{n:NODE}:e` the node's write epoch. A fill reads it with its lookup and stores only if
//!   no write bumped it meanwhile (the store script checks): a fill that raced a write on
//!   another replica can never put pre-write data back.
//!
//! Nothing secret is stored: bodies are prepared (paging links carry the client-key
//! key marker, injected tokens scrubbed) exactly as in L1, and keys name tokens by identity.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use redis::Script;

use super::entry::{Entry, Stamp};
use super::key::{CacheKey, KeyId};
use crate::metrics::RedisOp;
use crate::redis_conn::RedisConn;
use crate::rewrite::{KeyMarker, PreparedBody, MARKER_LEN};

/// First byte of every stored value. A reader that does not know the version treats the
/// value as a miss, so a format change never serves garbage (version 3: bodies may be
/// LZ4-compressed; a version-2 replica and a version-3 one each see the other's values as
/// misses and overwrite them, never misread them).
pub const FORMAT_VERSION: u8 = 3;
/// A write epoch lives this long after its last bump: far longer than any fill takes.
const EPOCH_TTL: Duration = Duration::from_secs(600);
/// Admin purges by prefix or of everything walk the keyspace for at most this long.
const PURGE_BUDGET: Duration = Duration::from_secs(10);

const STORE: &str = r"
local cur = redis.call('GET', KEYS[2]) or '0'
if cur ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return 1
";

const INVALIDATE: &str = r"
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local n = 0
local function drop(set)
  for _, h in ipairs(redis.call('SMEMBERS', set)) do
    n = n + redis.call('DEL', ARGV[2] .. h)
  end
  redis.call('DEL', set)
end
drop(KEYS[3])
if ARGV[1] == '0' then drop(KEYS[2]) end
return n
";

/// What a lookup found: the entry (if any, decodable and of a known version) and the node's
/// write epoch at that moment, which a later store must still see.
#[derive(Debug)]
pub struct Lookup {
    pub entry: Option<Entry>,
    pub epoch: String,
}

/// The Redis tier of one gateway.
pub struct L2 {
    conn: Arc<RedisConn>,
    store: Script,
    invalidate: Script,
}

/// The hash-tagged key stem of a node: `{prefix}{n:NODE}`. Node ids are digits, underscores
/// and names like `me`; anything that could break the tag is hashed instead.
fn tag(prefix: &str, node: Option<&str>) -> String {
    match node {
        Some(n) if n.len() <= 128 && !n.contains(['{', '}']) => format!("{prefix}{{n:{n}}}"),
        Some(n) => {
            use sha2::{Digest, Sha256};
            let d = Sha256::digest(n.as_bytes());
            format!("{prefix}{{n:#{}}}", hex::encode(&d[..8]))
        }
        None => format!("{prefix}{{n:-}}"),
    }
}

fn hex_id(id: KeyId) -> String {
    format!("{:032x}", id.0)
}

impl L2 {
    pub fn new(conn: Arc<RedisConn>) -> L2 {
        L2 {
            conn,
            store: Script::new(STORE),
            invalidate: Script::new(INVALIDATE),
        }
    }

    pub fn conn(&self) -> &Arc<RedisConn> {
        &self.conn
    }

    /// Key of the fill lease for `key` (see [`super::lease`]): in the node's slot.
    pub fn lease_key(&self, key: &CacheKey) -> String {
        format!(
            "{}:l:{}",
            tag(self.conn.prefix(), key.node.as_deref()),
            hex_id(key.id)
        )
    }

    /// The entry and the node's epoch in one round trip (same slot, so `MGET` is fine on a
    /// cluster). `None` when Redis is unavailable.
    pub async fn lookup(&self, key: &CacheKey) -> Option<Lookup> {
        let t = tag(self.conn.prefix(), key.node.as_deref());
        let keys = [format!("{t}:c:{}", hex_id(key.id)), format!("{t}:e")];
        let (value, epoch): (Option<Vec<u8>>, Option<String>) = self
            .conn
            .run(RedisOp::Get, |mut c| async move {
                redis::cmd("MGET").arg(&keys).query_async(&mut c).await
            })
            .await?;
        let entry = value.and_then(|v| decode(&v, key));
        Some(Lookup {
            entry,
            epoch: epoch.unwrap_or_else(|| "0".into()),
        })
    }

    /// Stores `entry` (already in storage form) unless the node's epoch moved since `epoch`.
    /// Expires with the same lifetime as in L1: TTL plus the longer stale window, counted
    /// from when the entry was fetched.
    pub async fn store(
        &self,
        key: &CacheKey,
        entry: &Entry,
        epoch: &str,
        stale_window: Duration,
    ) -> bool {
        let left = (entry.ttl() + stale_window).saturating_sub(entry.age(Instant::now()));
        let px = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
        if px == 0 {
            return false;
        }
        let t = tag(self.conn.prefix(), key.node.as_deref());
        let Some(value) = encode(entry, key) else {
            return false;
        };
        let set = if key.has_edge { "ke" } else { "kn" };
        let keys = [
            format!("{t}:c:{}", hex_id(key.id)),
            format!("{t}:e"),
            format!("{t}:{set}"),
        ];
        let member = hex_id(key.id);
        let epoch = epoch.to_string();
        let script = &self.store;
        self.conn
            .run(RedisOp::Store, |mut c| async move {
                let mut inv = script.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(value)
                    .arg(epoch)
                    .arg(px)
                    .arg(member)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            == Some(1)
    }

    /// Deletes the node's entries (only its edges' with `edges_only`) and bumps its epoch.
    /// Returns how many entries were deleted (`None`: Redis unavailable).
    pub async fn invalidate_node(&self, node: &str, edges_only: bool) -> Option<u64> {
        let t = tag(self.conn.prefix(), Some(node));
        let keys = [format!("{t}:e"), format!("{t}:kn"), format!("{t}:ke")];
        let entry_prefix = format!("{t}:c:");
        let ttl = EPOCH_TTL.as_millis() as u64;
        let script = &self.invalidate;
        self.conn
            .run(RedisOp::Invalidate, |mut c| async move {
                let mut inv = script.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(if edges_only { "1" } else { "0" })
                    .arg(entry_prefix)
                    .arg(ttl)
                    .invoke_async::<u64>(&mut c)
                    .await
            })
            .await
    }

    /// Admin purge: deletes every entry whose readable key starts with `readable_prefix`
    /// (all entries when empty). Walks the keyspace with `SCAN`, bounded in time; returns
    /// entries deleted.
    pub async fn purge(&self, readable_prefix: &str) -> u64 {
        let pattern = format!("{}{{n:*}}:c:*", glob_escape(self.conn.prefix()));
        let started = Instant::now();
        let mut deleted = 0;
        // One keyspace per Cluster primary (a SCAN walks one node), else just the one.
        let keyspaces = self.conn.keyspaces().await.unwrap_or_default();
        'spaces: for space in &keyspaces {
            let mut cursor: u64 = 0;
            loop {
                let Some((next, keys)) = self.conn.scan(space.as_ref(), cursor, &pattern).await
                else {
                    break;
                };
                deleted += self.purge_keys(keys, readable_prefix).await;
                cursor = next;
                if started.elapsed() > PURGE_BUDGET {
                    break 'spaces;
                }
                if cursor == 0 {
                    break;
                }
            }
        }
        deleted
    }

    /// Deletes those of `keys` whose readable key starts with `readable_prefix` (all when
    /// empty); returns how many.
    async fn purge_keys(&self, keys: Vec<String>, readable_prefix: &str) -> u64 {
        let mut deleted = 0;
        let doomed = if readable_prefix.is_empty() || keys.is_empty() {
            keys
        } else {
            let mut values = Vec::with_capacity(keys.len());
            for k in &keys {
                // One key per command: keys of different nodes live in different slots.
                let k = k.clone();
                let v: Option<Vec<u8>> = self
                    .conn
                    .run(RedisOp::Purge, |mut c| async move {
                        redis::cmd("GET").arg(k).query_async(&mut c).await
                    })
                    .await
                    .flatten();
                values.push(v);
            }
            keys.into_iter()
                .zip(values)
                .filter(|(_, v)| {
                    v.as_deref()
                        .and_then(readable_of)
                        .is_some_and(|r| r.starts_with(readable_prefix))
                })
                .map(|(k, _)| k)
                .collect()
        };
        for k in doomed {
            let n = self
                .conn
                .run(RedisOp::Purge, |mut c| async move {
                    redis::cmd("UNLINK").arg(k).query_async::<u64>(&mut c).await
                })
                .await
                .unwrap_or(0);
            deleted += n;
        }
        deleted
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

fn unix_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = SystemTime::now() - now.saturating_duration_since(at);
    wall.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn instant_of(ms: u64) -> Instant {
    let now_ms = unix_ms(Instant::now());
    let age = Duration::from_millis(now_ms.saturating_sub(ms));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// Where the flags byte is: after the version, stored-at, TTL and status.
const FLAGS_AT: usize = 1 + 8 + 8 + 2;
const FLAG_PLACEHOLDER: u8 = 1;
const FLAG_EDGE: u8 = 2;
const FLAG_NODE: u8 = 4;
const FLAG_LZ4: u8 = 8;

/// Version 3 layout, big-endian: version u8, stored-at unix ms u64, ttl ms u64, status u16,
/// flags u8, readable (u32 len + bytes), node (u32 len + bytes, when flagged), header count
/// u16 and per header name (u16 len) and value (u32 len), the body's key marker (22 bytes,
/// when flagged), the body's plain length (u32, when flagged LZ4), then the body (u32 len +
/// bytes), LZ4-compressed when flagged.
/// The readable key sits early so a purge by prefix reads it without decoding the rest.
/// The body goes as the entry holds it: compressed when the in-process tier compresses
/// (`[cache] compress`, bodies of 256 bytes and more that shrink by an eighth), so a shared
/// hit moves and stores the smaller form and is kept compressed in L1 as it arrives. The node
/// and edge flag come from `key`, as [`decode`] checks the readable key against it.
pub fn encode(e: &Entry, key: &CacheKey) -> Option<Vec<u8>> {
    let node = key.node.as_deref();
    let (body, plain_len) = e.stored_body();
    let headers: usize = e
        .headers
        .iter()
        .map(|(n, v)| 6 + n.as_str().len() + v.len())
        .sum();
    let mut out = Vec::with_capacity(
        36 + e.readable().len() + node.map_or(0, str::len) + headers + body.bytes.len(),
    );
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&unix_ms(e.stored_at.instant()).to_be_bytes());
    out.extend_from_slice(&(e.ttl().as_millis() as u64).to_be_bytes());
    out.extend_from_slice(&e.status.as_u16().to_be_bytes());
    let mut flags = 0;
    if body.key_marker.is_some() {
        flags |= FLAG_PLACEHOLDER;
    }
    if key.has_edge {
        flags |= FLAG_EDGE;
    }
    if node.is_some() {
        flags |= FLAG_NODE;
    }
    if plain_len.is_some() {
        flags |= FLAG_LZ4;
    }
    out.push(flags);
    put(&mut out, e.readable().as_bytes());
    if let Some(n) = node {
        put(&mut out, n.as_bytes());
    }
    let count = u16::try_from(e.headers.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (n, v) in e.headers.iter().take(usize::from(count)) {
        let name = n.as_str().as_bytes();
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        put(&mut out, v.as_bytes());
    }
    if let Some(m) = &body.key_marker {
        out.extend_from_slice(&m.as_bytes());
    }
    if let Some(len) = plain_len {
        out.extend_from_slice(&len.to_be_bytes());
    }
    put(&mut out, &body.bytes);
    Some(out)
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// A bounds-checked reader: every read is `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_be_bytes(a))
    }
    fn chunk(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// The readable key of a stored value, without decoding the rest.
fn readable_of(v: &[u8]) -> Option<&str> {
    if *v.first()? != FORMAT_VERSION {
        return None;
    }
    let mut r = Reader(v.get(FLAGS_AT + 1..)?);
    std::str::from_utf8(r.chunk()?).ok()
}

/// Decodes a stored value for `key`. Anything unexpected (unknown version, truncation, bad
/// header bytes, an entry of another key) is a miss.
pub fn decode(v: &[u8], key: &CacheKey) -> Option<Entry> {
    let mut r = Reader(v);
    if r.u8()? != FORMAT_VERSION {
        return None;
    }
    let stored_ms = r.u64()?;
    let ttl = Duration::from_millis(r.u64()?);
    let status = StatusCode::from_u16(r.u16()?).ok()?;
    let flags = r.u8()?;
    let readable = std::str::from_utf8(r.chunk()?).ok()?;
    if readable != &*key.readable {
        // A digest collision or a foreign writer: never serve another key's reply.
        return None;
    }
    if flags & FLAG_NODE != 0 {
        r.chunk()?;
    }
    let count = r.u16()?;
    let mut headers = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let n = usize::from(r.u16()?);
        let name = HeaderName::from_bytes(r.take(n)?).ok()?;
        let value = HeaderValue::from_bytes(r.chunk()?).ok()?;
        headers.push((name, value));
    }
    let key_marker = if flags & FLAG_PLACEHOLDER != 0 {
        Some(KeyMarker::from_bytes(r.take(MARKER_LEN)?)?)
    } else {
        None
    };
    let plain_len = if flags & FLAG_LZ4 != 0 {
        Some(r.u32()?)
    } else {
        None
    };
    let body = PreparedBody {
        bytes: Bytes::copy_from_slice(r.chunk()?),
        key_marker,
    };
    if !r.0.is_empty() {
        return None;
    }
    let mut e = match plain_len {
        Some(len) => Entry::with_compressed_body(status, headers, body, len, ttl)?,
        None => Entry::new(status, headers, body, ttl),
    };
    e.stored_at = Stamp::at(instant_of(stored_ms));
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::request::Params;

    fn key() -> CacheKey {
        super::super::key::build(
            "v21.0",
            &["1001".to_string(), "feed".to_string()],
            &Params::parse("fields=id").unwrap(),
            "system",
        )
        .unwrap()
    }

    /// An entry in storage form (what the tier is given) under `k`.
    fn entry(k: &CacheKey) -> Entry {
        let fetched = Entry::new(
            StatusCode::OK,
            vec![
                (http::header::ETAG, HeaderValue::from_static("\"abc\"")),
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
            ],
            PreparedBody {
                bytes: Bytes::from_static(b"{\"data\":[]}"),
                key_marker: Some(KeyMarker::random()),
            },
            Duration::from_secs(60),
        );
        fetched.for_storage(false, &k.readable)
    }

    #[test]
    fn round_trip_keeps_what_a_reply_needs() {
        let k = key();
        let e = entry(&k);
        let v = encode(&e, &k).expect("encodes");
        assert_eq!(v[0], FORMAT_VERSION);
        assert_eq!(readable_of(&v), Some(&*k.readable));
        let d = decode(&v, &k).expect("decodes");
        assert_eq!(d.status, e.status);
        assert_eq!(d.body().ok(), e.body().ok());
        assert_eq!(d.headers.to_vec(), e.headers.to_vec());
        assert_eq!(d.etag(), e.etag());
        assert_eq!(d.ttl(), e.ttl());
        // The edge flag goes into the value.
        assert_ne!(v[FLAGS_AT] & FLAG_EDGE, 0);
        assert!(d.age(Instant::now()) < Duration::from_secs(2));

        // An entry held compressed goes to Redis compressed, and comes back so.
        let plain = Entry::new(
            StatusCode::OK,
            Vec::new(),
            PreparedBody::plain(Bytes::from(br#"{"id":"1","name":"Page"},"#.repeat(40))),
            Duration::from_secs(60),
        );
        let big = plain.for_storage(true, &k.readable);
        assert!(big.is_compressed());
        let v = encode(&big, &k).expect("encodes");
        assert_eq!(readable_of(&v), Some(&*k.readable));
        let d = decode(&v, &k).expect("decodes");
        assert!(d.is_compressed());
        assert_eq!(d.body().ok(), plain.body().ok());
        let flat = plain.for_storage(false, &k.readable);
        let flat = encode(&flat, &k).expect("encodes");
        assert!(v.len() * 2 < flat.len(), "{} vs {}", v.len(), flat.len());
        // A damaged compressed body is a miss, not an error when served.
        let mut bad = v.clone();
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        bad[n - 10] ^= 0xff;
        assert!(decode(&bad, &k).is_none_or(|e| e.body().is_ok()));
        let mut lying = v.clone();
        let at = n - 4 - big.stored_body().0.bytes.len() - 4;
        lying[at..at + 4].copy_from_slice(&5u32.to_be_bytes());
        assert!(decode(&lying, &k).is_none());
    }

    #[test]
    fn unknown_versions_truncation_and_foreign_keys_are_misses() {
        let k = key();
        let v = encode(&entry(&k), &k).expect("encodes");
        let mut other = v.clone();
        other[0] = FORMAT_VERSION + 1;
        assert!(decode(&other, &k).is_none());
        // Values an older graphgate wrote (version 1, a fixed key placeholder; version 2,
        // bodies always plain) are misses.
        for old in [1, 2] {
            other[0] = old;
            assert!(decode(&other, &k).is_none());
            assert!(readable_of(&other).is_none());
        }
        for n in 0..v.len() {
            assert!(decode(&v[..n], &k).is_none(), "truncated at {n}");
        }
        let mut longer = v.clone();
        longer.push(0);
        assert!(decode(&longer, &k).is_none());
        let other_key = super::super::key::build(
            "v21.0",
            &["1002".to_string()],
            &Params::parse("fields=id").unwrap(),
            "system",
        )
        .unwrap();
        assert!(decode(&v, &other_key).is_none());
    }

    #[test]
    fn tags_keep_a_node_in_one_slot_and_never_break() {
        assert_eq!(tag("gg:", Some("1001")), "gg:{n:1001}");
        assert_eq!(tag("gg:", None), "gg:{n:-}");
        let odd = tag("gg:", Some("a}b"));
        assert!(odd.starts_with("gg:{n:#") && odd.matches('}').count() == 1);
        assert_eq!(glob_escape("a*b?"), "a\\*b\\?");
    }

    proptest::proptest! {
        /// Random bytes never panic the decoder.
        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let k = key();
            let _ = decode(&bytes, &k);
            let _ = readable_of(&bytes);
        }
    }
}
