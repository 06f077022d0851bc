//! Messages between replicas over Redis pub/sub: invalidations (a write, an admin purge) that
//! each replica applies to its own L1, and "filled" notices that wake replicas waiting on
//! another's fill lease.
//!
//! Pub/sub is fire-and-forget: a replica that is disconnected when a message is sent never
//! sees it. That is acceptable because nothing depends on it alone: L2 entries are deleted
//! directly by the writer, lease waiters also poll L2, and L1 entries still expire at their
//! TTL (the backstop for lost invalidations).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};

use super::key::KeyId;
use crate::metrics::RedisOp;
use crate::redis_conn::RedisConn;

/// Received invalidations waiting to be applied; beyond this they are dropped (counted as a
/// Redis error, op `subscribe`) and the TTL backstop applies.
const QUEUE: usize = 4096;
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(50);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);

/// An invalidation to apply to the local tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// A successful write to this node (and, for a post, its Page's edges).
    Write(String),
    /// Admin purge of a node.
    Node(String),
    /// Admin purge of readable keys with this prefix.
    Prefix(String),
    /// Admin purge of everything.
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Message {
    Invalidate(Invalidation),
    Filled(KeyId),
}

/// `{replica:016x}|{kind}|{arg}`; kinds w, n, p, a, f.
fn encode(replica: u64, m: &Message) -> String {
    let (kind, arg) = match m {
        Message::Invalidate(Invalidation::Write(n)) => ("w", n.clone()),
        Message::Invalidate(Invalidation::Node(n)) => ("n", n.clone()),
        Message::Invalidate(Invalidation::Prefix(p)) => ("p", p.clone()),
        Message::Invalidate(Invalidation::All) => ("a", String::new()),
        Message::Filled(k) => ("f", format!("{:032x}", k.0)),
    };
    format!("{replica:016x}|{kind}|{arg}")
}

fn decode(s: &str) -> Option<(u64, Message)> {
    let mut parts = s.splitn(3, '|');
    let replica = u64::from_str_radix(parts.next()?, 16).ok()?;
    let kind = parts.next()?;
    let arg = parts.next()?;
    let m = match kind {
        "w" if !arg.is_empty() => Message::Invalidate(Invalidation::Write(arg.to_string())),
        "n" if !arg.is_empty() => Message::Invalidate(Invalidation::Node(arg.to_string())),
        "p" if !arg.is_empty() => Message::Invalidate(Invalidation::Prefix(arg.to_string())),
        "a" => Message::Invalidate(Invalidation::All),
        "f" => Message::Filled(KeyId(u128::from_str_radix(arg, 16).ok()?)),
        _ => return None,
    };
    Some((replica, m))
}

/// This replica's end of the bus.
pub struct Bus {
    conn: Arc<RedisConn>,
    channel: String,
    waiters: Arc<Mutex<HashMap<KeyId, Arc<Notify>>>>,
}

fn lock(m: &Mutex<HashMap<KeyId, Arc<Notify>>>) -> MutexGuard<'_, HashMap<KeyId, Arc<Notify>>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registration of interest in a key's "filled" notice; unregisters on drop.
pub struct FillWatch {
    key: KeyId,
    notify: Arc<Notify>,
    waiters: Arc<Mutex<HashMap<KeyId, Arc<Notify>>>>,
}

impl FillWatch {
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for FillWatch {
    fn drop(&mut self) {
        let mut map = lock(&self.waiters);
        // Two references: ours and the map's. Others still waiting keep it.
        if map
            .get(&self.key)
            .is_some_and(|n| Arc::ptr_eq(n, &self.notify) && Arc::strong_count(n) <= 2)
        {
            map.remove(&self.key);
        }
    }
}

impl Bus {
    pub fn new(conn: Arc<RedisConn>) -> Bus {
        let channel = format!("{}bus", conn.prefix());
        Bus {
            conn,
            channel,
            waiters: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub async fn invalidate(&self, inv: Invalidation) {
        self.publish(Message::Invalidate(inv)).await;
    }

    /// Tells waiting replicas that `key` was filled (or that its lease is free again).
    pub async fn filled(&self, key: KeyId) {
        self.publish(Message::Filled(key)).await;
    }

    async fn publish(&self, m: Message) {
        let text = encode(self.conn.replica(), &m);
        let channel = self.channel.clone();
        self.conn
            .run(RedisOp::Publish, |mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(text)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// Registers for the "filled" notice of `key`. Create it *before* checking L2, so a
    /// notice sent in between is not missed.
    pub fn watch(&self, key: KeyId) -> FillWatch {
        let notify = lock(&self.waiters)
            .entry(key)
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone();
        FillWatch {
            key,
            notify,
            waiters: self.waiters.clone(),
        }
    }

    /// Starts the subscriber: it (re)connects with backoff for as long as the returned
    /// receiver lives, wakes fill waiters itself and hands invalidations from other replicas
    /// to the receiver.
    pub fn subscribe(&self) -> mpsc::Receiver<Invalidation> {
        let (tx, rx) = mpsc::channel(QUEUE);
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(subscriber(
                self.conn.clone(),
                self.channel.clone(),
                self.waiters.clone(),
                tx,
            ));
        }
        rx
    }
}

async fn subscriber(
    conn: Arc<RedisConn>,
    channel: String,
    waiters: Arc<Mutex<HashMap<KeyId, Arc<Notify>>>>,
    tx: mpsc::Sender<Invalidation>,
) {
    let mut delay = RESUBSCRIBE_MIN;
    let mut was_subscribed = true;
    while !tx.is_closed() {
        let connect = async {
            let mut ps = conn.pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        let wait = (conn.timeout() * 10).max(Duration::from_millis(500));
        let ps = match tokio::time::timeout(wait, connect).await {
            Ok(Ok(ps)) => ps,
            _ => {
                if was_subscribed {
                    conn.metrics().redis.error(RedisOp::Subscribe);
                    was_subscribed = false;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RESUBSCRIBE_MAX);
                continue;
            }
        };
        if !was_subscribed {
            tracing::info!("Redis invalidation channel subscribed again");
        }
        was_subscribed = true;
        delay = RESUBSCRIBE_MIN;
        let mut stream = ps.into_on_message();
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if tx.is_closed() { return; }
                    continue;
                }
            };
            let Some(msg) = msg else {
                // The connection ended (Redis restarted or went away): resubscribe.
                break;
            };
            let Ok(text) = std::str::from_utf8(msg.get_payload_bytes()) else {
                continue;
            };
            let Some((from, m)) = decode(text) else {
                continue;
            };
            match m {
                Message::Filled(k) => {
                    if let Some(n) = lock(&waiters).get(&k) {
                        n.notify_waiters();
                    }
                }
                Message::Invalidate(_) if from == conn.replica() => {}
                Message::Invalidate(inv) => {
                    if tx.try_send(inv).is_err() {
                        conn.metrics().redis.error(RedisOp::Subscribe);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_junk_is_ignored() {
        for m in [
            Message::Invalidate(Invalidation::Write("1001_7".into())),
            Message::Invalidate(Invalidation::Node("me".into())),
            Message::Invalidate(Invalidation::Prefix("v21.0/1001|x".into())),
            Message::Invalidate(Invalidation::All),
            Message::Filled(KeyId(u128::MAX - 5)),
        ] {
            assert_eq!(decode(&encode(42, &m)), Some((42, m)));
        }
        for junk in ["", "zz|w|1", "1|q|x", "1|w|", "1|f|nothex", "1"] {
            assert_eq!(decode(junk), None, "{junk}");
        }
    }
}
