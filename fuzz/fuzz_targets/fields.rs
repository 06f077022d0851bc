//! `fields=` parser and canonicaliser: never panics; a parsed value's canonical text parses
//! again to the same canonical text (idempotent), and the deny check agrees across the two.
#![no_main]
use graphgate::graph::fields::{canonicalize, Fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = Fields::parse(s) else {
        return;
    };
    let canon = parsed.canonical();
    let again = Fields::parse(&canon)
        .unwrap_or_else(|e| panic!("canonical text {canon:?} of {s:?} does not parse: {e}"));
    assert_eq!(
        again,
        parsed.normalized(),
        "normalized form differs for {s:?}"
    );
    assert_eq!(
        canonicalize(&canon).unwrap(),
        canon,
        "canonicalisation is not idempotent for {s:?}"
    );
    assert_eq!(
        parsed.contains_at_any_depth("access_token"),
        again.contains_at_any_depth("access_token"),
        "the token-field deny check changes under canonicalisation for {s:?}"
    );
});
