//! `[log]`: the format (text or JSON lines) and the level, checked strictly.

use serde::Deserialize;

use super::{invalid, log_level, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    format: Option<String>,
    level: Option<String>,
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
        Ok(LogConfig {
            format,
            level: log_level::checked(self.level)?,
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
        }
        .validate()
        .unwrap();
        assert_eq!(json.format, LogFormat::Json);
        let err = RawLog {
            format: Some("yaml".into()),
            level: None,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("log.format"), "{err}");
    }
}
