//! The in-process [`FillLock`]: concurrent identical misses collapsed into one upstream call.
//!
//! Not moka's `get_with`: when the future that initialises an entry is dropped (the client
//! hung up) its waiters can stall (design.md). Here the first caller for a key gets the
//! write permit, a [`Flight`] to move into its own spawned task; everyone (the writer
//! included, through [`Flight::reader`]) waits on a `watch` channel with their own deadline.
//! The flight's drop guard removes the map entry whether it completed, failed or panicked,
//! so no key can stay stuck.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::fill_lock::{FillLock, Locked, ReadOutcome, WaitError};
use super::key::{FastMap, KeyId};

type Map<T> = FastMap<KeyId, watch::Receiver<Option<T>>>;

/// In-flight fills by key.
pub struct Coalescer<T> {
    inflight: Arc<Mutex<Map<T>>>,
}

/// Another handle on the same fills (for a task that releases a permit).
impl<T> Clone for Coalescer<T> {
    fn clone(&self) -> Self {
        Coalescer {
            inflight: self.inflight.clone(),
        }
    }
}

impl<T> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer {
            inflight: Arc::new(Mutex::new(FastMap::default())),
        }
    }
}

/// The right and duty to complete one fill: the in-process write permit.
pub struct Flight<T> {
    key: KeyId,
    tx: watch::Sender<Option<T>>,
    inflight: Arc<Mutex<Map<T>>>,
}

impl<T> std::fmt::Debug for Flight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight").field("key", &self.key).finish()
    }
}

/// Waits for a fill's result: the in-process reader.
pub struct Waiter<T>(watch::Receiver<Option<T>>);

fn lock<T>(m: &Mutex<Map<T>>) -> MutexGuard<'_, Map<T>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Clone> Coalescer<T> {
    /// [`FillLock::lock`] without awaiting: in process the answer is at hand, so code that
    /// cannot wait (the read stage) takes the lock too. Never [`Locked::Unavailable`].
    pub fn lock_now(&self, key: KeyId) -> Locked<Flight<T>, Waiter<T>> {
        let mut map = lock(&self.inflight);
        if let Some(rx) = map.get(&key) {
            return Locked::Read(Waiter(rx.clone()));
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key, rx);
        Locked::Write(Flight {
            key,
            tx,
            inflight: self.inflight.clone(),
        })
    }

    /// Fills currently running (for tests and debugging).
    pub fn in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }
}

impl<T> Flight<T> {
    /// A reader of this fill, for the writer's own request: it waits like any other, while
    /// the fill runs in a task a client hanging up cannot cancel.
    pub fn reader(&self) -> Waiter<T> {
        Waiter(self.tx.subscribe())
    }

    /// Hands the result to every waiter; the drop that follows frees the key.
    fn complete(self, value: T) {
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

impl<T: Clone + Send + Sync> FillLock for Coalescer<T> {
    type Key = KeyId;
    type Value = T;
    type Permit = Flight<T>;
    type Reader = Waiter<T>;

    async fn lock(&self, key: &KeyId) -> Locked<Flight<T>, Waiter<T>> {
        self.lock_now(*key)
    }

    /// Never [`ReadOutcome::TookOver`]: a dropped flight leaves its readers `Abandoned`.
    async fn wait(&self, reader: Waiter<T>, deadline: Duration) -> ReadOutcome<T, Flight<T>> {
        match reader.wait(deadline).await {
            Ok(v) => ReadOutcome::Done(v),
            Err(e) => ReadOutcome::GaveUp(e),
        }
    }

    async fn release(&self, permit: Flight<T>, value: T) {
        permit.complete(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_writer_many_readers_and_the_key_is_freed() {
        let c: Coalescer<u32> = Coalescer::default();
        let Locked::Write(permit) = c.lock(&KeyId(7)).await else {
            panic!("the first caller writes")
        };
        let readers: Vec<_> = (0..10)
            .map(|_| match c.lock_now(KeyId(7)) {
                Locked::Read(r) => r,
                _ => panic!("later callers read"),
            })
            .collect();
        // The writer's own reader going away changes nothing for the others.
        drop(permit.reader());
        let writer = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.release(permit, 42).await;
        });
        for r in readers {
            let outcome = c.wait(r, Duration::from_secs(5)).await;
            assert!(matches!(outcome, ReadOutcome::Done(42)), "{outcome:?}");
        }
        assert_eq!(c.in_flight(), 0);
        assert!(matches!(c.lock_now(KeyId(7)), Locked::Write(_)));
    }

    #[tokio::test]
    async fn a_dropped_permit_frees_the_key_and_its_readers_see_it_abandoned() {
        let c: Coalescer<u32> = Coalescer::default();
        let Locked::Write(permit) = c.lock_now(KeyId(1)) else {
            panic!()
        };
        let (mine, Locked::Read(theirs)) = (permit.reader(), c.lock_now(KeyId(1))) else {
            panic!()
        };
        drop(permit);
        assert_eq!(c.in_flight(), 0);
        for r in [mine, theirs] {
            let outcome = c.wait(r, Duration::from_secs(5)).await;
            assert!(
                matches!(outcome, ReadOutcome::GaveUp(WaitError::Abandoned)),
                "{outcome:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_slow_fill_times_its_readers_out() {
        let c: Coalescer<u32> = Coalescer::default();
        let Locked::Write(_permit) = c.lock_now(KeyId(2)) else {
            panic!()
        };
        let Locked::Read(r) = c.lock_now(KeyId(2)) else {
            panic!()
        };
        let outcome = c.wait(r, Duration::from_millis(20)).await;
        assert!(
            matches!(outcome, ReadOutcome::GaveUp(WaitError::TimedOut)),
            "{outcome:?}"
        );
        assert_eq!(c.in_flight(), 1, "the fill still runs");
    }

    #[tokio::test]
    async fn an_old_permit_never_frees_a_newer_fill_of_its_key() {
        let c: Coalescer<u32> = Coalescer::default();
        let Locked::Write(old) = c.lock_now(KeyId(3)) else {
            panic!()
        };
        // The old flight's entry gone while it lives on: its drop must spare a successor's.
        lock(&c.inflight).clear();
        let Locked::Write(new) = c.lock_now(KeyId(3)) else {
            panic!("the key was free")
        };
        drop(old);
        assert!(matches!(c.lock_now(KeyId(3)), Locked::Read(_)));
        drop(new);
        assert_eq!(c.in_flight(), 0);
    }
}
