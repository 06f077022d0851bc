//! Who fills a cache key: one lock with explicit outcomes, two backends.
//!
//! A caller that misses asks the key's lock. [`Locked::Write`]: it fills the key and then
//! releases the permit with the value. [`Locked::Read`]: someone else is filling it, so it
//! waits, and the wait ends with the value ([`ReadOutcome::Done`]), with the key handed over
//! because the writer went away ([`ReadOutcome::TookOver`]) or with nothing
//! ([`ReadOutcome::GaveUp`]). [`Locked::Unavailable`]: the lock's store is down, so the
//! caller fills without it. A permit dropped unreleased (its fill ended without a value)
//! frees the key too, so no key stays locked.
//!
//! - In process, [`super::coalesce::Coalescer`]: identical misses of one replica share one
//!   upstream call; the value reaches the readers through a channel. The fill runs in a task
//!   of its own that a client hanging up cannot end, so only a panic or an abort drops its
//!   permit; its readers then see [`WaitError::Abandoned`] rather than take over.
//! - Across replicas, [`super::lease::FleetLock`]: a Redis lease per key; readers find the
//!   value in the Redis tier, woken by the bus or by polling, and take the lease over when it
//!   comes free without an entry.

use std::future::Future;
use std::time::Duration;

/// The answer to asking for a key's lock.
#[derive(Debug)]
pub enum Locked<P, R> {
    /// This caller fills the key and releases the permit when done.
    Write(P),
    /// Another caller is filling it: wait with this reader.
    Read(R),
    /// The lock's store did not answer: fill without the lock.
    Unavailable,
}

/// How a reader's wait ended.
#[derive(Debug)]
pub enum ReadOutcome<T, P> {
    /// The writer's value.
    Done(T),
    /// The writer went away and the lock came free: this caller holds it and fills now.
    TookOver(P),
    /// No value and no lock.
    GaveUp(WaitError),
}

/// Why a reader got no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitError {
    /// The deadline passed first.
    TimedOut,
    /// The fill ended without a value (its task panicked or was aborted).
    Abandoned,
    /// The lock's store stopped answering.
    Unavailable,
}

/// A lock per cache key deciding who fills it (see the module docs).
pub trait FillLock {
    type Key: ?Sized;
    /// What a reader gets from the writer.
    type Value;
    /// The right and duty to fill one key.
    type Permit;
    type Reader;

    fn lock(
        &self,
        key: &Self::Key,
    ) -> impl Future<Output = Locked<Self::Permit, Self::Reader>> + Send;

    /// Waits at most `deadline` for the writer.
    fn wait(
        &self,
        reader: Self::Reader,
        deadline: Duration,
    ) -> impl Future<Output = ReadOutcome<Self::Value, Self::Permit>> + Send;

    /// Ends a fill that produced `value`: frees the key and lets the readers have it.
    fn release(&self, permit: Self::Permit, value: Self::Value) -> impl Future<Output = ()> + Send;
}
