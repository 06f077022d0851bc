//! Page budgets shared by every replica: the same state as a local [`super::budget::Budget`]
//! (the sliding-window count as sub-bucket counters, the latest reading, the learned limit
//! bounds, pause and probe) lives in one Redis hash per bucket, and one Lua script per
//! admission decides "may these units go now, or when", atomically and with Redis `TIME` as
//! the clock: N replicas together admit no more than one would, and the replicas' own clocks
//! never matter. Each reply's reading (and any throttle) is written back by a second script.
//!
//! The group of calls in flight together (see [`super::budget`]) is the fleet's too: every
//! call that ends, with a reply or without (failed, cancelled, never sent), tells the scripts,
//! so a burst spread over several replicas proves as much about the limit as one replica's.
//!
//! Queues, priorities and fairness stay local; only the decision moves to Redis.
//!
//! Keys: `{prefix}{page:ID}:q` (or `{prefix}{app}:q`): one hash, one Redis Cluster slot per
//! bucket, expiring two windows after its last use. Sub-bucket counters are fields `s<index>`
//! that the scripts drop as they leave the window; times are microseconds of Redis' clock.
//!
//! The fleet: every replica adds itself to `{prefix}{fleet}:replicas` (a sorted set scored
//! by expiry) every [`FLEET_TICK`]; while Redis is unreachable a replica decides alone on
//! `1 / replicas last seen alive` of every budget (`redis.local_budget_fraction` overrides
//! it). The same tick reads `{prefix}{fleet}:app_pause`, set by a replica that saw an
//! app-level throttle, so every replica's app gate closes.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::Script;

use super::attribution::BucketKey;
use super::budget::{regain_duration, Limits, Observation, Reason};
use crate::metrics::{AdmissionSource, RedisOp};
use crate::redis_conn::RedisConn;

/// How often a replica announces itself and reads the fleet's app pause.
pub const FLEET_TICK: Duration = Duration::from_millis(250);
/// A replica not heard from for this long no longer counts as alive.
pub const REPLICA_TTL: Duration = Duration::from_secs(3);
/// A fleet probe (or blind call) whose replica never reported back stops counting after this.
const PROBE_TTL: Duration = Duration::from_secs(10);

/// Shared by the scripts: state loading and saving, expiry of sub-buckets, the estimate and
/// when room appears (the same rules as `budget.rs`).
const PRELUDE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local tt = redis.call('TIME')
local now = tonumber(tt[1]) * 1000000 + tonumber(tt[2])
local SLOTS = 128
-- Readings lower the limit below the guess only when their bounds agree within this factor
-- (budget.rs: TIGHT_BOUNDS): wide bounds mean a burst was in flight or other apps use the Page.
local TIGHT_BOUNDS = 2
-- A group's lower bound this far above the upper bounds shows other apps use the Page
-- (budget.rs: OTHERS_MARGIN); closer, the upper bound stands.
local OTHERS_MARGIN = 1.1
-- Points a group of calls must move the usage for the move to bound the limit
-- (budget.rs: MIN_SLOPE_PCT).
local MIN_SLOPE_PCT = 5
-- The reading a group's move starts from is at most a window over this old
-- (budget.rs: MAX_BASE_AGE_DIVISOR).
local MAX_BASE_AGE_DIVISOR = 20
local FIELDS = {'t','o','rp','ro','ra','rr','rsyn','bl1','bu1','bl0','bu0','bq1','bq0','bs','bo','pu','pa','n','pr','px','ps','la','seq','fl','fx','mg','gs','gi','gn','gr','gp','gl','gz','gb','gc','gq','su','rh','rc'}

local function load()
  local v = redis.call('HMGET', key, unpack(FIELDS))
  local S = {}
  for i, f in ipairs(FIELDS) do S[f] = tonumber(v[i]) end
  S.t = S.t or 0; S.n = S.n or 0; S.pr = S.pr or 0; S.seq = S.seq or 0; S.fl = S.fl or 0
  S.mg = S.mg or 0; S.su = S.su or 0
  S.gs = S.gs or 0; S.gi = S.gi or 0; S.gn = S.gn or 0; S.gr = S.gr or 0; S.gp = S.gp or 0
  return S
end

local function params(i)
  local P = {}
  P.guess = math.max(tonumber(ARGV[i]), 1)
  P.learn = tonumber(ARGV[i + 1]) == 1
  local headroom = tonumber(ARGV[i + 2])
  P.W = math.max(tonumber(ARGV[i + 4]), 1000)
  P.slot = math.max(math.floor(P.W / SLOTS), 1)
  P.ceiling = math.min(math.max(100 - headroom, 1), 100)
  P.threshold = math.min(math.max(tonumber(ARGV[i + 3]), 0), P.ceiling)
  return P
end

local function save(S, P)
  local args = {}
  for _, f in ipairs(FIELDS) do
    if S[f] ~= nil then
      args[#args + 1] = f
      args[#args + 1] = string.format('%.17g', S[f])
    end
  end
  redis.call('HSET', key, unpack(args))
  local keep = 2 * P.W + P.slot
  if S.pu ~= nil and S.pu - now > keep then keep = S.pu - now end
  redis.call('PEXPIRE', key, math.floor(keep / 1000) + 1000)
end

-- A sub-bucket's calls leave at its end plus the window plus the margin (a recent one-way
-- trip to Meta).
local function expire(S, P)
  local cutoff = math.floor((now - P.W - S.mg) / P.slot)
  if S.o == nil or S.o >= cutoff then return end
  local last = math.min(cutoff - 1, S.o + SLOTS + 2)
  local names = {}
  for i = S.o, last do names[#names + 1] = 's' .. i end
  local vals = redis.call('HMGET', key, unpack(names))
  for _, v in ipairs(vals) do
    if v then S.t = S.t - tonumber(v) end
  end
  redis.call('HDEL', key, unpack(names))
  if S.t < 0 or cutoff - S.o > SLOTS + 2 then S.t = 0 end
  S.o = cutoff
end

local function fresh(S, P)
  return S.ra ~= nil and S.rp ~= nil and now - S.ra < P.W
end

-- Limit bounds over the readings of the current period and the one before (a window each):
-- lower (0: none), upper (-1: none) and the lower bound from how far a group moved the usage
-- (bq, 0: none; budget.rs: learn_slope).
local function clear_bounds(S)
  S.bl1 = 0; S.bu1 = -1; S.bl0 = 0; S.bu0 = -1; S.bq1 = 0; S.bq0 = 0; S.bs = now
end

local function roll(S, P)
  if S.bs == nil then return end
  local age = now - S.bs
  if age >= 2 * P.W then
    clear_bounds(S)
  elseif age >= P.W then
    S.bl0 = S.bl1; S.bu0 = S.bu1; S.bq0 = S.bq1 or 0; S.bl1 = 0; S.bu1 = -1; S.bq1 = 0
    S.bs = now
  end
end

local function min_upper(a, b)
  if a == nil or a < 0 then return b or -1 end
  if b == nil or b < 0 then return a end
  return math.min(a, b)
end

local function bounds(S, P)
  roll(S, P)
  local lower = math.max(S.bl1 or 0, S.bl0 or 0)
  if lower <= 0 then return nil, nil, 0 end
  return lower, min_upper(S.bu1, S.bu0), math.max(S.bq1 or 0, S.bq0 or 0)
end

local function limit(S, P)
  local g = P.guess
  local lower, upper, slope = bounds(S, P)
  if lower ~= nil then
    if upper >= 0 and g > upper and upper <= TIGHT_BOUNDS * lower then return math.max(lower, 1), 1 end
    if g < lower and P.learn then return lower, 2 end
    -- The fleet's calls moved the usage as a limit under half the guess would.
    if slope > 0 and g > TIGHT_BOUNDS * slope and lower < g then return math.max(slope, lower, 1), 1 end
  end
  return g, 0
end

local function count_limit(L, P)
  if P.learn then return math.max(P.guess, L) end
  return P.guess
end

local function estimate(S, P)
  local L, src = limit(S, P)
  local est = 100 * S.t / count_limit(L, P)
  if fresh(S, P) then
    local r = S.rp + 100 * (S.t - S.ro) / L
    if r > est then est = r end
  end
  if est < 0 then est = 0 end
  return est, L, src
end

local function releases(S, P)
  local out = {}
  if S.o == nil or S.t <= 0 then return out end
  local cur = math.floor(now / P.slot)
  local names = {}
  for i = S.o, math.min(cur, S.o + SLOTS + 2) do names[#names + 1] = 's' .. i end
  if #names == 0 then return out end
  local vals = redis.call('HMGET', key, unpack(names))
  for j, v in ipairs(vals) do
    if v then out[#out + 1] = {(S.o + j) * P.slot + P.W + S.mg, tonumber(v)} end
  end
  return out
end

local function first_release(S, P)
  local t = nil
  if S.o ~= nil and S.t > 0 then
    local cur = math.floor(now / P.slot)
    for i = S.o, math.min(cur, S.o + SLOTS + 2) do
      if redis.call('HEXISTS', key, 's' .. i) == 1 then
        S.o = i
        t = (i + 1) * P.slot + P.W + S.mg
        break
      end
    end
  end
  if fresh(S, P) then
    local e = S.ra + P.W
    if t == nil or e < t then t = e end
  end
  return t
end

local function sum_slots(S, a, b)
  local total = 0
  if S.o == nil then return 0 end
  if a < S.o then a = S.o end
  if b > S.o + SLOTS + 2 then b = S.o + SLOTS + 2 end
  if b < a then return 0 end
  local names = {}
  for i = a, b do names[#names + 1] = 's' .. i end
  for _, v in ipairs(redis.call('HMGET', key, unpack(names))) do
    if v then total = total + tonumber(v) end
  end
  return total
end

-- The fleet's group (budget.rs: Group): its calls in flight together, from one granted while
-- none was until the last of them ends. gs: start (0: none), gi: units in flight, gn: sent,
-- gr: read (an unthrottled reading came back), gp: the highest reading, gl: the last grant
-- or end, gz: 1 when it started while calls of an abandoned group could still be in flight.
-- A call is the group's when it was granted at or after gs.
local function in_group(S, at)
  return S.gs > 0 and at >= S.gs
end

-- A call ended without a reading (`uncount`: it never went out).
local function leave_group(S, at, units, uncount)
  if units <= 0 or not in_group(S, at) then return end
  S.gi = math.max(S.gi - units, 0)
  if uncount then S.gn = math.max(S.gn - units, 0) end
  S.gl = now
end

-- A call's reply: for the group's last, when every call of the group brought a reading and
-- the group is younger than a window, the lower bound of the limit it proves (else 0): Meta
-- counted every one of our calls before it answered the last, whoever else uses the Page.
local function group_reply(S, P, at, units, pct, calls, read)
  if units <= 0 or not in_group(S, at) then return 0 end
  S.gi = math.max(S.gi - units, 0)
  S.gl = now
  if read then
    S.gr = S.gr + units
    if pct > S.gp then S.gp = pct end
    if calls > (S.gq or 0) then S.gq = calls end
  end
  if S.gi > 0 then return 0 end
  local lower = 0
  if S.gr >= S.gn and S.gn > 0 and now - S.gs + S.mg < P.W then
    local counted = S.gn
    if S.gz ~= 1 then
      -- No call of ours was in flight when the group started: all of them in the window count.
      local gone = sum_slots(S, S.o, math.floor((now + S.mg - P.W) / P.slot))
      counted = math.max(S.t - gone, S.gn)
    end
    lower = 100 * counted / (math.floor(S.gp) + 1)
    -- How far the group moved call_count from the reading in force when it started
    -- (call_count leading at both ends; rounded readings: the true move is below moved + 1.5).
    local gq = S.gq or 0
    local moved = math.floor(gq) - math.floor(S.gb or -1)
    if S.gz ~= 1 and (S.gb or -1) >= 0 and gq >= S.gp and moved >= MIN_SLOPE_PCT
        and counted > (S.gc or 0) then
      roll(S, P)
      if S.bs == nil then clear_bounds(S) end
      S.bq1 = math.max(S.bq1 or 0, 100 * (counted - (S.gc or 0)) / (moved + 1.5))
    end
  end
  S.gs = 0
  return lower
end

local function time_until_room(S, P, units, decay)
  local L = limit(S, P)
  local cl = count_limit(L, P)
  local extra = 100 * (units - 1) / L
  local reading = fresh(S, P)
  local e = nil
  local unexplained = 0
  if reading then
    e = S.ra + P.W
    unexplained = S.rp - 100 * S.ro / L
  end
  local ours = S.t
  local start = now
  local rel = releases(S, P)
  local k = 1
  while true do
    local nxt = nil
    if rel[k] then nxt = rel[k][1] end
    local on = e ~= nil and start < e
    local seg_end = nxt
    if on and (seg_end == nil or e < seg_end) then seg_end = e end
    if 100 * ours / cl + extra < P.ceiling then
      if not on then return start end
      local need = P.ceiling - extra - 100 * ours / L
      if not decay then
        if unexplained < need then return start end
      else
        local u = math.max(unexplained, 0)
        if u < need then return start end
        if need > 0 then
          local f = 1 - need / u
          if f < 0 then f = 0 elseif f > 1 then f = 1 end
          local t = S.ra + P.W * f
          if seg_end == nil or t < seg_end then return math.max(t, start) end
        end
      end
    end
    if nxt ~= nil and ((not on) or nxt <= e) then
      ours = ours - rel[k][2]
      k = k + 1
      if nxt > start then start = nxt end
    elseif on then
      start = e
    else
      return start + P.W
    end
  end
end
";

/// ARGV: units, guess, learn, headroom %, threshold %, window µs, probe TTL µs.
/// Returns {granted, wait µs, reason, ours, seq, at µs, probe, usage ×1000, limit ×1000,
/// calls in window, paused µs, blind, ours_low, µs until the oldest calls leave (holds only),
/// units the fleet sent so far (grants only)}.
const ADMIT: &str = r"
local units = math.max(tonumber(ARGV[1]), 1)
local P = params(2)
-- A probe (or blind call) whose verdict never reaches Redis stops holding the bucket after a
-- few round trips (at least a second, at most the configured TTL); a group whose calls stop
-- ending is given up after the whole TTL.
local group_ttl = tonumber(ARGV[7])
local S = load()
local probe_ttl = math.min(math.max(8 * S.mg, 1000000), group_ttl)
expire(S, P)
local est, L = estimate(S, P)
local recheck = math.min(math.max(P.slot, 10000), 250000)

local function join_group()
  -- A group whose calls stopped ending (a replica gone, a reading never written back) is
  -- given up; calls of it may still be in flight, so the next one counts only its own.
  local stale = S.gi > 0 and (now - S.gl > group_ttl or now - S.gs >= P.W)
  if S.gs <= 0 or S.gi <= 0 or stale then
    S.gs = now; S.gi = 0; S.gn = 0; S.gr = 0; S.gp = 0; S.gq = 0
    if stale then S.gz = 1 else S.gz = 0 end
    -- The reading in force (its call_count, the most of ours it can have counted): where the
    -- group's move starts; only a recent one led by call_count.
    if fresh(S, P) and S.rsyn ~= 1 and S.rh ~= nil and S.rc ~= nil and S.rc >= S.rp
        and now - S.ra <= P.W / MAX_BASE_AGE_DIVISOR then
      S.gb = S.rc; S.gc = S.rh
    else
      S.gb = -1; S.gc = 0
    end
  end
  S.gi = S.gi + units
  S.gn = S.gn + units
  S.gl = now
end

local function grant(probe)
  S.seq = S.seq + 1
  join_group()
  local idx = math.floor(now / P.slot)
  redis.call('HINCRBY', key, 's' .. idx, units)
  if S.o == nil or S.t <= 0 then S.o = idx end
  local blind = 0
  if not fresh(S, P) then
    if S.fx == nil or S.fx <= now then S.fl = 0 end
    S.fl = S.fl + units
    S.fx = now + probe_ttl
    blind = 1
  end
  S.t = S.t + units
  S.su = S.su + units
  S.la = now
  local p = 0
  if probe then S.pr = 2; S.px = now + probe_ttl; S.ps = S.seq; p = 1 end
  -- Calls Meta surely still counts when this one arrives; for learning the limit, with a
  -- whole round trip for it to arrive and without those sent within the last round trip
  -- (they may arrive after it).
  local gone = sum_slots(S, S.o, math.floor((now + S.mg - P.W) / P.slot))
  local ours = math.max(S.t - gone, units)
  local gone_late = sum_slots(S, S.o, math.floor((now + 2 * S.mg - P.W) / P.slot))
  local recent = sum_slots(S, math.floor((now - 2 * S.mg) / P.slot), idx) - units
  local ours_low = math.max(S.t - gone_late - math.max(recent, 0), units)
  save(S, P)
  return {1, 0, 0, ours, S.seq, now, p, math.floor((est + 100 * units / L) * 1000), math.floor(L * 1000), S.t, 0, blind, ours_low, 0, S.su}
end

local function hold(wait, reason)
  -- Until the fleet's oldest counted calls start leaving the window: a replica predicts
  -- from it how long the calls queued behind this one wait.
  local horizon = P.W
  local nr = first_release(S, P)
  if nr ~= nil then horizon = math.max(nr - now, 0) end
  save(S, P)
  local paused = 0
  if S.pu ~= nil and S.pu > now then paused = S.pu - now end
  return {0, math.floor(math.max(wait, 1000)), reason, S.t, S.seq, now, 0, math.floor(est * 1000), math.floor(L * 1000), S.t, math.floor(paused), 0, S.t, math.floor(horizon)}
end

if S.pu ~= nil and S.pu > now then return hold(S.pu - now, 1) end
if S.pr == 2 then
  if S.px ~= nil and S.px > now then return hold(recheck, 2) end
  S.pr = 1
end
if S.pr == 1 then return grant(true) end
-- Blind calls (sent before the window's first reading) still out.
local fl = 0
if S.fx ~= nil and S.fx > now then fl = S.fl end
if not fresh(S, P) then
  local blind = math.max(1, math.floor(P.guess / 100))
  if fl > 0 and fl + units > blind then return hold(recheck, 3) end
elseif fl > 0 then
  -- The window's first calls are all back before more go (budget.rs: BlindCalls): the first
  -- reply counts only its own call, and the limit is known once their group is answered.
  return hold(recheck, 3)
end
local per = 100 / L
local last = est + per * (units - 1)
if est < P.threshold and last < P.ceiling then return grant(false) end
if last < P.ceiling then
  local room = math.max((P.ceiling - est) / per, 1)
  local nr = first_release(S, P)
  local horizon = P.W
  if nr ~= nil then horizon = math.max(nr - now, 0) end
  local spacing = horizon / room * units
  if S.la ~= nil and S.la + spacing > now then return hold(S.la + spacing - now, 4) end
  return grant(false)
end
local room_at = time_until_room(S, P, units, false)
local probe_at = time_until_room(S, P, units, true)
if probe_at < room_at and S.pr == 0 then
  if probe_at <= now then return grant(true) end
  return hold(probe_at - now, 5)
end
return hold(room_at - now, 5)
";

/// ARGV: has ticket, ticket ours, ticket seq, ticket at µs, ticket probe, ticket blind
/// units, has usage, usage %, regain µs, throttled, answered, ticket ours_low, round trip µs
/// (0: none measured), the replica's group lower bound (0: none), ticket units, ticket calls in
/// the window at its grant, ticket units the fleet had sent then, the reading's call_count %,
/// then the bucket's parameters. Returns the pause left in µs.
const OBSERVE: &str = r"
local has_ticket = tonumber(ARGV[1]) == 1
local t_probe = tonumber(ARGV[5]) == 1
local t_blind = tonumber(ARGV[6])
local has_usage = tonumber(ARGV[7]) == 1
local pct = tonumber(ARGV[8])
local regain = tonumber(ARGV[9])
local throttled = tonumber(ARGV[10]) == 1
local answered = tonumber(ARGV[11]) == 1
local rtt = tonumber(ARGV[13])
local group_lower = tonumber(ARGV[14])
local t_units = tonumber(ARGV[15])
local t_total = tonumber(ARGV[16])
local t_sent = tonumber(ARGV[17])
local calls = tonumber(ARGV[18])
local P = params(19)
local S = load()
if rtt > 0 then
  -- The margin follows the fleet's round trips: up at once, down slowly.
  local half = rtt / 2
  if half >= S.mg then S.mg = half else S.mg = S.mg - (S.mg - half) / 8 end
  if S.mg > P.W then S.mg = P.W end
end
expire(S, P)
local count = S.t
local ours, ours_low, seq, at = count, count, S.seq, now
-- The most of ours Meta can have counted when the call arrived (budget.rs: most_counted): the
-- window at its grant plus every unit sent since, not the window now (calls leave it during the
-- round trip that Meta still counted).
local ours_high = count
if has_ticket then
  ours = tonumber(ARGV[2]); seq = tonumber(ARGV[3]); at = tonumber(ARGV[4]); ours_low = tonumber(ARGV[12])
  ours_high = t_total + math.max(S.su - t_sent, 0)
end
if t_blind > 0 then S.fl = math.max(S.fl - t_blind, 0) end
if not has_usage then pct = 0 end
if has_ticket then
  -- The fleet's own group proves more than a replica's (it counts every replica's calls).
  local fleet_lower = group_reply(S, P, at, t_units, pct, calls, has_usage and not throttled)
  if fleet_lower > group_lower then group_lower = fleet_lower end
end
-- A whole group's lower bound (budget.rs: Group) no other app's usage can fake: one well above
-- the upper bounds proves they wrongly assumed nobody else uses the Page; for a window
-- upper bounds are not taken (bo: when others were seen). One a little above is cut to them.
local others = S.bo ~= nil and S.bo > 0 and now - S.bo < P.W
if group_lower > 0 then
  roll(S, P)
  if S.bs == nil then clear_bounds(S) end
  local up = min_upper(S.bu1, S.bu0)
  if up >= 0 and group_lower > up * OTHERS_MARGIN then
    S.bu1 = -1; S.bu0 = -1; S.bo = now; others = true
  elseif up >= 0 and group_lower > up then
    group_lower = up
  end
  S.bl1 = math.max(S.bl1 or 0, group_lower)
end
if has_usage then
  if ours_low > 0 then
    local p = math.floor(pct)
    local lower = 100 * ours_low / (p + 1)
    local upper = -1
    if p >= 1 and not others then upper = 100 * ours_high / (p - 0.5) end
    local lo, up = bounds(S, P)
    if lo == nil or throttled then
      S.bl1 = lower; S.bu1 = upper; S.bl0 = 0; S.bu0 = -1; S.bq1 = 0; S.bq0 = 0; S.bs = now
      if throttled then S.bo = 0 end
    else
      -- Upper bounds assume nobody else uses the Page: one below what the Page has shown says
      -- someone does, and is ignored. A lower bound above it means a call of ours counted
      -- before Meta had it (slow to arrive): a limit must never be learned too high.
      if up >= 0 and lower > up then lower = up end
      if upper >= 0 and upper < lo then upper = -1 end
      S.bl1 = math.max(S.bl1 or 0, lower)
      S.bu1 = min_upper(S.bu1, upper)
    end
  end
  -- A call sent after the kept reading arrived knows better; of readings whose calls were
  -- in flight together, the one showing more usage wins.
  local L = limit(S, P)
  if (not fresh(S, P)) or S.rr == nil or at >= S.rr
      or pct - 100 * ours / L >= S.rp - 100 * S.ro / L then
    S.rp = pct; S.rc = calls; S.ro = ours; S.rh = ours_high; S.ra = at; S.rr = now; S.rsyn = 0
  end
end
if (not throttled) and pct >= 100 then
  -- At the limit: full until counted calls leave; only Meta's regain time adds a pause.
  if regain > 0 then
    local untl = now + regain
    if S.pu == nil or S.pu < untl then S.pu = untl end
    S.pa = now; S.pr = 1
  end
elseif throttled then
  local esc
  if has_ticket then
    esc = t_probe or S.pa == nil or at >= S.pa
  else
    esc = S.pu == nil or S.pu <= now
  end
  if esc then S.n = S.n + 1 end
  if throttled and pct < 100 then
    S.rp = 100; S.rc = 0; S.ro = count; S.rh = count; S.ra = now; S.rr = now; S.rsyn = 1
  end
  local pause
  if regain > 0 then
    pause = regain
  else
    local drained = math.max(time_until_room(S, P, 1, true) - now, P.slot)
    local d = math.min(math.max(S.n - 1, 0), 8)
    pause = math.min(drained * (2 ^ d), P.W)
  end
  local untl = now + pause
  if S.pu == nil or S.pu < untl then S.pu = untl end
  S.pa = now
  S.pr = 1
elseif answered and has_ticket then
  if t_probe and S.pr == 2 and S.ps == seq then
    S.pr = 0; S.n = 0
  elseif (S.pa == nil or at >= S.pa) and S.pr == 0 then
    S.n = 0
  end
elseif (not answered) and t_probe and S.pr == 2 and S.ps == seq then
  S.pr = 1
end
save(S, P)
if S.pu ~= nil and S.pu > now then return math.floor(S.pu - now) end
return 0
";

/// A call admitted by [`ADMIT`] ends without a verdict (`uncount`: it never went out, so its
/// count is taken back too). ARGV: at µs, units, blind units, probe, seq, uncount, then the
/// bucket's parameters.
const FINISH: &str = r"
local at = tonumber(ARGV[1])
local units = tonumber(ARGV[2])
local blind = tonumber(ARGV[3])
local probe = tonumber(ARGV[4]) == 1
local seq = tonumber(ARGV[5])
local uncount = tonumber(ARGV[6]) == 1
local P = params(7)
local S = load()
expire(S, P)
if uncount then
  local f = 's' .. math.floor(at / P.slot)
  local v = tonumber(redis.call('HGET', key, f) or '0')
  local back = math.min(v, units)
  if back > 0 then
    if back == v then redis.call('HDEL', key, f) else redis.call('HINCRBY', key, f, -back) end
    S.t = math.max(S.t - back, 0)
  end
end
if blind > 0 then S.fl = math.max(S.fl - blind, 0) end
if probe and S.pr == 2 and S.ps == seq then S.pr = 1 end
leave_group(S, at, units, uncount)
save(S, P)
return 1
";

/// Reads a bucket's fleet-wide state without changing it (an admin view must not keep an
/// idle bucket alive): calls in the window, estimate, limit, pause left. ARGV: the bucket's
/// parameters. Returns {exists, calls, usage ×1000, limit ×1000, paused µs}.
const PEEK: &str = r"
local P = params(1)
if redis.call('EXISTS', key) == 0 then return {0, 0, 0, 0, 0} end
local S = load()
local cutoff = math.floor((now - P.W - S.mg) / P.slot)
if S.o == nil or S.o < cutoff then S.o = cutoff end
S.t = sum_slots(S, S.o, math.floor(now / P.slot))
local est, L = estimate(S, P)
local paused = 0
if S.pu ~= nil and S.pu > now then paused = S.pu - now end
return {1, S.t, math.floor(est * 1000), math.floor(L * 1000), math.floor(paused)}
";

/// KEYS: the fleet's app pause. ARGV: pause µs. Never shortens a longer pause.
const PAUSE_APP: &str = r"
local tt = redis.call('TIME')
local now = tonumber(tt[1]) * 1000000 + tonumber(tt[2])
local untl = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if untl > cur then
  redis.call('SET', KEYS[1], string.format('%.0f', untl), 'PX', math.floor(tonumber(ARGV[1]) / 1000) + 1000)
end
return 1
";

/// KEYS: replicas (sorted set), app pause. ARGV: replica id, TTL ms.
/// Returns {replicas alive, app pause left µs}.
const FLEET: &str = r"
local tt = redis.call('TIME')
local now = tonumber(tt[1]) * 1000 + math.floor(tonumber(tt[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local alive = redis.call('ZCARD', KEYS[1])
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
local left = pause - now * 1000
if left < 0 then left = 0 end
return {alive, math.floor(left)}
";

/// A bucket's configuration as the scripts take it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetParams {
    guess: u32,
    learn: bool,
    headroom_pct: f64,
    threshold_pct: f64,
    window: Duration,
}

impl From<Limits> for FleetParams {
    fn from(l: Limits) -> FleetParams {
        FleetParams {
            guess: l.guess,
            learn: l.learn,
            headroom_pct: l.headroom_pct,
            threshold_pct: l.threshold_pct,
            window: l.window,
        }
    }
}

impl FleetParams {
    fn args(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(self.guess.max(1))
            .arg(u8::from(self.learn))
            .arg(self.headroom_pct)
            .arg(self.threshold_pct)
            .arg(micros(self.window));
    }
}

/// The fleet's record of one admitted call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetTicket {
    pub units: u32,
    /// The fleet's calls in the window once this one was counted (as Meta counts them when
    /// it arrives).
    pub ours: u32,
    /// The same without calls sent within the last round trip (for learning the limit).
    pub ours_low: u32,
    /// The fleet's calls in the window with this one, and the units it had sent so far (the
    /// most of ours Meta can have counted when this call arrived is the first plus what the
    /// second grows by).
    pub total: u32,
    pub sent: u64,
    pub seq: u64,
    /// When Redis admitted it, µs of Redis' clock.
    pub at_us: u64,
    pub probe: bool,
    /// Sent before the bucket had a reading in this window.
    pub blind: bool,
}

/// Redis' answer to one admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub granted: bool,
    pub ticket: FleetTicket,
    pub wait: Duration,
    pub reason: Reason,
    pub usage_pct: f64,
    pub limit: f64,
    pub count: u32,
    pub paused: Duration,
    /// With a hold: how long until the fleet's oldest counted calls leave the window.
    pub horizon: Option<Duration>,
}

/// One bucket's fleet-wide state, read by [`SharedBudgets::peek`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peek {
    /// False: no such bucket in Redis (never used, or idle past its expiry).
    pub exists: bool,
    pub calls_in_window: u32,
    pub usage_pct: f64,
    pub limit: f64,
    pub paused: Duration,
}

/// The scheduler's handle on the shared budgets.
pub struct SharedBudgets {
    conn: Arc<RedisConn>,
    admit: Script,
    observe: Script,
    finish: Script,
    pause_app: Script,
    fleet: Script,
    peek: Script,
    /// `redis.local_budget_fraction`, when set.
    fraction: Option<f64>,
    /// Replicas alive at the last fleet tick (0: never seen).
    replicas: AtomicU32,
    /// The fleet's app pause, µs after `origin` (0: none).
    app_pause: AtomicU64,
    origin: Instant,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn reason_of(code: i64) -> Reason {
    match code {
        1 => Reason::Paused,
        2 => Reason::Probing,
        3 => Reason::FirstReading,
        4 => Reason::Pacing,
        _ => Reason::Full,
    }
}

impl SharedBudgets {
    /// The handle, and (inside a runtime) its fleet task: heartbeat and app pause.
    pub fn new(conn: Arc<RedisConn>, fraction: Option<f64>) -> Arc<SharedBudgets> {
        let script = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        let me = Arc::new(SharedBudgets {
            conn,
            admit: script(ADMIT),
            observe: script(OBSERVE),
            finish: script(FINISH),
            pause_app: Script::new(PAUSE_APP),
            fleet: Script::new(FLEET),
            peek: script(PEEK),
            fraction,
            replicas: AtomicU32::new(0),
            app_pause: AtomicU64::new(0),
            origin: Instant::now(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&me);
            rt.spawn(fleet_task(weak));
        }
        me
    }

    /// Whether Redis can decide right now (else the local budget does, on its share).
    pub fn is_up(&self) -> bool {
        self.conn.is_up()
    }

    pub fn count(&self, source: AdmissionSource) {
        self.conn.metrics().quota.decided(source);
    }

    /// The share of each budget this replica uses while deciding alone.
    pub fn local_share(&self) -> f64 {
        match self.fraction {
            Some(f) => f,
            None => 1.0 / f64::from(self.replicas.load(Ordering::Relaxed).max(1)),
        }
    }

    /// Replicas alive at the last fleet tick (0 before the first).
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// Until when another replica saw the app throttled.
    pub fn app_paused_until(&self, now: Instant) -> Option<Instant> {
        match self.app_pause.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.origin + Duration::from_micros(us)).filter(|t| *t > now),
        }
    }

    fn key(&self, key: &BucketKey) -> String {
        let p = self.conn.prefix();
        match key {
            BucketKey::Page(id) => format!("{p}{{page:{id}}}:q"),
            BucketKey::App => format!("{p}{{app}}:q"),
        }
    }

    /// One admission decision for `units`. `None`: Redis could not decide.
    pub async fn admit(
        &self,
        key: &BucketKey,
        units: u32,
        params: FleetParams,
    ) -> Option<Decision> {
        let k = self.key(key);
        let script = &self.admit;
        let r: Vec<i64> = self
            .conn
            .run(RedisOp::Admit, |mut c| async move {
                let mut inv = script.key(k);
                inv.arg(units.max(1));
                params.args(&mut inv);
                inv.arg(micros(PROBE_TTL));
                inv.invoke_async(&mut c).await
            })
            .await?;
        let at = |i: usize| r.get(i).copied().unwrap_or(0).max(0);
        let us = |i: usize| Duration::from_micros(at(i) as u64);
        if r.len() < 14 {
            return None;
        }
        Some(Decision {
            granted: at(0) == 1,
            ticket: FleetTicket {
                units: units.max(1),
                ours: u32::try_from(at(3)).unwrap_or(u32::MAX),
                seq: at(4) as u64,
                at_us: at(5) as u64,
                probe: at(6) == 1,
                blind: at(11) == 1,
                ours_low: u32::try_from(at(12)).unwrap_or(u32::MAX),
                total: u32::try_from(at(9)).unwrap_or(u32::MAX),
                sent: at(14) as u64,
            },
            wait: us(1),
            reason: reason_of(at(2)),
            usage_pct: at(7) as f64 / 1000.0,
            limit: at(8) as f64 / 1000.0,
            count: u32::try_from(at(9)).unwrap_or(u32::MAX),
            paused: us(10),
            horizon: (at(0) != 1).then(|| us(13)),
        })
    }

    /// Writes what a reply said: the reading, the learned bounds, a pause, a probe's verdict;
    /// `group_lower`: the lower bound of the limit this replica's last group of calls proved
    /// (see [`super::budget::Budget::observe`]).
    pub async fn observe(
        &self,
        key: &BucketKey,
        ticket: Option<FleetTicket>,
        round_trip: Option<Duration>,
        obs: &Observation,
        group_lower: Option<f64>,
        params: FleetParams,
    ) {
        let k = self.key(key);
        let script = &self.observe;
        let rtt = round_trip.map_or(0, micros);
        let t = ticket.unwrap_or(FleetTicket {
            units: 0,
            ours: 0,
            ours_low: 0,
            total: 0,
            sent: 0,
            seq: 0,
            at_us: 0,
            probe: false,
            blind: false,
        });
        let regain = regain_duration(obs.regain_minutes).map_or(0, micros);
        let pct = obs.usage.map_or(0.0, |u| u.max());
        let calls = obs.usage.map_or(0.0, |u| u.call_count);
        let (has_usage, throttled, answered) = (obs.usage.is_some(), obs.throttled, obs.answered);
        self.conn
            .run(RedisOp::Observe, |mut c| async move {
                let mut inv = script.key(k);
                inv.arg(u8::from(ticket.is_some()))
                    .arg(t.ours)
                    .arg(t.seq)
                    .arg(t.at_us)
                    .arg(u8::from(t.probe))
                    .arg(if t.blind { t.units } else { 0 })
                    .arg(u8::from(has_usage))
                    .arg(pct)
                    .arg(regain)
                    .arg(u8::from(throttled))
                    .arg(u8::from(answered))
                    .arg(t.ours_low)
                    .arg(rtt)
                    .arg(group_lower.unwrap_or(0.0))
                    .arg(t.units)
                    .arg(t.total)
                    .arg(t.sent)
                    .arg(calls);
                params.args(&mut inv);
                inv.invoke_async::<i64>(&mut c).await
            })
            .await;
    }

    async fn finish_call(
        &self,
        key: &BucketKey,
        t: FleetTicket,
        params: FleetParams,
        uncount: bool,
    ) {
        let k = self.key(key);
        let script = &self.finish;
        self.conn
            .run(RedisOp::Refund, |mut c| async move {
                let mut inv = script.key(k);
                inv.arg(t.at_us)
                    .arg(t.units)
                    .arg(if t.blind { t.units } else { 0 })
                    .arg(u8::from(t.probe))
                    .arg(t.seq)
                    .arg(u8::from(uncount));
                params.args(&mut inv);
                inv.invoke_async::<i64>(&mut c).await
            })
            .await;
    }

    /// Takes back a call that never went out.
    pub async fn refund(&self, key: &BucketKey, t: FleetTicket, params: FleetParams) {
        self.finish_call(key, t, params, true).await;
    }

    /// A call ended without a reply to learn from (it leaves the fleet's group; a probe or
    /// blind call also frees its slot).
    pub async fn finish_without_verdict(
        &self,
        key: &BucketKey,
        t: FleetTicket,
        params: FleetParams,
    ) {
        self.finish_call(key, t, params, false).await;
    }

    /// The fleet's view of one bucket as Redis holds it. `None`: Redis could not answer.
    pub async fn peek(&self, key: &BucketKey, params: FleetParams) -> Option<Peek> {
        let k = self.key(key);
        let script = &self.peek;
        let r: Vec<i64> = self
            .conn
            .run(RedisOp::Peek, |mut c| async move {
                let mut inv = script.key(k);
                params.args(&mut inv);
                inv.invoke_async(&mut c).await
            })
            .await?;
        let at = |i: usize| r.get(i).copied().unwrap_or(0).max(0);
        Some(Peek {
            exists: at(0) == 1,
            calls_in_window: u32::try_from(at(1)).unwrap_or(u32::MAX),
            usage_pct: at(2) as f64 / 1000.0,
            limit: at(3) as f64 / 1000.0,
            paused: Duration::from_micros(at(4) as u64),
        })
    }

    /// Closes every replica's app gate for `d` (Redis' clock); never shortens a longer pause.
    pub async fn pause_app(&self, d: Duration) {
        let k = format!("{}{{fleet}}:app_pause", self.conn.prefix());
        let script = &self.pause_app;
        let us = micros(d);
        self.conn
            .run(RedisOp::Pause, |mut c| async move {
                script.key(k).arg(us).invoke_async::<i64>(&mut c).await
            })
            .await;
    }

    /// One fleet tick: announce this replica, count the live ones, read the app pause.
    async fn tick(&self) {
        if !self.conn.is_up() {
            return;
        }
        let p = self.conn.prefix();
        let (replicas, pause) = (
            format!("{p}{{fleet}}:replicas"),
            format!("{p}{{fleet}}:app_pause"),
        );
        let id = format!("{:016x}", self.conn.replica());
        let ttl = u64::try_from(REPLICA_TTL.as_millis()).unwrap_or(3000);
        let script = &self.fleet;
        let r: Option<Vec<i64>> = self
            .conn
            .run(RedisOp::Heartbeat, |mut c| async move {
                script
                    .key(replicas)
                    .key(pause)
                    .arg(id)
                    .arg(ttl)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        if let Some(r) = r {
            let alive = r
                .first()
                .copied()
                .unwrap_or(1)
                .clamp(1, i64::from(u32::MAX));
            self.replicas.store(alive as u32, Ordering::Relaxed);
            let left = r.get(1).copied().unwrap_or(0).max(0) as u64;
            let until = if left == 0 {
                0
            } else {
                micros(self.origin.elapsed()).saturating_add(left)
            };
            self.app_pause.store(until, Ordering::Relaxed);
        }
    }
}

async fn fleet_task(me: Weak<SharedBudgets>) {
    loop {
        match me.upgrade() {
            Some(s) => s.tick().await,
            None => return,
        }
        tokio::time::sleep(FLEET_TICK).await;
    }
}
