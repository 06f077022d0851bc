//! Field-union fills: concurrent misses for one node that ask for different fields share one
//! upstream call for the union of their fields, and each caller gets its own projection.
//!
//! The first miss for a node (its base key: the read without `fields`) opens a *gathering*.
//! For `[cache] union_window_ms` it stays open and later misses for the same node add their
//! fields to it (when the union is allowed: no member name with two meanings, at most
//! [`projection::MAX_UNION_FIELDS`] fields, a URL within `upstream.max_get_url_bytes`); then it
//! closes and its one upstream call runs. While that call is in flight, a miss whose fields
//! the union covers waits for it instead of making its own. Everything else fills on its own.
//! With a window of 0 only the in-flight part applies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::coalesce::Waiter;
use super::key::KeyId;
use super::projection;
use super::Fill;
use crate::error::ProxyError;
use crate::graph::fields::Fields;

/// What a union fill produced: the fields it asked Graph for and its fill.
pub type UnionResult = Result<(Fields, Fill), ProxyError>;

type Map = HashMap<KeyId, Arc<Gathering>>;

/// The open gatherings and in-flight union fills, by base key.
pub struct Unions {
    map: Arc<Mutex<Map>>,
    /// Whether a new fill first gathers other misses' fields (a window is set); without,
    /// it is in flight from the start and only covered misses join it.
    gathers: bool,
}

struct Gathering {
    state: Mutex<State>,
    tx: watch::Sender<Option<UnionResult>>,
}

struct State {
    /// The union so far (normalized).
    fields: Fields,
    /// Still taking fields (within the window); once closed, the call is on its way.
    open: bool,
    /// Distinct callers whose fields are in the union.
    callers: usize,
}

/// A caller's part in a union fill.
pub enum Part {
    /// Run the fill (after the window) with [`Lead::close`] and [`Lead::complete`].
    Lead(Lead, Waiter<UnionResult>),
    /// Another caller's fill will hold this caller's fields.
    Joined(Waiter<UnionResult>),
    /// No union with the fill under way: fill alone.
    Alone,
}

/// The right and duty to run one union fill. Dropping it (the fill's task ended, however)
/// removes the gathering, and its waiters see it abandoned.
pub struct Lead {
    base: KeyId,
    gathering: Arc<Gathering>,
    map: Arc<Mutex<Map>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Unions {
    pub fn new(gathers: bool) -> Unions {
        Unions {
            map: Arc::default(),
            gathers,
        }
    }

    /// Joins the gathering or in-flight fill for `base`, or opens one. `fits` says whether a
    /// union's fields still make an acceptable upstream call.
    pub fn join(&self, base: KeyId, want: &Fields, fits: impl Fn(&Fields) -> bool) -> Part {
        let want = want.normalized();
        let mut map = lock(&self.map);
        if let Some(g) = map.get(&base) {
            let mut state = lock(&g.state);
            if projection::covers(&state.fields, &want) {
                state.callers += 1;
                return Part::Joined(Waiter::new(g.tx.subscribe()));
            }
            if state.open {
                if let Some(u) = projection::union(&state.fields, &want).filter(|u| fits(u)) {
                    state.fields = u;
                    state.callers += 1;
                    return Part::Joined(Waiter::new(g.tx.subscribe()));
                }
            }
            return Part::Alone;
        }
        let (tx, _) = watch::channel(None);
        let gathering = Arc::new(Gathering {
            state: Mutex::new(State {
                fields: want,
                open: self.gathers,
                callers: 1,
            }),
            tx,
        });
        map.insert(base, gathering.clone());
        let waiter = Waiter::new(gathering.tx.subscribe());
        Part::Lead(
            Lead {
                base,
                gathering,
                map: self.map.clone(),
            },
            waiter,
        )
    }

    /// Gatherings open or in flight (for tests).
    pub fn in_flight(&self) -> usize {
        lock(&self.map).len()
    }
}

impl Lead {
    /// Stops taking fields: the union to ask for, and how many callers it serves.
    pub fn close(&self) -> (Fields, usize) {
        let mut state = lock(&self.gathering.state);
        state.open = false;
        (state.fields.clone(), state.callers)
    }

    /// Hands the result to every caller; the drop that follows removes the gathering.
    pub fn complete(self, result: UnionResult) {
        self.gathering.tx.send_replace(Some(result));
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        if map
            .get(&self.base)
            .is_some_and(|g| Arc::ptr_eq(g, &self.gathering))
        {
            map.remove(&self.base);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::coalesce::WaitError;

    fn f(s: &str) -> Fields {
        Fields::parse(s).unwrap()
    }

    fn base(n: u64) -> KeyId {
        KeyId(u128::from(n))
    }

    #[test]
    fn an_open_gathering_takes_new_fields_and_a_closed_one_only_covered_ones() {
        let unions = Unions::new(true);
        let Part::Lead(lead, _) = unions.join(base(1), &f("id,name"), |_| true) else {
            panic!("the first miss leads");
        };
        assert!(matches!(
            unions.join(base(1), &f("about"), |_| true),
            Part::Joined(_)
        ));
        // A member name with two meanings cannot share the call.
        assert!(matches!(
            unions.join(base(1), &f("feed.limit(2).as(about)"), |_| true),
            Part::Alone
        ));
        // Too long a URL: not added.
        assert!(matches!(
            unions.join(base(1), &f("category"), |u| u.fields().len() < 4),
            Part::Alone
        ));
        let (fields, callers) = lead.close();
        assert_eq!(
            fields.canonical(),
            f("about,id,name").normalized().canonical()
        );
        assert_eq!(callers, 2);
        // In flight: covered fields join, others fill alone.
        assert!(matches!(
            unions.join(base(1), &f("name"), |_| true),
            Part::Joined(_)
        ));
        assert!(matches!(
            unions.join(base(1), &f("fan_count"), |_| true),
            Part::Alone
        ));
        // Another node is another gathering.
        let other = unions.join(base(2), &f("name"), |_| true);
        assert!(matches!(other, Part::Lead(..)));
        assert_eq!(unions.in_flight(), 2);
        drop(lead);
        assert_eq!(unions.in_flight(), 1);
        drop(other);
        assert_eq!(unions.in_flight(), 0);

        // Without a window, a fill takes no fields but its own.
        let unions = Unions::new(false);
        let _lead = unions.join(base(1), &f("id,name"), |_| true);
        assert!(matches!(
            unions.join(base(1), &f("about"), |_| true),
            Part::Alone
        ));
        assert!(matches!(
            unions.join(base(1), &f("id"), |_| true),
            Part::Joined(_)
        ));
    }

    #[tokio::test]
    async fn every_caller_gets_the_result_and_a_dropped_lead_frees_them() {
        let unions = Unions::new(true);
        let Part::Lead(lead, mine) = unions.join(base(1), &f("id"), |_| true) else {
            panic!("leads");
        };
        let Part::Joined(theirs) = unions.join(base(1), &f("name"), |_| true) else {
            panic!("joins");
        };
        let (fields, _) = lead.close();
        lead.complete(Err(ProxyError::BadRequest("no".into())));
        for w in [mine, theirs] {
            let got = w.wait(Duration::from_secs(1)).await.expect("a result");
            assert!(got.is_err());
        }
        assert_eq!(fields.canonical(), "id,name");
        assert_eq!(unions.in_flight(), 0);

        let Part::Lead(lead, _) = unions.join(base(1), &f("id"), |_| true) else {
            panic!("leads again");
        };
        let Part::Joined(w) = unions.join(base(1), &f("id"), |_| true) else {
            panic!("joins");
        };
        drop(lead);
        assert_eq!(
            w.wait(Duration::from_secs(1)).await.err(),
            Some(WaitError::Abandoned)
        );
        assert_eq!(unions.in_flight(), 0);
    }
}
