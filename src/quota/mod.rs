//! The per-Page quota steward: calls that must go to Graph are admitted here first, so Meta
//! never has to throttle them, and while a Page has room they go at once.
//!
//! - [`attribution`]: which bucket (a Page, or the app) each call unit is charged to;
//! - [`window`]: the sliding-window count of dispatched calls (a ring of sub-buckets);
//! - [`budget`]: one bucket's estimate (latest usage reading plus calls since, learned
//!   limit) and admission rule, pause and probe, with an injected clock;
//! - [`table`]: the bounded bucket table (sharded, O(1) insert and eviction);
//! - [`scheduler`]: per-bucket queues (interactive before batch), deadlines, the app gate,
//!   learning from replies, status, RateLimit headers and per-Page series;
//! - [`shared`]: with Redis, the same state and decision for the whole fleet.
//!
//! Cache hits never reach the scheduler: only `Gateway::forward` calls it.

pub mod attribution;
pub mod budget;
pub mod scheduler;
pub mod shared;
pub mod table;
pub mod window;

pub use attribution::{call_units, BucketKey, Charge};
pub use scheduler::{Admission, Learned, Scheduler};
