//! Mutable server-side state: the seeded Pages and posts, token tables, rate-limit windows,
//! statistics and the request log. It lives behind one mutex that is never held across an
//! `.await`, so every Graph call (or whole batch) sees and changes it atomically.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{ExecutedCall, FakeGraphConfig, FakeGraphStats, FakePage, RecordedRequest};

/// Unix time of post number 0: 2026-01-01T00:00:00Z. Post `n` was created `n - 1` hours later,
/// so timestamps (and therefore ETags) never depend on the wall clock.
pub(crate) const EPOCH: i64 = 1_767_225_600;

/// Default bound of the request log.
pub(crate) const DEFAULT_RECORD_LIMIT: usize = 10_000;

#[derive(Debug, Clone)]
pub(crate) struct PostData {
    pub message: String,
    pub created: i64,
}

#[derive(Debug, Clone)]
pub(crate) struct PageData {
    pub id: String,
    pub name: String,
    pub about: String,
    pub category: String,
    pub fan_count: u64,
    /// Keyed by post number; higher numbers are newer.
    pub posts: BTreeMap<u64, PostData>,
    pub next_post: u64,
    pub token: String,
}

impl PageData {
    fn seed(p: &FakePage) -> PageData {
        let posts = (1..=p.posts as u64)
            .map(|n| (n, seeded_post(p, n)))
            .collect();
        PageData {
            id: p.id.clone(),
            name: p.name.clone(),
            about: p.about.clone(),
            category: p.category.clone(),
            fan_count: p.fan_count,
            posts,
            next_post: p.posts as u64 + 1,
            token: page_token_for(&p.id),
        }
    }

    pub fn post_time(n: u64) -> i64 {
        EPOCH.saturating_add(n.saturating_sub(1).min(1 << 40) as i64 * 3600)
    }
}

/// Seeded messages contain a URL so `\/` escaping shows up in every feed page.
fn seeded_post(p: &FakePage, n: u64) -> PostData {
    PostData {
        message: format!(
            "Post #{n} from {}: details at https://example.com/{}/posts/{n}",
            p.name, p.id
        ),
        created: PageData::post_time(n),
    }
}

/// The Page token the fake hands out: deterministic, opaque-looking, distinct per Page.
pub(crate) fn page_token_for(page_id: &str) -> String {
    let digest = Sha256::digest(format!("graphgate-fake-page-token:{page_id}").as_bytes());
    format!("EAAGfakePage{page_id}x{}", &hex::encode(digest)[..24])
}

/// `appsecret_proof` as Meta defines it: hex HMAC-SHA256 of the token keyed by the app secret.
/// Deliberately not `tokens::appsecret_proof`: the simulated Graph is the independent check of
/// the gateway's proof, so it must not share the code under test.
pub fn appsecret_proof(secret: &str, token: &str) -> String {
    match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(token.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        // HMAC accepts keys of any length; this arm is unreachable in practice.
        Err(_) => String::new(),
    }
}

/// Who a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    SystemUser,
    Page(String),
}

/// The quota a call is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum QuotaKey {
    Page(String),
    App,
}

/// A quota reading after charging one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    /// Calls in the window including this one.
    pub count: u64,
    pub limit: u64,
    pub throttled: bool,
    /// Whole minutes until the oldest call leaves the window (meaningful only when throttled).
    pub regain_minutes: u64,
}

impl Reading {
    /// Usage as a whole percentage of the limit, as the usage headers report it.
    pub fn percent(&self) -> u64 {
        self.count.saturating_mul(100) / self.limit.max(1)
    }
}

/// Internal mutable statistics; `requests` and in-flight counters are atomics elsewhere.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    pub calls: u64,
    pub calls_by_page: BTreeMap<String, u64>,
    pub throttled: u64,
    pub throttled_by_page: BTreeMap<String, u64>,
    pub errors: u64,
    pub post_method_get: u64,
    pub not_modified: u64,
}

impl Counters {
    pub fn snapshot(&self, requests: u64, max_in_flight: u64) -> FakeGraphStats {
        FakeGraphStats {
            requests,
            calls: self.calls,
            calls_by_page: self.calls_by_page.clone(),
            throttled: self.throttled,
            throttled_by_page: self.throttled_by_page.clone(),
            errors: self.errors,
            post_method_get: self.post_method_get,
            max_in_flight,
            not_modified: self.not_modified,
            // Connection-level counters live outside the state lock.
            ..FakeGraphStats::default()
        }
    }
}

pub(crate) struct State {
    /// Pages in configuration order (the order `/me/accounts` lists them).
    pub pages: Vec<PageData>,
    page_index: HashMap<String, usize>,
    page_tokens: HashMap<String, String>,
    system_tokens: HashSet<String>,
    revoked: HashSet<String>,
    windows: HashMap<QuotaKey, VecDeque<Instant>>,
    /// Calls of other apps always present in a Page's window (see
    /// [`super::FakeGraph::set_other_usage`]).
    other_usage: HashMap<String, u64>,
    /// Leave the usage headers out at 0 %, as Meta does.
    pub omit_zero_usage: bool,
    pub counters: Counters,
    pub recorded: VecDeque<RecordedRequest>,
    /// What the engine executed (calls, `ids=` reads, batch operations), oldest first.
    pub executed: VecDeque<ExecutedCall>,
    pub record_limit: usize,
}

impl State {
    pub fn new(cfg: &FakeGraphConfig) -> State {
        let mut pages: Vec<PageData> = Vec::with_capacity(cfg.pages.len());
        for p in &cfg.pages {
            // A duplicated id would make lookups ambiguous; the first definition wins.
            if !pages.iter().any(|q| q.id == p.id) {
                pages.push(PageData::seed(p));
            }
        }
        let page_index = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.clone(), i))
            .collect();
        let page_tokens = pages
            .iter()
            .map(|p| (p.token.clone(), p.id.clone()))
            .collect();
        State {
            pages,
            page_index,
            page_tokens,
            system_tokens: cfg.system_user_tokens.iter().cloned().collect(),
            revoked: HashSet::new(),
            windows: HashMap::new(),
            other_usage: HashMap::new(),
            omit_zero_usage: false,
            counters: Counters::default(),
            recorded: VecDeque::new(),
            executed: VecDeque::new(),
            record_limit: DEFAULT_RECORD_LIMIT,
        }
    }

    pub fn page(&self, id: &str) -> Option<&PageData> {
        self.page_index.get(id).and_then(|&i| self.pages.get(i))
    }

    pub fn page_mut(&mut self, id: &str) -> Option<&mut PageData> {
        match self.page_index.get(id) {
            Some(&i) => self.pages.get_mut(i),
            None => None,
        }
    }

    pub fn is_revoked(&self, token: &str) -> bool {
        self.revoked.contains(token)
    }

    /// Revokes `token`. A revoked Page token is replaced by a new one, as Meta issues a fresh
    /// token when a Page token is minted again after expiry.
    pub fn revoke(&mut self, token: &str) {
        self.revoked.insert(token.to_string());
        if let Some(page_id) = self.page_tokens.get(token).cloned() {
            let generation = self.revoked.len();
            let fresh = format!("{}g{generation}", page_token_for(&page_id));
            self.page_tokens.insert(fresh.clone(), page_id.clone());
            if let Some(page) = self.page_mut(&page_id) {
                page.token = fresh;
            }
        }
    }

    pub fn restore(&mut self, token: &str) {
        self.revoked.remove(token);
    }

    /// The Page token currently handed out for `page_id`.
    pub fn current_page_token(&self, page_id: &str) -> String {
        self.page(page_id)
            .map(|p| p.token.clone())
            .unwrap_or_else(|| page_token_for(page_id))
    }

    /// The principal of a token that exists (revocation is checked separately).
    pub fn principal(&self, token: &str) -> Option<Principal> {
        if self.system_tokens.contains(token) {
            Some(Principal::SystemUser)
        } else {
            self.page_tokens
                .get(token)
                .map(|p| Principal::Page(p.clone()))
        }
    }

    /// Charges one call to `key`'s sliding window and reports the usage. Throttled calls stay in
    /// the window too: Meta counts them, so hammering a throttled Page keeps it throttled.
    pub fn charge(
        &mut self,
        key: &QuotaKey,
        limit: u32,
        window: Duration,
        now: Instant,
    ) -> Reading {
        let log = self.windows.entry(key.clone()).or_default();
        while log
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= window)
        {
            log.pop_front();
        }
        log.push_back(now);
        let others = match key {
            QuotaKey::Page(p) => self.other_usage.get(p).copied().unwrap_or(0),
            QuotaKey::App => 0,
        };
        let count = log.len() as u64 + others;
        let limit = u64::from(limit);
        let throttled = count > limit;
        let regain_minutes = match (throttled, log.front()) {
            (true, Some(&oldest)) => {
                window
                    .saturating_sub(now.saturating_duration_since(oldest))
                    .as_secs()
                    / 60
            }
            _ => 0,
        };

        let c = &mut self.counters;
        c.calls += 1;
        if throttled {
            c.throttled += 1;
        }
        if let QuotaKey::Page(p) = key {
            *c.calls_by_page.entry(p.clone()).or_default() += 1;
            if throttled {
                *c.throttled_by_page.entry(p.clone()).or_default() += 1;
            }
        }
        Reading {
            count,
            limit,
            throttled,
            regain_minutes,
        }
    }

    /// Forgets all rate-limit history (not part of Graph; lets benches start from a clean slate).
    pub fn reset_windows(&mut self) {
        self.windows.clear();
    }

    /// Other apps' calls in `page`'s window from now on (0 removes them).
    pub fn set_other_usage(&mut self, page: &str, calls: u64) {
        if calls == 0 {
            self.other_usage.remove(page);
        } else {
            self.other_usage.insert(page.to_string(), calls);
        }
    }

    pub fn record(&mut self, req: RecordedRequest) {
        if self.record_limit == 0 {
            return;
        }
        while self.recorded.len() >= self.record_limit {
            self.recorded.pop_front();
        }
        self.recorded.push_back(req);
    }

    pub fn record_executed(&mut self, call: ExecutedCall) {
        if self.record_limit == 0 {
            return;
        }
        while self.executed.len() >= self.record_limit {
            self.executed.pop_front();
        }
        self.executed.push_back(call);
    }
}
