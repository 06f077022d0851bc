//! Answering a request for some fields of a node from a cached reply for more of them, and
//! asking Graph once for the union of several requests' fields.
//!
//! Graph returns one JSON member per requested field, named by its alias (`.as(x)`) or its
//! name, so a reply for fields G holds the reply for any F whose every field is in G with
//! the same member name and the same text (modifiers and nested selection identical: a
//! `feed.limit(5)` member says nothing about `feed.limit(2)`). Graph omits fields that have no
//! value; the projection omits them too. `id` is Graph's own: a node reply carries it when it
//! was requested and, on the real Graph, also when it was not; whether the upstream appends
//! it is learned from replies ([`IdHabit`]), and until it is known a projection that would
//! have to guess is not made.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use bytes::{BufMut, BytesMut};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::entry::Entry;
use super::key::{FastMap, KeyId};
use crate::graph::fields::{Field, Fields};
use crate::rewrite::PreparedBody;

/// Most top-level fields a union fill may ask for: Graph rejects very long field lists and a
/// bigger union costs more CPU time on Meta's side (which counts against the Page).
pub const MAX_UNION_FIELDS: usize = 100;

/// The member a field comes back under: its last `.as(alias)`, else its name.
pub fn member_name(field: &Field) -> &str {
    field
        .modifiers
        .iter()
        .rev()
        .find(|m| m.name == "as")
        .map(|m| m.args.as_str())
        .unwrap_or(&field.name)
}

/// The fields of a list by member name, `None` when two fields share a member name (their
/// reply members could not be told apart).
fn by_member(fields: &Fields) -> Option<Vec<(&str, String)>> {
    let mut out: Vec<(&str, String)> = Vec::with_capacity(fields.fields().len());
    for f in fields.fields() {
        let name = member_name(f);
        let text = f.canonical();
        match out.iter().find(|(n, _)| *n == name) {
            Some((_, t)) if *t == text => {}
            Some(_) => return None,
            None => out.push((name, text)),
        }
    }
    Some(out)
}

/// Does a reply for `have` hold the reply for `want`? Every wanted field must be in `have`
/// under the same member name with the same text; no member name may be ambiguous.
pub fn covers(have: &Fields, want: &Fields) -> bool {
    if want.is_empty() || have.is_empty() {
        return false;
    }
    let (Some(have), Some(want)) = (by_member(have), by_member(want)) else {
        return false;
    };
    want.iter()
        .all(|(name, text)| have.iter().any(|(n, t)| n == name && t == text))
}

/// The union of two field lists for one upstream call, in canonical form; `None` when they
/// cannot share a call (one member name with different texts) or it would be too long.
pub fn union(a: &Fields, b: &Fields) -> Option<Fields> {
    let (ma, mb) = (by_member(a)?, by_member(b)?);
    let mut fields: Vec<String> = ma.iter().map(|(_, t)| t.clone()).collect();
    for (name, text) in &mb {
        match ma.iter().find(|(n, _)| n == name) {
            Some((_, t)) if t == text => {}
            Some(_) => return None,
            None => fields.push(text.clone()),
        }
    }
    if fields.len() > MAX_UNION_FIELDS {
        return None;
    }
    Fields::parse(&fields.join(","))
        .ok()
        .map(|f| f.normalized())
}

/// Whether the upstream adds `id` to node replies that did not ask for it, as the real Graph
/// does. Learned from the first reply that can tell; shared by every entry.
#[derive(Debug, Default)]
pub struct IdHabit(AtomicU8);

const UNKNOWN: u8 = 0;
const APPENDS: u8 = 1;
const OMITS: u8 = 2;

impl IdHabit {
    /// Learns from a node reply for `fields`: only a reply to a list without `id` tells.
    pub fn learn(&self, fields: &Fields, body: &[u8]) {
        if fields.is_empty() || wants_id(fields) || self.0.load(Ordering::Relaxed) != UNKNOWN {
            return;
        }
        if let Some(members) = members(body) {
            let seen = if members.iter().any(|(k, _)| k == "id") {
                APPENDS
            } else {
                OMITS
            };
            self.0.store(seen, Ordering::Relaxed);
        }
    }

    /// [`IdHabit::learn`] from a stored entry, reading (and decompressing) its body only
    /// while the habit is still unknown: after the first reply that tells, never.
    pub fn learn_from_entry(&self, fields: &Fields, entry: &Entry) {
        if self.get().is_some() {
            return;
        }
        if let Ok(body) = entry.body() {
            self.learn(fields, &body.bytes);
        }
    }

    fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::Relaxed) {
            APPENDS => Some(true),
            OMITS => Some(false),
            _ => None,
        }
    }
}

fn wants_id(fields: &Fields) -> bool {
    fields.fields().iter().any(|f| member_name(f) == "id")
}

/// Node reads with the same key but for `fields` (their base) that have replies stored: most
/// bases kept, and most field lists kept per base (newest win).
const MAX_BASES: usize = 100_000;
const MAX_PER_BASE: usize = 8;
/// Records and lookups of different bases rarely wait on each other.
const SHARDS: usize = 16;

/// The field lists stored under one base, oldest first, with the key each is stored as.
type Stored = Vec<(Fields, KeyId)>;

/// Which stored node replies hold which fields, by base key (the read's key without
/// `fields`). Entries are not removed when the cache drops them: a lookup reads the cache
/// and skips what is gone.
///
/// A hint, so a plain bounded map rather than a cache of its own: every miss records its
/// base, and a second moka cache cost a miss about 5 µs (its inserts, its housekeeping and
/// the rehashing of its table as bases come and go). A full shard drops its oldest base
/// that no lookup found since it was last passed over (second chance, as CLOCK).
pub struct ProjectionIndex {
    shards: Box<[Mutex<Shard>]>,
    /// Most bases a shard keeps.
    per_shard: usize,
    /// Whether the upstream adds `id` to replies (shared by every base).
    pub id_habit: IdHabit,
}

#[derive(Default)]
struct Shard {
    bases: FastMap<KeyId, Base>,
    /// Every base of `bases` once, oldest record first: the eviction order.
    order: VecDeque<KeyId>,
}

#[derive(Default)]
struct Base {
    stored: Stored,
    /// A lookup found it since eviction last passed it over.
    looked_up: bool,
}

impl Default for ProjectionIndex {
    fn default() -> Self {
        ProjectionIndex::with_capacity(MAX_BASES)
    }
}

impl ProjectionIndex {
    /// An index of at most about `bases` bases.
    fn with_capacity(bases: usize) -> ProjectionIndex {
        ProjectionIndex {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: bases.div_ceil(SHARDS).max(1),
            id_habit: IdHabit::default(),
        }
    }

    fn shard(&self, base: KeyId) -> std::sync::MutexGuard<'_, Shard> {
        // A key id is a digest: its low bits are as good as any hash.
        let shard = &self.shards[(base.0 as usize) % SHARDS];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that the reply for `fields` under `base` is stored as `key`.
    pub fn record(&self, base: KeyId, fields: Fields, key: KeyId) {
        let mut shard = self.shard(base);
        if !shard.bases.contains_key(&base) {
            shard.make_room(self.per_shard);
            shard.order.push_back(base);
        }
        let list = &mut shard.bases.entry(base).or_default().stored;
        list.retain(|(_, k)| *k != key);
        if list.len() >= MAX_PER_BASE {
            list.remove(0);
        }
        list.push((fields, key));
    }

    /// The stored replies of `base` whose fields cover `want`, newest first.
    pub fn covering(&self, base: KeyId, want: &Fields) -> Vec<(Fields, KeyId)> {
        let mut shard = self.shard(base);
        let Some(found) = shard.bases.get_mut(&base) else {
            return Vec::new();
        };
        found.looked_up = true;
        found
            .stored
            .iter()
            .rev()
            .filter(|(have, _)| covers(have, want))
            .cloned()
            .collect()
    }

    /// How many bases the index holds.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).bases.len())
            .sum()
    }

    /// Whether the index holds no base.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Shard {
    /// Drops bases until one more fits under `limit`: the oldest first, a looked-up one
    /// going to the back once instead.
    fn make_room(&mut self, limit: usize) {
        while self.bases.len() >= limit {
            let Some(oldest) = self.order.pop_front() else {
                return;
            };
            match self.bases.get_mut(&oldest) {
                Some(b) if b.looked_up => {
                    b.looked_up = false;
                    self.order.push_back(oldest);
                }
                _ => {
                    self.bases.remove(&oldest);
                }
            }
        }
    }
}

/// The members of a JSON object in their order, each value as its original text.
fn members(body: &[u8]) -> Option<Vec<(String, &RawValue)>> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                out.push((k, v));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let out = (&mut de).deserialize_map(Members).ok()?;
    de.end().ok()?;
    Some(out)
}

/// The reply for `want` cut from a cached reply for `have` (which must cover it): the wanted
/// members in the cached reply's order, their bytes as Graph sent them, and `id` where Graph
/// would return it. `None` when the body is not a JSON object, holds a member twice, or
/// whether Graph would add `id` is not known yet.
pub fn project(
    body: &PreparedBody,
    have: &Fields,
    want: &Fields,
    habit: &IdHabit,
) -> Option<PreparedBody> {
    let wanted = by_member(want)?;
    let members = members(&body.bytes)?;
    for (i, (k, _)) in members.iter().enumerate() {
        if members[..i].iter().any(|(other, _)| other == k) {
            return None;
        }
    }
    let keep_id = if wants_id(want) {
        true
    } else if wants_id(have) {
        // The cached reply has `id` because it was asked for; would Graph add it for `want`?
        habit.get()?
    } else {
        // Whatever Graph did for `have` it does for `want`.
        true
    };
    let mut out = BytesMut::with_capacity(body.bytes.len());
    out.put_u8(b'{');
    let mut first = true;
    for (k, v) in &members {
        let keep = wanted.iter().any(|(n, _)| n == k) || (k == "id" && keep_id);
        if !keep {
            continue;
        }
        if !first {
            out.put_u8(b',');
        }
        first = false;
        // The key again as JSON (serde_json unescaped it).
        out.put_slice(serde_json::to_string(k).ok()?.as_bytes());
        out.put_u8(b':');
        out.put_slice(v.get().as_bytes());
    }
    out.put_u8(b'}');
    Some(body.part(out.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Fields {
        Fields::parse(s).unwrap()
    }

    /// Bases that all land in the first shard.
    fn base(n: u128) -> KeyId {
        KeyId(n * SHARDS as u128)
    }

    #[test]
    fn the_index_finds_covering_lists_newest_first_and_replaces_a_key() {
        let index = ProjectionIndex::default();
        index.record(base(1), f("id,name"), KeyId(10));
        index.record(base(1), f("id,name,about"), KeyId(11));
        index.record(base(2), f("id,name,about"), KeyId(20));
        let found: Vec<KeyId> = index
            .covering(base(1), &f("name"))
            .into_iter()
            .map(|(_, k)| k)
            .collect();
        assert_eq!(found, [KeyId(11), KeyId(10)]);
        assert!(index.covering(base(1), &f("fan_count")).is_empty());
        assert!(index.covering(base(3), &f("name")).is_empty());
        // The same key stored again with other fields replaces its old list.
        index.record(base(1), f("id"), KeyId(11));
        let found = index.covering(base(1), &f("about"));
        assert!(found.is_empty(), "{found:?}");
        for k in 0..(MAX_PER_BASE as u128 + 3) {
            index.record(base(4), f("id,name"), KeyId(100 + k));
        }
        let kept = index.covering(base(4), &f("id"));
        assert_eq!(kept.len(), MAX_PER_BASE);
        assert_eq!(kept[0].1, KeyId(100 + MAX_PER_BASE as u128 + 2));
    }

    #[test]
    fn the_index_stays_bounded_and_keeps_a_base_that_was_looked_up() {
        let index = ProjectionIndex::with_capacity(SHARDS * 3);
        for n in 1..=3 {
            index.record(base(n), f("id,name"), KeyId(n));
        }
        assert_eq!(index.covering(base(1), &f("name")).len(), 1);
        // A fourth base in the full shard: the oldest that no lookup found leaves.
        index.record(base(4), f("id,name"), KeyId(4));
        assert_eq!(index.len(), 3);
        assert!(index.covering(base(2), &f("name")).is_empty());
        for n in [1, 3, 4] {
            assert_eq!(index.covering(base(n), &f("name")).len(), 1, "base {n}");
        }
        for n in 5..1_000 {
            index.record(KeyId(n * 7919), f("id"), KeyId(n));
        }
        assert!(index.len() <= SHARDS * 3, "{}", index.len());
    }

    #[test]
    fn a_superset_covers_only_fields_it_holds_with_the_same_text() {
        assert!(covers(&f("id,name,fan_count"), &f("name,id")));
        assert!(covers(&f("name,picture.as(p)"), &f("picture.as(p)")));
        assert!(covers(
            &f("feed.limit(2){message}"),
            &f("feed.limit(2){message}")
        ));
        assert!(!covers(&f("id,name"), &f("name,about")));
        assert!(!covers(
            &f("feed.limit(5){message}"),
            &f("feed.limit(2){message}")
        ));
        assert!(!covers(&f("feed{message,id}"), &f("feed{message}")));
        assert!(!covers(&f("name"), &f("name.as(n)")));
        // An alias that shadows another field's member: ambiguous either way.
        assert!(!covers(&f("name,about.as(name)"), &f("name")));
        assert!(!covers(&f(""), &f("name")));
        assert!(!covers(&f("name"), &f("")));
    }

    #[test]
    fn unions_merge_distinct_members_and_refuse_conflicts() {
        assert_eq!(
            union(&f("id,name"), &f("name,fan_count"))
                .unwrap()
                .canonical(),
            "fan_count,id,name"
        );
        assert_eq!(
            union(&f("feed.limit(2){id}"), &f("about"))
                .unwrap()
                .canonical(),
            "about,feed.limit(2){id}"
        );
        assert!(union(&f("feed.limit(2){id}"), &f("feed.limit(3){id}")).is_none());
        let many: Vec<String> = (0..MAX_UNION_FIELDS).map(|i| format!("f{i}")).collect();
        assert!(union(&f(&many.join(",")), &f("extra")).is_none());
    }

    fn body(s: &str) -> PreparedBody {
        PreparedBody::plain(bytes::Bytes::from(s.to_string()))
    }

    #[test]
    fn projections_keep_graphs_bytes_and_order() {
        let habit = IdHabit::default();
        let cached = body(r#"{"name":"A \/ B","fan_count":7,"about":"x\u00e9","id":"1001"}"#);
        let have = f("id,name,fan_count,about");
        let p = project(&cached, &have, &f("about,name,id"), &habit).unwrap();
        assert_eq!(
            &p.bytes[..],
            br#"{"name":"A \/ B","about":"x\u00e9","id":"1001"}"#
        );
        // Without `id` wanted: unknown whether Graph adds it, so no projection yet.
        assert!(project(&cached, &have, &f("name"), &habit).is_none());
        habit.learn(&f("name"), br#"{"name":"A","id":"1001"}"#);
        let p = project(&cached, &have, &f("name"), &habit).unwrap();
        assert_eq!(&p.bytes[..], br#"{"name":"A \/ B","id":"1001"}"#);
        let omits = IdHabit::default();
        omits.learn(&f("name"), br#"{"name":"A"}"#);
        let p = project(&cached, &have, &f("name"), &omits).unwrap();
        assert_eq!(&p.bytes[..], br#"{"name":"A \/ B"}"#);
        // A superset reply that did not ask for id: what Graph did there it does here.
        let appended = body(r#"{"name":"A","about":"b","id":"1001"}"#);
        let p = project(
            &appended,
            &f("name,about"),
            &f("about"),
            &IdHabit::default(),
        )
        .unwrap();
        assert_eq!(&p.bytes[..], br#"{"about":"b","id":"1001"}"#);
        // A field Graph left out (no value) stays out.
        let p = project(&cached, &f("id,name,link"), &f("link,id"), &habit).unwrap();
        assert_eq!(&p.bytes[..], br#"{"id":"1001"}"#);
        // Not an object, or a member twice: no projection.
        assert!(project(&body("[1]"), &have, &f("id"), &habit).is_none());
        assert!(project(&body(r#"{"id":"1","id":"2"}"#), &have, &f("id"), &habit).is_none());
        assert!(project(&body(r#"{"id":"1"} x"#), &have, &f("id"), &habit).is_none());
    }
}
