//! `[log]`: the format (text or JSON lines), the level, and OpenTelemetry export of the
//! request spans (the `otlp` feature), checked strictly.

use serde::Deserialize;

use super::{invalid, log_level, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    format: Option<String>,
    level: Option<String>,
    otlp_endpoint: Option<String>,
    otlp_service_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    /// Where request spans go over OTLP/HTTP (the collector's base URL); `None`: not exported.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub otlp_service_name: String,
}

/// Why `otlp_endpoint` cannot be used, if it cannot: only `http://` URLs (the exporter has no
/// TLS; a collector beside graphgate is reached in the clear), and only in a build with the
/// `otlp` feature.
fn check_otlp_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{endpoint}` is not an http:// URL (OTLP over HTTP, no TLS)"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) {
        return Err(format!("`{endpoint}` has no host[:port]"));
    }
    if !cfg!(feature = "otlp") {
        return Err(
            "this graphgate was built without the otlp feature (build it with `--features otlp`)"
                .into(),
        );
    }
    Ok(())
}

impl RawLog {
    pub(super) fn validate(self) -> Result<LogConfig, ConfigError> {
        let format = match self.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log.format",
                    format!("`{other}` is not \"text\" or \"json\""),
                ))
            }
        };
        if let Some(endpoint) = &self.otlp_endpoint {
            check_otlp_endpoint(endpoint).map_err(|why| invalid("log.otlp_endpoint", why))?;
        }
        let otlp_service_name = self.otlp_service_name.unwrap_or_else(|| "graphgate".into());
        if otlp_service_name.is_empty() || otlp_service_name.chars().any(char::is_control) {
            return Err(invalid(
                "log.otlp_service_name",
                "must be a non-empty name without control characters".to_string(),
            ));
        }
        Ok(LogConfig {
            format,
            level: log_level::checked(self.level)?,
            otlp_endpoint: self.otlp_endpoint,
            otlp_service_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_by_default_json_on_request_nothing_else() {
        let log = RawLog::default().validate().unwrap();
        assert_eq!((log.format, log.level.as_str()), (LogFormat::Text, "info"));
        let json = RawLog {
            format: Some("json".into()),
            level: Some("warn".into()),
            ..RawLog::default()
        }
        .validate()
        .unwrap();
        assert_eq!(json.format, LogFormat::Json);
        let err = RawLog {
            format: Some("yaml".into()),
            ..RawLog::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("log.format"), "{err}");
    }

    fn otlp(endpoint: &str) -> Result<LogConfig, String> {
        RawLog {
            otlp_endpoint: Some(endpoint.into()),
            ..RawLog::default()
        }
        .validate()
        .map_err(|e| e.to_string())
    }

    #[test]
    fn otlp_export_is_off_by_default_and_needs_an_http_url() {
        let log = RawLog::default().validate().unwrap();
        assert_eq!(log.otlp_endpoint, None);
        assert_eq!(log.otlp_service_name, "graphgate");
        for bad in [
            "https://collector:4318",
            "collector:4318",
            "http://",
            "http://a b",
        ] {
            let err = otlp(bad).unwrap_err();
            assert!(err.contains("log.otlp_endpoint"), "{bad}: {err}");
        }
        let err = RawLog {
            otlp_service_name: Some(String::new()),
            ..RawLog::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("log.otlp_service_name"), "{err}");
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn an_http_endpoint_switches_export_on() {
        let log = otlp("http://collector:4318").unwrap();
        assert_eq!(log.otlp_endpoint.as_deref(), Some("http://collector:4318"));
    }

    #[cfg(not(feature = "otlp"))]
    #[test]
    fn an_endpoint_is_refused_by_a_build_without_the_feature() {
        let err = otlp("http://collector:4318").unwrap_err();
        assert!(err.contains("log.otlp_endpoint"), "{err}");
        assert!(
            err.contains("this graphgate was built without the otlp feature"),
            "{err}"
        );
    }
}
