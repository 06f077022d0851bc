//! `[log] level`: a level or comma-separated `target=level` directives, as in `RUST_LOG`.
//! Checked strictly: tracing's filter syntax takes a bare word such as `verbose` as a target
//! name (enabling nothing graphgate logs), so a typo there would silence the logs instead of
//! failing.

use super::{invalid, ConfigError};

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The level directive to use (default `info`), or an error naming `log.level`.
pub(super) fn checked(level: Option<String>) -> Result<String, ConfigError> {
    let level = level.unwrap_or_else(|| "info".into());
    let is_level = |s: &str| LEVELS.contains(&s.trim().to_ascii_lowercase().as_str());
    let is_target = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-' | b'.'))
    };
    let ok = !level.trim().is_empty()
        && level.split(',').all(|d| match d.trim().split_once('=') {
            None => is_level(d),
            Some((target, l)) => is_target(target.trim()) && is_level(l),
        });
    if ok {
        Ok(level)
    } else {
        Err(invalid(
            "log.level",
            format!(
                "`{level}` is not a level ({}) or a list of target=level directives",
                LEVELS.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::checked;

    #[test]
    fn levels_and_directives() {
        for ok in ["info", "DEBUG", "warn,graphgate=debug", "hyper=off, info"] {
            assert_eq!(checked(Some(ok.into())).unwrap(), ok);
        }
        assert_eq!(checked(None).unwrap(), "info");
        for bad in [
            "verbose",
            "",
            "info,",
            "graphgate=loud",
            "=debug",
            "a b=info",
        ] {
            let err = checked(Some(bad.into())).unwrap_err().to_string();
            assert!(err.contains("log.level"), "{bad}: {err}");
        }
    }
}
