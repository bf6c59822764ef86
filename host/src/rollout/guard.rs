//! Automatic rollback: each host watches what the candidate does next to the live version over a
//! sliding window of the candidate's last entries, and gives up on it when it breaks a threshold.
//! The window is this host's (its own calls, measured here); the decision is the fleet's (the
//! rollout ends in PostgreSQL and every host follows within seconds).

use std::collections::VecDeque;
use std::time::Duration;

/// Below this, a difference of handler time p99s is noise on a shared machine, whatever the
/// ratio: a candidate is not rolled back for taking 60 µs where the live version takes 20 µs.
pub const LATENCY_FLOOR: Duration = Duration::from_millis(5);

/// The thresholds of one rollout (see `migrations/*_rollouts.sql`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// Roll back when the candidate's failure rate exceeds the live one's by more than this many
    /// percentage points.
    pub max_failure_points: f64,
    /// Over the candidate's last this many entries (checked once it has handled this many).
    pub window: usize,
    /// Roll back when the candidate's handler time p99 exceeds this many times the live one's
    /// (and by more than [`LATENCY_FLOOR`]).
    pub max_latency_factor: f64,
    /// Shadow mode: roll back when more than this percentage of the compared entries differ.
    pub max_difference_percent: Option<f64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_failure_points: 5.0,
            window: 200,
            max_latency_factor: 3.0,
            max_difference_percent: None,
        }
    }
}

/// Why a rollout was rolled back.
#[derive(Clone, Debug, PartialEq)]
pub enum Breach {
    /// The candidate failed more often than the live version, by more than the threshold.
    FailureRate {
        candidate: f64,
        live: f64,
        window: usize,
    },
    /// Validation refused the candidate's commands.
    Rejected(String),
    /// The candidate's handler time p99 was over the threshold.
    Latency { candidate: Duration, live: Duration },
    /// Too many of the shadow's entries differed.
    Differences { percent: f64, window: usize },
}

impl Breach {
    /// Every kind of breach, as [`Breach::kind`] names them.
    pub const KINDS: [&'static str; 4] = ["failure-rate", "rejected", "latency", "differences"];

    /// The breach's kind, for the metric's label.
    pub fn kind(&self) -> &'static str {
        match self {
            Breach::FailureRate { .. } => "failure-rate",
            Breach::Rejected(_) => "rejected",
            Breach::Latency { .. } => "latency",
            Breach::Differences { .. } => "differences",
        }
    }
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Breach::FailureRate {
                candidate,
                live,
                window,
            } => write!(
                f,
                "the candidate failed {candidate:.1}% of its last {window} entries, the live version {live:.1}% of its own"
            ),
            Breach::Rejected(reason) => {
                write!(f, "validation refused the candidate's commands: {reason}")
            }
            Breach::Latency { candidate, live } => write!(
                f,
                "the candidate's handler time p99 was {candidate:.1?}, the live version's {live:.1?}"
            ),
            Breach::Differences { percent, window } => write!(
                f,
                "{percent:.1}% of the last {window} entries compared differed from the live version"
            ),
        }
    }
}

/// The last `capacity` observations of one kind.
#[derive(Debug)]
struct Window<T> {
    items: VecDeque<T>,
    capacity: usize,
}

impl<T> Window<T> {
    fn new(capacity: usize) -> Self {
        Window {
            items: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
        }
    }

    fn push(&mut self, item: T) {
        if self.items.len() == self.capacity {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    fn full(&self) -> bool {
        self.items.len() == self.capacity
    }
}

/// One handler call, as the guard counts it.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    pub failed: bool,
    pub elapsed: Duration,
}

/// What one host saw of a rollout's two versions.
#[derive(Debug)]
pub struct Guard {
    thresholds: Thresholds,
    /// Whether the candidate's failures (and refused commands) roll it back: in a canary they
    /// reach the data and the dead-letter stream; a shadow is there to show them, and only its
    /// cost to the live path (latency) and an operator's limit on differences end it.
    judge_failures: bool,
    candidate: Window<Call>,
    live: Window<Call>,
    /// Shadow: whether each compared entry differed.
    compared: Window<bool>,
}

impl Guard {
    /// A guard with empty windows; `judge_failures`: see the field.
    pub fn new(thresholds: Thresholds, judge_failures: bool) -> Guard {
        Guard {
            thresholds,
            judge_failures,
            candidate: Window::new(thresholds.window),
            live: Window::new(thresholds.window),
            compared: Window::new(thresholds.window),
        }
    }

    /// Counts a call of the candidate.
    pub fn candidate(&mut self, call: Call) {
        self.candidate.push(call);
    }

    /// Counts a call of the live version.
    pub fn live(&mut self, call: Call) {
        self.live.push(call);
    }

    /// Counts a shadow comparison.
    pub fn compared(&mut self, differs: bool) {
        self.compared.push(differs);
    }

    /// The first threshold broken, if any. Rates and times are judged once the candidate's
    /// window is full, so a few early entries decide nothing.
    pub fn check(&self) -> Option<Breach> {
        let t = &self.thresholds;
        if let Some(limit) = t.max_difference_percent
            && self.compared.full()
        {
            let percent = percent_of(self.compared.items.iter().copied());
            if percent > limit {
                return Some(Breach::Differences {
                    percent,
                    window: self.compared.capacity,
                });
            }
        }
        if !self.candidate.full() || self.live.items.is_empty() {
            return None;
        }
        let candidate = percent_of(self.candidate.items.iter().map(|c| c.failed));
        let live = percent_of(self.live.items.iter().map(|c| c.failed));
        if self.judge_failures && candidate - live > t.max_failure_points {
            return Some(Breach::FailureRate {
                candidate,
                live,
                window: self.candidate.capacity,
            });
        }
        let (candidate, live) = (p99(&self.candidate), p99(&self.live));
        if candidate.as_secs_f64() > live.as_secs_f64() * t.max_latency_factor
            && candidate.saturating_sub(live) > LATENCY_FLOOR
        {
            return Some(Breach::Latency { candidate, live });
        }
        None
    }
}

/// The percentage of `flags` that are set.
fn percent_of(flags: impl Iterator<Item = bool>) -> f64 {
    let (mut set, mut all) = (0usize, 0usize);
    for flag in flags {
        all += 1;
        set += usize::from(flag);
    }
    if all == 0 {
        0.0
    } else {
        set as f64 * 100.0 / all as f64
    }
}

/// The 99th percentile of the window's handler times.
fn p99(window: &Window<Call>) -> Duration {
    let mut times: Vec<Duration> = window.items.iter().map(|c| c.elapsed).collect();
    times.sort();
    let at = ((times.len() as f64) * 0.99).ceil() as usize;
    times
        .get(at.saturating_sub(1).min(times.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(failed: bool, ms: u64) -> Call {
        Call {
            failed,
            elapsed: Duration::from_millis(ms),
        }
    }

    fn guard(window: usize) -> Guard {
        Guard::new(
            Thresholds {
                window,
                ..Thresholds::default()
            },
            true,
        )
    }

    #[test]
    fn a_candidate_failing_a_third_of_its_entries_breaks_the_failure_threshold_once_its_window_is_full()
     {
        let mut guard = guard(30);
        for i in 0..29 {
            guard.live(call(false, 1));
            guard.candidate(call(i % 3 == 0, 1));
            assert_eq!(guard.check(), None, "the window is not full yet");
        }
        guard.candidate(call(false, 1));
        match guard.check() {
            Some(Breach::FailureRate {
                candidate,
                live,
                window: 30,
            }) => {
                assert!((candidate - 33.3).abs() < 0.1, "{candidate}");
                assert_eq!(live, 0.0);
            }
            other => panic!("expected a failure-rate breach, got {other:?}"),
        }
    }

    #[test]
    fn a_shadow_reports_failures_rather_than_ending_on_them() {
        let mut shadow = Guard::new(
            Thresholds {
                window: 10,
                ..Thresholds::default()
            },
            false,
        );
        for _ in 0..10 {
            shadow.live(call(false, 1));
            shadow.candidate(call(true, 1));
        }
        assert_eq!(shadow.check(), None);
    }

    #[test]
    fn failing_as_often_as_the_live_version_is_no_breach() {
        let mut guard = guard(20);
        for i in 0..20 {
            guard.live(call(i % 5 == 0, 1));
            guard.candidate(call(i % 5 == 1, 1));
        }
        assert_eq!(guard.check(), None);
    }

    #[test]
    fn a_slow_candidate_breaks_the_latency_threshold_but_not_below_the_floor() {
        let mut slow = guard(10);
        let mut quick = guard(10);
        for _ in 0..10 {
            slow.live(call(false, 2));
            slow.candidate(call(false, 40));
            // Ten times slower, yet by less than the floor: noise.
            quick.live(call(false, 0));
            quick.candidate(call(false, 1));
        }
        assert!(matches!(slow.check(), Some(Breach::Latency { .. })));
        assert_eq!(quick.check(), None);
    }

    #[test]
    fn differences_count_only_when_the_operator_set_a_limit() {
        let mut unlimited = guard(10);
        let mut limited = Guard::new(
            Thresholds {
                window: 10,
                max_difference_percent: Some(20.0),
                ..Thresholds::default()
            },
            false,
        );
        for i in 0..10 {
            unlimited.compared(i < 5);
            limited.compared(i < 5);
        }
        assert_eq!(unlimited.check(), None);
        assert_eq!(
            limited.check(),
            Some(Breach::Differences {
                percent: 50.0,
                window: 10
            })
        );
    }
}
