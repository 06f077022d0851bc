//! `[[clients]]`: who may call graphgate (by key, key digest or TLS client certificate) and
//! which Pages they may touch.

use serde::Deserialize;

use super::{invalid, ConfigError, Credentials, KeyDigest, Secret, ServerConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    name: String,
    #[serde(default)]
    pub(super) key: Option<Secret>,
    /// Lowercase or uppercase hex SHA-256 of the key, in place of `key`.
    #[serde(default)]
    pub(super) key_sha256: Option<String>,
    /// Subject CN (or DNS SAN) of a TLS client certificate that authenticates this client.
    #[serde(default)]
    cert_subject: Option<String>,
    #[serde(default)]
    pages: Vec<String>,
    #[serde(default)]
    write: bool,
    #[serde(default)]
    priority: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    /// SHA-256 of the client key (from `key` or `key_sha256`); `None` for a client that
    /// authenticates only by TLS client certificate.
    pub key_sha256: Option<KeyDigest>,
    /// Subject CN or DNS SAN of the client certificate that authenticates this client.
    pub cert_subject: Option<String>,
    /// Page ids this client may touch; `None` means every Page ("*").
    pub pages: Option<Vec<String>>,
    pub write: bool,
    pub priority: Priority,
}

/// The clients in file order. Keys must differ from each other and from the system-user
/// token; a certificate subject needs the server to verify client certificates.
pub(super) fn validate(
    raw: Vec<RawClient>,
    credentials: &Credentials,
    server: &ServerConfig,
) -> Result<Vec<ClientConfig>, ConfigError> {
    let system_token = KeyDigest::of(credentials.system_user_token.expose());
    let mut clients = Vec::with_capacity(raw.len());
    for (i, rc) in raw.into_iter().enumerate() {
        let client = rc.validate(i, &clients, &system_token, server)?;
        clients.push(client);
    }
    Ok(clients)
}

impl RawClient {
    /// Client `i`, given the ones before it (keys and subjects must not repeat).
    fn validate(
        self,
        i: usize,
        earlier: &[ClientConfig],
        system_token: &KeyDigest,
        server: &ServerConfig,
    ) -> Result<ClientConfig, ConfigError> {
        let key_name = |k: &str| format!("clients[{i}].{k}");
        if self.name.trim().is_empty() {
            return Err(invalid(&key_name("name"), "must not be empty"));
        }
        let key_sha256 = match (&self.key, &self.key_sha256) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    &key_name("key"),
                    "give either `key` or `key_sha256`, not both",
                ))
            }
            (Some(k), None) => {
                if k.expose().len() < 8 {
                    return Err(invalid(&key_name("key"), "must be at least 8 characters"));
                }
                Some(KeyDigest::of(k.expose()))
            }
            (None, Some(hex)) => Some(KeyDigest::from_hex(hex).ok_or_else(|| {
                invalid(&key_name("key_sha256"), "must be 64 hex digits (a SHA-256)")
            })?),
            (None, None) if self.cert_subject.is_some() => None,
            (None, None) => return Err(invalid(
                &key_name("key"),
                "required: `key` or `key_sha256` (or `cert_subject` for TLS client certificates)",
            )),
        };
        if let Some(d) = &key_sha256 {
            if d == system_token {
                return Err(invalid(
                    &key_name("key"),
                    "must differ from the system user token",
                ));
            }
            if earlier.iter().any(|c| c.key_sha256.as_ref() == Some(d)) {
                return Err(invalid(&key_name("key"), "duplicate key"));
            }
        }
        let cert_subject = match self.cert_subject {
            Some(cn) if cn.trim().is_empty() => {
                return Err(invalid(&key_name("cert_subject"), "must not be empty"))
            }
            Some(cn) => {
                if !server.verifies_client_certificates() {
                    return Err(invalid(
                        &key_name("cert_subject"),
                        "needs server.tls_client_ca_file (client certificates are verified against it)",
                    ));
                }
                if earlier
                    .iter()
                    .any(|c| c.cert_subject.as_deref() == Some(cn.as_str()))
                {
                    return Err(invalid(&key_name("cert_subject"), "duplicate subject"));
                }
                Some(cn)
            }
            None => None,
        };
        let pages = if self.pages.iter().any(|p| p == "*") {
            None
        } else {
            for p in &self.pages {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(invalid(
                        &key_name("pages"),
                        format!("`{p}` is not a Page id or \"*\""),
                    ));
                }
            }
            Some(self.pages)
        };
        let priority = match self.priority.as_deref() {
            None | Some("interactive") => Priority::Interactive,
            Some("batch") => Priority::Batch,
            Some(other) => {
                return Err(invalid(
                    &key_name("priority"),
                    format!("`{other}` is not \"interactive\" or \"batch\""),
                ))
            }
        };
        Ok(ClientConfig {
            name: self.name,
            key_sha256,
            cert_subject,
            pages,
            write: self.write,
            priority,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{no_env, MIN};
    use crate::config::Config;

    fn error_of(clients: &str) -> String {
        let text = format!("{MIN}\n{clients}");
        Config::from_toml(&text, no_env).unwrap_err().to_string()
    }

    #[test]
    fn keys_are_unique_and_never_the_system_token() {
        let err = error_of("[[clients]]\nname = \"b\"\nkey = \"client-key-reports\"\n");
        assert!(
            err.contains("clients[1].key") && err.contains("duplicate key"),
            "{err}"
        );
        // The same key given as its digest is the same key.
        let digest = hex::encode(super::KeyDigest::of("client-key-reports").0);
        let err = error_of(&format!(
            "[[clients]]\nname = \"b\"\nkey_sha256 = \"{}\"\n",
            digest.to_uppercase()
        ));
        assert!(err.contains("duplicate key"), "{err}");
        let err = error_of("[[clients]]\nname = \"b\"\nkey = \"EAAB-system-token-secret\"\n");
        assert!(
            err.contains("must differ from the system user token"),
            "{err}"
        );
        assert!(!err.contains("EAAB-system-token-secret"), "{err}");
    }

    #[test]
    fn certificate_subjects_need_a_client_ca_and_are_unique() {
        let err = error_of("[[clients]]\nname = \"svc\"\ncert_subject = \"svc.internal\"\n");
        assert!(err.contains("clients[1].cert_subject"), "{err}");
        assert!(err.contains("server.tls_client_ca_file"), "{err}");
        let tls = "[server]\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\ntls_client_ca_file = \"ca.pem\"\n";
        let two = "[[clients]]\nname = \"a\"\ncert_subject = \"svc\"\n[[clients]]\nname = \"b\"\ncert_subject = \"svc\"\n";
        let err = Config::from_toml(&format!("{tls}{MIN}\n{two}"), no_env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("clients[2].cert_subject") && err.contains("duplicate subject"),
            "{err}"
        );
        let one = "[[clients]]\nname = \"a\"\ncert_subject = \"svc\"\n";
        let c = Config::from_toml(&format!("{tls}{MIN}\n{one}"), no_env).unwrap();
        assert_eq!(c.clients[1].cert_subject.as_deref(), Some("svc"));
        assert!(c.clients[1].key_sha256.is_none());
    }

    #[test]
    fn pages_and_priority_are_checked() {
        let err =
            error_of("[[clients]]\nname = \"b\"\nkey = \"client-key-bbbb\"\npages = [\"10/01\"]\n");
        assert!(err.contains("clients[1].pages"), "{err}");
        let err = error_of(
            "[[clients]]\nname = \"b\"\nkey = \"client-key-bbbb\"\npriority = \"urgent\"\n",
        );
        assert!(err.contains("clients[1].priority"), "{err}");
        let text = format!("{MIN}\n[[clients]]\nname = \"b\"\nkey = \"client-key-bbbb\"\npages = [\"1001\", \"*\"]\npriority = \"batch\"\n");
        let c = Config::from_toml(&text, no_env).unwrap();
        assert!(c.clients[1].pages.is_none(), "\"*\" is every Page");
        assert_eq!(c.clients[1].priority, super::Priority::Batch);
    }
}
