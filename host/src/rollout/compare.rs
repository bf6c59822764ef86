//! How a shadow candidate's outcome for an entry compares with the live one's: commands in a
//! canonical form (the JSON `plugin exec` prints: columns by name, so the order a handler lists
//! them in does not matter, the order of commands does), failures by kind.

use crate::dead_letter::FailureKind;
use crate::plugin::wit;
use serde_json::{Value as Json, json};

/// What one version did with an entry, in the form it is compared and shown in.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Commands that passed validation, canonical.
    Commands(Vec<Json>),
    /// Commands validation refused (forbidden table or column, unknown column, a value that does
    /// not fit), with the reason.
    Rejected { commands: Vec<Json>, reason: String },
    /// The handler failed: its failure kind and reason.
    Failed { kind: FailureKind, reason: String },
}

impl Outcome {
    /// The canonical form of `commands`.
    pub fn canonical(commands: &[wit::Command]) -> Vec<Json> {
        commands
            .iter()
            .map(crate::plugin::readable::command_json)
            .collect()
    }

    /// As stored in the sample of differences and shown by `rollout diff --json`.
    pub fn to_json(&self) -> Json {
        match self {
            Outcome::Commands(commands) => json!({"commands": commands}),
            Outcome::Rejected { commands, reason } => {
                json!({"rejected": reason, "commands": commands})
            }
            Outcome::Failed { kind, reason } => json!({"failed": kind.as_str(), "reason": reason}),
        }
    }

    /// Whether two outcomes are the same for the rollout: equal commands, or failures of the
    /// same kind (the reason's text may name the version), or both refused by validation.
    fn same_as(&self, other: &Outcome) -> bool {
        match (self, other) {
            (Outcome::Commands(a), Outcome::Commands(b)) => a == b,
            (Outcome::Failed { kind: a, .. }, Outcome::Failed { kind: b, .. }) => a == b,
            (Outcome::Rejected { .. }, Outcome::Rejected { .. }) => true,
            _ => false,
        }
    }
}

/// How the candidate's outcome for an entry compares with the live version's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// The same commands, or the same kind of failure.
    Same,
    /// Both wrote, differently (or both failed, differently).
    Different,
    /// The live version wrote; the candidate's handler failed.
    CandidateFailed,
    /// The live version failed (or was refused); the candidate wrote.
    CandidateSucceeded,
    /// Validation refused the candidate's commands (a table or column it may not write, one
    /// that does not exist): it would have been dead-lettered as `forbidden-command`.
    CandidateRejected,
}

impl Verdict {
    /// Every verdict, in the order reports list them.
    pub const ALL: [Verdict; 5] = [
        Verdict::Same,
        Verdict::Different,
        Verdict::CandidateFailed,
        Verdict::CandidateSucceeded,
        Verdict::CandidateRejected,
    ];

    /// As tallies, metrics and reports name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Same => "same",
            Verdict::Different => "different",
            Verdict::CandidateFailed => "candidate-failed",
            Verdict::CandidateSucceeded => "candidate-succeeded",
            Verdict::CandidateRejected => "candidate-rejected",
        }
    }
}

/// Compares the `candidate`'s outcome for an entry with the `live` one's.
pub fn compare(live: &Outcome, candidate: &Outcome) -> Verdict {
    if live.same_as(candidate) {
        return Verdict::Same;
    }
    match (live, candidate) {
        (_, Outcome::Rejected { .. }) => Verdict::CandidateRejected,
        (Outcome::Commands(_), Outcome::Failed { .. }) => Verdict::CandidateFailed,
        (Outcome::Failed { .. } | Outcome::Rejected { .. }, Outcome::Commands(_)) => {
            Verdict::CandidateSucceeded
        }
        _ => Verdict::Different,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(value: i64) -> Outcome {
        Outcome::Commands(vec![
            json!({"upsert": {"table": "faces", "key": {"id": 1}, "set": {"x": value}}}),
        ])
    }

    fn failed(kind: FailureKind, reason: &str) -> Outcome {
        Outcome::Failed {
            kind,
            reason: reason.into(),
        }
    }

    fn rejected() -> Outcome {
        Outcome::Rejected {
            commands: Vec::new(),
            reason: "table `users` is not granted".into(),
        }
    }

    #[test]
    fn equal_commands_and_failures_of_one_kind_are_the_same() {
        assert_eq!(compare(&commands(1), &commands(1)), Verdict::Same);
        let a = failed(FailureKind::Malformed, "no mediaId (1.0.0)");
        let b = failed(FailureKind::Malformed, "mediaId missing (2.0.0)");
        assert_eq!(compare(&a, &b), Verdict::Same);
        assert_eq!(compare(&rejected(), &rejected()), Verdict::Same);
    }

    #[test]
    fn each_way_of_differing_has_its_verdict() {
        assert_eq!(compare(&commands(1), &commands(2)), Verdict::Different);
        let trap = failed(FailureKind::PluginTrap, "boom");
        assert_eq!(compare(&commands(1), &trap), Verdict::CandidateFailed);
        assert_eq!(compare(&trap, &commands(1)), Verdict::CandidateSucceeded);
        assert_eq!(
            compare(&rejected(), &commands(1)),
            Verdict::CandidateSucceeded
        );
        assert_eq!(
            compare(&commands(1), &rejected()),
            Verdict::CandidateRejected
        );
        assert_eq!(compare(&trap, &rejected()), Verdict::CandidateRejected);
        let malformed = failed(FailureKind::Malformed, "bad");
        assert_eq!(compare(&trap, &malformed), Verdict::Different);
    }

    #[test]
    fn the_order_of_columns_is_not_a_difference_the_order_of_commands_is() {
        let value = |v: i64| wit::ColumnValue {
            column: format!("c{v}"),
            value: wit::Value::Integer(v),
        };
        let insert = |values: Vec<wit::ColumnValue>| {
            wit::Command::Insert(wit::Insert {
                table: "t".into(),
                values,
                on_conflict: wit::OnConflict::Ignore,
            })
        };
        let a = Outcome::canonical(&[insert(vec![value(1), value(2)])]);
        let b = Outcome::canonical(&[insert(vec![value(2), value(1)])]);
        assert_eq!(a, b);
        let c = Outcome::canonical(&[insert(vec![value(1)]), insert(vec![value(2)])]);
        let d = Outcome::canonical(&[insert(vec![value(2)]), insert(vec![value(1)])]);
        assert_ne!(c, d);
    }
}
