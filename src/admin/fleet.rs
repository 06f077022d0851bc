//! The fleet's admin view. With Redis, every replica publishes a small status record (who it
//! is, its in-process cache figures, its busiest Pages) under `{prefix}{fleet}:status:ID`,
//! expiring after the heartbeat's TTL, so a replica that stops leaves the view on its own.
//! The live replicas are listed by the heartbeat's sorted set `{prefix}{fleet}:replicas`
//! (same `{fleet}` hash tag: one Cluster slot), so reading the fleet never scans keys.
//!
//! Records are JSON with a version field: a reader skips a record of another version, and
//! fields it does not know are ignored, so replicas of different versions can share a fleet.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::metrics::{CacheResult, CacheTier, RedisOp};
use crate::proxy::Gateway;
use crate::quota::shared::REPLICA_TTL;
use crate::redis_conn::RedisConn;

/// Version of the record format; readers skip other versions.
pub const RECORD_VERSION: u32 = 1;
/// Pages per record: the busiest, as the local `/admin/pages` orders them.
pub const PAGES_PER_RECORD: usize = 20;
/// At most this many Pages are shown in the fleet's Pages view.
const MAX_PAGES: usize = 100;
/// At most this many replicas are read for one fleet view.
const MAX_REPLICAS: isize = 256;
/// How often a replica publishes its record (well within [`REPLICA_TTL`]).
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// One replica's status as published to Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    /// Stable for the process: the random id the replica's heartbeat uses.
    pub replica: String,
    pub host: String,
    pub pid: u32,
    /// The public URL clients reach this replica at.
    pub public_url: String,
    /// Unix seconds.
    pub started_at: u64,
    pub version: String,
    pub cache: CacheStats,
    pub pages: Vec<PageRow>,
}

/// The in-process cache tier's figures since the process started, and this replica's
/// lookups in the shared tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub shared_hits: u64,
    pub shared_misses: u64,
}

/// One Page (or the app bucket) as this replica sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PageRow {
    pub id: String,
    pub queue_depth: u64,
    pub in_flight: u64,
    pub paused: bool,
    /// Calls this replica's estimate counts in the window.
    pub calls_in_window: u64,
    pub state: String,
}

impl Record {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for anything unreadable or of another format version.
    pub fn decode(raw: &[u8]) -> Option<Record> {
        let r: Record = serde_json::from_slice(raw).ok()?;
        (r.v == RECORD_VERSION).then_some(r)
    }

    /// The replica columns shared by every view.
    fn identity(&self) -> Value {
        json!({
            "replica": self.replica,
            "host": self.host,
            "pid": self.pid,
            "public_url": self.public_url,
            "started_at": self.started_at,
            "version": self.version,
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// When this process started serving (the first time anyone asked).
fn started_at() -> u64 {
    static AT: OnceLock<u64> = OnceLock::new();
    *AT.get_or_init(unix_now)
}

fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".to_string())
    })
}

fn conn(gw: &Gateway) -> Option<&Arc<RedisConn>> {
    gw.cache.shared().map(|s| s.l2.conn())
}

/// This replica's id: the heartbeat's with Redis, else host and pid.
fn replica_id(gw: &Gateway) -> String {
    match conn(gw) {
        Some(c) => format!("{:016x}", c.replica()),
        None => format!("{}-{}", hostname(), std::process::id()),
    }
}

fn status_key(conn: &RedisConn, id: &str) -> String {
    format!("{}{{fleet}}:status:{id}", conn.prefix())
}

fn cache_stats(gw: &Gateway) -> CacheStats {
    let (entries, bytes) = gw.cache.settle();
    let lookups = |tier: CacheTier, result: CacheResult| {
        gw.metrics
            .cache
            .lookups
            .with_label_values(&[tier.as_str(), result.as_str()])
            .get()
    };
    CacheStats {
        entries,
        bytes,
        max_bytes: gw.cache.max_bytes(),
        hits: lookups(CacheTier::L1, CacheResult::Hit),
        misses: lookups(CacheTier::L1, CacheResult::Miss),
        stale: lookups(CacheTier::L1, CacheResult::Stale),
        shared_hits: lookups(CacheTier::L2, CacheResult::Hit),
        shared_misses: lookups(CacheTier::L2, CacheResult::Miss),
    }
}

/// The busiest rows of the local quota status.
fn page_rows(status: &Value) -> Vec<PageRow> {
    let rows = status["pages"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    rows.iter()
        .take(PAGES_PER_RECORD)
        .map(|p| PageRow {
            id: p["id"].as_str().unwrap_or_default().to_string(),
            queue_depth: p["queue_depth"].as_u64().unwrap_or(0),
            in_flight: p["in_flight"].as_u64().unwrap_or(0),
            paused: !p["paused_until"].is_null(),
            calls_in_window: p["estimate"]["calls_in_window"].as_u64().unwrap_or(0),
            state: p["state"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

/// This replica's record, as it is now.
pub fn local_record(gw: &Gateway) -> Record {
    Record {
        v: RECORD_VERSION,
        replica: replica_id(gw),
        host: hostname().to_string(),
        pid: std::process::id(),
        public_url: gw.public_url().to_string(),
        started_at: started_at(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        cache: cache_stats(gw),
        pages: page_rows(&gw.quota.status_of(PAGES_PER_RECORD)),
    }
}

/// Publishes this replica's record every second while Redis is configured; stops (and
/// withdraws the record) when the gateway drains or goes away.
pub fn spawn_publisher(gw: &Arc<Gateway>) {
    started_at();
    if conn(gw).is_none() {
        return;
    }
    let weak = Arc::downgrade(gw);
    tokio::spawn(async move {
        let ttl = u64::try_from(REPLICA_TTL.as_millis()).unwrap_or(3000);
        loop {
            let Some(gw) = weak.upgrade() else { return };
            let Some(conn) = conn(&gw).cloned() else {
                return;
            };
            let key = status_key(&conn, &replica_id(&gw));
            if gw.is_draining() {
                conn.run(RedisOp::Status, |mut c| async move {
                    redis::cmd("DEL").arg(key).query_async::<i64>(&mut c).await
                })
                .await;
                return;
            }
            if conn.is_up() {
                let value = local_record(&gw).encode();
                conn.run(RedisOp::Status, |mut c| async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(ttl)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            }
            drop(gw);
            tokio::time::sleep(PUBLISH_EVERY).await;
        }
    });
}

/// The fleet's records (this replica's own as it is now), or why there are none.
async fn fleet_records(gw: &Gateway, me: &Record) -> Result<Vec<Record>, &'static str> {
    let Some(conn) = conn(gw) else {
        return Err("");
    };
    if !conn.is_up() {
        return Err("Redis is unreachable: this replica's view only");
    }
    let index = format!("{}{{fleet}}:replicas", conn.prefix());
    let ids: Vec<String> = conn
        .run(RedisOp::Status, |mut c| async move {
            // Latest expiry first: the replicas heard from most recently.
            redis::cmd("ZREVRANGE")
                .arg(index)
                .arg(0)
                .arg(MAX_REPLICAS - 1)
                .query_async(&mut c)
                .await
        })
        .await
        .ok_or("Redis did not answer: this replica's view only")?;
    let others: Vec<String> = ids.into_iter().filter(|id| *id != me.replica).collect();
    let mut records = vec![me.clone()];
    if !others.is_empty() {
        let keys: Vec<String> = others.iter().map(|id| status_key(conn, id)).collect();
        let values: Vec<Option<Vec<u8>>> = conn
            .run(RedisOp::Status, |mut c| async move {
                redis::cmd("MGET").arg(keys).query_async(&mut c).await
            })
            .await
            .ok_or("Redis did not answer: this replica's view only")?;
        // Expired (stopped) replicas have no record left and are not shown.
        records.extend(values.iter().flatten().filter_map(|v| Record::decode(v)));
    }
    records.sort_by(|a, b| a.replica.cmp(&b.replica));
    Ok(records)
}

/// Adds `fleet`, the answering replica and, when the fleet could not be read, why.
fn framed(mut body: Value, me: &Record, fleet: Result<(), &str>) -> Value {
    body["fleet"] = json!(fleet.is_ok());
    body["replica"] = json!(me.replica);
    if let Err(why) = fleet {
        if !why.is_empty() {
            body["explanation"] = json!(why);
        }
    }
    body
}

/// `GET /admin/pages?scope=fleet`: per Page, the fleet's shared count and estimate from
/// Redis, and a row per replica that has the Page among its busiest.
pub async fn pages(gw: &Gateway) -> Value {
    let me = local_record(gw);
    let (records, fleet) = match fleet_records(gw, &me).await {
        Ok(r) => (r, Ok(())),
        Err(why) => (vec![me.clone()], Err(why)),
    };
    // The Pages the replicas are busiest with, by their calls together; Redis is asked
    // about at most MAX_PAGES of them (one round trip each).
    let mut calls: HashMap<&str, u64> = HashMap::new();
    for r in &records {
        for p in &r.pages {
            *calls.entry(p.id.as_str()).or_default() += p.calls_in_window;
        }
    }
    let mut ids: Vec<(&str, u64)> = calls.into_iter().collect();
    ids.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    ids.truncate(MAX_PAGES);
    let ids: Vec<String> = ids.into_iter().map(|(id, _)| id.to_string()).collect();
    let shared = if fleet.is_ok() {
        gw.quota.shared_status(&ids).await
    } else {
        None
    };
    let mut rows: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let replicas: Vec<Value> = records
                .iter()
                .filter_map(|r| {
                    let p = r.pages.iter().find(|p| p.id == *id)?;
                    Some(json!({
                        "replica": r.replica,
                        "queue_depth": p.queue_depth,
                        "in_flight": p.in_flight,
                        "paused": p.paused,
                        "calls_in_window": p.calls_in_window,
                        "state": p.state,
                    }))
                })
                .collect();
            json!({
                "id": id,
                "shared": shared.as_ref().and_then(|s| s.get(i)).cloned(),
                "replicas": replicas,
            })
        })
        .collect();
    let total = |v: &Value| {
        v["shared"]["calls_in_window"].as_u64().unwrap_or_else(|| {
            v["replicas"].as_array().map_or(0, |r| {
                r.iter().filter_map(|x| x["calls_in_window"].as_u64()).sum()
            })
        })
    };
    rows.sort_by_key(|r| std::cmp::Reverse(total(r)));
    let replicas: Vec<Value> = records.iter().map(Record::identity).collect();
    let mut body = json!({ "replicas": replicas, "pages": rows });
    if fleet.is_ok() && shared.is_none() {
        body["explanation"] = json!("Redis did not answer for the Pages' shared counts");
    }
    framed(body, &me, fleet)
}

/// `GET /admin/cache`: this replica's cache figures and, with Redis, a row per live
/// replica. The shared tier's size is not given: counting it would mean scanning keys, and
/// the database may hold more than graphgate's keys.
pub async fn cache(gw: &Gateway) -> Value {
    let me = local_record(gw);
    let (records, fleet) = match fleet_records(gw, &me).await {
        Ok(r) => (r, Ok(())),
        Err(why) => (vec![me.clone()], Err(why)),
    };
    let replicas: Vec<Value> = records
        .iter()
        .map(|r| {
            let mut row = r.identity();
            if let (Value::Object(row), Ok(Value::Object(stats))) =
                (&mut row, serde_json::to_value(r.cache))
            {
                row.extend(stats);
            }
            row
        })
        .collect();
    let body = json!({ "cache": me.cache, "replicas": replicas });
    framed(body, &me, fleet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            v: RECORD_VERSION,
            replica: "00ab".into(),
            host: "h1".into(),
            pid: 42,
            public_url: "http://10.0.0.1:8080".into(),
            started_at: 1_700_000_000,
            version: "1.2.3".into(),
            cache: CacheStats {
                entries: 3,
                bytes: 900,
                max_bytes: 1 << 20,
                hits: 7,
                misses: 2,
                stale: 1,
                shared_hits: 4,
                shared_misses: 5,
            },
            pages: vec![PageRow {
                id: "1001".into(),
                queue_depth: 2,
                in_flight: 1,
                paused: true,
                calls_in_window: 17,
                state: "paused".into(),
            }],
        }
    }

    #[test]
    fn a_record_survives_encoding() {
        let r = record();
        assert_eq!(Record::decode(r.encode().as_bytes()), Some(r));
    }

    #[test]
    fn records_of_another_version_or_unreadable_are_skipped() {
        let mut r = record();
        r.v = RECORD_VERSION + 1;
        assert_eq!(Record::decode(r.encode().as_bytes()), None);
        assert_eq!(Record::decode(b"not json"), None);
        assert_eq!(Record::decode(b"{\"v\":1}"), None);
        assert_eq!(Record::decode(&[0xff, 0x00]), None);
    }

    #[test]
    fn unknown_fields_from_newer_replicas_are_ignored() {
        let mut v: Value = serde_json::from_str(&record().encode()).unwrap();
        v["added_later"] = json!({"x": 1});
        v["cache"]["evictions"] = json!(9);
        assert_eq!(
            Record::decode(v.to_string().as_bytes()),
            Some(record()),
            "a newer replica's extra fields must not hide it"
        );
    }

    #[test]
    fn page_rows_take_the_busiest_and_read_leniently() {
        let pages: Vec<Value> = (0..PAGES_PER_RECORD + 5)
            .map(|i| {
                json!({
                    "id": i.to_string(), "queue_depth": 1, "in_flight": 0,
                    "paused_until": null, "estimate": {"calls_in_window": i}, "state": "open",
                })
            })
            .collect();
        let rows = page_rows(&json!({ "pages": pages }));
        assert_eq!(rows.len(), PAGES_PER_RECORD);
        assert_eq!(rows[3].calls_in_window, 3);
        assert!(!rows[0].paused);
        assert!(page_rows(&json!({})).is_empty());
    }
}
