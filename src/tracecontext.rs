//! Following a request across services: the W3C Trace Context (`traceparent`, `tracestate`)
//! and `X-Request-Id` a client sends, or new ones; what graphgate passes on to Graph; the
//! client's address. Values from the client are checked before they are used anywhere (a log
//! line, an upstream header, an error body): anything malformed is replaced, never refused.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Longest `X-Request-Id` taken from a client; longer ones are replaced.
pub const MAX_REQUEST_ID: usize = 128;
/// Longest `tracestate` passed on (the W3C limit is 32 entries of up to 256 characters; 512
/// is what the specification asks vendors to propagate at least).
const MAX_TRACESTATE: usize = 512;

/// The trace this request belongs to and graphgate's own span in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lower-case hex digits, never all zero: the client's, or new.
    trace_id: [u8; 32],
    /// graphgate's span: the parent-id Graph sees (16 lower-case hex digits, never all zero).
    span_id: [u8; 16],
    /// The client's parent-id, when it sent a valid `traceparent`.
    parent_id: Option<[u8; 16]>,
    /// Trace flags as received (only the sampled bit is defined); 0 for a new trace.
    flags: u8,
}

impl TraceContext {
    /// A new trace with a random id (the client sent none, or an invalid one).
    pub fn new_root() -> TraceContext {
        let mut trace_id = [0; 32];
        // All zeros is invalid; one in 2^128.
        let id = fastrand::u128(..).max(1);
        hex_u64((id >> 64) as u64, &mut trace_id[..16]);
        hex_u64(id as u64, &mut trace_id[16..]);
        TraceContext {
            trace_id,
            span_id: new_span_id(),
            parent_id: None,
            flags: 0,
        }
    }

    /// The trace of a valid `traceparent`, continued with a new span of graphgate's; `None`
    /// when the value is not valid by the W3C Trace Context rules.
    pub fn continue_from(traceparent: &[u8]) -> Option<TraceContext> {
        let p = parse_traceparent(traceparent)?;
        Some(TraceContext {
            trace_id: p.trace_id,
            span_id: new_span_id(),
            parent_id: Some(p.parent_id),
            flags: p.flags,
        })
    }

    pub fn trace_id(&self) -> &str {
        // Only ever hex digits (see the constructors).
        std::str::from_utf8(&self.trace_id).unwrap_or("")
    }

    /// The trace id as a header value (`X-Graphgate-Trace-Id`, a generated `X-Request-Id`).
    pub fn trace_id_header(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.trace_id).unwrap_or(EMPTY)
    }

    pub fn span_id(&self) -> &str {
        std::str::from_utf8(&self.span_id).unwrap_or("")
    }

    /// The client's parent-id (16 hex digits), when the trace came from the client.
    pub fn parent_id(&self) -> Option<&str> {
        self.parent_id
            .as_ref()
            .and_then(|p| std::str::from_utf8(p).ok())
    }

    /// Trace flags as received (bit 0: sampled); 0 for a new trace.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the trace came from the client.
    pub fn is_continued(&self) -> bool {
        self.parent_id.is_some()
    }

    /// `traceparent` for the call to Graph: same trace, graphgate's span as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        let mut v = Vec::with_capacity(55);
        v.extend_from_slice(b"00-");
        v.extend_from_slice(&self.trace_id);
        v.push(b'-');
        v.extend_from_slice(&self.span_id);
        v.push(b'-');
        v.extend_from_slice(&HEX_PAIRS[usize::from(self.flags)]);
        HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
            .unwrap_or(HeaderValue::from_static(""))
    }
}

struct Parsed {
    trace_id: [u8; 32],
    parent_id: [u8; 16],
    flags: u8,
}

/// `version-traceid-parentid-flags`, lower-case hex. Version `ff` is invalid; version `00` is
/// exactly 55 characters; a later version may append fields after a `-` and is read as `00`.
fn parse_traceparent(v: &[u8]) -> Option<Parsed> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = &v[0..2];
    if !is_lower_hex(version) || version == b"ff" {
        return None;
    }
    if (version == b"00" && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let (trace, parent, flags) = (&v[3..35], &v[36..52], &v[53..55]);
    if !is_lower_hex(trace) || !is_lower_hex(parent) || !is_lower_hex(flags) {
        return None;
    }
    if trace.iter().all(|&b| b == b'0') || parent.iter().all(|&b| b == b'0') {
        return None;
    }
    let flags = u8::from_str_radix(std::str::from_utf8(flags).ok()?, 16).ok()?;
    Some(Parsed {
        trace_id: trace.try_into().ok()?,
        parent_id: parent.try_into().ok()?,
        flags,
    })
}

fn is_lower_hex(b: &[u8]) -> bool {
    b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

fn new_span_id() -> [u8; 16] {
    let mut id = [0; 16];
    hex_u64(fastrand::u64(..).max(1), &mut id);
    id
}

/// Two lower-case hex digits for each byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    pairs
};

/// `v` as 16 lower-case hex digits into `out` (16 bytes). By hand, a byte at a time from a
/// table: `format!` costs a few hundred instructions on every request.
fn hex_u64(v: u64, out: &mut [u8]) {
    for (pair, byte) in out.chunks_exact_mut(2).zip(v.to_be_bytes()) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
}

/// A client's `X-Request-Id` if it is 1 to [`MAX_REQUEST_ID`] characters of letters, digits
/// and `-_.:@/+=` (safe in a log line, a header and a file name); otherwise `None`.
pub fn valid_request_id(v: &HeaderValue) -> Option<HeaderValue> {
    let b = v.as_bytes();
    let safe = |c: &u8| c.is_ascii_alphanumeric() || b"-_.:@/+=".contains(c);
    (!b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(safe)).then(|| v.clone())
}

/// Everything graphgate knows about who sent a request and which trace it belongs to.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub trace: TraceContext,
    /// The client's `tracestate`, passed on with a continued trace (bounded, visible ASCII).
    pub tracestate: Option<HeaderValue>,
    /// The client's `X-Request-Id` if valid; else the request's id is its trace id.
    client_request_id: Option<HeaderValue>,
    /// The TCP peer, or the client a trusted proxy names (see [`client_addr`]); `None` for
    /// requests that did not come over a socket (benches, in-process use).
    pub client_addr: Option<IpAddr>,
}

impl RequestContext {
    /// Reads `traceparent`, `tracestate` and `X-Request-Id` from `headers`, replacing what is
    /// missing or invalid.
    pub fn from_headers(headers: &HeaderMap, client_addr: Option<IpAddr>) -> RequestContext {
        // One pass over the (few) headers: a lookup by a name that is not a standard header
        // hashes the name each time.
        let (mut traceparent, mut tracestate, mut request_id) = (None, None, None);
        for (name, value) in headers {
            let slot = match name.as_str() {
                "traceparent" => &mut traceparent,
                "tracestate" => &mut tracestate,
                "x-request-id" => &mut request_id,
                _ => continue,
            };
            // The first of several, as `HeaderMap::get` would.
            slot.get_or_insert(value);
        }
        let continued = traceparent.and_then(|v| TraceContext::continue_from(v.as_bytes()));
        let trace = continued.unwrap_or_else(TraceContext::new_root);
        let tracestate = continued
            .and(tracestate)
            .filter(|v| v.len() <= MAX_TRACESTATE && v.to_str().is_ok())
            .cloned();
        let client_request_id = request_id.and_then(valid_request_id);
        RequestContext {
            trace,
            tracestate,
            client_request_id,
            client_addr,
        }
    }

    /// A context for a request that carries none (in-process callers).
    pub fn new_root() -> RequestContext {
        RequestContext::from_headers(&HeaderMap::new(), None)
    }

    /// The client's `X-Request-Id`, or the trace id.
    pub fn request_id(&self) -> &str {
        match &self.client_request_id {
            // Checked to be visible ASCII.
            Some(v) => v.to_str().unwrap_or(""),
            None => self.trace.trace_id(),
        }
    }

    /// [`RequestContext::request_id`] as bytes, without checking them again.
    pub fn request_id_bytes(&self) -> &[u8] {
        match &self.client_request_id {
            Some(v) => v.as_bytes(),
            None => &self.trace.trace_id,
        }
    }

    /// [`RequestContext::request_id`] as a header value (`X-Request-Id`).
    pub fn request_id_header(&self) -> HeaderValue {
        match &self.client_request_id {
            Some(v) => v.clone(),
            None => self.trace.trace_id_header(),
        }
    }

    /// The headers that carry the trace to Graph.
    pub fn upstream_headers(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        [
            Some((TRACEPARENT, self.trace.traceparent())),
            self.tracestate.clone().map(|v| (TRACESTATE, v)),
            Some((X_REQUEST_ID, self.request_id_header())),
        ]
        .into_iter()
        .flatten()
    }
}

const EMPTY: HeaderValue = HeaderValue::from_static("");

/// The client's address: the TCP peer, unless the peer is a trusted proxy; then the
/// right-most `X-Forwarded-For` address that is not itself a trusted proxy (what any hop could
/// have written to the left of it is not believed). An entry that is not an address ends the
/// walk at the last trusted hop.
pub fn client_addr(
    peer: SocketAddr,
    headers: &HeaderMap,
    trusted: impl Fn(IpAddr) -> bool,
) -> IpAddr {
    let mut client = peer.ip();
    if !trusted(client) {
        return client;
    }
    // Several X-Forwarded-For fields form one list, in order.
    let hops: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop.trim()) else {
            break;
        };
        client = ip;
        if !trusted(ip) {
            break;
        }
    }
    client
}

/// An `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let t = TraceContext::continue_from(VALID.as_bytes()).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id(), "00f067aa0ba902b7");
        assert!(t.is_continued());
        let out = t.traceparent();
        let out = out.to_str().unwrap();
        assert_eq!(out.len(), 55);
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with(&format!("{}-01", t.span_id())));
        assert!(TraceContext::continue_from(out.as_bytes()).is_some());
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert!(
                TraceContext::continue_from(bad.as_bytes()).is_none(),
                "{bad}"
            );
        }
        // A later version may append fields; it is read as version 00.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        let t = TraceContext::continue_from(later.as_bytes()).unwrap();
        assert!(t.traceparent().to_str().unwrap().starts_with("00-"));
    }

    #[test]
    fn hex_is_lower_case_and_zero_padded() {
        for v in [0u64, 1, 0xabc, 0x1234_5678_9abc_def0, u64::MAX] {
            let mut out = [0; 16];
            hex_u64(v, &mut out);
            assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{v:016x}"));
        }
    }

    #[test]
    fn new_traces_are_well_formed_and_distinct() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_ne!(a.trace_id(), b.trace_id());
        assert!(!a.is_continued());
        let tp = a.traceparent();
        let parsed = parse_traceparent(tp.as_bytes()).unwrap();
        assert_eq!(&parsed.trace_id, a.trace_id().as_bytes());
        assert_eq!(parsed.flags, 0);
    }

    #[test]
    fn request_ids_are_kept_only_when_safe_and_short() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("req-42.a:b"));
        let c = RequestContext::from_headers(&h, None);
        assert_eq!(c.request_id(), "req-42.a:b");
        for bad in ["has space", "quote\"d", "semi;colon", "<tag>"] {
            h.insert(X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let c = RequestContext::from_headers(&h, None);
            assert_eq!(c.request_id(), c.trace.trace_id(), "{bad}");
        }
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(MAX_REQUEST_ID + 1)).unwrap(),
        );
        let c = RequestContext::from_headers(&h, None);
        assert_eq!(c.request_id().len(), 32);
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(MAX_REQUEST_ID)).unwrap(),
        );
        assert_eq!(
            RequestContext::from_headers(&h, None).request_id().len(),
            MAX_REQUEST_ID
        );
    }

    #[test]
    fn tracestate_travels_only_with_a_continued_trace() {
        let mut h = HeaderMap::new();
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=abc"));
        assert!(RequestContext::from_headers(&h, None).tracestate.is_none());
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        let c = RequestContext::from_headers(&h, None);
        let names: Vec<_> = c.upstream_headers().map(|(n, _)| n).collect();
        assert_eq!(names, [TRACEPARENT, TRACESTATE, X_REQUEST_ID]);
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = |ip: IpAddr| ip.to_string().starts_with("10.");
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 1.2.3.4"),
        );
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.7"));
        let stranger: SocketAddr = "9.9.9.9:1000".parse().unwrap();
        let proxy: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        assert_eq!(client_addr(stranger, &h, trusted).to_string(), "9.9.9.9");
        assert_eq!(client_addr(proxy, &h, trusted).to_string(), "1.2.3.4");
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("junk, 10.0.0.8"));
        assert_eq!(client_addr(proxy, &h, trusted).to_string(), "10.0.0.8");
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("[2001:db8::1]:443"),
        );
        assert_eq!(client_addr(proxy, &h, trusted).to_string(), "2001:db8::1");
        h.remove(X_FORWARDED_FOR);
        assert_eq!(client_addr(proxy, &h, trusted).to_string(), "10.0.0.1");
    }
}
