//! `[webhooks]`: the endpoint for Meta's Page change notifications, which purge what they
//! name. Off unless `path` is set; then `verify_token` and `credentials.app_secret` (which
//! signs every delivery) are required.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError, Secret};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWebhooks {
    path: Option<String>,
    pub(super) verify_token: Option<Secret>,
    max_age_s: Option<u64>,
}

/// Validated `[webhooks]`; `None` in [`super::Config`] when the endpoint is off.
#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    /// The path on the public listener (e.g. `/webhooks`), taken from Graph's namespace.
    pub path: String,
    /// Compared with `hub.verify_token` of the subscription handshake.
    pub verify_token: Secret,
    /// Notifications older than this (by their entries' `time`) are refused, and a delivery
    /// seen again within it is acknowledged without purging: a captured delivery cannot be
    /// replayed to keep purging the cache.
    pub max_age: Duration,
}

/// Default `webhooks.max_age_s`: Meta delivers within seconds and retries failed deliveries
/// for a while; an hour covers the retries that matter for a cache.
const DEFAULT_MAX_AGE_S: u64 = 3600;

impl RawWebhooks {
    pub(super) fn validate(
        self,
        app_secret: Option<&Secret>,
    ) -> Result<Option<WebhooksConfig>, ConfigError> {
        let Some(path) = self.path else {
            if self.verify_token.is_some() {
                return Err(invalid(
                    "webhooks.path",
                    "required when webhooks.verify_token is set",
                ));
            }
            return Ok(None);
        };
        let path_ok = path.len() > 1
            && path.len() <= 256
            && path.starts_with('/')
            && !path.ends_with('/')
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
            && !path.contains("//");
        if !path_ok {
            return Err(invalid(
                "webhooks.path",
                "a path such as \"/webhooks\": starts with /, letters, digits, - _ . and /",
            ));
        }
        let first = path[1..].split('/').next().unwrap_or("");
        if super::is_version(first) || first.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid(
                "webhooks.path",
                "must not look like a Graph path (a version or a node id)",
            ));
        }
        let verify_token = self.verify_token.filter(|t| !t.is_empty()).ok_or_else(|| {
            invalid(
                "webhooks.verify_token",
                "required when webhooks.path is set",
            )
        })?;
        if app_secret.is_none_or(Secret::is_empty) {
            return Err(invalid(
                "webhooks.path",
                "needs credentials.app_secret (Meta signs every delivery with it)",
            ));
        }
        let max_age_s = self.max_age_s.unwrap_or(DEFAULT_MAX_AGE_S);
        if !(60..=7 * 24 * 3600).contains(&max_age_s) {
            return Err(invalid("webhooks.max_age_s", "60..=604800"));
        }
        Ok(Some(WebhooksConfig {
            path,
            verify_token,
            max_age: Duration::from_secs(max_age_s),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(path: Option<&str>, token: Option<&str>) -> RawWebhooks {
        RawWebhooks {
            path: path.map(str::to_string),
            verify_token: token.map(Secret::new),
            max_age_s: None,
        }
    }

    #[test]
    fn off_without_a_path_and_checked_with_one() {
        let secret = Secret::new("app-secret");
        assert!(raw(None, None).validate(None).unwrap().is_none());
        let on = raw(Some("/webhooks"), Some("vt"))
            .validate(Some(&secret))
            .unwrap()
            .unwrap();
        assert_eq!(on.path, "/webhooks");
        assert_eq!(on.max_age, Duration::from_secs(3600));
        for (path, token, app, key) in [
            (None, Some("vt"), Some(&secret), "webhooks.path"),
            (
                Some("/webhooks"),
                None,
                Some(&secret),
                "webhooks.verify_token",
            ),
            (Some("/webhooks"), Some("vt"), None, "webhooks.path"),
            (Some("webhooks"), Some("vt"), Some(&secret), "webhooks.path"),
            (Some("/v21.0/x"), Some("vt"), Some(&secret), "webhooks.path"),
            (Some("/1001"), Some("vt"), Some(&secret), "webhooks.path"),
            (Some("/a?b"), Some("vt"), Some(&secret), "webhooks.path"),
        ] {
            let err = raw(path, token).validate(app).unwrap_err().to_string();
            assert!(err.contains(key), "{path:?}: {err}");
            assert!(!err.contains("vt\""), "{err}");
        }
    }
}
