//! Byte-level encodings that make the fake look like Graph on the wire: Graph's JSON flavour,
//! base64 cursors, trace ids and timestamps.

use serde_json::Value;

/// Serialises JSON the way Graph does: `/` is written as `\/` and non-ASCII characters as
/// `\uXXXX` escapes. Proxies that rewrite links with byte-level search-and-replace break on
/// this, which is the point.
///
/// serde_json only emits `/` and non-ASCII inside string literals, so escaping them in the
/// serialised text is exact.
pub(crate) fn graph_json(v: &Value) -> Vec<u8> {
    let plain = v.to_string();
    let mut out = String::with_capacity(plain.len() + plain.len() / 8);
    for c in plain.chars() {
        match c {
            '/' => out.push_str("\\/"),
            c if c.is_ascii() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.into_bytes()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64_with(alphabet: &[u8; 64], data: &[u8], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let emit = chunk.len() + 1;
        for i in 0..4 {
            if i < emit {
                out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Standard padded base64, as Graph's cursors use (they really do contain `=`, `+` and `/`).
pub(crate) fn b64(data: &[u8]) -> String {
    b64_with(B64, data, true)
}

/// Decodes standard or URL-safe base64, padded or not; `None` on anything else.
pub(crate) fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// An 11-character id in the style of `fbtrace_id` ("AbC_dE-fGhI"), deterministic in `n`.
pub(crate) fn trace_id(n: u64, salt: u64) -> String {
    let mixed = splitmix64(n ^ salt);
    b64_with(B64_URL, &mixed.to_be_bytes(), false)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Formats Unix seconds as Graph does: `2026-01-01T00:00:00+0000`.
pub(crate) fn graph_time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+0000",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_graph() {
        let v = serde_json::json!({"link": "https://x.com/a", "t": "caf\u{e9} \u{1F600}"});
        let s = String::from_utf8(graph_json(&v)).unwrap();
        assert!(s.contains(r#"https:\/\/x.com\/a"#), "{s}");
        assert!(s.contains(r"caf\u00e9 \ud83d\ude00"), "{s}");
        let back: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn base64_roundtrip() {
        for data in [&b""[..], b"a", b"ab", b"abc", b"post:1001:42"] {
            assert_eq!(b64_decode(&b64(data)).unwrap(), data);
        }
        assert_eq!(b64(b"ab"), "YWI=");
        assert!(b64_decode("a b").is_none());
        assert_eq!(trace_id(1, 2).len(), 11);
    }

    #[test]
    fn times() {
        assert_eq!(graph_time(1_767_225_600), "2026-01-01T00:00:00+0000");
        assert_eq!(
            graph_time(1_767_225_600 + 61 * 3600),
            "2026-01-03T13:00:00+0000"
        );
        assert_eq!(graph_time(951_782_400), "2000-02-29T00:00:00+0000");
    }
}
