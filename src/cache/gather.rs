//! Gathering concurrent misses into one upstream call: the first miss of a group opens a
//! gathering and leads it; for a short window later misses of the group may add what they
//! need to it (the group decides what fits); then it closes, its one call runs, and every
//! caller gets the result. While the call is in flight, misses the call already covers wait
//! for it. Used for field unions (one node, several field lists: [`super::union`]) and for
//! merged node reads (one Page, several nodes: [`super::merge`]).

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::coalesce::Waiter;
use super::key::{FastMap, KeyId};

type Map<S, R> = FastMap<KeyId, Arc<Gathering<S, R>>>;

/// The open gatherings and the in-flight calls they led to, by group.
pub struct Gatherings<S, R> {
    map: Arc<Mutex<Map<S, R>>>,
    /// Whether a new gathering takes other misses' additions (a window is set); without,
    /// it is in flight from the start and only covered misses join it.
    gathers: bool,
}

struct Gathering<S, R> {
    state: Mutex<(S, bool)>,
    tx: watch::Sender<Option<R>>,
}

/// A caller's part in a gathering.
pub enum Part<S, R> {
    /// Run the call (after the window) with [`Lead::close`] and [`Lead::complete`].
    Lead(Lead<S, R>, Waiter<R>),
    /// Another caller's call will answer this one.
    Joined(Waiter<R>),
    /// Nothing under way can answer this caller: it calls on its own.
    Alone,
}

/// The right and duty to run one gathering's call. Dropping it (its task ended, however)
/// removes the gathering, and its waiters see it abandoned.
pub struct Lead<S, R> {
    group: KeyId,
    gathering: Arc<Gathering<S, R>>,
    map: Arc<Mutex<Map<S, R>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: Clone, R: Clone> Gatherings<S, R> {
    pub fn new(gathers: bool) -> Self {
        Gatherings {
            map: Arc::default(),
            gathers,
        }
    }

    /// Joins the gathering (or in-flight call) of `group`, or opens one holding `first()`.
    /// `join(state, open)` says whether this caller can be answered by it, adding what it
    /// needs to `state` when `open`.
    pub fn join(
        &self,
        group: KeyId,
        first: impl FnOnce() -> S,
        join: impl FnOnce(&mut S, bool) -> bool,
    ) -> Part<S, R> {
        let mut map = lock(&self.map);
        if let Some(g) = map.get(&group) {
            let mut state = lock(&g.state);
            let (s, open) = &mut *state;
            return if join(s, *open) {
                Part::Joined(Waiter::new(g.tx.subscribe()))
            } else {
                Part::Alone
            };
        }
        let (tx, _) = watch::channel(None);
        let gathering = Arc::new(Gathering {
            state: Mutex::new((first(), self.gathers)),
            tx,
        });
        map.insert(group, gathering.clone());
        let waiter = Waiter::new(gathering.tx.subscribe());
        Part::Lead(
            Lead {
                group,
                gathering,
                map: self.map.clone(),
            },
            waiter,
        )
    }

    /// Joins the gathering of `group` if there is one and `join` accepts (as in
    /// [`Gatherings::join`]); never opens one.
    pub fn join_existing(
        &self,
        group: KeyId,
        join: impl FnOnce(&mut S, bool) -> bool,
    ) -> Option<Waiter<R>> {
        let map = lock(&self.map);
        let g = map.get(&group)?;
        let mut state = lock(&g.state);
        let (s, open) = &mut *state;
        join(s, *open).then(|| Waiter::new(g.tx.subscribe()))
    }

    /// Gatherings open or in flight (for tests).
    pub fn in_flight(&self) -> usize {
        lock(&self.map).len()
    }
}

impl<S: Clone, R> Lead<S, R> {
    /// Stops taking additions: what the call is to serve.
    pub fn close(&self) -> S {
        let mut state = lock(&self.gathering.state);
        state.1 = false;
        state.0.clone()
    }

    /// Hands the result to every caller; the drop that follows removes the gathering.
    pub fn complete(self, result: R) {
        self.gathering.tx.send_replace(Some(result));
    }
}

impl<S, R> Drop for Lead<S, R> {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        if map
            .get(&self.group)
            .is_some_and(|g| Arc::ptr_eq(g, &self.gathering))
        {
            map.remove(&self.group);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::fill_lock::WaitError;

    type Sums = Gatherings<Vec<u32>, u32>;

    /// Joins when open (adding `n`) or when `n` is already in.
    fn join(g: &Sums, group: u128, n: u32) -> Part<Vec<u32>, u32> {
        g.join(
            KeyId(group),
            || vec![n],
            |s, open| {
                if s.contains(&n) {
                    true
                } else if open {
                    s.push(n);
                    true
                } else {
                    false
                }
            },
        )
    }

    #[tokio::test]
    async fn callers_join_while_open_or_covered_and_all_get_the_result() {
        let g = Sums::new(true);
        let Part::Lead(lead, mine) = join(&g, 1, 1) else {
            panic!("the first leads");
        };
        let Part::Joined(theirs) = join(&g, 1, 2) else {
            panic!("joins while open");
        };
        assert_eq!(lead.close(), vec![1, 2]);
        assert!(matches!(join(&g, 1, 3), Part::Alone), "closed: not covered");
        let Part::Joined(covered) = join(&g, 1, 2) else {
            panic!("closed but covered");
        };
        let other = join(&g, 2, 1);
        assert!(matches!(other, Part::Lead(..)), "another group");
        assert_eq!(g.in_flight(), 2);
        lead.complete(3);
        for w in [mine, theirs, covered] {
            assert_eq!(w.wait(Duration::from_secs(1)).await, Ok(3));
        }
        assert_eq!(g.in_flight(), 1);
        drop(other);
        assert_eq!(g.in_flight(), 0);
        assert!(
            g.join_existing(KeyId(2), |_, _| true).is_none(),
            "join_existing opens nothing"
        );
    }

    #[tokio::test]
    async fn without_a_window_nothing_is_added_and_a_dropped_lead_frees_its_waiters() {
        let g = Sums::new(false);
        let Part::Lead(lead, _) = join(&g, 1, 1) else {
            panic!("leads");
        };
        assert!(matches!(join(&g, 1, 2), Part::Alone));
        let Part::Joined(w) = join(&g, 1, 1) else {
            panic!("covered");
        };
        drop(lead);
        assert_eq!(
            w.wait(Duration::from_secs(1)).await,
            Err(WaitError::Abandoned)
        );
        assert_eq!(g.in_flight(), 0);
    }
}
