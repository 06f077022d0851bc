//! The Meta tokens graphgate injects: the system user token, or (with `page_tokens = true`)
//! a Page token minted once with `GET /{page}?fields=access_token` and reused until Graph
//! rejects it with code 190, after which it is minted again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{Credentials, Secret};
use crate::error::ProxyError;
use crate::graph::request::{GraphMethod, Params};
use crate::graph::usage::ErrorClass;
use crate::metrics::Metrics;
use crate::rewrite::Secrets;
use crate::upstream::{Upstream, UpstreamRequest};

/// The token chosen for one call and its proof. `identity` names the token without
/// revealing it (`system`, `page:1001`): cache keys include it, since different tokens may
/// see different data.
#[derive(Clone)]
pub struct Injected {
    pub token: Secret,
    pub proof: Option<String>,
    pub identity: Arc<str>,
}

impl std::fmt::Debug for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injected")
            .field("identity", &self.identity)
            .finish()
    }
}

impl Injected {
    /// Puts `access_token` and `appsecret_proof` into `params`, replacing whatever was there.
    pub fn apply(&self, params: &mut Params) {
        params.remove("appsecret_proof");
        params.set("access_token", self.token.expose());
        if let Some(p) = &self.proof {
            params.set("appsecret_proof", p.clone());
        }
    }
}

pub struct Tokens {
    system: Injected,
    app_secret: Option<Secret>,
    page_tokens: bool,
    minted: RwLock<HashMap<String, Injected>>,
    /// Every token and secret held, for scrubbing replies; rebuilt when a Page token is
    /// minted or forgotten.
    secrets: ArcSwap<Secrets>,
    /// Serializes minting so a burst of calls to a new Page mints one token.
    mint_lock: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    /// Whether Graph last accepted the system token / a Page token (see [`Tokens::observe`]).
    system_valid: AtomicBool,
    page_valid: AtomicBool,
}

/// Lowercase hex HMAC-SHA256(key = app secret, message = token), as Graph expects.
pub fn appsecret_proof(app_secret: &str, token: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(app_secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

impl Tokens {
    pub fn new(creds: &Credentials, metrics: Arc<Metrics>) -> Tokens {
        let proof = creds
            .app_secret
            .as_ref()
            .map(|s| appsecret_proof(s.expose(), creds.system_user_token.expose()));
        let tokens = Tokens {
            system: Injected {
                token: creds.system_user_token.clone(),
                proof,
                identity: Arc::from("system"),
            },
            app_secret: creds.app_secret.clone(),
            page_tokens: creds.page_tokens,
            minted: RwLock::new(HashMap::new()),
            secrets: ArcSwap::from_pointee(Secrets::new(Vec::<String>::new())),
            mint_lock: tokio::sync::Mutex::new(()),
            metrics,
            system_valid: AtomicBool::new(true),
            page_valid: AtomicBool::new(true),
        };
        tokens.refresh_secrets();
        tokens
    }

    /// Every token and secret graphgate holds (system token, app secret, minted Page tokens):
    /// what [`crate::rewrite`] redacts from replies.
    pub fn secrets(&self) -> Arc<Secrets> {
        self.secrets.load_full()
    }

    fn refresh_secrets(&self) {
        let minted: Vec<String> = self
            .minted
            .read()
            .map(|m| m.values().map(|i| i.token.expose().to_string()).collect())
            .unwrap_or_default();
        let held = [
            self.system.token.expose(),
            self.app_secret.as_ref().map(Secret::expose).unwrap_or(""),
        ];
        self.secrets.store(Arc::new(Secrets::new(
            held.iter().map(|s| s.to_string()).chain(minted),
        )));
    }

    pub fn system(&self) -> &Injected {
        &self.system
    }

    /// The identity [`Tokens::for_page`] will use for `page`, known before any minting: cache
    /// keys need it before the call goes upstream. Must agree with `for_page`.
    pub fn identity_for(&self, page: Option<&str>) -> Arc<str> {
        match page.filter(|_| self.page_tokens) {
            Some(page) => Arc::from(format!("page:{page}")),
            None => self.system.identity.clone(),
        }
    }

    /// The token for a call attributed to `page` (or the system token).
    pub async fn for_page(
        &self,
        page: Option<&str>,
        version: &str,
        upstream: &Upstream,
    ) -> Result<Injected, ProxyError> {
        let Some(page) = page.filter(|_| self.page_tokens) else {
            return Ok(self.system.clone());
        };
        if let Some(t) = self.cached(page) {
            return Ok(t);
        }
        let _guard = self.mint_lock.lock().await;
        if let Some(t) = self.cached(page) {
            return Ok(t);
        }
        let token = self.mint(page, version, upstream).await?;
        let injected = Injected {
            proof: self
                .app_secret
                .as_ref()
                .map(|s| appsecret_proof(s.expose(), &token)),
            token: Secret::new(token),
            identity: Arc::from(format!("page:{page}")),
        };
        if let Ok(mut map) = self.minted.write() {
            map.insert(page.to_string(), injected.clone());
        }
        self.refresh_secrets();
        self.metrics.tokens.page_tokens_minted.inc();
        Ok(injected)
    }

    fn cached(&self, page: &str) -> Option<Injected> {
        self.minted.read().ok().and_then(|m| m.get(page).cloned())
    }

    /// Forgets a Page token Graph rejected (code 190), so the next call mints a new one.
    pub fn forget(&self, identity: &str) {
        if let Some(page) = identity.strip_prefix("page:") {
            if let Ok(mut map) = self.minted.write() {
                map.remove(page);
            }
            self.refresh_secrets();
        }
    }

    /// Records whether Graph accepted the token named by `identity` (`system`, `page:ID`):
    /// `accepted = false` after a 190/102, `true` after any reply that shows the token was
    /// accepted. Drives `graphgate_token_valid{token}` and the last-invalid timestamp, and
    /// logs one warning per change of state (not one per failing call).
    pub fn observe(&self, identity: &str, accepted: bool) {
        let (kind, flag) = if identity.starts_with("page:") {
            ("page", &self.page_valid)
        } else {
            ("system", &self.system_valid)
        };
        if !accepted {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            self.metrics.tokens.last_invalid.set(now);
        }
        self.metrics
            .tokens
            .valid
            .with_label_values(&[kind])
            .set(i64::from(accepted));
        if flag.swap(accepted, Ordering::SeqCst) != accepted {
            if accepted {
                tracing::warn!(token = kind, "Graph accepts the {kind} token again");
            } else {
                tracing::warn!(
                    token = kind,
                    "Graph rejects the {kind} token (code 190/102): calls with it fail until it is replaced"
                );
            }
        }
    }

    async fn mint(
        &self,
        page: &str,
        version: &str,
        upstream: &Upstream,
    ) -> Result<String, ProxyError> {
        let mut params = Params::new();
        params.push("fields", "access_token");
        self.system.apply(&mut params);
        let reply = upstream
            .send(UpstreamRequest {
                method: GraphMethod::Get,
                path: format!("/{version}/{page}"),
                params,
                headers: Vec::new(),
                files: Vec::new(),
            })
            .await?;
        match reply.graph_error() {
            Some(e) if e.class() == ErrorClass::Auth => self.observe("system", false),
            Some(_) => {}
            None if reply.status.is_success() => self.observe("system", true),
            None => {}
        }
        let parsed: Option<String> = serde_json::from_slice::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| {
                v.get("access_token")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            });
        match parsed {
            Some(t) if reply.status.is_success() && !t.is_empty() => Ok(t),
            _ => {
                let why = reply
                    .graph_error()
                    .map(|e| format!("code {}: {}", e.code, e.message))
                    .unwrap_or_else(|| format!("HTTP {}", reply.status));
                Err(ProxyError::UpstreamBadResponse(format!(
                    "could not obtain a Page token for {page} ({why})"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_matches_known_vector() {
        // HMAC-SHA256(key="key", msg="The quick brown fox jumps over the lazy dog").
        assert_eq!(
            appsecret_proof("key", "The quick brown fox jumps over the lazy dog"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn debug_hides_token() {
        let t = Tokens::new(
            &Credentials {
                system_user_token: Secret::new("SYSTEM-TOKEN-XYZ"),
                app_secret: Some(Secret::new("APPSECRET")),
                page_tokens: false,
            },
            Arc::new(Metrics::new()),
        );
        let dbg = format!("{:?}", t.system());
        assert!(!dbg.contains("SYSTEM-TOKEN-XYZ"));
        let mut p = Params::new();
        p.push("access_token", "client-key");
        t.system().apply(&mut p);
        assert_eq!(p.get("access_token"), Some("SYSTEM-TOKEN-XYZ"));
        assert_eq!(
            p.get("appsecret_proof").map(str::to_string),
            Some(appsecret_proof("APPSECRET", "SYSTEM-TOKEN-XYZ"))
        );
    }
}
