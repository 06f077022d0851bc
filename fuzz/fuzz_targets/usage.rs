//! Usage headers and Graph error bodies: total parsers, never panic, and every value they
//! return is a finite, non-negative percentage.
#![no_main]
use graphgate::graph::usage::{parse_app_usage, parse_buc_usage, GraphErrorInfo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = GraphErrorInfo::from_body(data).map(|e| e.class());
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(u) = parse_app_usage(s) {
        for v in [u.call_count, u.total_time, u.total_cputime] {
            assert!(v.is_finite() && v >= 0.0, "{v} from {s:?}");
        }
    }
    for b in parse_buc_usage(s) {
        let u = b.usage;
        for v in [u.call_count, u.total_time, u.total_cputime] {
            assert!(v.is_finite() && v >= 0.0, "{v} from {s:?}");
        }
        if let Some(m) = b.regain_access_minutes {
            assert!(m.is_finite() && m >= 0.0, "regain {m} from {s:?}");
        }
    }
});
