//! `[credentials]`: the Meta tokens graphgate injects. Both may come from the environment
//! instead, so they need not sit in files.

use serde::Deserialize;

use super::{invalid, ConfigError, Secret};

/// Environment variables that override secrets, so they need not sit in files.
pub const ENV_SYSTEM_USER_TOKEN: &str = "GRAPHGATE_SYSTEM_USER_TOKEN";
pub const ENV_APP_SECRET: &str = "GRAPHGATE_APP_SECRET";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCredentials {
    pub(super) system_user_token: Option<Secret>,
    pub(super) app_secret: Option<Secret>,
    page_tokens: bool,
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub system_user_token: Secret,
    pub app_secret: Option<Secret>,
    pub page_tokens: bool,
}

impl RawCredentials {
    /// `env` (the process environment in production) wins over the file.
    pub(super) fn validate(
        self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, ConfigError> {
        let system_user_token = env(ENV_SYSTEM_USER_TOKEN)
            .map(Secret::new)
            .or(self.system_user_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                invalid(
                    "credentials.system_user_token",
                    format!("required (or set {ENV_SYSTEM_USER_TOKEN})"),
                )
            })?;
        let app_secret = env(ENV_APP_SECRET)
            .map(Secret::new)
            .or(self.app_secret)
            .filter(|t| !t.is_empty());
        Ok(Credentials {
            system_user_token,
            app_secret,
            page_tokens: self.page_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::no_env;
    use crate::config::Config;

    use super::*;

    #[test]
    fn secrets_come_from_env() {
        let text = "[[clients]]\nname='a'\nkey='client-key-aaaa'\npages=['*']\n";
        let env = |k: &str| match k {
            ENV_SYSTEM_USER_TOKEN => Some("from-env-token".to_string()),
            ENV_APP_SECRET => Some("from-env-secret".to_string()),
            _ => None,
        };
        let c = Config::from_toml(text, env).unwrap();
        assert_eq!(c.credentials.system_user_token.expose(), "from-env-token");
        assert_eq!(
            c.credentials.app_secret.unwrap().expose(),
            "from-env-secret"
        );
        assert!(c.clients[0].pages.is_none());
    }

    #[test]
    fn missing_token_is_an_error() {
        let err = Config::from_toml("", no_env).unwrap_err().to_string();
        assert!(err.contains("credentials.system_user_token"), "{err}");
        // An empty token is none, from the file or the environment.
        let empty = RawCredentials {
            system_user_token: Some(Secret::new("")),
            ..RawCredentials::default()
        };
        let env = |k: &str| (k == ENV_SYSTEM_USER_TOKEN).then(String::new);
        assert!(empty.validate(&env).is_err());
    }
}
