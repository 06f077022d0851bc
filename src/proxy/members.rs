//! Reads answered member by member: `GET /?ids=a,b,c` (members are nodes) and read-only
//! batches (members are operations). Each member shares its entry with the equivalent single
//! read; one engine looks members up (in-process, cut from a stored superset, then Redis),
//! and stores what the one upstream call for the missing members brought back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use super::cached::{assembled_entry, member_fields, reply_from, Caller, Origin, Served, Writer};
use super::{Call, Gateway};
use crate::cache::entry::{Entry, Freshness};
use crate::cache::key::{self, CacheKey, KeyId};
use crate::cache::policy::Directive;
use crate::cache::status::{CacheStatus, Forward, MemberKind, Members};
use crate::cache::{batch, ids, projection, union, Fill, FillKind, FillResult};
use crate::error::ProxyError;
use crate::graph::fields::Fields;
use crate::graph::headers;
use crate::graph::request::Params;
use crate::metrics::CacheResult;
use crate::rewrite::{self, PreparedBody};

/// One member of an `ids=` or batch read (or of a merged node read).
#[derive(Clone)]
pub(super) struct Member {
    pub key: CacheKey,
    /// Zero: never looked up or stored (a `[[cache.rules]]` TTL of 0).
    pub ttl: Duration,
    /// The member's fields and base key, when it may be cut from stored supersets and is
    /// noted for them once stored.
    pub projection: Option<(Fields, KeyId)>,
}

impl Gateway {
    /// A member of an `ids=` or batch read: its key, TTL and, for `ids=` members with
    /// `project_fields`, what it may be cut from.
    pub(super) fn member(
        &self,
        version: &str,
        segments: &[String],
        params: &Params,
        identity: &str,
        projectable: bool,
    ) -> Result<Member, ProxyError> {
        let key = key::build(version, segments, params, identity)
            .map_err(|e| ProxyError::BadRequest(format!("Invalid fields: {e}.")))?;
        let ttl = self.cache.policy.ttl_for(&key.rule_path);
        let projection = (projectable && self.cache.project_fields)
            .then(|| member_fields(params))
            .flatten()
            .and_then(|f| key::base_of(version, segments, params, identity).map(|b| (f, b)));
        Ok(Member {
            key,
            ttl,
            projection,
        })
    }

    /// Looks members up: a fresh successful entry in-process (or one cut from a stored reply
    /// for more of the node's fields), else, for what that tier lacks, the Redis tier, all at
    /// once. Each member comes back with the Redis epoch its lookup read (to store what is
    /// fetched for it). A member with a TTL of 0 is never looked up.
    pub(super) async fn lookup_members(
        &self,
        members: &[Member],
        directive: Directive,
    ) -> Result<Vec<(Option<Arc<Entry>>, Option<String>)>, ProxyError> {
        let serve = directive == Directive::Normal;
        let now = Instant::now();
        let mut found: Vec<(Option<Arc<Entry>>, Option<String>)> =
            Vec::with_capacity(members.len());
        for m in members {
            let mut hit = None;
            if serve && !m.ttl.is_zero() {
                hit = self
                    .cache
                    .get(&m.key)
                    .filter(|e| {
                        e.status.is_success()
                            && e.freshness(now, Duration::ZERO, Duration::ZERO) == Freshness::Fresh
                    })
                    .map(Arc::new);
                if let (None, Some((want, base))) = (&hit, &m.projection) {
                    hit = self.project_stored(&m.key, want, *base, now)?;
                }
            }
            self.cache.count(if hit.is_some() {
                CacheResult::Hit
            } else {
                CacheResult::Miss
            });
            found.push((hit, None));
        }
        // What the in-process tier lacks may be in the Redis tier (another replica's fill).
        let lacking: Vec<usize> = (0..members.len())
            .filter(|&i| found[i].0.is_none() && !members[i].ttl.is_zero())
            .collect();
        let lacking_keys: Vec<&CacheKey> = lacking.iter().map(|&i| &members[i].key).collect();
        let shared = self.shared_members(&lacking_keys, serve).await;
        for (&i, looked) in lacking.iter().zip(shared) {
            found[i] = looked;
        }
        Ok(found)
    }

    /// Stores a member fetched for an `ids=`, batch or merged read (`epoch`: the node's write
    /// epoch read before the call): in-process, in Redis with the epoch its lookup read, and
    /// in the projection index.
    pub(super) async fn store_member(
        &self,
        m: &Member,
        entry: &Entry,
        epoch: u64,
        l2_epoch: Option<&String>,
    ) {
        if m.ttl.is_zero() || !self.cache.store(&m.key, entry, epoch) {
            return;
        }
        if let Some((fields, base)) = &m.projection {
            self.cache
                .projections
                .id_habit
                .learn_from_entry(fields, entry);
            self.cache
                .projections
                .record(*base, fields.clone(), m.key.id);
        }
        if let Some(l2_epoch) = l2_epoch {
            self.cache.store_shared(&m.key, entry, l2_epoch).await;
        }
    }

    /// `GET /?ids=a,b,c`: ids with a fresh per-node entry are answered locally, the rest go
    /// upstream as one `ids=` call whose members are stored per node.
    pub(super) async fn ids_read(
        self: &Arc<Self>,
        call: &Call,
        version: &str,
        directive: Directive,
        caller: &Caller<'_>,
    ) -> Result<Served, ProxyError> {
        let wanted = ids::unique(&call.ids);
        let mut node_params = call.params.clone();
        node_params.remove("ids");
        let identity = self.tokens.identity_for(None);
        let nodes: Vec<Member> = wanted
            .iter()
            .map(|id| {
                self.member(
                    version,
                    std::slice::from_ref(id),
                    &node_params,
                    &identity,
                    true,
                )
            })
            .collect::<Result<_, _>>()?;
        let (have, mut l2_epochs): (Vec<Option<Arc<Entry>>>, Vec<Option<String>>) = self
            .lookup_members(&nodes, directive)
            .await?
            .into_iter()
            .unzip();
        let lacking: Vec<usize> = (0..wanted.len()).filter(|&i| have[i].is_none()).collect();
        let hits = wanted.len() - lacking.len();
        let members = Members {
            kind: MemberKind::Ids,
            hits,
            total: wanted.len(),
        };

        if lacking.is_empty() {
            let bodies = wanted
                .iter()
                .zip(&have)
                .filter_map(|(id, e)| e.as_ref().map(|e| Ok((id.as_str(), e.body()?))))
                .collect::<Result<Vec<_>, ProxyError>>()?;
            let parts: Vec<(&str, &PreparedBody)> = bodies.iter().map(|(id, b)| (*id, b)).collect();
            let first = have.iter().flatten().next().cloned();
            let headers = first
                .map(|e| e.headers.clone())
                .unwrap_or_else(|| Vec::new().into());
            let entry = assembled_entry(headers, ids::assemble(&parts)?);
            let status = CacheStatus::MembersHit(members);
            return Ok(Served {
                response: reply_from(&entry, caller, status, None, Origin::Assembled)?,
                cache: status.result(),
                upstream_ms: None,
            });
        }

        // A member whose node a single read is fetching (its fields covered) waits for that
        // call; the rest go upstream in one `ids=` call, coalesced with identical ones.
        let mut joined = Vec::new();
        let mut missing = Vec::new();
        for i in lacking {
            let waiter = nodes[i]
                .projection
                .as_ref()
                .filter(|_| directive == Directive::Normal)
                .and_then(|(want, base)| union::join_covering(&self.cache.unions, *base, want));
            match waiter {
                Some(w) => joined.push((i, w)),
                None => missing.push(i),
            }
        }
        let started = Instant::now();
        let deadline = self.fill_deadline();
        let fetch = async {
            if missing.is_empty() {
                return Ok(None);
            }
            let batch = missing
                .iter()
                .map(|&i| (nodes[i].clone(), l2_epochs[i].take()));
            self.fetch_ids(call, version, &identity, batch.collect())
                .await
                .map(Some)
        };
        let wait = futures_util::future::join_all(
            joined
                .into_iter()
                .map(|(i, w)| async move { (i, w.wait(deadline).await) }),
        );
        let (fetched, waited) = tokio::join!(fetch, wait);
        let fetched = fetched?;
        let mut bodies: Vec<Option<PreparedBody>> = have
            .iter()
            .map(|h| h.as_ref().map(|e| e.body()).transpose())
            .collect::<Result<_, _>>()?;
        let mut collapsed = waited.iter().any(|(_, r)| r.is_ok());
        let mut headers = None;
        if let Some((fill, was_collapsed)) = &fetched {
            collapsed |= *was_collapsed;
            let Some(pieces) = fill
                .pieces
                .as_ref()
                .filter(|_| fill.entry.status.is_success())
            else {
                // Graph's error (one bad id fails the whole request) is handed on as it is.
                let status = CacheStatus::Forwarded {
                    fwd: Forward::Miss,
                    fwd_status: fill.entry.status.as_u16(),
                    stored: false,
                    collapsed,
                };
                return Ok(Served {
                    response: reply_from(
                        &fill.entry,
                        caller,
                        status,
                        None,
                        Origin::Fetched(fill.hold.clone()),
                    )?,
                    cache: status.result(),
                    upstream_ms: Some(started.elapsed().as_millis()),
                });
            };
            for &i in &missing {
                bodies[i] = pieces
                    .iter()
                    .find(|(pid, _)| *pid == wanted[i])
                    .map(|(_, b)| b.clone());
            }
            headers = Some(fill.entry.headers.clone());
        }
        // A joined call that failed, or whose reply cannot be cut down: fetched after all.
        let mut again = Vec::new();
        for (i, result) in waited {
            let Some((want, _)) = &nodes[i].projection else {
                continue;
            };
            let cut = match result {
                Ok(Ok((union, fill))) if fill.entry.status.is_success() => {
                    let body = fill.entry.body()?;
                    if union == want.normalized() {
                        Some(body)
                    } else {
                        let id_habit = &self.cache.projections.id_habit;
                        projection::project(&body, &union, want, id_habit)
                    }
                }
                _ => None,
            };
            match cut {
                Some(body) => bodies[i] = Some(body),
                None => again.push((nodes[i].clone(), None)),
            }
        }
        if !again.is_empty() {
            let ids: Vec<String> = again
                .iter()
                .filter_map(|(m, _)| m.key.node.as_deref().map(str::to_string))
                .collect();
            let (fill, _) = self.fetch_ids(call, version, &identity, again).await?;
            match fill
                .pieces
                .as_ref()
                .filter(|_| fill.entry.status.is_success())
            {
                Some(pieces) => {
                    for (i, id) in wanted.iter().enumerate() {
                        if bodies[i].is_none() && ids.contains(id) {
                            bodies[i] =
                                pieces.iter().find(|(p, _)| p == id).map(|(_, b)| b.clone());
                        }
                    }
                }
                None => {
                    return Err(ProxyError::UpstreamBadResponse(format!(
                        "the ids= call for {} member(s) failed with {}",
                        ids.len(),
                        fill.entry.status
                    )))
                }
            }
            headers = headers.or(Some(fill.entry.headers.clone()));
        }
        let upstream_ms = Some(started.elapsed().as_millis());
        let mut parts: Vec<(&str, &PreparedBody)> = Vec::with_capacity(wanted.len());
        for (id, body) in wanted.iter().zip(&bodies) {
            match body {
                Some(b) => parts.push((id.as_str(), b)),
                None => {
                    return Err(ProxyError::UpstreamBadResponse(format!(
                        "the ids= reply has no member for a requested id ({} of {})",
                        wanted.len() - hits,
                        wanted.len()
                    )))
                }
            }
        }
        let headers = headers
            .or_else(|| have.iter().flatten().next().map(|e| e.headers.clone()))
            .unwrap_or_else(|| Vec::new().into());
        let entry = assembled_entry(headers, ids::assemble(&parts)?);
        let status = CacheStatus::MembersFetched {
            fwd: if hits > 0 {
                Forward::Partial
            } else {
                Forward::Miss
            },
            fwd_status: 200,
            members,
            collapsed,
        };
        Ok(Served {
            response: reply_from(&entry, caller, status, None, Origin::Assembled)?,
            cache: status.result(),
            upstream_ms,
        })
    }

    /// One `ids=` call for `nodes` (coalesced with an identical one in flight); each member
    /// fetched is stored per node. Returns the fill and whether it was another request's.
    async fn fetch_ids(
        self: &Arc<Self>,
        call: &Call,
        version: &str,
        identity: &str,
        nodes: Vec<(Member, Option<String>)>,
    ) -> Result<(Fill, bool), ProxyError> {
        let ids: Vec<String> = nodes
            .iter()
            .filter_map(|(m, _)| m.key.node.as_deref().map(str::to_string))
            .collect();
        let mut sub = call.clone();
        sub.params.set("ids", ids.join(","));
        // The quota charges one unit per id sent, not per id asked for.
        sub.ids = ids;
        let sub_key = key::build(version, &[], &sub.params, identity)
            .map_err(|e| ProxyError::BadRequest(format!("Invalid fields: {e}.")))?;
        let gw = self.clone();
        let version = version.to_string();
        self.coalesced(sub_key.id, Writer::Spawned, move || async move {
            gw.fill_ids(sub, &version, nodes).await
        })
        .await
    }

    /// The `ids=` call for the members no tier had; each member's reply is stored as its
    /// node's single read would be (see [`Gateway::store_member`]).
    pub(super) async fn fill_ids(
        &self,
        call: Call,
        version: &str,
        nodes: Vec<(Member, Option<String>)>,
    ) -> FillResult {
        let epochs: Vec<u64> = nodes
            .iter()
            .map(|(m, _)| self.cache.epoch(&m.key))
            .collect();
        let reply = self.forward(&call, version, true).await?;
        let prepared = rewrite::prepare(
            reply.body.clone(),
            false,
            &self.public_url,
            &self.tokens.secrets(),
        )?;
        let pieces = if reply.status.is_success() {
            ids::split(&prepared)
        } else {
            None
        };
        let node_headers = headers::member_stored(reply.headers.iter().cloned());
        if let Some(pieces) = &pieces {
            for ((m, l2_epoch), epoch) in nodes.iter().zip(epochs) {
                let Some(node) = m.key.node.as_deref() else {
                    continue;
                };
                let Some((_, body)) = pieces.iter().find(|(id, _)| id == node) else {
                    continue;
                };
                let e = Entry::new(reply.status, node_headers.clone(), body.clone(), m.ttl);
                self.store_member(m, &e, epoch, l2_epoch.as_ref()).await;
            }
        }
        let kind = if reply.status.is_success() {
            FillKind::Fetched
        } else {
            FillKind::Passed
        };
        Ok(Fill {
            entry: Arc::new(Entry::new(
                reply.status,
                reply.headers,
                prepared,
                Duration::ZERO,
            )),
            kind,
            pieces: pieces.map(Arc::new),
            hold: reply.hold,
        })
    }

    /// A read-only batch: operations with a fresh entry are answered locally, the rest go
    /// upstream as one smaller batch (not coalesced: batches rarely repeat exactly), whose
    /// successful operations are stored per operation; elements are merged in request order.
    pub(super) async fn batch_read(
        &self,
        call: &Call,
        version: &str,
        directive: Directive,
        caller: &Caller<'_>,
    ) -> Result<Served, ProxyError> {
        let ops = call.batch.as_deref().unwrap_or_default();
        let include_headers = call.params.get("include_headers") != Some("false");
        // Batch operations run with the system token (see `upstream_batch`).
        let identity = self.tokens.identity_for(None);
        let op_members: Vec<Member> = ops
            .iter()
            .map(|op| {
                let op_version = op.path.version.as_deref().unwrap_or(version);
                self.member(
                    op_version,
                    &op.path.segments,
                    &op.all_params(),
                    &identity,
                    false,
                )
            })
            .collect::<Result<_, _>>()?;
        let (have, l2_epochs): (Vec<Option<PreparedBody>>, Vec<Option<String>>) = self
            .lookup_members(&op_members, directive)
            .await?
            .into_iter()
            .map(|(e, l2)| (e.and_then(|e| batch::element(&e, include_headers)), l2))
            .unzip();
        let missing: Vec<usize> = (0..ops.len()).filter(|&i| have[i].is_none()).collect();
        let hits = ops.len() - missing.len();
        let members = Members {
            kind: MemberKind::Batch,
            hits,
            total: ops.len(),
        };
        if missing.is_empty() {
            let parts: Vec<&PreparedBody> = have.iter().flatten().collect();
            let entry = assembled_entry(Vec::new().into(), batch::assemble(&parts)?);
            let status = CacheStatus::MembersHit(members);
            return Ok(Served {
                response: reply_from(&entry, caller, status, None, Origin::Assembled)?,
                cache: status.result(),
                upstream_ms: None,
            });
        }

        let mut sub = call.clone();
        sub.batch = Some(missing.iter().map(|&i| ops[i].clone()).collect());
        let epochs: Vec<u64> = missing
            .iter()
            .map(|&i| self.cache.epoch(&op_members[i].key))
            .collect();
        let started = Instant::now();
        let reply = self.forward(&sub, version, true).await?;
        let upstream_ms = Some(started.elapsed().as_millis());
        let prepared = rewrite::prepare(
            reply.body.clone(),
            true,
            &self.public_url,
            &self.tokens.secrets(),
        )?;
        let status = reply.status;
        let parts = if status.is_success() {
            batch::split(&prepared).filter(|p| p.len() == missing.len())
        } else {
            None
        };
        let Some(parts) = parts else {
            if status.is_success() {
                return Err(ProxyError::UpstreamBadResponse(
                    "the batch reply does not match the operations sent".into(),
                ));
            }
            // A whole-batch error from Graph is handed on as it is.
            let entry = Entry::new(status, reply.headers, prepared, Duration::ZERO);
            let cs = CacheStatus::Forwarded {
                fwd: Forward::Miss,
                fwd_status: status.as_u16(),
                stored: false,
                collapsed: false,
            };
            return Ok(Served {
                response: reply_from(&entry, caller, cs, None, Origin::Fetched(reply.hold))?,
                cache: cs.result(),
                upstream_ms,
            });
        };
        for ((&i, part), epoch) in missing.iter().zip(&parts).zip(epochs) {
            if let Some((body, etag)) = &part.ok_body {
                let m = &op_members[i];
                let e = Entry::new(
                    StatusCode::OK,
                    batch::entry_headers(etag.clone()),
                    body.clone(),
                    m.ttl,
                );
                self.store_member(m, &e, epoch, l2_epochs[i].as_ref()).await;
            }
        }
        let mut fetched = parts.iter();
        let mut elements: Vec<&PreparedBody> = Vec::with_capacity(ops.len());
        for hit in &have {
            match hit {
                Some(e) => elements.push(e),
                None => match fetched.next() {
                    Some(p) => elements.push(&p.element),
                    None => {
                        return Err(ProxyError::Internal(
                            "batch merge ran out of replies".into(),
                        ))
                    }
                },
            }
        }
        let entry = assembled_entry(reply.headers.into(), batch::assemble(&elements)?);
        let cs = CacheStatus::MembersFetched {
            fwd: if hits > 0 {
                Forward::Partial
            } else {
                Forward::Miss
            },
            fwd_status: status.as_u16(),
            members,
            collapsed: false,
        };
        Ok(Served {
            response: reply_from(&entry, caller, cs, None, Origin::Assembled)?,
            cache: cs.result(),
            upstream_ms,
        })
    }
}
