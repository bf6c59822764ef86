//! Whether PostgreSQL and Redis are reachable right now. (Readiness as a whole — these, and
//! plugins loaded — is [`crate::state::HostState::not_ready`].)
//!
//! Consumers report failures as they hit them, and a probe checks both services every
//! [`PROBE_INTERVAL`], so an outage shows even when no traffic arrives. `kaleidoscope status`
//! shows the result (and the HTTP readiness endpoint, where enabled, answers from it).

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

/// The dependencies a host needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dependency {
    /// PostgreSQL: where results are persisted.
    Database,
    /// Redis: where entries are read and acknowledged.
    Redis,
}

impl Dependency {
    /// The name operators know it by.
    pub fn name(self) -> &'static str {
        match self {
            Dependency::Database => "PostgreSQL",
            Dependency::Redis => "Redis",
        }
    }
}

/// Current outages, shared by every task of the host.
#[derive(Default, Debug)]
pub struct Health {
    database: Mutex<Option<Outage>>,
    redis: Mutex<Option<Outage>>,
}

impl Health {
    fn slot(&self, dependency: Dependency) -> &Mutex<Option<Outage>> {
        match dependency {
            Dependency::Database => &self.database,
            Dependency::Redis => &self.redis,
        }
    }

    /// Records a failure; returns true when this starts an outage.
    pub fn failed(&self, dependency: Dependency, error: &str) -> bool {
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

    /// The current outage of `dependency`, if any.
    pub fn outage(&self, dependency: Dependency) -> Option<Outage> {
        self.slot(dependency)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Human-readable reasons why the host is not ready; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        [
            (Dependency::Database, "PostgreSQL"),
            (Dependency::Redis, "Redis"),
        ]
        .into_iter()
        .filter_map(|(dependency, name)| {
            self.outage(dependency).map(|outage| {
                format!(
                    "{name} unavailable since {}: {}",
                    humantime::format_rfc3339_seconds(outage.since),
                    outage.error
                )
            })
        })
        .collect()
    }
}

/// Which dependency is out, if `error`'s chain says one cannot be reached: a lost or refused
/// connection to PostgreSQL ([`crate::persist::execute::is_outage`]) or to Redis (I/O errors,
/// refused or dropped connections, timeouts). Any other error — a statement PostgreSQL rejected,
/// a command Redis refused — is about the work, not the dependency, and blames nothing.
pub fn blame(error: &anyhow::Error) -> Option<Dependency> {
    error.chain().find_map(|cause| {
        if let Some(KnownOutage(dependency, _)) = cause.downcast_ref::<KnownOutage>() {
            Some(*dependency)
        } else if let Some(error) = cause.downcast_ref::<sqlx::Error>() {
            crate::persist::execute::is_outage(error).then_some(Dependency::Database)
        } else if let Some(error) = cause.downcast_ref::<redis::RedisError>() {
            redis_outage(error).then_some(Dependency::Redis)
        } else if let Some(crate::streams::StreamError::Redis(error)) =
            cause.downcast_ref::<crate::streams::StreamError>()
        {
            redis_outage(error).then_some(Dependency::Redis)
        } else {
            None
        }
    })
}

/// A dependency found not answering (a failed probe), whatever the error it gave: an outage
/// even if its cause is not one [`blame`] would recognise.
#[derive(Debug, thiserror::Error)]
#[error("{name} does not answer: {detail}", name = .0.name(), detail = .1)]
pub struct KnownOutage(pub Dependency, pub String);

/// Whether a Redis error means Redis cannot be reached (rather than that it refused a command).
fn redis_outage(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || matches!(
            error.code(),
            Some("LOADING" | "MASTERDOWN" | "TRYAGAIN" | "BUSY")
        )
}
