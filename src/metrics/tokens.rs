//! Injected tokens: Page tokens minted, and whether Graph accepts each kind of token.

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Registry};

use super::{counter, gauge, int_gauge_vec};

pub struct TokenMetrics {
    /// Page tokens minted from the system user token.
    pub page_tokens_minted: IntCounter,
    /// Unix time of the last code 190/102 reply for the injected token; 0 = never.
    pub last_invalid: IntGauge,
    /// 1 while Graph accepts the injected token of each kind (`system`, `page`), 0 after a
    /// 190/102 until the next call with that kind of token succeeds: the alertable state.
    pub valid: IntGaugeVec,
}

impl TokenMetrics {
    pub(super) fn new(r: &Registry) -> TokenMetrics {
        TokenMetrics {
            page_tokens_minted: counter(
                r,
                "graphgate_page_tokens_minted_total",
                "Page access tokens obtained with the system user token.",
            ),
            last_invalid: gauge(
                r,
                "graphgate_token_last_invalid_timestamp_seconds",
                "Unix time Graph last rejected an injected token (code 190/102); 0 if never.",
            ),
            valid: {
                let g = int_gauge_vec(
                    r,
                    "graphgate_token_valid",
                    "1 while Graph accepts the injected token of this kind (system, page); 0 after code 190/102 until a call with it succeeds.",
                    &["token"],
                );
                g.with_label_values(&["system"]).set(1);
                g.with_label_values(&["page"]).set(1);
                g
            },
        }
    }
}
