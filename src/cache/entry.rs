//! A cached (or just fetched) reply and its age arithmetic.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, StatusCode};
use triomphe::HeaderSlice;

use super::invalidate::NodeSlot;
pub use super::reply_headers::ReplyHeaders;
use super::reply_headers::{readable_in, PackedAt};
use crate::error::ProxyError;
use crate::rewrite::{KeyMarker, PreparedBody};

/// Graph's content type for JSON; served when an entry stores none.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json; charset=UTF-8";

/// Bodies at least this long are worth compressing when stored; below, LZ4's gain is small
/// next to the entry's fixed cost.
pub const COMPRESS_MIN_BYTES: usize = 256;

/// What a cached entry costs besides its body, headers and readable key: its fixed fields,
/// moka's per-entry nodes and key, the node index and allocator rounding. Measured as RSS
/// per entry less those (`examples/entry_memory`, 300 000 and 1 000 000 entries of 1 KB):
/// 492–571 bytes when each entry is a read of its own node (most caches), 414–489 when all
/// are reads of one node. The larger, so either kind stays within `cache.max_bytes` (a body
/// whose buffer just misses an allocator size class can still cost up to ~10 % more, by the
/// classes' spacing: reasoned, not measured).
pub const ENTRY_OVERHEAD: usize = 580;

/// A compressed entry read this many times is stored again plain: a hot entry then costs no
/// decompression per hit, while the long tail stays compressed.
pub const HOT_HITS: u32 = 16;

/// The longest TTL an entry holds (~49 days, what milliseconds in a `u32` can say); a
/// longer one is held as this.
pub const MAX_TTL: Duration = Duration::from_millis(u32::MAX as u64);

fn ttl_ms(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX)
}

/// The TTL [`ttl_ms`] holds.
fn ttl_of(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

/// What an entry holding `held` bytes (body as stored, headers, readable key) weighs in the
/// cache: those and [`ENTRY_OVERHEAD`].
fn weight_of(held: usize) -> u32 {
    u32::try_from(held + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
}

/// When an entry was stored, in 8 bytes where an `Instant` takes 16: nanoseconds from a
/// process-wide anchor, negative for an entry older than the process (from the Redis tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(i64);

fn anchor() -> Instant {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    *ANCHOR.get_or_init(Instant::now)
}

/// Signed nanoseconds from the anchor to `at`.
fn nanos_from_anchor(at: Instant) -> i64 {
    let anchor = anchor();
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    match at.checked_duration_since(anchor) {
        Some(after) => nanos(after),
        None => -nanos(anchor.saturating_duration_since(at)),
    }
}

impl Stamp {
    pub fn now() -> Stamp {
        Stamp::at(Instant::now())
    }

    /// `at` to the nanosecond (clamped ~292 years either side of the anchor).
    pub fn at(at: Instant) -> Stamp {
        Stamp(nanos_from_anchor(at))
    }

    /// Time from this stamp to `now` (zero if `now` is earlier). One clock subtraction: a
    /// hit asks for an entry's age up to three times.
    pub fn until(self, now: Instant) -> Duration {
        let age = nanos_from_anchor(now).saturating_sub(self.0);
        Duration::from_nanos(u64::try_from(age).unwrap_or(0))
    }

    pub fn instant(self) -> Instant {
        let anchor = anchor();
        let d = Duration::from_nanos(self.0.unsigned_abs());
        if self.0 >= 0 {
            anchor + d
        } else {
            anchor.checked_sub(d).unwrap_or(anchor)
        }
    }
}

/// One reply as served from the cache: the prepared body (with the client-key marker,
/// finalized per client) and the headers worth replaying. The in-process tier holds it as a
/// [`Stored`] and makes an `Entry` of it for each read.
#[derive(Debug, Clone)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: ReplyHeaders,
    /// The body as served, or LZ4-compressed when `plain_len` is set: read it through
    /// [`Entry::body`].
    body: PreparedBody,
    /// The body's length before compression, for a compressed body (never empty).
    plain_len: Option<NonZeroU32>,
    pub stored_at: Stamp,
    /// Time to live in milliseconds (at most [`MAX_TTL`]): read it through [`Entry::ttl`].
    ttl_ms: u32,
    /// Where the entry's key is in the node index (set when stored in the in-process tier).
    pub index_slot: Option<NodeSlot>,
    /// What the in-process tier holds, for a compressed entry read from it: its hit count,
    /// and what [`crate::cache::l1::L1::replace_if_current`] compares when the entry is
    /// stored again plain (a plain entry never is).
    origin: Option<Stored>,
}

/// [`Entry::pack`]'s buffer and what it says of it.
struct PackedEntry {
    buf: Vec<u8>,
    headers_at: PackedAt,
    plain_len: Option<NonZeroU32>,
}

/// A cached entry as the in-process tier holds it: its fixed fields, then the body (as
/// stored), the packed headers and the readable key, all in one allocation. An `Arc<Entry>`
/// with a shared buffer would be three (the entry, the buffer, the buffer's shared count):
/// ~150 bytes more per cached entry, a seventh of a 1 KB one. Cheap to clone.
#[derive(Clone)]
pub struct Stored(triomphe::Arc<HeaderSlice<StoredHead, [u8]>>);

/// A [`Stored`] entry's fixed fields (56 bytes).
struct StoredHead {
    status: StatusCode,
    plain_len: Option<NonZeroU32>,
    headers_at: PackedAt,
    /// Hits while compressed, counted towards [`HOT_HITS`].
    hits: AtomicU32,
    ttl_ms: u32,
    stored_at: Stamp,
    index_slot: Option<NodeSlot>,
    key_marker: Option<KeyMarker>,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("status", &self.0.header.status)
            .field("bytes", &self.0.slice.len())
            .finish_non_exhaustive()
    }
}

/// The whole buffer, so a read's body and header values are slices of it with no copy.
impl AsRef<[u8]> for Stored {
    fn as_ref(&self) -> &[u8] {
        &self.0.slice
    }
}

impl Stored {
    /// The entry, for a read: its body and header values share this allocation.
    pub fn entry(&self) -> Entry {
        let head = &self.0.header;
        let all = Bytes::from_owner(self.clone());
        Entry {
            status: head.status,
            headers: ReplyHeaders::packed(&all, head.headers_at),
            body: PreparedBody {
                bytes: all.slice(..head.headers_at.start()),
                key_marker: head.key_marker,
            },
            plain_len: head.plain_len,
            stored_at: head.stored_at,
            ttl_ms: head.ttl_ms,
            index_slot: head.index_slot,
            // Only a compressed entry counts hits or is swapped for a plain copy.
            origin: head.plain_len.map(|_| self.clone()),
        }
    }

    /// The readable key packed with the headers.
    pub fn readable(&self) -> &str {
        let headers = self.0.slice.get(self.0.header.headers_at.start()..);
        headers.and_then(readable_in).unwrap_or("")
    }

    pub fn index_slot(&self) -> Option<NodeSlot> {
        self.0.header.index_slot
    }

    pub fn ttl(&self) -> Duration {
        ttl_of(self.0.header.ttl_ms)
    }

    pub fn age(&self, now: Instant) -> Duration {
        self.0.header.stored_at.until(now)
    }

    /// Memory this entry costs once cached, as [`Entry::weight`] counts it.
    pub fn weight(&self) -> u32 {
        weight_of(self.0.slice.len())
    }

    /// How many hold this allocation (the cache, reads in progress).
    #[cfg(test)]
    pub(crate) fn holders(&self) -> usize {
        triomphe::Arc::count(&self.0)
    }
}

/// Where an entry stands at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Past TTL but within `stale_while_revalidate`.
    StaleRevalidate,
    /// Past TTL and the revalidate window, but within `stale_if_error`.
    StaleIfError,
    /// Too old to serve at all.
    Expired,
}

impl Entry {
    pub fn new(
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: PreparedBody,
        ttl: Duration,
    ) -> Entry {
        Entry {
            status,
            headers: headers.into(),
            body,
            plain_len: None,
            stored_at: Stamp::now(),
            ttl_ms: ttl_ms(ttl),
            index_slot: None,
            origin: None,
        }
    }

    /// The readable key, for prefix purge and the Redis tier: packed by
    /// [`Entry::for_storage`] ("" for an entry not made by it, which no one asks).
    pub fn readable(&self) -> &str {
        self.headers.readable().unwrap_or("")
    }

    /// How long the entry is fresh after `stored_at`.
    pub fn ttl(&self) -> Duration {
        ttl_of(self.ttl_ms)
    }

    /// The body as served (before the per-client key marker is filled in). A compressed
    /// body is decompressed into a new buffer: ~0.3 µs for 1 KB, against the memory it saves.
    pub fn body(&self) -> Result<PreparedBody, ProxyError> {
        let Some(len) = self.plain_len else {
            return Ok(self.body.clone());
        };
        let len = len.get() as usize;
        let plain = lz4_flex::block::decompress(&self.body.bytes, len)
            .ok()
            .filter(|b| b.len() == len)
            .ok_or_else(|| ProxyError::Internal("a cached body did not decompress".into()))?;
        Ok(PreparedBody {
            bytes: Bytes::from(plain),
            key_marker: self.body.key_marker,
        })
    }

    /// The body as held (LZ4-compressed when the second value, its plain length, is set):
    /// the Redis tier stores it as it is.
    pub fn stored_body(&self) -> (&PreparedBody, Option<u32>) {
        (&self.body, self.plain_len.map(NonZeroU32::get))
    }

    /// An entry whose body is held LZ4-compressed, `plain_len` bytes plain. `None` when the
    /// body does not decompress to exactly that (a damaged or foreign value).
    pub fn with_compressed_body(
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: PreparedBody,
        plain_len: u32,
        ttl: Duration,
    ) -> Option<Entry> {
        let mut e = Entry::new(status, headers, body, ttl);
        e.plain_len = Some(NonZeroU32::new(plain_len)?);
        e.body().is_ok().then_some(e)
    }

    /// Length of the body as served (before the per-client key marker is filled in).
    pub fn body_len(&self) -> usize {
        self.plain_len
            .map_or(self.body.bytes.len(), |len| len.get() as usize)
    }

    /// Whether serving the body means a copy per client (the key marker filled in).
    pub fn has_key_marker(&self) -> bool {
        self.body.key_marker.is_some()
    }

    /// Whether the body is held compressed.
    pub fn is_compressed(&self) -> bool {
        self.plain_len.is_some()
    }

    /// Counts a hit on a compressed entry read from the in-process tier; true exactly once,
    /// on the [`HOT_HITS`]th.
    pub fn became_hot(&self) -> bool {
        self.is_compressed()
            && self
                .origin
                .as_ref()
                .is_some_and(|o| o.0.header.hits.fetch_add(1, Ordering::Relaxed) + 1 == HOT_HITS)
    }

    /// Whether this entry, compressed, was read from `stored` (false for a plain one).
    pub fn is_from(&self, stored: &Stored) -> bool {
        self.origin
            .as_ref()
            .is_some_and(|o| triomphe::Arc::ptr_eq(&o.0, &stored.0))
    }

    /// The same entry (same freshness and index slot) with its body plain.
    pub fn decompressed(&self) -> Result<Entry, ProxyError> {
        Ok(Entry {
            body: self.body()?,
            plain_len: None,
            origin: None,
            ..self.clone()
        })
    }

    /// A copy fit for storing under the key whose readable form is `readable` (the Redis
    /// tier stores this): only the replayable headers, and the body, those headers and the
    /// readable key (packed, see [`ReplyHeaders`]) copied into one exact-size buffer. Bytes
    /// from the upstream client are slices of hyper's read buffer (8 KB and more), and one
    /// slice kept alive pins the whole buffer: a cached 1 KB reply held several times its
    /// size. One buffer instead of a header table and a value per header also saves their
    /// allocations. Costs one memcpy per fill.
    ///
    /// With `compress`, a body of [`COMPRESS_MIN_BYTES`] or more is kept LZ4-compressed when
    /// that saves at least an eighth of it (Graph-like JSON shrank 1.8-4.2× in our samples).
    pub fn for_storage(&self, compress: bool, readable: &str) -> Entry {
        let packed = self.pack(compress, readable);
        let all = Bytes::from(packed.buf);
        Entry {
            headers: ReplyHeaders::packed(&all, packed.headers_at),
            body: PreparedBody {
                bytes: all.slice(..packed.headers_at.start()),
                key_marker: self.body.key_marker,
            },
            plain_len: packed.plain_len,
            origin: None,
            ..self.clone()
        }
    }

    /// What the in-process tier holds for this entry, packed as [`Entry::for_storage`] packs
    /// it, with its fixed fields in the same allocation: one allocation per cached entry.
    pub fn stored(&self, compress: bool, readable: &str, index_slot: Option<NodeSlot>) -> Stored {
        let packed = self.pack(compress, readable);
        let head = StoredHead {
            status: self.status,
            plain_len: packed.plain_len,
            headers_at: packed.headers_at,
            hits: AtomicU32::new(0),
            ttl_ms: self.ttl_ms,
            stored_at: self.stored_at,
            index_slot,
            key_marker: self.body.key_marker,
        };
        Stored(triomphe::Arc::from_header_and_slice(head, &packed.buf))
    }

    /// The body (compressed if `compress` and worth it), then the replayable headers and
    /// `readable`, packed into one exact-size buffer.
    fn pack(&self, compress: bool, readable: &str) -> PackedEntry {
        let owned;
        let all: &[(HeaderName, HeaderValue)] = match &self.headers {
            ReplyHeaders::Table(t) => t,
            packed => {
                owned = packed.to_vec();
                &owned
            }
        };
        // The default content type is added when serving: not stored per entry.
        let kept_refs = || {
            all.iter()
                .filter(|(n, v)| !(n == header::CONTENT_TYPE && v == DEFAULT_CONTENT_TYPE))
                .map(|(n, v)| (n, v))
        };
        let plain = &self.body.bytes;
        let compressed = match u32::try_from(plain.len()).ok().and_then(NonZeroU32::new) {
            Some(len)
                if compress && self.plain_len.is_none() && plain.len() >= COMPRESS_MIN_BYTES =>
            {
                let c = lz4_flex::block::compress(plain);
                (c.len() <= plain.len() - plain.len() / 8).then_some((c, len))
            }
            _ => None,
        };
        let (body, plain_len): (&[u8], _) = match &compressed {
            Some((c, len)) => (c, Some(*len)),
            None => (plain, self.plain_len),
        };
        let mut buf =
            Vec::with_capacity(body.len() + ReplyHeaders::packed_len(kept_refs(), readable));
        buf.extend_from_slice(body);
        let headers_at = ReplyHeaders::pack(&mut buf, kept_refs(), readable);
        PackedEntry {
            buf,
            headers_at,
            plain_len,
        }
    }

    /// The same content, fresh again (after a 304 from Graph).
    pub fn renewed(&self, ttl: Duration) -> Entry {
        Entry {
            stored_at: Stamp::now(),
            ttl_ms: ttl_ms(ttl),
            ..self.clone()
        }
    }

    pub fn age(&self, now: Instant) -> Duration {
        self.stored_at.until(now)
    }

    /// Seconds of freshness left; negative once stale (RFC 9211 `ttl`).
    pub fn ttl_left_s(&self, now: Instant) -> i64 {
        self.ttl().as_secs() as i64 - self.age(now).as_secs() as i64
    }

    pub fn freshness(&self, now: Instant, swr: Duration, sie: Duration) -> Freshness {
        let (age, ttl) = (self.age(now), self.ttl());
        if age < ttl {
            Freshness::Fresh
        } else if age < ttl + swr {
            Freshness::StaleRevalidate
        } else if age < ttl + sie {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }

    /// Fresh by its TTL alone, no stale grace: what may answer from the Redis tier.
    pub fn is_fresh(&self) -> bool {
        self.freshness(Instant::now(), Duration::ZERO, Duration::ZERO) == Freshness::Fresh
    }

    /// Whether a stale copy may stand in for a failed refresh.
    pub fn usable_on_error(&self, now: Instant, sie: Duration) -> bool {
        self.age(now) < self.ttl() + sie
    }

    /// Memory this entry costs once cached, for the byte-bounded cache: what it holds (body
    /// as stored, headers, readable key) and [`ENTRY_OVERHEAD`], so `cache.max_bytes` bounds
    /// the process's memory rather than the payload alone.
    pub fn weight(&self) -> u32 {
        weight_of(self.body.bytes.len() + self.headers.held_bytes())
    }

    /// The entry's validator, if Graph sent one.
    pub fn etag(&self) -> Option<HeaderValue> {
        self.headers.get(&header::ETAG)
    }

    /// Does the client's `If-None-Match` match this entry's ETag (weak comparison)?
    pub fn matches_if_none_match(&self, inm: Option<&HeaderValue>) -> bool {
        let Some(inm) = inm else {
            return false;
        };
        let Some(etag) = self.etag() else {
            return false;
        };
        let (Ok(inm), Ok(etag)) = (inm.to_str(), etag.to_str()) else {
            return false;
        };
        let etag = etag.trim_start_matches("W/");
        inm.split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == etag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ttl: u64) -> Entry {
        Entry::new(
            StatusCode::OK,
            vec![
                (header::ETAG, HeaderValue::from_static("\"abc\"")),
                (
                    HeaderName::from_static("x-app-usage"),
                    HeaderValue::from_static("{}"),
                ),
            ],
            PreparedBody::plain(Bytes::from_static(b"{}")),
            Duration::from_secs(ttl),
        )
    }

    /// Stamps before and after the anchor come back as the instants they were made from,
    /// and ages are measured from them.
    #[test]
    fn stamps_keep_instants_on_both_sides_of_the_anchor() {
        let now = Instant::now();
        let s = Duration::from_secs;
        for at in [now, now + s(5), now.checked_sub(s(3600)).unwrap_or(now)] {
            let stamp = Stamp::at(at);
            assert_eq!(stamp.instant(), at);
            assert_eq!(stamp.until(at + s(7)), s(7));
            assert_eq!(stamp.until(at), Duration::ZERO);
        }
        assert_eq!(Stamp::at(now + s(9)).until(now), Duration::ZERO);
    }

    #[test]
    fn freshness_windows() {
        let e = entry(10);
        let s = Duration::from_secs;
        let t0 = e.stored_at.instant();
        assert_eq!(e.freshness(t0 + s(5), s(5), s(20)), Freshness::Fresh);
        assert_eq!(
            e.freshness(t0 + s(12), s(5), s(20)),
            Freshness::StaleRevalidate
        );
        assert_eq!(
            e.freshness(t0 + s(20), s(5), s(20)),
            Freshness::StaleIfError
        );
        assert_eq!(e.freshness(t0 + s(31), s(5), s(20)), Freshness::Expired);
        assert_eq!(e.ttl_left_s(t0 + s(12)), -2);
    }

    #[test]
    fn etags_and_storage() {
        let e = entry(10);
        assert!(e.matches_if_none_match(Some(&HeaderValue::from_static("W/\"abc\", \"x\""))));
        assert!(e.matches_if_none_match(Some(&HeaderValue::from_static("*"))));
        assert!(!e.matches_if_none_match(Some(&HeaderValue::from_static("\"x\""))));
        assert!(!e.matches_if_none_match(None));
        let stored = e.for_storage(true, "v21.0/1001");
        assert_eq!(stored.headers.len(), 1);
        assert_eq!(stored.etag(), Some(HeaderValue::from_static("\"abc\"")));
        assert_eq!(stored.readable(), "v21.0/1001");
        // The body, the packed ETag (5 bytes, its 3-byte record), the readable key (10 bytes,
        // its 4-byte length, the count) and the overhead.
        assert_eq!(
            stored.weight() as usize,
            2 + 5 + 3 + 10 + 5 + ENTRY_OVERHEAD
        );
        // Stored again (a renewal): the packed headers and key are kept.
        let again = stored.for_storage(true, stored.readable());
        assert_eq!(again.headers.to_vec(), stored.headers.to_vec());
        assert_eq!(again.readable(), "v21.0/1001");
        // Too short to be worth compressing.
        assert!(!stored.is_compressed());
    }

    fn with_body(body: Vec<u8>, placeholder: bool) -> Entry {
        Entry::new(
            StatusCode::OK,
            vec![(header::ETAG, HeaderValue::from_static("\"abc\""))],
            PreparedBody {
                bytes: Bytes::from(body),
                key_marker: placeholder.then(crate::rewrite::KeyMarker::random),
            },
            Duration::from_secs(60),
        )
    }

    #[test]
    fn json_bodies_are_stored_compressed_and_read_back_whole() {
        let json: Vec<u8> = (0..40)
            .flat_map(|i| {
                format!(r#"{{"id":"{i}","name":"Page {i}","category":"Shop"}},"#).into_bytes()
            })
            .collect();
        let e = with_body(json.clone(), true);
        let stored = e.for_storage(true, "");
        assert!(stored.is_compressed());
        assert!(
            stored.weight() < e.weight() - json.len() as u32 / 2,
            "JSON shrinks"
        );
        let body = stored.body().expect("decompresses");
        assert_eq!(&body.bytes[..], &json[..]);
        assert_eq!(body.key_marker, e.body().unwrap().key_marker);
        assert!(body.key_marker.is_some());
        assert_eq!(stored.etag(), e.etag());
        // Stored again (a renewal, a promotion): still one compression, same body.
        let again = stored.for_storage(true, "");
        assert_eq!(again.body().expect("decompresses").bytes, body.bytes);
        // Not read from the in-process tier: no hits counted.
        assert!(!stored.became_hot());
        // Held by the in-process tier, read back whole; the HOT_HITS-th read says so, once;
        // the plain copy is the same entry.
        let held = e.stored(true, "v21.0/1001", None);
        assert_eq!(held.readable(), "v21.0/1001");
        assert_eq!(held.weight(), e.for_storage(true, "v21.0/1001").weight());
        let read = held.entry();
        assert!(read.is_from(&held) && !stored.is_from(&held));
        assert_eq!(read.body().expect("decompresses"), body);
        assert_eq!(read.headers.to_vec(), stored.headers.to_vec());
        assert_eq!((read.stored_at, read.ttl()), (e.stored_at, e.ttl()));
        let hot: Vec<bool> = (0..HOT_HITS + 5)
            .map(|_| held.entry().became_hot())
            .collect();
        assert_eq!(hot.iter().filter(|h| **h).count(), 1);
        assert!(hot[HOT_HITS as usize - 1]);
        let plain = read.decompressed().expect("decompresses");
        assert!(!plain.is_compressed() && !plain.became_hot() && !plain.is_from(&held));
        assert_eq!(plain.body().expect("plain"), body);
        assert_eq!(plain.stored_at, stored.stored_at);
        // Not asked to compress: kept as it is.
        assert!(!e.for_storage(false, "").is_compressed());
    }

    #[test]
    fn incompressible_bodies_are_stored_as_they_are() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..2000)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        let stored = with_body(noise.clone(), false).for_storage(true, "");
        assert!(!stored.is_compressed());
        assert_eq!(&stored.body().expect("plain").bytes[..], &noise[..]);
    }

    #[test]
    fn a_long_key_is_packed_whole() {
        let long = "k".repeat(70_000);
        let stored = entry(10).for_storage(true, &long);
        assert_eq!(stored.readable(), long);
    }

    /// A stored entry's fixed fields and its count stay within 64 bytes: what they add to
    /// the body's buffer (a 775-byte buffer and they stay in mimalloc's 896-byte class).
    #[test]
    fn a_stored_head_is_small() {
        assert!(
            std::mem::size_of::<StoredHead>() + 8 <= 64,
            "{}",
            std::mem::size_of::<StoredHead>()
        );
    }

    /// A stored entry reads back as the entry it was made from: status, headers, body,
    /// marker, times, index slot and readable key, and the bytes held are what
    /// `for_storage` packs.
    #[test]
    fn a_stored_entry_reads_back_as_it_was() {
        let e = with_body(b"{\"id\":\"1001\"}".to_vec(), true);
        let slot = crate::cache::invalidate::NodeIndex::default().slot("1001", false);
        let held = e.stored(true, "system|v21.0/1001", Some(slot));
        let read = held.entry();
        let packed = e.for_storage(true, "system|v21.0/1001");
        assert_eq!(read.status, e.status);
        assert_eq!(read.headers.to_vec(), e.headers.to_vec());
        assert_eq!(read.body().ok(), e.body().ok());
        assert_eq!((read.stored_at, read.ttl()), (e.stored_at, e.ttl()));
        assert_eq!(read.index_slot, Some(slot));
        assert_eq!(read.readable(), "system|v21.0/1001");
        assert_eq!(held.readable(), "system|v21.0/1001");
        assert_eq!(held.weight(), packed.weight());
        assert_eq!(
            held.as_ref().len(),
            packed.weight() as usize - ENTRY_OVERHEAD
        );
        // A read holds the allocation until it is dropped (through its body and headers; a
        // plain entry keeps no other handle on it).
        assert!(!read.is_compressed() && !read.is_from(&held));
        assert_eq!(held.holders(), 2);
        drop(read);
        assert_eq!(held.holders(), 1);
    }

    #[test]
    fn a_ttl_beyond_what_milliseconds_in_u32_say_is_held_as_the_longest() {
        let e = entry(u64::from(u32::MAX));
        assert_eq!(e.ttl(), MAX_TTL);
        assert_eq!(entry(10).ttl(), Duration::from_secs(10));
        assert_eq!(
            e.renewed(Duration::from_millis(1500)).ttl(),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn a_corrupt_compressed_body_is_an_error_not_a_panic() {
        let json =
            br#"{"data":[{"id":"1"},{"id":"1"},{"id":"1"},{"id":"1"},{"id":"1"}]}"#.repeat(20);
        let mut stored = with_body(json, false).for_storage(true, "");
        assert!(stored.is_compressed());
        stored.body.bytes = stored.body.bytes.slice(..stored.body.bytes.len() / 2);
        assert!(stored.body().is_err());
    }
}

#[cfg(test)]
mod stored_props {
    use proptest::prelude::*;

    use super::*;
    use crate::cache::invalidate::NodeIndex;
    use crate::graph::headers;

    /// A header list: names among those stored and others, values of any visible ASCII.
    fn headers_strategy() -> impl Strategy<Value = Vec<(HeaderName, HeaderValue)>> {
        let name = prop_oneof![
            (0..headers::STORED.len()).prop_map(|i| headers::STORED[i].clone()),
            Just(HeaderName::from_static("x-app-usage")),
        ];
        let value = "[ -~]{0,80}".prop_map(|v| HeaderValue::from_str(&v).expect("visible ASCII"));
        proptest::collection::vec((name, value), 0..8)
    }

    /// Bodies that compress (repeated words) and bodies that do not (any bytes).
    fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..1500),
            ("[a-z\"{}:, ]{1,12}", 1..200usize).prop_map(|(w, n)| w.repeat(n).into_bytes()),
        ]
    }

    proptest! {
        /// Whatever an entry holds, the in-process tier reads back what `for_storage` keeps
        /// (the Redis tier's form): status, stored headers in order, body, marker, times,
        /// index slot and readable key, and weighs it the same.
        #[test]
        fn a_stored_entry_reads_back_what_for_storage_keeps(
            status in prop_oneof![Just(200u16), Just(404), Just(500)],
            given in headers_strategy(),
            body in body_strategy(),
            marker in any::<bool>(),
            compress in any::<bool>(),
            readable in "[ -~]{0,120}",
            ttl_s in 0u64..100_000,
            node in proptest::option::of("[0-9]{1,15}"),
        ) {
            let e = Entry::new(
                StatusCode::from_u16(status).expect("status"),
                given.clone(),
                PreparedBody {
                    bytes: Bytes::from(body),
                    key_marker: marker.then(crate::rewrite::KeyMarker::random),
                },
                Duration::from_secs(ttl_s),
            );
            // What a stored entry replays: the stored names, in order, but the default type.
            let expected: Vec<_> = given
                .iter()
                .filter(|(n, v)| {
                    headers::STORED.contains(n)
                        && !(n == header::CONTENT_TYPE && v == DEFAULT_CONTENT_TYPE)
                })
                .cloned()
                .collect();
            let slot = node.map(|n| NodeIndex::default().slot(&n, false));
            let held = e.stored(compress, &readable, slot);
            let kept = e.for_storage(compress, &readable);
            let read = held.entry();
            prop_assert_eq!(read.status, e.status);
            prop_assert_eq!(read.headers.to_vec(), expected);
            prop_assert_eq!(kept.headers.to_vec(), read.headers.to_vec());
            prop_assert_eq!(read.body().ok(), e.body().ok());
            prop_assert_eq!(read.is_compressed(), kept.is_compressed());
            prop_assert_eq!((read.stored_at, read.ttl()), (e.stored_at, e.ttl()));
            prop_assert_eq!(read.index_slot, slot);
            prop_assert_eq!(read.readable(), readable.as_str());
            prop_assert_eq!(held.readable(), readable.as_str());
            prop_assert_eq!(held.weight(), kept.weight());
            prop_assert_eq!(read.is_from(&held), read.is_compressed());
        }
    }
}
