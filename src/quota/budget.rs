//! One bucket's budget: what we sent, what Meta last said, and whether the next call may go.
//!
//! Everything here is pure: time comes in as `now`, so tests drive it with a fake clock.
//!
//! **What is known.** The calls we dispatched, as a sliding-window count ([`Window`]), and the
//! latest usage reading (the highest of call_count, total_time, total_cputime, in percent of
//! the Page's limit). A reading arrives with every reply, so it is at most one round trip old
//! while calls flow.
//!
//! **Estimated usage** is the larger of
//! - the latest reading plus the calls we counted since, in percent of the estimated limit
//!   (`reading + (ours now − ours at the reading) ÷ limit`): usage our calls do not explain
//!   (other apps on the Page) stays counted as consumed, our own calls leave with the window;
//! - our calls in the window ÷ the configured ceiling (`page_calls`).
//!
//! **Estimated limit.** `page_calls` is a starting guess. Meta reports whole percentages, so
//! a reading `p` with `c` of our calls counted says `limit > 100·c ÷ (p + 1)` (whatever other
//! apps used) and, if nobody else used the Page, `limit ≤ 100·c ÷ (p − ½)`. Once a whole
//! [`Group`] of calls in flight together is answered, its highest reading counted all of them.
//! Readings contradicting the guess from above lower the limit to the proven lower bound when
//! the bounds agree ([`TIGHT_BOUNDS`]); with `learn_limits` a lower bound above the guess
//! raises it. Small readings bound little, so they leave the guess alone; a group's lower bound
//! above the upper bounds shows other apps use the Page, and upper bounds are dropped.
//!
//! **Counting what Meta counts.** Meta counts a call when it arrives, up to a round trip after
//! we sent it, and replies may arrive in any order. So a call leaves our window half a recent
//! round trip late; among readings from calls in flight together the one showing more usage
//! wins; and the counts used to learn the limit leave out calls still on their way.
//!
//! **Admission.** Below the threshold (default 60 %) a call goes at once: no pacing, no queue.
//! Between the threshold and the ceiling (100 % − headroom) what is left is spread over the
//! time until the oldest counted calls leave the window, so a flood uses the whole budget
//! without piling it into one instant. At the ceiling a call waits for counted calls to
//! leave; when usage our calls do not explain blocks the bucket, one probe call refreshes the
//! reading once that usage has probably drained. On a throttle code the bucket pauses until
//! Meta's `estimated_time_to_regain_access`, or without one until enough counted calls have
//! left the window (doubling while probes keep being throttled), then sends one probe and
//! resumes when it comes back unthrottled. A reading at 100 % without a throttle code only
//! makes the bucket full (a regain time in it pauses).
//!
//! Until the first reading of a window only a few calls (1 % of the guess) may be in flight,
//! and no more go until all of those are answered ([`BlindCalls`]): a guess ten times too
//! high must not put a whole burst in front of Meta unread.

use std::time::{Duration, Instant};

use super::window::Window;
use crate::graph::usage::Usage;

/// Longest a holder re-checks without being woken (replies wake it earlier).
const MAX_RECHECK: Duration = Duration::from_millis(250);
/// Consecutive throttles double the pause up to this many times.
const MAX_DOUBLINGS: u32 = 8;
/// Readings lower the limit below the guess only when their bounds agree within this factor
/// (`upper ≤ TIGHT_BOUNDS × lower`). Wide bounds mean most of our calls were still in flight
/// when the readings were taken (a burst), or other apps use the Page (the upper bound
/// assumes nobody does); the lower bound would then count each call as many times its
/// share and hold a Page that has most of its budget left.
const TIGHT_BOUNDS: f64 = 2.0;
/// A group's lower bound more than this factor above the upper bounds shows that other apps
/// use the Page (the upper bounds assume nobody does). Closer, the bounds disagree by a few
/// calls counted on the wrong side of a window's edge (a call slower to reach Meta than the
/// margin allows): the upper bound stands and the lower one is cut to it, since going back to
/// the guess on such a slip would send a flood to a Page at its limit.
const OTHERS_MARGIN: f64 = 1.1;

/// How many points a group of our calls must move the Page's usage for the move to bound
/// the limit (see [`Budget::learn_slope`]): fewer are mostly the readings' rounding.
const MIN_SLOPE_PCT: f64 = 5.0;

/// The reading a group's move starts from is at most a window over this old: other apps'
/// calls leaving the window meanwhile would shrink the move.
const MAX_BASE_AGE_DIVISOR: u32 = 20;

/// Meta's regain times beyond this are not believed.
const MAX_REGAIN: Duration = Duration::from_secs(24 * 3600);

/// A bucket's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// `page_calls` (or `app_calls`): the starting guess of the limit per window.
    pub guess: u32,
    pub window: Duration,
    /// Percent of the limit left unused: the ceiling is `100 − headroom`.
    pub headroom_pct: f64,
    /// Below this estimated usage calls go at once.
    pub threshold_pct: f64,
    /// Whether a learned limit may exceed the guess.
    pub learn: bool,
}

impl Limits {
    pub fn ceiling_pct(&self) -> f64 {
        (100.0 - self.headroom_pct).clamp(1.0, 100.0)
    }

    pub fn threshold_pct(&self) -> f64 {
        self.threshold_pct.clamp(0.0, self.ceiling_pct())
    }

    /// Whether `units` more calls, each `per_call` percent, fit on top of `usage`: the
    /// estimate is below the ceiling before the last of them. (Requiring room after it would
    /// waste most of a call per window where one call is worth more than the headroom, and
    /// lock a bucket whose limit is still being learned out of the readings that would
    /// correct it.)
    pub fn fits(&self, usage: f64, per_call: f64, units: u32) -> bool {
        usage + per_call * f64::from(units.max(1) - 1) < self.ceiling_pct()
    }

    /// The wait for `needed` calls at `usage` percent, each call `per_call` percent, while
    /// they fit: none below the threshold, else what is left spread over `horizon` (until
    /// the oldest counted calls leave the window, or the whole window). `None` when they do
    /// not fit (the wait then depends on which calls leave when).
    pub fn paced_wait(
        &self,
        usage: f64,
        per_call: f64,
        needed: u32,
        horizon: Option<Duration>,
    ) -> Option<Duration> {
        if !self.fits(usage, per_call, needed) {
            return None;
        }
        if usage < self.threshold_pct() {
            return Some(Duration::ZERO);
        }
        let room = ((self.ceiling_pct() - usage) / per_call).max(1.0);
        let horizon = horizon.unwrap_or(self.window);
        Some(horizon.div_f64(room).saturating_mul(needed))
    }
}

/// The latest usage reading of a bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub usage: Usage,
    /// The highest of the three percentages: Meta throttles once any reaches 100.
    pub pct: f64,
    pub regain: Option<Duration>,
    /// When the call that brought it was dispatched.
    pub at: Instant,
    /// Our calls in the window when that call went, itself included: the fewest of ours the
    /// reading can contain.
    pub ours: u32,
    /// The most of ours it can contain (see [`Budget::most_counted`]).
    most: u32,
    /// When it arrived. A reading from a call sent before then overlapped it in flight.
    received: Instant,
    /// Stands in for a throttle code that came without one: 100 % until a probe says more.
    pub synthetic: bool,
}

impl Reading {
    /// The usage it shows beyond the calls of ours it counted: the part of the estimate
    /// that does not move with our count.
    fn beyond_ours(&self, limit: f64) -> f64 {
        self.pct - 100.0 * f64::from(self.ours) / limit
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Bounds {
    lower: f64,
    upper: f64,
    /// The highest lower bound a group of our calls proved from how far it moved the
    /// Page's usage (0: none; see [`Budget::learn_slope`]).
    slope: f64,
}

/// Limit bounds over a sliding stretch of time: the readings of the current period and of the
/// one before (each a window long), so a bound lasts one to two windows after the reading that
/// set it while the tightest recent bound always holds (the limit itself moves, slowly).
#[derive(Debug, Clone, Copy, PartialEq)]
struct BoundsLog {
    current: Bounds,
    previous: Bounds,
    since: Instant,
    /// When a group's lower bound last exceeded the upper bounds: other apps use the Page,
    /// so for a window upper bounds (which assume nobody does) are not taken.
    others_seen: Option<Instant>,
}

const NO_BOUNDS: Bounds = Bounds {
    lower: 0.0,
    upper: f64::INFINITY,
    slope: 0.0,
};

impl Bounds {
    fn merge(self, other: Bounds) -> Bounds {
        Bounds {
            lower: self.lower.max(other.lower),
            upper: self.upper.min(other.upper),
            slope: self.slope.max(other.slope),
        }
    }
}

impl BoundsLog {
    /// No bounds yet, from `now`.
    fn new(now: Instant) -> BoundsLog {
        BoundsLog {
            current: NO_BOUNDS,
            previous: NO_BOUNDS,
            since: now,
            others_seen: None,
        }
    }

    /// Moves the periods on to `now`.
    fn roll(&mut self, now: Instant, window: Duration) {
        let age = now.saturating_duration_since(self.since);
        if age >= window * 2 {
            (self.previous, self.current, self.since) = (NO_BOUNDS, NO_BOUNDS, now);
        } else if age >= window {
            (self.previous, self.current, self.since) = (self.current, NO_BOUNDS, now);
        }
    }

    fn at(mut self, now: Instant, window: Duration) -> Option<Bounds> {
        self.roll(now, window);
        Some(self.current.merge(self.previous)).filter(|b| b.lower > 0.0)
    }
}

/// Where the estimated limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    /// `page_calls` (no reading contradicts it).
    Configured,
    /// Readings show the configured value is too high: the proven lower bound.
    Lowered,
    /// Readings show more room than configured and `learn_limits` is on.
    Learned,
}

impl LimitSource {
    pub fn label(self) -> &'static str {
        match self {
            LimitSource::Configured => "page_calls",
            LimitSource::Lowered => "lowered_by_readings",
            LimitSource::Learned => "learned",
        }
    }
}

/// The bucket's view of itself at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Estimated usage, percent of the limit.
    pub usage_pct: f64,
    /// Estimated limit, calls per window.
    pub limit: f64,
    pub source: LimitSource,
    pub calls_in_window: u32,
    /// Usage the latest reading shows beyond what our calls explain, percent.
    pub unexplained_pct: f64,
    /// A reading from the current window exists.
    pub has_reading: bool,
    /// What one more call adds to the estimate, percent.
    pub per_call_pct: f64,
}

/// Why a call may not go yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A throttle code or 100 % usage: waiting out the pause.
    Paused,
    /// One probe call is out; the others wait for its verdict.
    Probing,
    /// No reading in this window yet and the blind allowance is in flight.
    FirstReading,
    /// Above the threshold: spreading what is left until counted calls leave the window.
    Pacing,
    /// At the ceiling: waiting for counted calls to leave the window.
    Full,
    /// Graph throttled the app: every call waits (see the scheduler's app gate).
    AppPaused,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Paused => "paused",
            Reason::Probing => "probing",
            Reason::FirstReading => "awaiting_first_reading",
            Reason::Pacing => "pacing",
            Reason::Full => "full",
            Reason::AppPaused => "app_paused",
        }
    }
}

/// Not now: look again at `until` (or when a reply wakes the bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub until: Instant,
    pub reason: Reason,
}

/// One admitted call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub units: u32,
    pub at: Instant,
    /// Our calls in the window once this one was counted (those Meta still counts when it
    /// arrives).
    pub ours: u32,
    /// The same without the calls that were still on their way (they may arrive after it).
    pub ours_low: u32,
    /// Our calls in the window as it was counted at dispatch, itself included, and the
    /// bucket's running total of dispatched units then: with what went since, the most of
    /// ours Meta can have counted when this call arrived (see [`Budget::most_counted`]).
    total: u32,
    sent: u64,
    seq: u64,
    pub probe: bool,
}

/// What one reply said about a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observation {
    pub usage: Option<Usage>,
    pub regain_minutes: Option<f64>,
    pub throttled: bool,
    /// Graph produced the reply (2xx or a Graph error), rather than a transport failure.
    pub answered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Off,
    /// The pause is over: the next call is the probe.
    Due,
    InFlight(u64),
}

#[derive(Debug, Clone)]
pub struct Budget {
    pub limits: Limits,
    /// Share of the configured ceiling this replica may use alone (1 unless Redis is
    /// configured and unreachable).
    share: f64,
    window: Window,
    reading: Option<Reading>,
    bounds: Option<BoundsLog>,
    paused_until: Option<Instant>,
    paused_at: Option<Instant>,
    throttles: u32,
    probe: Probe,
    /// Units dispatched whose reply has not been seen.
    in_flight: u32,
    last_admit: Option<Instant>,
    seq: u64,
    /// Units dispatched since the bucket was made (never taken back: only an upper bound
    /// reads it).
    sent: u64,
    /// The calls sent before the window's first reading, while any is out.
    blind: Option<BlindCalls>,
    group: Group,
    /// A recent round trip to Meta (rises at once, falls slowly): how much later than our
    /// dispatch Meta may have counted a call.
    round_trip: Duration,
}

/// Our calls in flight together: from one dispatched while none was, until the last of them
/// is answered. Meta counted each of them before answering it, so the one it answered last
/// saw all of them counted, and the highest reading among them bounds the limit from below
/// with every call of the group counted, whoever else uses the Page. (A single reading from
/// a burst counts only the calls answered before its own was sent: for calls sent together,
/// none.)
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Group {
    started: Option<Instant>,
    /// Units dispatched in the group.
    sent: u32,
    /// Units whose reply brought an unthrottled reading.
    read: u32,
    /// The highest reading among them, in percent.
    max_pct: f64,
    /// The highest `call_count` among them, in percent.
    max_calls: f64,
    /// The reading in force when the group started, as (its `call_count`, the most of our
    /// calls it can have counted); only a recent one led by `call_count`.
    base: Option<(f64, u32)>,
}

/// The calls of a window sent before its first reading (the blind allowance). Their replies
/// come back spread out, and the first of them counts only itself: the limit is known once
/// they are all back (their group's readings, see [`Group`]), so until then no more go, for
/// a few round trips at most (as measured by then: the first reply tells how slow Graph is
/// answering, which the first call could not know).
#[derive(Debug, Clone, Copy, PartialEq)]
struct BlindCalls {
    /// The first blind call's sequence number: a ticket numbered from it on that ends was
    /// one of them (no other call goes while they are out).
    from_seq: u64,
    in_flight: u32,
    /// When the first of them went.
    since: Instant,
}

/// How long the blind calls may hold the others back: four recent round trips, within these
/// (the fleet's Redis script holds them as long).
const MIN_BLIND_HOLD: Duration = Duration::from_secs(1);
const MAX_BLIND_HOLD: Duration = Duration::from_secs(10);

/// The pause Meta asked for, when it named one.
pub fn regain_duration(minutes: Option<f64>) -> Option<Duration> {
    minutes
        .filter(|m| m.is_finite() && *m > 0.0)
        .map(|m| Duration::from_secs_f64(m * 60.0).min(MAX_REGAIN))
}

impl Budget {
    pub fn new(limits: Limits, now: Instant) -> Budget {
        Budget {
            limits,
            share: 1.0,
            window: Window::new(limits.window, now),
            reading: None,
            bounds: None,
            paused_until: None,
            paused_at: None,
            throttles: 0,
            probe: Probe::Off,
            in_flight: 0,
            last_admit: None,
            seq: 0,
            sent: 0,
            blind: None,
            group: Group::default(),
            round_trip: Duration::ZERO,
        }
    }

    /// The share of the configured ceiling this replica uses on its own.
    pub fn set_share(&mut self, share: f64) {
        self.share = if share.is_finite() {
            share.clamp(1e-3, 1.0)
        } else {
            1.0
        };
    }

    /// The share of the configured ceiling this replica uses on its own (see
    /// [`Budget::set_share`]).
    pub fn share(&self) -> f64 {
        self.share
    }

    fn recheck(&self) -> Duration {
        self.window
            .slot()
            .clamp(Duration::from_millis(10), MAX_RECHECK)
    }

    /// The reading, while it is about the current window.
    pub fn reading(&self, now: Instant) -> Option<Reading> {
        self.reading
            .filter(|r| now.saturating_duration_since(r.at) < self.limits.window)
    }

    /// The limit bounds in force (none without a lower bound).
    fn bounds(&self, now: Instant) -> Option<Bounds> {
        self.bounds?.at(now, self.limits.window)
    }

    /// The configured guess, in calls of this replica: its share of `page_calls`.
    fn own_guess(&self) -> f64 {
        (f64::from(self.limits.guess.max(1)) * self.share).max(1e-3)
    }

    /// The estimated limit (calls per window) and where it comes from. Counted in this
    /// replica's calls: with a share below 1 (deciding alone while other replicas send too),
    /// the bounds learned from its own calls, and its share of the guess.
    pub fn limit(&self, now: Instant) -> (f64, LimitSource) {
        let guess = self.own_guess();
        match self.bounds(now) {
            Some(b) if guess > b.upper && b.upper <= TIGHT_BOUNDS * b.lower => {
                (b.lower.max(1.0), LimitSource::Lowered)
            }
            Some(b) if guess < b.lower && self.limits.learn => (b.lower, LimitSource::Learned),
            // Our own calls moved the usage as a limit under half the guess would: the guess
            // is far too high, whoever else uses the Page.
            Some(b) if guess > TIGHT_BOUNDS * b.slope && b.slope > 0.0 && b.lower < guess => {
                (b.slope.max(b.lower), LimitSource::Lowered)
            }
            _ => (guess, LimitSource::Configured),
        }
    }

    /// The ceiling for the count of our own calls.
    fn count_limit(&self, limit: f64) -> f64 {
        let guess = self.own_guess();
        if self.limits.learn {
            guess.max(limit)
        } else {
            guess
        }
    }

    /// Calls that may be in flight before the first reading of a window.
    fn blind_allowance(&self) -> u32 {
        ((f64::from(self.limits.guess) * self.share / 100.0).floor() as u32).max(1)
    }

    /// Blind calls are out and still hold the others: for four round trips as known now.
    fn blind_out(&self, now: Instant) -> bool {
        let hold = (self.round_trip * 4).clamp(MIN_BLIND_HOLD, MAX_BLIND_HOLD);
        self.blind
            .is_some_and(|b| b.in_flight > 0 && now < b.since + hold)
    }

    pub fn estimate(&mut self, now: Instant) -> Estimate {
        let count = self.window.count(now);
        let (limit, source) = self.limit(now);
        let count_limit = self.count_limit(limit);
        let by_count = 100.0 * f64::from(count) / count_limit;
        let reading = self.reading(now);
        let by_reading =
            reading.map(|r| r.pct + 100.0 * (f64::from(count) - f64::from(r.ours)) / limit);
        Estimate {
            usage_pct: by_count.max(by_reading.unwrap_or(0.0)).max(0.0),
            limit,
            source,
            calls_in_window: count,
            unexplained_pct: reading
                .map_or(0.0, |r| r.pct - 100.0 * f64::from(r.ours) / limit)
                .max(0.0),
            has_reading: reading.is_some(),
            per_call_pct: 100.0 / limit.min(count_limit),
        }
    }

    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|&t| t > now)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether a call of `units` may go now; nothing is charged.
    pub fn decide(&mut self, units: u32, now: Instant) -> Result<bool, Hold> {
        let units = units.max(1);
        self.window.expire(now);
        let recheck = now + self.recheck();
        if let Some(until) = self.paused_until(now) {
            return Err(Hold {
                until,
                reason: Reason::Paused,
            });
        }
        match self.probe {
            Probe::InFlight(_) => {
                return Err(Hold {
                    until: recheck,
                    reason: Reason::Probing,
                })
            }
            // Calls sent before the pause are still out: their replies are the probe.
            Probe::Due if self.in_flight > 0 => {
                return Err(Hold {
                    until: recheck,
                    reason: Reason::Probing,
                })
            }
            Probe::Due => return Ok(true),
            Probe::Off => {}
        }
        let est = self.estimate(now);
        let blind_out = self.blind_out(now);
        let blind_full = !est.has_reading
            && self.in_flight > 0
            && self.in_flight.saturating_add(units) > self.blind_allowance();
        if blind_full || (est.has_reading && blind_out) {
            return Err(Hold {
                until: recheck,
                reason: Reason::FirstReading,
            });
        }
        let ceiling = self.limits.ceiling_pct();
        let per_unit = est.per_call_pct;
        let fits = self.limits.fits(est.usage_pct, per_unit, units);
        if est.usage_pct < self.limits.threshold_pct() && fits {
            return Ok(false);
        }
        if fits {
            // Spread what is left over the time until counted usage starts to leave (the
            // last call that fits needs no spreading).
            let room = (ceiling - est.usage_pct) / per_unit;
            if room <= f64::from(units) {
                return Ok(false);
            }
            let horizon = self
                .next_release(now)
                .map_or(self.limits.window, |t| t.saturating_duration_since(now));
            let spacing = horizon.div_f64(room).saturating_mul(units);
            return match self.last_admit {
                Some(t) if t + spacing > now => Err(Hold {
                    until: t + spacing,
                    reason: Reason::Pacing,
                }),
                _ => Ok(false),
            };
        }
        let room_at = self.time_until_room(units, now, false);
        if self.in_flight == 0 {
            let probe_at = self.time_until_room(units, now, true);
            if probe_at < room_at {
                if probe_at <= now {
                    return Ok(true);
                }
                return Err(Hold {
                    until: probe_at,
                    reason: Reason::Full,
                });
            }
        }
        Err(Hold {
            until: room_at.max(now + Duration::from_millis(1)),
            reason: Reason::Full,
        })
    }

    /// Charges `units` if they may go now.
    pub fn try_admit(&mut self, units: u32, now: Instant) -> Result<Ticket, Hold> {
        let probe = self.decide(units, now)?;
        Ok(self.dispatched(units, now, probe))
    }

    /// Counts a call another party decided may go (Redis for the fleet).
    pub fn dispatched(&mut self, units: u32, now: Instant, probe: bool) -> Ticket {
        let units = units.max(1);
        self.seq += 1;
        if self.in_flight == 0 {
            let window = self.limits.window;
            let base = self
                .reading(now)
                .filter(|r| {
                    !r.synthetic
                        && r.usage.call_count >= r.pct
                        && now.saturating_duration_since(r.at) <= window / MAX_BASE_AGE_DIVISOR
                })
                .map(|r| (r.usage.call_count, r.most));
            self.group = Group {
                started: Some(now),
                base,
                ..Group::default()
            };
        }
        self.group.sent = self.group.sent.saturating_add(units);
        self.sent = self.sent.saturating_add(u64::from(units));
        let total = self.window.record(units, now);
        let ours = self.window.surely_counted(now).max(units);
        // For learning the limit, which must never come out high, this call may take a whole
        // round trip to arrive, and calls still on their way may reach Meta after it.
        let ours_low = self
            .window
            .surely_counted(now + self.window.margin())
            .saturating_sub(self.in_flight)
            .max(units);
        if self.reading(now).is_none() {
            if self.blind_out(now) {
                if let Some(b) = self.blind.as_mut() {
                    b.in_flight = b.in_flight.saturating_add(units);
                }
            } else {
                self.blind = Some(BlindCalls {
                    from_seq: self.seq,
                    in_flight: units,
                    since: now,
                });
            }
        }
        self.in_flight = self.in_flight.saturating_add(units);
        self.last_admit = Some(now);
        if probe {
            self.probe = Probe::InFlight(self.seq);
        }
        Ticket {
            units,
            at: now,
            ours,
            ours_low,
            total,
            sent: self.sent,
            seq: self.seq,
            probe,
        }
    }

    /// The most of our calls Meta can have counted when `t` arrived: those in the window at
    /// its dispatch plus every unit sent since. (The window's count when the reply comes is
    /// not that bound: calls leave it during the round trip that Meta still counted.)
    fn most_counted(&self, t: &Ticket) -> u32 {
        let since = u32::try_from(self.sent.saturating_sub(t.sent)).unwrap_or(u32::MAX);
        t.total.saturating_add(since)
    }

    /// The call is over at `now` (its reply, if any, has been observed).
    pub fn finish(&mut self, ticket: &Ticket, now: Instant) {
        let sample = now.saturating_duration_since(ticket.at);
        self.round_trip = if sample >= self.round_trip {
            sample
        } else {
            self.round_trip - (self.round_trip - sample) / 8
        };
        self.window.set_margin(self.round_trip / 2);
        self.end(ticket);
    }

    fn end(&mut self, ticket: &Ticket) {
        self.in_flight = self.in_flight.saturating_sub(ticket.units);
        if let Some(b) = self.blind.as_mut().filter(|b| ticket.seq >= b.from_seq) {
            b.in_flight = b.in_flight.saturating_sub(ticket.units);
        }
        if self.probe == Probe::InFlight(ticket.seq) {
            // No verdict (transport failure, cancelled): another call probes.
            self.probe = Probe::Due;
        }
    }

    /// Takes back a call that never went out.
    pub fn refund(&mut self, ticket: &Ticket) {
        self.window.unrecord(ticket.units, ticket.at);
        if self.group.started.is_some_and(|s| ticket.at >= s) {
            self.group.sent = self.group.sent.saturating_sub(ticket.units);
        }
        self.end(ticket);
    }

    /// Learns from a reply. `ticket` is the call that brought it; `None` for a reading about
    /// this bucket that came with another bucket's call. Returns the lower bound of the limit
    /// a whole group of calls proved (see [`Group`]), for the fleet's state.
    pub fn observe(
        &mut self,
        ticket: Option<&Ticket>,
        obs: &Observation,
        now: Instant,
    ) -> Option<f64> {
        let group_lower = ticket.and_then(|t| self.group_reply(t, obs, now));
        if let Some(lower) = group_lower {
            self.learn_group_lower(lower, now);
        }
        self.observe_reading(ticket, obs, now);
        group_lower
    }

    /// Counts a reply in its group; for the group's last reply, when every call of the group
    /// brought a reading and the group is younger than a window (none of its calls left
    /// Meta's window before the last was counted), the lower bound it proves.
    fn group_reply(&mut self, t: &Ticket, obs: &Observation, now: Instant) -> Option<f64> {
        let g = &mut self.group;
        let started = g.started.filter(|&s| t.at >= s)?;
        if let (Some(usage), false) = (obs.usage, obs.throttled) {
            g.read = g.read.saturating_add(t.units);
            g.max_pct = g.max_pct.max(usage.max());
            g.max_calls = g.max_calls.max(usage.call_count);
        }
        let last = self.in_flight <= t.units;
        let young =
            now.saturating_duration_since(started) + self.window.margin() < self.limits.window;
        if !last || !young || g.read < g.sent || g.sent == 0 || !g.max_pct.is_finite() {
            return None;
        }
        g.started = None;
        // Every call of ours was answered, so counted, before Meta answered the group's
        // last: all of them still in its window count, not only the group's.
        let counted = self.window.surely_counted(now).max(g.sent);
        let (max_pct, max_calls, base) = (g.max_pct, g.max_calls, g.base);
        if let Some((base_calls, base_ours)) = base {
            // `call_count` led at both ends, so its move is the one that binds; readings may
            // be rounded, so the true move is below `moved + 1.5`.
            let moved = max_calls.floor() - base_calls.floor();
            if max_calls >= max_pct && moved >= MIN_SLOPE_PCT && counted > base_ours {
                self.learn_slope(100.0 * f64::from(counted - base_ours) / (moved + 1.5), now);
            }
        }
        Some(100.0 * f64::from(counted) / (max_pct.floor() + 1.0))
    }

    /// A lower bound from how far a group of our calls moved the Page's usage: from the
    /// reading in force when it started (`p₀`, counting at most `c₀` of our calls) to its
    /// highest (`p₁`, all `c₁` of ours in the window counted), the limit is at least
    /// `100·(c₁ − c₀) ÷ (p₁ − p₀ + 1.5)` unless other apps' usage fell meanwhile (hence a
    /// recent `p₀` only, and `call_count` leading at both ends). Unlike the
    /// upper bounds it holds with other apps on the Page, and unlike the lower bounds it is
    /// not diluted by their usage: there the upper bounds are not taken, and without it the
    /// limit would go back to `page_calls`.
    fn learn_slope(&mut self, slope: f64, now: Instant) {
        let mut log = self.bounds_at(now);
        log.current.slope = log.current.slope.max(slope);
        self.bounds = Some(log);
    }

    /// The bounds learned so far, rolled to `now` (a new log if none yet).
    fn bounds_at(&self, now: Instant) -> BoundsLog {
        let mut log = self.bounds.unwrap_or(BoundsLog::new(now));
        log.roll(now, self.limits.window);
        log
    }

    /// A lower bound no other app's usage can fake: one well above the upper bounds proves
    /// they assumed wrongly that nobody else uses the Page, so they are dropped (see
    /// [`OTHERS_MARGIN`]).
    fn learn_group_lower(&mut self, lower: f64, now: Instant) {
        let mut log = self.bounds_at(now);
        let upper = log.current.merge(log.previous).upper;
        let lower = if lower > upper * OTHERS_MARGIN && self.share >= 1.0 {
            log.current.upper = f64::INFINITY;
            log.previous.upper = f64::INFINITY;
            log.others_seen = Some(now);
            lower
        } else {
            lower.min(upper)
        };
        log.current.lower = log.current.lower.max(lower);
        self.bounds = Some(log);
    }

    fn observe_reading(&mut self, ticket: Option<&Ticket>, obs: &Observation, now: Instant) {
        let count = self.window.count(now);
        let (at, ours, ours_low, ours_high) = match ticket {
            // A reply slower than the round trip `ours_low` allowed for: its call may have
            // reached Meta after some of the calls counted in it had left Meta's window, so it
            // proves no lower bound (a loaded host delays replies long after Meta sent them).
            Some(t) if now.saturating_duration_since(t.at) > 2 * self.window.margin() => {
                (t.at, t.ours, 0, self.most_counted(t))
            }
            Some(t) => (t.at, t.ours, t.ours_low, self.most_counted(t)),
            None => (now, count, count.saturating_sub(self.in_flight), count),
        };
        let pct = obs.usage.map_or(0.0, |u| u.max());
        if let Some(usage) = obs.usage {
            self.learn_bounds(ours_low, ours_high, pct, obs.throttled, now);
            let reading = Reading {
                usage,
                pct,
                regain: regain_duration(obs.regain_minutes),
                at,
                ours,
                most: ours_high,
                received: now,
                synthetic: false,
            };
            // A call sent after the kept reading arrived knows better. Calls that were in
            // flight together may reach Meta in any order: the reading showing more usage
            // wins.
            let (limit, _) = self.limit(now);
            let replace = self.reading(now).is_none_or(|r| {
                at >= r.received || reading.beyond_ours(limit) >= r.beyond_ours(limit)
            });
            if replace {
                self.reading = Some(reading);
            }
        }
        let regain = regain_duration(obs.regain_minutes);
        if !obs.throttled && pct >= 100.0 {
            // At the limit: the estimate is full until counted calls leave; only a regain time
            // from Meta adds a pause.
            if let Some(d) = regain {
                self.pause(now + d, now);
            }
            return;
        }
        if obs.throttled {
            let escalates = match ticket {
                Some(t) => t.probe || self.paused_at.is_none_or(|p| t.at >= p),
                None => self.paused_until(now).is_none(),
            };
            if escalates {
                self.throttles = self.throttles.saturating_add(1);
            }
            if obs.throttled && pct < 100.0 {
                // Meta says the limit is reached: 100 % until the probe says more.
                self.reading = Some(Reading {
                    usage: obs.usage.unwrap_or_default(),
                    pct: 100.0,
                    regain: None,
                    at: now,
                    ours: count,
                    most: count,
                    received: now,
                    synthetic: true,
                });
            }
            let pause = match regain {
                Some(d) => d,
                None => {
                    // Until enough counted calls have left the window (ours as counted, the
                    // rest as if spread evenly over it).
                    let drained = self
                        .time_until_room(1, now, true)
                        .saturating_duration_since(now)
                        .max(self.window.slot());
                    let doublings = self.throttles.saturating_sub(1).min(MAX_DOUBLINGS);
                    drained
                        .saturating_mul(1 << doublings)
                        .min(self.limits.window)
                }
            };
            self.pause(now + pause, now);
            return;
        }
        if !obs.answered {
            return;
        }
        if let Some(t) = ticket {
            if self.probe == Probe::InFlight(t.seq) {
                self.probe = Probe::Off;
                self.throttles = 0;
            } else if self.paused_at.is_none_or(|p| t.at >= p) && self.probe == Probe::Off {
                self.throttles = 0;
            }
        }
    }

    /// Pauses until `until` (never shorter than a pause already running), then one probe.
    fn pause(&mut self, until: Instant, now: Instant) {
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
        self.paused_at = Some(now);
        self.probe = Probe::Due;
    }

    /// Narrows the limit from one reading (see the module docs): `ours_low` of our calls
    /// certainly counted, `ours_high` at most.
    fn learn_bounds(
        &mut self,
        ours_low: u32,
        ours_high: u32,
        pct: f64,
        at_limit: bool,
        now: Instant,
    ) {
        if ours_high == 0 || !pct.is_finite() {
            return;
        }
        // Whole percentages, floored or rounded: the true usage is below `p + 1` and at least
        // `p − 0.5`, so these bounds hold either way. No call surely counted: no lower bound.
        let p = pct.floor();
        let lower = 100.0 * f64::from(ours_low) / (p + 1.0);
        let upper = if p >= 1.0 {
            100.0 * f64::from(ours_high) / (p - 0.5)
        } else {
            f64::INFINITY
        };
        // At the limit the bounds may be stale (the limit went down): start again from this
        // reading.
        let mut log = if at_limit {
            BoundsLog::new(now)
        } else {
            self.bounds_at(now)
        };
        let held = log.current.merge(log.previous);
        // Upper bounds assume nobody else uses the Page: one below what the Page has shown
        // says someone does, and is ignored (lower bounds hold regardless). A lower bound
        // above what the Page has shown means one of our calls was counted that Meta had not
        // yet (slow to arrive): a limit must never be learned too high.
        let lower = lower.min(held.upper);
        let others = log
            .others_seen
            .is_some_and(|t| now.saturating_duration_since(t) < self.limits.window);
        let upper = if upper >= held.lower && !others {
            upper
        } else {
            f64::INFINITY
        };
        log.current = log.current.merge(Bounds {
            lower,
            upper,
            slope: 0.0,
        });
        self.bounds = Some(log);
    }

    /// When counted usage next starts to drop: the oldest counted calls leave, or the
    /// reading's calls have all left.
    fn next_release(&self, now: Instant) -> Option<Instant> {
        let reading_end = self.reading(now).map(|r| r.at + self.limits.window);
        match (self.window.next_release(), reading_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The earliest time a call of `units` fits under the ceiling as counted calls leave the
    /// window. `decay`: assume usage our calls do not explain drains evenly over the window
    /// (when to probe), rather than staying until the reading's window is over (when a call
    /// surely fits).
    fn time_until_room(&self, units: u32, now: Instant, decay: bool) -> Instant {
        let (limit, _) = self.limit(now);
        let count_limit = self.count_limit(limit);
        let per_call = 100.0 / limit.min(count_limit);
        let units = f64::from(units.max(1));
        // The estimate must stay below this for the call to fit (see `fits`).
        let cap = self.limits.ceiling_pct() - per_call * (units - 1.0);
        let window = self.limits.window;
        let reading = self.reading(now);
        let end = reading.map(|r| r.at + window);
        let unexplained = reading.map_or(0.0, |r| r.pct - 100.0 * f64::from(r.ours) / limit);
        let mut ours = f64::from(self.window.total());
        let mut start = now;
        let mut releases = self.window.releases().peekable();
        loop {
            let next = releases.peek().map(|&(t, _)| t);
            let reading_on = end.is_some_and(|e| start < e);
            let seg_end = match (next, end.filter(|_| reading_on)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if 100.0 * ours / count_limit < cap {
                if !reading_on {
                    return start;
                }
                // Usage not explained by our calls must stay below `need`.
                let need = cap - 100.0 * ours / limit;
                if !decay {
                    if unexplained < need {
                        return start;
                    }
                } else if let Some(r) = reading {
                    let u = unexplained.max(0.0);
                    if u < need {
                        return start;
                    }
                    if need > 0.0 {
                        let t = r.at + window.mul_f64((1.0 - need / u).clamp(0.0, 1.0));
                        if seg_end.is_none_or(|e| t < e) {
                            return t.max(start);
                        }
                    }
                }
            }
            match (next, end.filter(|_| reading_on)) {
                (Some(n), e) if e.is_none_or(|e| n <= e) => {
                    if let Some((_, c)) = releases.next() {
                        ours -= f64::from(c);
                    }
                    start = n.max(start);
                }
                (_, Some(e)) => start = e,
                // Nothing left to release and still no room: only a longer window helps.
                _ => return start + window,
            }
        }
    }

    /// How long a call queued behind `units_ahead` waiting units would wait (estimate).
    pub fn predicted_wait(&mut self, units_ahead: u32, units: u32, now: Instant) -> Duration {
        if let Some(p) = self.paused_until(now) {
            return p - now;
        }
        if self.probe != Probe::Off {
            return self.recheck();
        }
        let needed = units_ahead.saturating_add(units.max(1));
        let est = self.estimate(now);
        let horizon = self
            .next_release(now)
            .map(|t| t.saturating_duration_since(now));
        if let Some(wait) = self
            .limits
            .paced_wait(est.usage_pct, est.per_call_pct, needed, horizon)
        {
            return wait;
        }
        self.time_until_room(needed, now, false)
            .saturating_duration_since(now)
    }

    /// When the oldest counted calls leave the window (for the RateLimit header).
    pub fn next_release_at(&self, now: Instant) -> Option<Instant> {
        self.next_release(now)
    }
}

#[cfg(test)]
mod tests;
