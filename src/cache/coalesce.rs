//! Collapsing concurrent identical misses into one upstream call.
//!
//! Not moka's `get_with`: when the future that initialises an entry is dropped (the client
//! hung up) its waiters can stall (design.md). Here the first caller for a key becomes the
//! leader and gets a [`Flight`] to move into its own spawned task; everyone (leader included)
//! waits on a `watch` channel with their own deadline. The flight's drop guard removes the
//! map entry whether it completed, failed or panicked, so no key can stay stuck.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::key::KeyId;

type Map<T> = HashMap<KeyId, watch::Receiver<Option<T>>>;

/// In-flight fills by key.
pub struct Coalescer<T> {
    inflight: Arc<Mutex<Map<T>>>,
}

impl<T> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer {
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// The caller's part in a fill.
pub enum Role<T> {
    /// Start the fill: move the flight into a task and call [`Flight::complete`].
    Leader(Flight<T>, Waiter<T>),
    /// A fill for this key is already running.
    Follower(Waiter<T>),
}

/// The right and duty to complete one fill.
pub struct Flight<T> {
    key: KeyId,
    tx: watch::Sender<Option<T>>,
    inflight: Arc<Mutex<Map<T>>>,
}

/// Waits for a fill's result.
pub struct Waiter<T>(watch::Receiver<Option<T>>);

fn lock<T>(m: &Mutex<Map<T>>) -> MutexGuard<'_, Map<T>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Clone> Coalescer<T> {
    pub fn join(&self, key: KeyId) -> Role<T> {
        let mut map = lock(&self.inflight);
        if let Some(rx) = map.get(&key) {
            return Role::Follower(Waiter(rx.clone()));
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key, rx.clone());
        Role::Leader(
            Flight {
                key,
                tx,
                inflight: self.inflight.clone(),
            },
            Waiter(rx),
        )
    }

    /// Fills currently running (for tests and debugging).
    pub fn in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }
}

impl<T> Flight<T> {
    /// Hands the result to every waiter; the drop that follows frees the key.
    pub fn complete(self, value: T) {
        self.tx.send_replace(Some(value));
    }
}

impl<T> Drop for Flight<T> {
    fn drop(&mut self) {
        let mut map = lock(&self.inflight);
        // Remove only our own flight: never a newer one under the same key.
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

/// Why a waiter got no result.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitError {
    /// The deadline passed first.
    TimedOut,
    /// The fill ended without a result (its task panicked or was aborted).
    Abandoned,
}

impl<T: Clone> Waiter<T> {
    /// Waits on a channel that another mechanism (a union fill) completes.
    pub(super) fn new(rx: watch::Receiver<Option<T>>) -> Self {
        Waiter(rx)
    }

    pub async fn wait(mut self, deadline: Duration) -> Result<T, WaitError> {
        match tokio::time::timeout(deadline, self.0.wait_for(Option::is_some)).await {
            Err(_) => Err(WaitError::TimedOut),
            Ok(Err(_)) => Err(WaitError::Abandoned),
            Ok(Ok(v)) => v.clone().ok_or(WaitError::Abandoned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_followers_and_the_key_is_freed() {
        let c: Coalescer<u32> = Coalescer::default();
        let Role::Leader(flight, lead_wait) = c.join(KeyId(7)) else {
            panic!("first caller leads")
        };
        let followers: Vec<_> = (0..10)
            .map(|_| match c.join(KeyId(7)) {
                Role::Follower(w) => w,
                Role::Leader(..) => panic!("second caller follows"),
            })
            .collect();
        // The leader's own waiter going away changes nothing for the followers.
        drop(lead_wait);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            flight.complete(42);
        });
        for w in followers {
            assert_eq!(w.wait(Duration::from_secs(5)).await, Ok(42));
        }
        assert_eq!(c.in_flight(), 0);
        assert!(matches!(c.join(KeyId(7)), Role::Leader(..)));
    }

    #[tokio::test]
    async fn abandoned_and_slow_fills_do_not_hang_waiters() {
        let c: Coalescer<u32> = Coalescer::default();
        let Role::Leader(flight, w) = c.join(KeyId(1)) else {
            panic!()
        };
        drop(flight);
        assert_eq!(
            w.wait(Duration::from_secs(5)).await,
            Err(WaitError::Abandoned)
        );
        assert_eq!(c.in_flight(), 0);

        let Role::Leader(_flight, w) = c.join(KeyId(2)) else {
            panic!()
        };
        assert_eq!(
            w.wait(Duration::from_millis(20)).await,
            Err(WaitError::TimedOut)
        );
    }
}
