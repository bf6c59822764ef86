//! Shipping a handler version safely: a **candidate** build of a deployed plugin runs beside its
//! **live** build on every host of the fleet, under a plan kept in PostgreSQL
//! ([`crate::persist::rollouts`]), until an operator promotes or aborts it, or a threshold rolls
//! it back.
//!
//! - **Shadow**: the live version handles every entry as always; the candidate runs on the same
//!   entries (a share of them, by key), its commands are validated and compared ([`compare`])
//!   and never executed, emitted or dead-lettered.
//! - **Canary**: the candidate handles a share of the entries, chosen by a key field
//!   ([`route`]), and its commands are executed as the live ones are.
//!
//! Both work because a handler returns its writes as data. Each host watches the two versions
//! ([`guard`]) and ends the rollout for the whole fleet when the candidate breaks a threshold.
//! Where this plugs into the delivery protocol is `delivery/candidate.rs`; how a host follows
//! the plan is `host/rollout_sync.rs`; the commands are `deploy/rollout.rs`.

pub mod compare;
pub mod diff;
pub mod guard;
pub mod route;

use crate::persist::rollouts::RolloutRow;
use crate::plugin::Plugin;
use guard::{Breach, Call, Guard, Thresholds};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// How the candidate takes part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Runs beside the live version; its writes are compared, never executed.
    Shadow,
    /// Handles its share of the entries for real.
    Canary,
}

impl Mode {
    /// As the `rollouts.mode` column holds it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shadow => "shadow",
            Mode::Canary => "canary",
        }
    }

    /// The mode a `rollouts.mode` value names.
    pub fn parse(text: &str) -> Option<Mode> {
        [Mode::Shadow, Mode::Canary]
            .into_iter()
            .find(|mode| mode.as_str() == text)
    }
}

/// The thresholds a stored rollout carries.
pub fn thresholds(row: &RolloutRow) -> Thresholds {
    Thresholds {
        max_failure_points: row.max_failure_points,
        window: usize::try_from(row.window_entries).unwrap_or(1).max(1),
        max_latency_factor: row.max_latency_factor,
        max_difference_percent: row.max_difference_percent,
    }
}

/// A rollout this host follows: its plan, the candidate loaded, and what the host saw of it.
#[derive(Debug)]
pub struct Active {
    pub row: RolloutRow,
    pub mode: Mode,
    pub candidate: Arc<Plugin>,
    guard: Mutex<Guard>,
    /// Set when this host rolled the rollout back (or saw it end), before the fleet's plan says
    /// so: from then on no entry goes to the candidate here.
    ended: AtomicBool,
}

impl Active {
    /// Follows `row` with its `candidate` loaded.
    pub fn new(row: RolloutRow, candidate: Arc<Plugin>) -> Option<Active> {
        let mode = Mode::parse(&row.mode)?;
        Some(Active {
            guard: Mutex::new(Guard::new(thresholds(&row), mode == Mode::Canary)),
            mode,
            row,
            candidate,
            ended: AtomicBool::new(false),
        })
    }

    /// The same rollout under a changed plan (a new share or mode): the candidate stays loaded
    /// and the guard starts a new window. A rollout this host rolled back stays ended here,
    /// whatever the plan says (its end may not have reached PostgreSQL).
    pub fn revised(&self, row: RolloutRow) -> Option<Active> {
        let revised = Active::new(row, self.candidate.clone())?;
        revised
            .ended
            .store(self.ended.load(Ordering::Acquire), Ordering::Release);
        Some(revised)
    }

    /// Whether the rollout applies to a batch handled by `live`: it still runs here, and `live` is
    /// the build the rollout was started against (a host serving another build has nothing to
    /// compare the candidate with, and says so in its heartbeat).
    pub fn applies_to(&self, live: &Plugin) -> bool {
        !self.ended.load(Ordering::Acquire)
            && live.name == self.row.plugin
            && live.sha256 == self.row.live_sha256
    }

    /// Whether the candidate takes the entry (`entry_id`, `fields`): handles it (canary) or runs
    /// on it beside the live version (shadow).
    pub fn takes(&self, entry_id: &str, fields: &[(String, String)]) -> bool {
        let key = route::key_of(self.row.key_field.as_deref(), fields, entry_id);
        route::within(route::bucket(self.row.id, key), self.row.percent)
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, Guard> {
        match self.guard.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Counts calls of each version and shadow comparisons, then checks the thresholds.
    pub fn observe(&self, live: &[Call], candidate: &[Call], compared: &[bool]) -> Option<Breach> {
        let mut guard = self.guard();
        for call in live {
            guard.live(*call);
        }
        for call in candidate {
            guard.candidate(*call);
        }
        for differs in compared {
            guard.compared(*differs);
        }
        guard.check()
    }

    /// Stops routing to the candidate on this host. Returns whether this call did it (the first
    /// to end a rollout reports it).
    pub fn end(&self) -> bool {
        !self.ended.swap(true, Ordering::AcqRel)
    }
}

/// The rollouts a host follows, by plugin name, and those it could not follow (the candidate
/// would not load here, or the host serves another live build), with why.
#[derive(Debug, Default)]
pub struct Followed {
    pub active: BTreeMap<String, Arc<Active>>,
    pub refused: BTreeMap<String, (RolloutRow, String)>,
}

impl Followed {
    /// The rollout that applies to a batch handled by `live`, if any.
    pub fn for_live(&self, live: &Plugin) -> Option<Arc<Active>> {
        self.active
            .get(&live.name)
            .filter(|active| active.applies_to(live))
            .cloned()
    }
}

/// What a host follows now, replaceable as a whole: a batch takes the snapshot once, like the
/// plugin set, so a change of plan never splits a batch.
#[derive(Default)]
pub struct Rollouts {
    current: RwLock<Arc<Followed>>,
}

impl Rollouts {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Followed> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the snapshot.
    pub fn replace(&self, followed: Followed) {
        let followed = Arc::new(followed);
        match self.current.write() {
            Ok(mut guard) => *guard = followed,
            Err(poisoned) => *poisoned.into_inner() = followed,
        }
    }
}
