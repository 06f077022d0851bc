//! The headers a cache entry replays, in the form that costs least to hold.
//!
//! A reply just fetched keeps its headers as a table. A stored entry keeps them in its body's
//! buffer, after the body: the values, then per header its name (an index into
//! [`headers::STORED`]) and its value's length, then the entry's readable key, its length
//! and the count. That is 3 bytes per header and no allocation, against a table of 72 bytes
//! per header in an allocation of its own (a Graph reply replays five: ~380 bytes per cached
//! entry), and the readable key needs no allocation of its own either. Reading them back makes
//! each value a slice of the buffer, as cloning a table's value would; the bytes are not
//! checked again on every hit (they were copied from valid values).

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use http::{HeaderName, HeaderValue};

use crate::graph::headers;

/// Bytes per header in the packed table: name index, value length (u16, big-endian).
const RECORD: usize = 3;

/// Bytes after the readable key: its length (u32, big-endian) and the header count.
const TRAILER: usize = 5;

#[derive(Debug, Clone)]
pub enum ReplyHeaders {
    /// As fetched: any headers.
    Table(Arc<[(HeaderName, HeaderValue)]>),
    /// As stored: only [`headers::STORED`], packed (see the module doc); made by
    /// [`ReplyHeaders::pack`] only.
    Packed(Packed),
}

/// Packed headers, their values copied from valid `HeaderValue`s (the field is private: no
/// other bytes can pose as them).
#[derive(Debug, Clone)]
pub struct Packed(Bytes);

/// Where [`ReplyHeaders::pack`] put the headers in its buffer: only it makes one, so
/// [`ReplyHeaders::packed`] reads back nothing but what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedAt {
    start: usize,
    end: usize,
}

impl PackedAt {
    /// Where the headers start: the body's length, when the body came first.
    pub fn start(self) -> usize {
        self.start
    }
}

impl Default for ReplyHeaders {
    fn default() -> Self {
        ReplyHeaders::Table(Arc::new([]))
    }
}

impl From<Vec<(HeaderName, HeaderValue)>> for ReplyHeaders {
    fn from(v: Vec<(HeaderName, HeaderValue)>) -> Self {
        ReplyHeaders::Table(v.into())
    }
}

impl ReplyHeaders {
    /// Appends `kept` packed (names among [`headers::STORED`], values of at most
    /// 64 KiB; others are left out) and `readable` (the entry's readable key, below 4 GiB)
    /// to `buf`, after what it holds (the body). The returned mark is what
    /// [`ReplyHeaders::packed`] reads them back with, from these same bytes.
    pub fn pack<'a>(
        buf: &mut Vec<u8>,
        kept: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
        readable: &str,
    ) -> PackedAt {
        let start = buf.len();
        let mut records: Vec<(u8, u16)> = Vec::new();
        for (name, value) in kept.take(usize::from(u8::MAX)) {
            if let Some(record) = record(name, value) {
                buf.extend_from_slice(value.as_bytes());
                records.push(record);
            }
        }
        for (index, len) in &records {
            buf.put_u8(*index);
            buf.put_u16(*len);
        }
        let readable = packable(readable);
        buf.extend_from_slice(readable.as_bytes());
        buf.put_u32(readable.len() as u32);
        buf.put_u8(records.len() as u8);
        PackedAt {
            start,
            end: buf.len(),
        }
    }

    /// The headers [`ReplyHeaders::pack`] appended to `all` (the same bytes, shared):
    /// no copy. Empty headers if `all` is not as long as the buffer they were packed into.
    pub fn packed(all: &Bytes, at: PackedAt) -> ReplyHeaders {
        if all.len() != at.end {
            return ReplyHeaders::default();
        }
        ReplyHeaders::Packed(Packed(all.slice(at.start..)))
    }

    /// Bytes [`ReplyHeaders::pack`] appends for `kept` and `readable`.
    pub fn packed_len<'a>(
        kept: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
        readable: &str,
    ) -> usize {
        TRAILER
            + packable(readable).len()
            + kept
                .take(usize::from(u8::MAX))
                .filter(|(n, v)| record(n, v).is_some())
                .map(|(_, v)| v.len() + RECORD)
                .sum::<usize>()
    }

    pub fn len(&self) -> usize {
        match self {
            ReplyHeaders::Table(t) => t.len(),
            ReplyHeaders::Packed(Packed(b)) => b.last().map_or(0, |&n| usize::from(n)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether [`ReplyHeaders::pack`] packs `readable` whole (it leaves out a key
    /// longer than its length field can say, 4 GiB: no request is let in that large).
    pub fn packs_readable(readable: &str) -> bool {
        packable(readable).len() == readable.len()
    }

    /// The readable key packed with the headers (`None` for a table). Not on the hit path:
    /// purges by prefix and the Redis tier read it, so its bytes are checked here.
    pub fn readable(&self) -> Option<&str> {
        let ReplyHeaders::Packed(Packed(b)) = self else {
            return None;
        };
        readable_in(b)
    }

    /// The packed bytes (the headers and the readable key) of stored headers: equal bytes
    /// replay equal headers. `None` for a table.
    pub fn packed_bytes(&self) -> Option<&[u8]> {
        match self {
            ReplyHeaders::Table(_) => None,
            ReplyHeaders::Packed(Packed(b)) => Some(b),
        }
    }

    /// The headers in order, each value a shared slice (no copy).
    pub fn iter(&self) -> Iter<'_> {
        match self {
            ReplyHeaders::Table(t) => Iter(Cursor::Table(t.iter())),
            ReplyHeaders::Packed(Packed(b)) => {
                let count = self.len();
                // A table that does not fit the buffer yields nothing (never built so).
                let table = readable_span(b).and_then(|(at, _)| at.checked_sub(RECORD * count));
                Iter(Cursor::Packed {
                    buf: b,
                    table: table.unwrap_or(0),
                    count: if table.is_some() { count } else { 0 },
                    next: 0,
                    at: 0,
                })
            }
        }
    }

    /// The first value of `name`.
    pub fn get(&self, name: &HeaderName) -> Option<HeaderValue> {
        let mut it = self.iter();
        if let Cursor::Packed { .. } = it.0 {
            // Names are compared as indices: no name is cloned for the headers skipped.
            let wanted = headers::STORED.iter().position(|n| n == name)?;
            return std::iter::from_fn(|| it.next_packed())
                .find(|(index, _)| *index == wanted)
                .map(|(_, v)| v);
        }
        it.find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn to_vec(&self) -> Vec<(HeaderName, HeaderValue)> {
        self.iter().collect()
    }

    /// Bytes held for these headers beyond the entry itself (for the cache's weigher).
    pub fn held_bytes(&self) -> usize {
        match self {
            ReplyHeaders::Table(t) => t.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum(),
            ReplyHeaders::Packed(Packed(b)) => b.len(),
        }
    }
}

/// A value from the packed values, without checking its bytes again: a hit makes five of
/// them, and checking was a third of the headers' cost per hit.
fn value_of(bytes: Bytes) -> HeaderValue {
    // SAFETY: `bytes` lies within the values region of a table `pack` made (the readers
    // stop at a length reaching past it), whose bytes were copied from valid `HeaderValue`s;
    // validity is a rule on each byte, so any part of the region is a valid value.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// The readable key as packed: all of it, or nothing if it is longer than its length field
/// can say.
fn packable(readable: &str) -> &str {
    if u32::try_from(readable.len()).is_ok() {
        readable
    } else {
        ""
    }
}

/// The readable key in bytes [`ReplyHeaders::pack`] appended (checked: not on the hit path).
pub fn readable_in(packed: &[u8]) -> Option<&str> {
    let (at, len) = readable_span(packed)?;
    std::str::from_utf8(packed.get(at..at + len)?).ok()
}

/// Where the readable key starts in packed bytes, and its length.
fn readable_span(b: &[u8]) -> Option<(usize, usize)> {
    let &[l0, l1, l2, l3, _count] = b.get(b.len().checked_sub(TRAILER)?..)? else {
        return None;
    };
    let len = usize::try_from(u32::from_be_bytes([l0, l1, l2, l3])).ok()?;
    Some((b.len().checked_sub(TRAILER + len)?, len))
}

/// A header's record in the packed table, if it can be packed.
fn record(name: &HeaderName, value: &HeaderValue) -> Option<(u8, u16)> {
    let index = headers::STORED.iter().position(|n| n == name)?;
    Some((u8::try_from(index).ok()?, u16::try_from(value.len()).ok()?))
}

/// Iterator over [`ReplyHeaders`], yielding owned names and values. Opaque: a packed cursor
/// is only ever made over bytes [`ReplyHeaders::pack`] wrote (see [`value_of`]).
pub struct Iter<'a>(Cursor<'a>);

enum Cursor<'a> {
    Table(std::slice::Iter<'a, (HeaderName, HeaderValue)>),
    Packed {
        buf: &'a Bytes,
        /// Where the records start.
        table: usize,
        count: usize,
        next: usize,
        /// Where the next value starts.
        at: usize,
    },
}

impl Iter<'_> {
    /// The next packed header: its name's index and its value. `None` at the end (or at a
    /// record reaching past the buffer, which ends the iteration).
    fn next_packed(&mut self) -> Option<(usize, HeaderValue)> {
        let Cursor::Packed {
            buf,
            table,
            count,
            next,
            at,
        } = &mut self.0
        else {
            return None;
        };
        if *next >= *count {
            return None;
        }
        let record = *table + RECORD * *next;
        *next += 1;
        let (index, end) = match buf.get(record..record + RECORD) {
            Some(&[index, hi, lo]) => (index, *at + usize::from(u16::from_be_bytes([hi, lo]))),
            _ => (0, usize::MAX),
        };
        if end > *table {
            *next = *count;
            return None;
        }
        let start = std::mem::replace(at, end);
        Some((usize::from(index), value_of(buf.slice(start..end))))
    }
}

impl Iterator for Iter<'_> {
    type Item = (HeaderName, HeaderValue);

    fn next(&mut self) -> Option<Self::Item> {
        if let Cursor::Table(it) = &mut self.0 {
            return it.next().cloned();
        }
        loop {
            let (index, value) = self.next_packed()?;
            if let Some(name) = headers::STORED.get(index) {
                return Some((name.clone(), value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &'static str, value: &'static str) -> (HeaderName, HeaderValue) {
        (
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        )
    }

    #[test]
    fn packed_headers_read_back_as_they_were_minus_names_not_stored() {
        let given = vec![
            h("facebook-api-version", "v21.0"),
            h("x-app-usage", "{\"call_count\":1}"),
            h("etag", "\"abc\""),
            h("x-fb-trace-id", ""),
        ];
        let mut buf = b"body".to_vec();
        let at = ReplyHeaders::pack(
            &mut buf,
            given.iter().map(|(n, v)| (n, v)),
            "system|v21.0/1001?fields=id",
        );
        assert_eq!(at.start(), 4);
        let all = Bytes::from(buf);
        let packed = ReplyHeaders::packed(&all, at);
        assert_eq!(packed.len(), 3);
        assert_eq!(packed.readable(), Some("system|v21.0/1001?fields=id"));
        let expected: Vec<_> = given
            .into_iter()
            .filter(|(n, _)| n != "x-app-usage")
            .collect();
        assert_eq!(packed.to_vec(), expected);
        assert_eq!(
            packed.get(&http::header::ETAG),
            Some(HeaderValue::from_static("\"abc\""))
        );
        assert_eq!(packed.get(&http::header::LAST_MODIFIED), None);
        assert_eq!(&all[..4], b"body");
    }

    #[test]
    fn a_packed_length_is_what_pack_appends() {
        let given = [
            h("etag", "\"1\""),
            h("x-fb-rev", "1234"),
            h("x-app-usage", "{}"),
        ];
        for readable in ["", "v21.0/1001", &"x".repeat(70_000)] {
            assert!(ReplyHeaders::packs_readable(readable));
            let mut buf = Vec::new();
            let at = ReplyHeaders::pack(&mut buf, given.iter().map(|(n, v)| (n, v)), readable);
            let all = Bytes::from(buf);
            let packed = ReplyHeaders::packed(&all, at);
            // Other bytes than those packed into read back as no headers.
            let other = Bytes::from(vec![0; all.len() + 1]);
            assert!(ReplyHeaders::packed(&other, at).is_empty());
            assert_eq!(
                all.len(),
                ReplyHeaders::packed_len(given.iter().map(|(n, v)| (n, v)), readable)
            );
            assert_eq!(packed.len(), 2);
            assert_eq!(packed.to_vec(), given[..2].to_vec());
            assert_eq!(packed.readable(), Some(readable));
        }
    }

    #[test]
    fn a_table_has_no_packed_readable_key() {
        let table = ReplyHeaders::from(vec![h("etag", "\"1\"")]);
        assert_eq!(table.readable(), None);
    }
}
