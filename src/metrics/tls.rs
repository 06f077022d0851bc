//! Inbound TLS: failed handshakes and the expiry of the certificate in use.

use prometheus::{IntCounter, IntGaugeVec, Registry};

use super::{counter, int_gauge_vec};

pub struct TlsMetrics {
    pub handshake_failures: IntCounter,
    /// notAfter of the inbound TLS leaf certificate (Unix time), by listener; no series
    /// without inbound TLS.
    pub cert_expiry: IntGaugeVec,
}

impl TlsMetrics {
    pub(super) fn new(r: &Registry) -> TlsMetrics {
        TlsMetrics {
            handshake_failures: counter(
                r,
                "graphgate_tls_handshake_failures_total",
                "Inbound TLS handshakes that failed or timed out.",
            ),
            cert_expiry: int_gauge_vec(
                r,
                "graphgate_tls_cert_expiry_timestamp_seconds",
                "Expiry (notAfter) of the inbound TLS leaf certificate in use, as Unix time; absent without inbound TLS.",
                &["listener"],
            ),
        }
    }
}
