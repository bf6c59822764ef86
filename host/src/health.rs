//! Whether PostgreSQL and Redis are reachable right now. (Readiness as a whole — these, and
//! plugins loaded — is [`crate::state::HostState::not_ready`].)
//!
//! Consumers report failures as they hit them, and a probe checks both services every
//! [`PROBE_INTERVAL`], so an outage shows even when no traffic arrives. `kaleidoscope status`
//! shows the result (and the HTTP readiness endpoint, where enabled, answers from it).

use crate::failure::Dependency;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How often the probe checks PostgreSQL and Redis.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// A dependency that is failing, since when, and how.
#[derive(Clone, Debug)]
pub struct Outage {
    pub since: SystemTime,
    pub error: String,
}

/// Current outages, shared by every task of the host.
#[derive(Default, Debug)]
pub struct Health {
    database: Mutex<Option<Outage>>,
    redis: Mutex<Option<Outage>>,
    /// Until when errors are taken for the aftermath of the host's own stall (see
    /// [`Health::note_stall`]) rather than for an outage.
    stall_grace_until: Mutex<Option<std::time::Instant>>,
    /// The stall watch's last tick (see [`Health::tick`]); `None` where nothing watches.
    last_tick: Mutex<Option<std::time::Instant>>,
}

/// How long after the host itself stalled a dependency's error is not taken for an outage: the
/// requests that were in flight during the stall time out at once when it ends.
pub const STALL_GRACE: Duration = Duration::from_secs(5);
/// How often the stall watch ticks ([`Health::tick`]).
pub const STALL_TICK: Duration = Duration::from_millis(500);
/// How late a tick must be for the host to count as having stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(3);

impl Health {
    fn slot(&self, dependency: Dependency) -> &Mutex<Option<Outage>> {
        match dependency {
            Dependency::Database => &self.database,
            Dependency::Redis => &self.redis,
        }
    }

    /// Records a failure; returns true when this starts an outage.
    pub fn failed(&self, dependency: Dependency, error: &str) -> bool {
        // After a stall, whichever notices first — this error or the watch's next tick — takes
        // it for what it is: the order they run in after the host resumes is not fixed.
        self.tick();
        if self.just_stalled() {
            tracing::info!(
                "{} error right after the host itself stalled, not taken for an outage: {error}",
                dependency.name()
            );
            return false;
        }
        let mut slot = self
            .slot(dependency)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let started = slot.is_none();
        if started {
            *slot = Some(Outage {
                since: SystemTime::now(),
                error: error.to_string(),
            });
        }
        started
    }

    /// Records a success; returns true when this ends an outage.
    pub fn recovered(&self, dependency: Dependency) -> bool {
        self.slot(dependency)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some()
    }

    /// Records the outcome of using `dependency`, logging when an outage starts or ends.
    pub fn observe(&self, dependency: Dependency, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                if self.recovered(dependency) {
                    tracing::info!("{} is reachable again", dependency.name());
                }
            }
            Err(error) => {
                if self.failed(dependency, &error) {
                    tracing::warn!("{} is unavailable: {error}", dependency.name());
                }
            }
        }
    }

    /// The host itself did not run for `gap` (stopped with SIGSTOP, swapped out, starved of CPU):
    /// the timeouts of the requests it had in flight are its own doing, not its dependencies'.
    /// Clears the outages that began during the stall and ignores new errors for
    /// [`STALL_GRACE`]; a real outage is seen again by the next probe after that.
    pub fn note_stall(&self, gap: Duration) {
        tracing::warn!(
            "the host itself did not run for {:.1}s (stopped, swapped out or starved of CPU); timeouts from that time are not outages",
            gap.as_secs_f64()
        );
        let stall_began = SystemTime::now() - gap;
        *self
            .stall_grace_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now() + STALL_GRACE);
        for dependency in Dependency::ALL {
            let mut slot = self
                .slot(dependency)
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().is_some_and(|o| o.since >= stall_began) {
                *slot = None;
            }
        }
    }

    /// The stall watch's heartbeat, every [`STALL_TICK`]: a tick (or an error, see
    /// [`Health::failed`]) that comes more than [`STALL_AFTER`] after the previous one means the
    /// host did not run in between.
    pub fn tick(&self) {
        let now = std::time::Instant::now();
        let previous = self
            .last_tick
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(now);
        if let Some(previous) = previous
            && now.duration_since(previous) > STALL_AFTER
        {
            self.note_stall(now.duration_since(previous));
        }
    }

    /// Whether the host itself stalled moments ago (errors now are its own doing).
    pub fn just_stalled(&self) -> bool {
        self.stall_grace_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    /// The current outage of `dependency`, if any.
    pub fn outage(&self, dependency: Dependency) -> Option<Outage> {
        self.slot(dependency)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Human-readable reasons why the host is not ready; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        Dependency::ALL
            .into_iter()
            .filter_map(|dependency| {
                self.outage(dependency).map(|outage| {
                    format!(
                        "{} unavailable since {}: {}",
                        dependency.name(),
                        humantime::format_rfc3339_seconds(outage.since),
                        outage.error
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_begun_during_the_hosts_own_stall_is_cleared_and_new_errors_wait_out_the_grace() {
        let health = Health::default();
        assert!(health.failed(Dependency::Redis, "read timed out"));
        assert!(health.outage(Dependency::Redis).is_some());
        // The host did not run for a minute, and the outage began in that minute.
        health.note_stall(Duration::from_secs(60));
        assert!(health.outage(Dependency::Redis).is_none());
        assert!(health.just_stalled());
        assert!(!health.failed(Dependency::Redis, "read timed out"));
        assert!(health.problems().is_empty());
    }

    #[test]
    fn an_outage_older_than_the_stall_stays() {
        let health = Health::default();
        *health.redis.lock().unwrap() = Some(Outage {
            since: SystemTime::now() - Duration::from_secs(600),
            error: "connection refused".into(),
        });
        health.note_stall(Duration::from_secs(5));
        assert!(health.outage(Dependency::Redis).is_some());
    }
}
