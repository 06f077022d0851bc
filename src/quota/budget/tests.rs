//! The budget against a simulated Meta: an exact sliding window per Page, whole-percent
//! readings (floored), throttled calls counted too, optional usage by other apps, and a fixed
//! round trip. A greedy client keeps one call waiting at all times (unbounded overload).

use std::collections::VecDeque;

use super::*;

const ROUND_TRIP: Duration = Duration::from_millis(50);

struct Meta {
    limit: u32,
    window: Duration,
    arrivals: VecDeque<Instant>,
    /// Calls of other apps always present in the window.
    other: u32,
    /// (arrival, throttled) of every call.
    log: Vec<(Instant, bool)>,
}

impl Meta {
    fn new(limit: u32, window: Duration) -> Meta {
        Meta {
            limit,
            window,
            arrivals: VecDeque::new(),
            other: 0,
            log: Vec::new(),
        }
    }

    /// Charges one call arriving at `at`: the reading and whether it was throttled.
    fn call(&mut self, at: Instant) -> (Usage, bool) {
        while self
            .arrivals
            .front()
            .is_some_and(|&t| at.saturating_duration_since(t) >= self.window)
        {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(at);
        let count = self.arrivals.len() as u64 + u64::from(self.other);
        let throttled = count > u64::from(self.limit);
        self.log.push((at, throttled));
        let pct = (count * 100 / u64::from(self.limit)) as f64;
        (
            Usage {
                call_count: pct,
                total_time: (pct / 2.0).floor(),
                total_cputime: (pct / 2.0).floor(),
            },
            throttled,
        )
    }

    /// Calls answered (not throttled) per whole window since `t0`.
    fn ok_per_window(&self, t0: Instant, windows: u32) -> Vec<u32> {
        let mut out = vec![0; windows as usize];
        for &(at, throttled) in &self.log {
            let k = (at.saturating_duration_since(t0).as_secs_f64() / self.window.as_secs_f64())
                as usize;
            if !throttled && k < out.len() {
                out[k] += 1;
            }
        }
        out
    }

    fn throttled_per_window(&self, t0: Instant, windows: u32) -> Vec<u32> {
        let mut out = vec![0; windows as usize];
        for &(at, throttled) in &self.log {
            let k = (at.saturating_duration_since(t0).as_secs_f64() / self.window.as_secs_f64())
                as usize;
            if throttled && k < out.len() {
                out[k] += 1;
            }
        }
        out
    }
}

/// What the budget learns from a call Meta answered with `meta.call`'s reading.
fn reply((usage, throttled): (Usage, bool)) -> Observation {
    Observation {
        usage: Some(usage),
        throttled,
        answered: true,
        ..Observation::default()
    }
}

fn limits(guess: u32, window_s: u64, learn: bool) -> Limits {
    Limits {
        guess,
        window: Duration::from_secs(window_s),
        headroom_pct: 2.0,
        threshold_pct: 60.0,
        learn,
    }
}

struct Reply {
    at: Instant,
    ticket: Ticket,
    usage: Usage,
    throttled: bool,
}

/// Runs a greedy client from `t0` for `windows` windows; returns the budget and Meta.
fn overload(limits: Limits, meta: Meta, windows: u32) -> (Budget, Meta, Instant) {
    overload_with(limits, meta, windows, Duration::ZERO)
}

/// [`overload`] where each call takes up to 10 ms more to reach Meta and its reply up to 10
/// ms more to come back (a fixed pseudo-random sequence): calls sent together arrive, and
/// their replies return, in any order.
fn overload_spread(limits: Limits, meta: Meta, windows: u32) -> (Budget, Meta, Instant) {
    overload_with(limits, meta, windows, Duration::from_millis(10))
}

fn overload_with(
    limits: Limits,
    meta: Meta,
    windows: u32,
    spread: Duration,
) -> (Budget, Meta, Instant) {
    let (budgets, meta, t0) = overload_replicas(limits, meta, windows, spread, 1);
    let b = budgets.into_iter().next().expect("one replica");
    (b, meta, t0)
}

/// [`overload_with`] through `replicas` replicas that decide alone (Redis unreachable), each
/// with its share of the budget (`1 / replicas`), each with a greedy client; Meta counts
/// the calls of all of them in every reading.
fn overload_replicas(
    limits: Limits,
    meta: Meta,
    windows: u32,
    spread: Duration,
    replicas: usize,
) -> (Vec<Budget>, Meta, Instant) {
    let t0 = Instant::now();
    let mut budgets: Vec<Budget> = (0..replicas)
        .map(|_| {
            let mut b = Budget::new(limits, t0);
            b.set_share(1.0 / replicas as f64);
            b
        })
        .collect();
    let mut meta = meta;
    let end = t0 + meta.window * windows;
    let mut now = t0;
    let mut seed: u64 = 1;
    let mut delay = || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        spread.mul_f64((seed >> 11) as f64 / (1u64 << 53) as f64)
    };
    // Calls on their way to Meta (arrival, order sent, replica, ticket, extra delay of the
    // reply), and replies on their way back (arrival, order sent, replica, reply), each
    // soonest (then first sent) last.
    let mut arriving: Vec<(Instant, u64, usize, Ticket, Duration)> = Vec::new();
    let mut pending: Vec<(Instant, u64, usize, Reply)> = Vec::new();
    let mut sent = 0u64;
    while now < end {
        while arriving.last().is_some_and(|a| a.0 <= now) {
            let (at, n, replica, ticket, back) = arriving.pop().expect("last");
            let (usage, throttled) = meta.call(at);
            let reply = Reply {
                at: at + ROUND_TRIP / 2 + back,
                ticket,
                usage,
                throttled,
            };
            pending.push((reply.at, n, replica, reply));
            pending.sort_by_key(|p| std::cmp::Reverse((p.0, p.1)));
        }
        while pending.last().is_some_and(|p| p.0 <= now) {
            let (_, _, replica, r) = pending.pop().expect("last");
            let obs = Observation {
                usage: Some(r.usage),
                regain_minutes: Some(0.0),
                throttled: r.throttled,
                answered: true,
            };
            budgets[replica].observe(Some(&r.ticket), &obs, r.at);
            budgets[replica].finish(&r.ticket, r.at);
        }
        let mut admitted = false;
        let mut until = end;
        for (replica, b) in budgets.iter_mut().enumerate() {
            match b.try_admit(1, now) {
                Ok(ticket) => {
                    let (there, back) = (delay(), delay());
                    arriving.push((now + ROUND_TRIP / 2 + there, sent, replica, ticket, back));
                    arriving.sort_by_key(|a| std::cmp::Reverse((a.0, a.1)));
                    sent += 1;
                    admitted = true;
                }
                Err(hold) => until = until.min(hold.until),
            }
        }
        if !admitted {
            let next_event = [arriving.last().map(|a| a.0), pending.last().map(|p| p.0)]
                .into_iter()
                .flatten()
                .min();
            assert!(until > now || next_event.is_some_and(|t| t <= now));
            let next = next_event.map_or(until, |t| t.min(until)).min(end);
            now = next.max(now + Duration::from_micros(1));
        }
    }
    (budgets, meta, t0)
}

#[test]
fn a_right_guess_under_overload_uses_the_whole_budget_and_is_never_throttled() {
    for (limit, window_s) in [(60, 20), (200, 4), (4800, 3600)] {
        let (_, meta, t0) = overload(
            limits(limit, window_s, false),
            Meta::new(limit, Duration::from_secs(window_s)),
            4,
        );
        let throttled: u32 = meta.throttled_per_window(t0, 4).iter().sum();
        assert_eq!(throttled, 0, "limit {limit}");
        let ok = meta.ok_per_window(t0, 4);
        // Where one call is worth more than the headroom, a window loses a whole call or two
        // to the sub-bucket and round-trip margins.
        let floor = if limit < 100 { 0.95 } else { 0.97 };
        for (k, n) in ok.iter().enumerate().skip(1) {
            let used = f64::from(*n) / f64::from(limit);
            assert!(used >= floor, "limit {limit}, window {k}: {ok:?}");
        }
    }
}

/// What a guess ten times too high may cost: at most 2 throttled calls in each of `windows`
/// windows, and 90 % of the budget used over the first three.
fn assert_few_throttled_and_most_used(meta: &Meta, t0: Instant, windows: u32) {
    let throttled = meta.throttled_per_window(t0, windows);
    assert!(throttled.iter().all(|&n| n <= 2), "{throttled:?}");
    let ok: u32 = meta.ok_per_window(t0, 3).iter().sum();
    let budget = 3 * meta.limit;
    assert!(f64::from(ok) >= 0.9 * f64::from(budget), "{ok} of {budget}");
}

#[test]
fn a_guess_ten_times_too_high_is_lowered_by_the_readings() {
    let (mut b, meta, t0) = overload(
        limits(600, 20, false),
        Meta::new(60, Duration::from_secs(20)),
        3,
    );
    assert_few_throttled_and_most_used(&meta, t0, 3);
    let est = b.estimate(t0 + Duration::from_secs(60));
    assert_eq!(est.source, LimitSource::Lowered);
    assert!((55.0..=60.0).contains(&est.limit), "{est:?}");
}

#[test]
fn a_guess_ten_times_too_low_is_raised_only_with_learn_limits() {
    // Eight windows: what was learned keeps holding as the readings that taught it age.
    let (mut b, meta, t0) = overload(
        limits(20, 20, true),
        Meta::new(200, Duration::from_secs(20)),
        8,
    );
    let ok = meta.ok_per_window(t0, 8);
    assert_eq!(meta.throttled_per_window(t0, 8), [0; 8]);
    for n in &ok[1..] {
        assert!(f64::from(*n) >= 0.9 * 200.0, "{ok:?}");
    }
    let est = b.estimate(t0 + Duration::from_secs(160));
    assert_eq!(est.source, LimitSource::Learned);
    assert!((180.0..=200.0).contains(&est.limit), "{est:?}");

    // Without learn_limits the guess is the ceiling.
    let (_, meta, t0) = overload(
        limits(20, 20, false),
        Meta::new(200, Duration::from_secs(20)),
        3,
    );
    for n in meta.ok_per_window(t0, 3) {
        assert!(n <= 20, "{n}");
    }
}

#[test]
fn usage_of_other_apps_counts_as_consumed() {
    let mut meta = Meta::new(100, Duration::from_secs(10));
    meta.other = 50;
    let (mut b, meta, t0) = overload(limits(100, 10, false), meta, 3);
    assert_eq!(meta.throttled_per_window(t0, 3), [0, 0, 0]);
    let ok = meta.ok_per_window(t0, 3);
    // Others leave 50 calls a window; ours are counted conservatively (see below), and the
    // first window after the start is still learning.
    for n in &ok[2..] {
        assert!((45..=50).contains(n), "{ok:?}");
    }
    // Whether the Page's limit is lower or others use it cannot be told apart from the
    // readings alone; either way the estimate follows Meta's count, not ours.
    let est = b.estimate(t0 + Duration::from_secs(30));
    assert!(est.usage_pct >= 94.0, "{est:?}");
}

#[test]
fn at_low_usage_calls_go_at_once_sequential_or_in_a_burst() {
    let l = limits(4800, 3600, false);
    let t0 = Instant::now();
    let mut b = Budget::new(l, t0);
    let mut meta = Meta::new(4800, l.window);
    let mut now = t0;
    // Sequential: each call waits for its reply, never for the budget.
    for _ in 0..200 {
        let t = b.try_admit(1, now).expect("sequential calls go at once");
        let r = meta.call(now + ROUND_TRIP / 2);
        now += ROUND_TRIP;
        b.observe(Some(&t), &reply(r), now);
        b.finish(&t, now);
    }
    // 200 at the same instant at ~4 % usage: all go, no in-flight cap.
    for i in 0..200 {
        assert!(b.try_admit(1, now).is_ok(), "call {i} of the burst");
    }
    assert_eq!(b.in_flight(), 200);
}

#[test]
fn bursts_while_other_apps_use_the_page_do_not_lock_it() {
    // Other apps hold 4 %, then half of the Page's budget. The 200 calls of a burst are in
    // flight together, so no single reading they bring back counts them (each counts only
    // the calls answered before its own was sent); the readings of the whole group do.
    // Sends `n` calls at `now` (all must go at once unless `may_hold`), answers them a round
    // trip later; returns the time after and how many went.
    let burst = |b: &mut Budget, meta: &mut Meta, now: Instant, n: usize, may_hold: bool| {
        let mut tickets = Vec::new();
        for i in 0..n {
            match b.try_admit(1, now) {
                Ok(t) => tickets.push(t),
                Err(_) if may_hold => break,
                Err(h) => panic!("call {i} of {n} held: {h:?}"),
            }
        }
        let readings: Vec<_> = tickets
            .iter()
            .map(|_| meta.call(now + ROUND_TRIP / 2))
            .collect();
        let now = now + ROUND_TRIP;
        for (t, r) in tickets.iter().zip(readings) {
            b.observe(Some(t), &reply(r), now);
            b.finish(t, now);
        }
        (now, tickets.len())
    };
    for other in [200, 2400] {
        let l = limits(4800, 3600, false);
        let t0 = Instant::now();

        // A few percent from others arrive after our first call: every burst goes at once.
        // (Half the Page arriving with our burst would look like a limit of a few hundred
        // calls: that is paced, as it must be.)
        if other <= 200 {
            let mut b = Budget::new(l, t0);
            let mut meta = Meta::new(4800, l.window);
            let (mut now, _) = burst(&mut b, &mut meta, t0, 1, false);
            meta.other = other;
            for _ in 0..3 {
                now = burst(&mut b, &mut meta, now, 200, false).0;
            }
            let est = b.estimate(now);
            assert!(est.usage_pct < 70.0, "other {other}: {est:?}");
        }

        // Others are there before our first call, whose reading alone cannot tell a Page
        // used by others from a limit a hundred times lower: the next bursts are paced (part
        // goes at once) until their groups' readings settle it, within a few round trips.
        let mut b = Budget::new(l, t0);
        let mut meta = Meta::new(4800, l.window);
        meta.other = other;
        let (mut now, _) = burst(&mut b, &mut meta, t0, 1, false);
        let mut paced = 0;
        loop {
            let went;
            (now, went) = burst(&mut b, &mut meta, now, 200, true);
            assert!(went >= 1, "other {other}");
            if went == 200 {
                break;
            }
            paced += 1;
            assert!(paced <= 3, "other {other}: {:?}", b.estimate(now));
        }
        now = burst(&mut b, &mut meta, now, 200, false).0;
        let est = b.estimate(now);
        assert!(est.usage_pct < 70.0, "other {other}: {est:?}");
        assert_eq!(meta.throttled_per_window(t0, 1), [0], "other {other}");
    }
}

#[test]
fn before_the_first_reading_only_the_blind_allowance_goes() {
    // A successful reply without a usage header is Meta's "about 0 %".
    let zero = reply((Usage::default(), false));
    let t0 = Instant::now();
    let mut b = Budget::new(limits(600, 20, false), t0);
    let tickets: Vec<Ticket> = (0..6).map(|_| b.try_admit(1, t0).unwrap()).collect();
    let hold = b.try_admit(1, t0).unwrap_err();
    assert_eq!(hold.reason, Reason::FirstReading);
    // The first reply counts only its own call: the others wait for the rest of the six.
    let now = t0 + ROUND_TRIP;
    for (i, t) in tickets.iter().enumerate() {
        assert_eq!(
            b.try_admit(1, now).unwrap_err().reason,
            Reason::FirstReading,
            "after {i} replies"
        );
        b.observe(Some(t), &zero, now);
        b.finish(t, now);
    }
    assert!(b.try_admit(1, now).is_ok());

    // A blind call that never comes back holds the others for a second at most.
    let mut b = Budget::new(limits(600, 20, false), t0);
    let tickets: Vec<Ticket> = (0..6).map(|_| b.try_admit(1, t0).unwrap()).collect();
    for t in &tickets[1..] {
        b.observe(Some(t), &zero, now);
        b.finish(t, now);
    }
    assert_eq!(
        b.try_admit(1, now).unwrap_err().reason,
        Reason::FirstReading
    );
    assert!(b.try_admit(1, t0 + MIN_BLIND_HOLD).is_ok());
}

#[test]
fn blind_calls_hold_the_others_for_round_trips_measured_by_their_own_replies() {
    let zero = reply((Usage::default(), false));
    // Graph answers in 1.2 s, past the shortest hold; the first reply says so.
    let slow = Duration::from_millis(1200);
    let t0 = Instant::now();
    let mut b = Budget::new(limits(600, 20, false), t0);
    let tickets: Vec<Ticket> = (0..6).map(|_| b.try_admit(1, t0).unwrap()).collect();
    b.observe(Some(&tickets[0]), &zero, t0 + slow);
    b.finish(&tickets[0], t0 + slow);
    let later = t0 + slow + Duration::from_millis(100);
    assert_eq!(
        b.try_admit(1, later).unwrap_err().reason,
        Reason::FirstReading
    );
    for t in &tickets[1..] {
        b.observe(Some(t), &zero, later);
        b.finish(t, later);
    }
    assert!(b.try_admit(1, later).is_ok());
}

#[test]
fn a_guess_ten_times_too_high_meets_a_backlog_without_a_flood() {
    // A backlog far beyond the budget waits when the window opens, and replies come back
    // spread over a few ms: the first of them counts only its own call, so letting the
    // backlog go on it would put most of `page_calls` in front of a Page that takes a tenth.
    let (_, meta, t0) = overload_spread(
        limits(4000, 10, false),
        Meta::new(400, Duration::from_secs(10)),
        4,
    );
    assert_few_throttled_and_most_used(&meta, t0, 4);
}

#[test]
fn a_throttle_pauses_until_counted_calls_leave_then_one_probe() {
    let l = limits(100, 10, false);
    let t0 = Instant::now();
    let mut b = Budget::new(l, t0);
    let mut tickets = Vec::new();
    // 100 calls spread over the window: ours explain the limit.
    for i in 0..100 {
        tickets.push(b.dispatched(1, t0 + l.window / 100 * i, false));
    }
    let at = t0 + l.window;
    // Graph throttles without a usage header or a regain time.
    let throttled = Observation {
        throttled: true,
        answered: true,
        ..Observation::default()
    };
    b.observe(Some(&tickets[49]), &throttled, at);
    for t in &tickets {
        b.finish(t, at);
    }
    let until = b.paused_until(at).expect("paused");
    // 100 % now, and our calls explain it: the pause ends when the oldest few have left,
    // a few hundredths of the window, not a fixed backoff.
    let pause = until - at;
    assert!(pause < l.window / 10, "{pause:?}");
    assert!(pause >= b.window.slot(), "{pause:?}");
    assert_eq!(b.try_admit(1, at).unwrap_err().reason, Reason::Paused);
    let probe = b.try_admit(1, until).expect("the probe");
    assert!(probe.probe);
    assert_eq!(b.try_admit(1, until).unwrap_err().reason, Reason::Probing);
    // The probe is throttled again: a longer pause, then another probe.
    b.observe(Some(&probe), &throttled, until + ROUND_TRIP);
    b.finish(&probe, until + ROUND_TRIP);
    let second = b.paused_until(until + ROUND_TRIP).expect("paused again") - (until + ROUND_TRIP);
    assert!(second > pause, "{second:?} after {pause:?}");
    // A probe that comes back fine resumes the bucket.
    let t = until + ROUND_TRIP + second;
    let probe = b.try_admit(1, t).expect("second probe");
    b.observe(
        Some(&probe),
        &Observation {
            usage: Some(Usage {
                call_count: 40.0,
                ..Usage::default()
            }),
            answered: true,
            ..Observation::default()
        },
        t + ROUND_TRIP,
    );
    b.finish(&probe, t + ROUND_TRIP);
    assert!(b.try_admit(1, t + ROUND_TRIP).is_ok());
}

#[test]
fn meta_regain_time_is_the_pause_and_total_time_counts_like_calls() {
    let l = limits(100, 10, false);
    let t0 = Instant::now();
    let mut b = Budget::new(l, t0);
    let t = b.try_admit(1, t0).unwrap();
    // total_time at 100 % throttles as call_count would.
    b.observe(
        Some(&t),
        &Observation {
            usage: Some(Usage {
                call_count: 3.0,
                total_time: 100.0,
                total_cputime: 10.0,
            }),
            regain_minutes: Some(7.0),
            throttled: false,
            answered: true,
        },
        t0,
    );
    assert_eq!(b.paused_until(t0), Some(t0 + Duration::from_secs(420)));
}

#[test]
fn a_reading_the_bucket_cannot_explain_is_probed_not_waited_out() {
    // Other apps hold the Page at 99 %: nothing of ours will leave to make room, so after the
    // unexplained usage has probably drained one probe goes, rather than waiting a window.
    let l = limits(100, 100, false);
    let t0 = Instant::now();
    let mut b = Budget::new(l, t0);
    let reading = |pct: f64| Observation {
        usage: Some(Usage {
            call_count: pct,
            ..Usage::default()
        }),
        answered: true,
        ..Observation::default()
    };
    // 50 calls at 50 %: they explain the usage, and the limit of 100 holds.
    let mut last = None;
    for _ in 0..50 {
        let t = b.dispatched(1, t0, false);
        b.finish(&t, t0);
        last = Some(t);
    }
    let t = last.unwrap();
    b.observe(Some(&t), &reading(50.0), t0);
    // Then the Page is at 99 %: 49 points our calls do not explain.
    b.observe(Some(&t), &reading(99.0), t0);
    let est = b.estimate(t0);
    assert!(est.unexplained_pct >= 45.0, "{est:?}");
    let hold = b.try_admit(1, t0).unwrap_err();
    assert_eq!(hold.reason, Reason::Full);
    assert!(hold.until - t0 < Duration::from_secs(10), "{hold:?}");
    assert!(b.try_admit(1, hold.until).unwrap().probe);
}

#[test]
fn predicted_wait_follows_the_window() {
    let l = limits(10, 10, false);
    let t0 = Instant::now();
    let mut b = Budget::new(l, t0);
    for _ in 0..10 {
        let t = b.dispatched(1, t0, false);
        b.finish(&t, t0);
    }
    // Full: the next call fits once the first sub-bucket leaves, one window later.
    let w = b.predicted_wait(0, 1, t0);
    assert!(w >= l.window && w <= l.window + b.window.slot(), "{w:?}");
    assert_eq!(b.try_admit(1, t0).unwrap_err().reason, Reason::Full);
    assert!(b.try_admit(1, t0 + w).is_ok());
}

#[test]
fn calls_answered_one_by_one_while_other_apps_use_the_page_do_not_lock_it() {
    // Other apps hold 5 % of a Page of 4800; our calls go one after another (or a burst
    // trickles out on a busy machine), each answered before the next is sent.
    for others_first in [false, true] {
        let l = limits(4800, 3600, false);
        let t0 = Instant::now();
        let mut b = Budget::new(l, t0);
        let mut meta = Meta::new(4800, l.window);
        if others_first {
            meta.other = 240;
        }
        let mut now = t0;
        for i in 0..40 {
            let t = b.try_admit(1, now).unwrap_or_else(|h| {
                panic!(
                    "others first {others_first}: call {i} held: {h:?} {:?}",
                    b.estimate(now)
                )
            });
            let r = meta.call(now + ROUND_TRIP / 2);
            now += ROUND_TRIP;
            // As Meta: no usage header at 0 %.
            let obs = if r.0.max() < 1.0 {
                Observation {
                    answered: true,
                    ..Observation::default()
                }
            } else {
                reply(r)
            };
            b.observe(Some(&t), &obs, now);
            b.finish(&t, now);
            meta.other = 240;
        }
        let est = b.estimate(now);
        assert!(est.usage_pct < 20.0, "others first {others_first}: {est:?}");
        // Then a burst: 200 more calls are 4 % of the Page; all go at once.
        for i in 0..200 {
            if let Err(h) = b.try_admit(1, now) {
                panic!(
                    "others first {others_first}: burst call {i} held: {h:?} {:?}",
                    b.estimate(now)
                );
            }
        }
    }
}

#[test]
fn a_burst_that_trickles_out_while_other_apps_use_the_page_does_not_lock_it() {
    for step in [1usize, 5, 10, 25] {
        let l = limits(4800, 3600, false);
        let t0 = Instant::now();
        let mut b = Budget::new(l, t0);
        let mut meta = Meta::new(4800, l.window);
        // Our first call, then others at 5 %.
        let t = b.try_admit(1, t0).unwrap();
        let r = meta.call(t0 + ROUND_TRIP / 2);
        let mut now = t0 + ROUND_TRIP;
        b.observe(Some(&t), &reply(r), now);
        b.finish(&t, now);
        meta.other = 240;
        for round in 0..3 {
            // A fixed round trip: replies come back in the order the calls went.
            let mut pending = VecDeque::new();
            let mut sent = 0;
            while sent < 200 || !pending.is_empty() {
                while pending
                    .front()
                    .is_some_and(|p: &(Instant, _, _)| p.0 <= now)
                {
                    let (_, t, r) = pending.pop_front().expect("front");
                    b.observe(Some(&t), &reply(r), now);
                    b.finish(&t, now);
                }
                for _ in 0..step.min(200 - sent) {
                    let t = b.try_admit(1, now).unwrap_or_else(|h| {
                        panic!(
                            "step {step} round {round}: call {sent} held: {h:?} {:?}",
                            b.estimate(now)
                        )
                    });
                    let r = meta.call(now + ROUND_TRIP / 2);
                    pending.push_back((now + ROUND_TRIP, t, r));
                    sent += 1;
                }
                now += Duration::from_millis(10);
            }
        }
    }
}

#[test]
fn an_upper_bound_counts_the_calls_that_left_our_window_during_the_round_trip() {
    // A reading counts what Meta held when the call arrived; by the time its reply is back,
    // calls Meta still counted then may have left our window. Counting only what is left
    // would bound the limit below the truth and, once a group proves more, drop every bound.
    let l = limits(4000, 10, false);
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut b = Budget::new(l, t0);
    let mut meta = Meta::new(400, l.window);
    let call = |b: &mut Budget, meta: &mut Meta, at: Instant| {
        let t = b.dispatched(1, at, false);
        let r = meta.call(at + ROUND_TRIP / 2);
        (t, r, at + ROUND_TRIP)
    };
    let answer = |b: &mut Budget, (t, r, at): (Ticket, (Usage, bool), Instant)| {
        b.observe(Some(&t), &reply(r), at);
        b.finish(&t, at);
    };
    // One call first (the round trip is learned), then three late in the first sub-bucket.
    let first = call(&mut b, &mut meta, t0);
    answer(&mut b, first);
    let three: Vec<_> = (0..3).map(|_| call(&mut b, &mut meta, ms(60))).collect();
    for c in three {
        answer(&mut b, c);
    }
    // 380 more over the window, about two in flight at a time.
    let mut pending = VecDeque::new();
    for i in 0..380 {
        let at = ms(200 + 24 * i);
        while pending
            .front()
            .is_some_and(|(_, _, end): &(Ticket, _, Instant)| *end <= at)
        {
            answer(&mut b, pending.pop_front().expect("front"));
        }
        pending.push_back(call(&mut b, &mut meta, at));
    }
    for c in pending {
        answer(&mut b, c);
    }
    // Meta still holds the three when this call arrives (384 calls: 96 %); they leave our
    // window before its reply is back.
    let last = call(&mut b, &mut meta, ms(10_056));
    assert_eq!(last.1 .0.call_count, 96.0);
    let end = last.2;
    answer(&mut b, last);
    assert_eq!(b.window.clone().count(end), 381);
    let log = b.bounds.expect("bounds");
    let held = log.current.merge(log.previous);
    assert!(held.upper >= 400.0, "{held:?}");
    assert!(held.lower <= 400.0, "{held:?}");
    assert!(b.estimate(end).limit <= 400.0);
}

#[test]
fn a_group_bound_a_little_above_the_upper_bounds_keeps_the_lowered_limit() {
    // Bounds a few calls apart that disagree (a call slow to reach Meta counted on the wrong
    // side of a window's edge) must not send the limit back to a guess ten times too high;
    // a group bound far above them is other apps' usage, and the guess is back.
    let l = limits(4000, 10, false);
    let t0 = Instant::now();
    let mut b = Budget::new(l, t0);
    let mut log = BoundsLog::new(t0);
    log.current = Bounds {
        lower: 396.0,
        upper: 400.5,
        slope: 0.0,
    };
    b.bounds = Some(log);
    assert_eq!(b.limit(t0), (396.0, LimitSource::Lowered));

    b.learn_group_lower(402.0, t0);
    let (limit, source) = b.limit(t0);
    assert_eq!(source, LimitSource::Lowered);
    assert!((396.0..=400.5).contains(&limit), "{limit}");

    b.learn_group_lower(600.0, t0);
    assert_eq!(b.limit(t0), (4000.0, LimitSource::Configured));
}

#[test]
fn replicas_deciding_alone_under_overload_are_not_throttled_and_use_most_of_the_budget() {
    // Redis unreachable: each replica counts only its own calls against its share, while
    // every reading counts the others' calls too. Its bounds are learned from its own calls,
    // so they are bounds on its share, the units it decides in. (Compared with the whole
    // Page's guess they read as other apps' usage: the limit went back to a guess ten times
    // too high, and the replicas flooded the Page with hundreds of throttled calls.)
    for (guess, learn, replicas, spread_ms) in [
        (400, false, 2, 10),
        (400, false, 3, 10),
        (4000, false, 2, 0),
        (4000, false, 2, 10),
        (4000, false, 2, 30),
        (4000, false, 3, 0),
        (4000, false, 3, 10),
        (4000, false, 3, 30),
        (4000, false, 5, 10),
        (40, true, 2, 10),
        (40, true, 3, 10),
    ] {
        let (_, meta, t0) = overload_replicas(
            limits(guess, 10, learn),
            Meta::new(400, Duration::from_secs(10)),
            6,
            Duration::from_millis(spread_ms),
            replicas,
        );
        let case = format!("guess {guess}, learn {learn}, {replicas} replicas, {spread_ms} ms");
        let throttled = meta.throttled_per_window(t0, 6);
        let ok = meta.ok_per_window(t0, 6);
        let most = 2 * replicas as u32;
        assert!(
            throttled.iter().all(|&n| n <= most),
            "{case}: {throttled:?}"
        );
        for n in &ok[1..] {
            assert!(f64::from(*n) >= 0.9 * 400.0, "{case}: {ok:?}");
        }
    }
}

#[test]
fn other_apps_on_a_page_whose_guess_is_far_too_high_let_no_flood_through() {
    // Other apps' usage makes a group's lower bound exceed the upper bounds (which assume
    // nobody else uses the Page), and those are dropped. With nothing else the limit went
    // back to the guess, and the next round trip sent hundreds of calls into the throttle
    // (135 to 660 in the first window here). How far our own calls moved the usage keeps it
    // down.
    for (guess, other, spread_ms) in [
        (4000, 20, 10),
        (4000, 40, 10),
        (4000, 80, 0),
        (4000, 80, 10),
        (4000, 120, 30),
        (4000, 200, 10),
        (1000, 80, 10),
    ] {
        let mut meta = Meta::new(400, Duration::from_secs(10));
        meta.other = other;
        let (_, meta, t0) = overload_with(
            limits(guess, 10, false),
            meta,
            6,
            Duration::from_millis(spread_ms),
        );
        let case = format!("guess {guess}, other apps {other}, {spread_ms} ms");
        let throttled = meta.throttled_per_window(t0, 6);
        assert!(throttled.iter().all(|&n| n <= 2), "{case}: {throttled:?}");
        let ok = meta.ok_per_window(t0, 6);
        for n in &ok[1..] {
            assert!(
                f64::from(*n) >= 0.9 * f64::from(400 - other),
                "{case}: {ok:?}"
            );
        }
    }
}
