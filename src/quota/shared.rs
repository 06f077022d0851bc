//! Page budgets shared by every replica: the GCRA state of each bucket lives in Redis and
//! one Lua script per admission decides "may these units go now, or when", atomically and
//! with Redis `TIME` as the clock, so the replicas' own clocks never matter and N replicas
//! together admit no more than one would.
//!
//! Only that decision moves to Redis. Queues, priorities, fairness, in-flight caps, usage
//! readings and the adaptive factor stay local (each replica sees the same usage headers for
//! a Page, so their factors agree); the interval each replica asks with already carries its
//! factor. A pause learned by one replica (throttle code, 100 % usage) is written to Redis
//! and every replica's next admission sees it.
//!
//! Keys: `{prefix}{page:ID}:tat` and `:pause` (or `{app}` for the app bucket): one hash
//! slot per bucket. Values are microseconds since the Unix epoch by Redis' clock; keys
//! expire once they no longer constrain anything.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;

use super::attribution::BucketKey;
use crate::redis_conn::RedisConn;

const ADMIT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local units = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local ahead = math.max(tat - now, 0)
if paused > now then
  return {0, paused - now, ahead, paused - now}
end
if tat > 0 then
  local ready = tat + interval * (units - 1) - tolerance
  if ready > now then
    return {0, ready - now, ahead, 0}
  end
end
local new = math.max(tat, now) + interval * units
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.floor((new - now) / 1000) + 1000)
return {1, 0, new - now, 0}
";

const PAUSE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if untl > cur then
  redis.call('SET', KEYS[1], string.format('%.0f', untl), 'PX', math.floor(tonumber(ARGV[1]) / 1000) + 1000)
end
return 1
";

const REFUND: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > now then
  local new = math.max(tat - tonumber(ARGV[1]), now)
  redis.call('SET', KEYS[1], string.format('%.0f', new), 'KEEPTTL')
end
return 1
";

/// Redis' answer to one admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Charged; the bucket's schedule now runs `ahead` past Redis' now.
    Granted { ahead: Duration },
    /// Not now: retry after `wait`. `paused` is non-zero while the bucket is paused.
    Wait {
        wait: Duration,
        ahead: Duration,
        paused: Duration,
    },
}

/// The scheduler's handle on the shared budgets.
pub struct SharedBudgets {
    conn: Arc<RedisConn>,
    admit: Script,
    pause: Script,
    refund: Script,
    /// Share of a bucket's budget a replica uses while Redis cannot decide.
    pub local_fraction: f64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl SharedBudgets {
    pub fn new(conn: Arc<RedisConn>, local_fraction: f64) -> SharedBudgets {
        SharedBudgets {
            conn,
            admit: Script::new(ADMIT),
            pause: Script::new(PAUSE),
            refund: Script::new(REFUND),
            local_fraction,
        }
    }

    /// Whether Redis can decide right now (else the local budget does, at the fraction).
    pub fn is_up(&self) -> bool {
        self.conn.is_up()
    }

    pub fn count(&self, source: &str) {
        self.conn
            .metrics()
            .redis
            .admissions
            .with_label_values(&[source])
            .inc();
    }

    fn keys(&self, key: &BucketKey) -> (String, String) {
        let p = self.conn.prefix();
        let tag = match key {
            BucketKey::Page(id) => format!("{p}{{page:{id}}}"),
            BucketKey::App => format!("{p}{{app}}"),
        };
        (format!("{tag}:tat"), format!("{tag}:pause"))
    }

    /// One GCRA step for `units` at `interval` per unit with `tolerance` of burst. `None`:
    /// Redis could not decide.
    pub async fn admit(
        &self,
        key: &BucketKey,
        units: u32,
        interval: Duration,
        tolerance: Duration,
    ) -> Option<Decision> {
        let (tat, pause) = self.keys(key);
        let script = &self.admit;
        let (i, t) = (micros(interval).max(1), micros(tolerance));
        let r: Vec<i64> = self
            .conn
            .run("admit", |mut c| async move {
                script
                    .key(tat)
                    .key(pause)
                    .arg(i)
                    .arg(units.max(1))
                    .arg(t)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let us = |v: Option<&i64>| Duration::from_micros(v.copied().unwrap_or(0).max(0) as u64);
        match r.first() {
            Some(1) => Some(Decision::Granted {
                ahead: us(r.get(2)),
            }),
            Some(0) => Some(Decision::Wait {
                wait: us(r.get(1)),
                ahead: us(r.get(2)),
                paused: us(r.get(3)),
            }),
            _ => None,
        }
    }

    /// Pauses the bucket for every replica for `d` from now (Redis' now); never shortens a
    /// longer pause.
    pub async fn pause(&self, key: &BucketKey, d: Duration) {
        let (_, pause) = self.keys(key);
        let script = &self.pause;
        let us = micros(d);
        self.conn
            .run("pause", |mut c| async move {
                script.key(pause).arg(us).invoke_async::<i64>(&mut c).await
            })
            .await;
    }

    /// Gives back `units` charged for a call that never went out.
    pub async fn refund(&self, key: &BucketKey, units: u32, interval: Duration) {
        let (tat, _) = self.keys(key);
        let script = &self.refund;
        let back = micros(interval).saturating_mul(u64::from(units));
        self.conn
            .run("refund", |mut c| async move {
                script.key(tat).arg(back).invoke_async::<i64>(&mut c).await
            })
            .await;
    }
}
