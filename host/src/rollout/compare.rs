//! How a shadow candidate's outcome for an entry compares with the live one's: the checked
//! statements each would run, compared as sets of columns (the order a handler lists its
//! columns in does not matter; the order of commands does), and failures by kind. Compared
//! where they are, without copying either version's writes: JSON is made only for the sample of
//! differences.

use crate::dead_letter::FailureKind;
use crate::persist::validate::{Condition, Param, SetOp, SetParam, Statement};
use crate::plugin::readable::{if_missing_name, value_json};
use serde_json::{Map, Value as Json, json};

/// What one version did with an entry, as a rollout compares it.
#[derive(Clone, Copy, Debug)]
pub enum View<'a> {
    /// Statements that passed validation.
    Writes(&'a [Statement]),
    /// Commands validation refused (forbidden table or column, unknown column, a value that does
    /// not fit), with the reason.
    Rejected(&'a str),
    /// The handler failed: its failure kind and reason.
    Failed(FailureKind, &'a str),
}

impl View<'_> {
    /// As stored in the sample of differences and shown by `rollout diff --json`: the commands
    /// in the form `plugin exec` prints them, or the refusal or failure.
    pub fn to_json(self) -> Json {
        match self {
            View::Writes(statements) => {
                json!({"commands": statements.iter().map(statement_json).collect::<Vec<_>>()})
            }
            View::Rejected(reason) => json!({"rejected": reason}),
            View::Failed(kind, reason) => json!({"failed": kind.as_str(), "reason": reason}),
        }
    }

    /// Whether two outcomes are the same for the rollout: the same writes, or failures of the
    /// same kind (the reason's text may name the version), or both refused by validation.
    fn same_as(self, other: View) -> bool {
        match (self, other) {
            (View::Writes(a), View::Writes(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_statement(a, b))
            }
            (View::Failed(a, _), View::Failed(b, _)) => a == b,
            (View::Rejected(_), View::Rejected(_)) => true,
            _ => false,
        }
    }
}

/// How the candidate's outcome for an entry compares with the live version's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// The same writes, or the same kind of failure.
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
pub fn compare(live: View, candidate: View) -> Verdict {
    if live.same_as(candidate) {
        return Verdict::Same;
    }
    match (live, candidate) {
        (_, View::Rejected(_)) => Verdict::CandidateRejected,
        (View::Writes(_), View::Failed(..)) => Verdict::CandidateFailed,
        (View::Failed(..) | View::Rejected(_), View::Writes(_)) => Verdict::CandidateSucceeded,
        _ => Verdict::Different,
    }
}

/// Whether two checked statements write the same: the same command on the same table, with the
/// same columns and values in any order (validation refused duplicate columns, so one list
/// holding every column of the other, and as many, is the same set).
fn same_statement(a: &Statement, b: &Statement) -> bool {
    fn same<T>(a: &[T], b: &[T], matches: impl Fn(&T, &T) -> bool) -> bool {
        a.len() == b.len() && a.iter().all(|x| b.iter().any(|y| matches(x, y)))
    }
    let param = |x: &Param, y: &Param| x.column == y.column && x.value == y.value;
    let set = |x: &SetParam, y: &SetParam| {
        x.column == y.column
            && match (&x.op, &y.op) {
                (SetOp::Assign(a), SetOp::Assign(b)) => a == b,
                (SetOp::AppendUnique(a), SetOp::AppendUnique(b)) => a == b,
                _ => false,
            }
    };
    let condition =
        |x: &Condition, y: &Condition| x.equals == y.equals && param(&x.param, &y.param);
    match (a, b) {
        (
            Statement::Upsert { table, key, set: s },
            Statement::Upsert {
                table: t,
                key: k,
                set: s2,
            },
        ) => table == t && same(key, k, param) && same(s, s2, set),
        (
            Statement::Update {
                table,
                key,
                set: s,
                if_missing,
                only_if,
            },
            Statement::Update {
                table: t,
                key: k,
                set: s2,
                if_missing: m,
                only_if: o,
            },
        ) => {
            table == t
                && if_missing == m
                && same(key, k, param)
                && same(s, s2, set)
                && same(only_if, o, condition)
        }
        (
            Statement::Insert {
                table,
                values,
                ignore_conflict,
            },
            Statement::Insert {
                table: t,
                values: v,
                ignore_conflict: i,
            },
        ) => table == t && ignore_conflict == i && same(values, v, param),
        (Statement::Delete { table, key }, Statement::Delete { table: t, key: k }) => {
            table == t && same(key, k, param)
        }
        (
            Statement::Emit { target, fields },
            Statement::Emit {
                target: t,
                fields: f,
            },
        ) => target == t && same(fields, f, |x, y| x == y),
        _ => false,
    }
}

/// A checked statement as readable JSON, in the shape of the command it came from (see
/// [`crate::plugin::readable::command_json`]), so `rollout diff` reads like `plugin exec`.
pub fn statement_json(statement: &Statement) -> Json {
    let columns = |params: &[Param]| -> Json {
        Json::Object(
            params
                .iter()
                .map(|p| (p.column.clone(), value_json(&p.value)))
                .collect::<Map<_, _>>(),
        )
    };
    let set = |sets: &[SetParam]| -> Json {
        Json::Object(
            sets.iter()
                .map(|s| {
                    let op = match &s.op {
                        SetOp::Assign(value) => value_json(value),
                        SetOp::AppendUnique(items) => json!({"append_unique": items}),
                    };
                    (s.column.clone(), op)
                })
                .collect::<Map<_, _>>(),
        )
    };
    match statement {
        Statement::Upsert { table, key, set: s } => {
            json!({"upsert": {"table": table, "key": columns(key), "set": set(s)}})
        }
        Statement::Update {
            table,
            key,
            set: s,
            if_missing,
            only_if,
        } => {
            let guard: Vec<Json> = only_if
                .iter()
                .map(|c| json!({"column": c.param.column, "equals": c.equals, "value": value_json(&c.param.value)}))
                .collect();
            json!({"update": {"table": table, "key": columns(key), "set": set(s),
                "if_missing": if_missing_name(*if_missing), "only_if": guard}})
        }
        Statement::Insert {
            table,
            values,
            ignore_conflict,
        } => {
            let on_conflict = if *ignore_conflict { "ignore" } else { "error" };
            json!({"insert": {"table": table, "values": columns(values), "on_conflict": on_conflict}})
        }
        Statement::Delete { table, key } => {
            json!({"delete": {"table": table, "key": columns(key)}})
        }
        Statement::Emit { target, fields } => {
            let fields: Map<String, Json> = fields
                .iter()
                .map(|(k, v)| (k.clone(), Json::String(v.clone())))
                .collect();
            json!({"emit": {"target": target, "fields": fields}})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::wit;

    fn param(column: &str, value: i64) -> Param {
        Param {
            column: column.into(),
            sql_type: "bigint".into(),
            value: wit::Value::Integer(value),
        }
    }

    fn upsert(x: i64, columns_reversed: bool) -> Statement {
        let mut set = vec![
            SetParam {
                column: "x".into(),
                sql_type: "bigint".into(),
                op: SetOp::Assign(wit::Value::Integer(x)),
            },
            SetParam {
                column: "y".into(),
                sql_type: "bigint".into(),
                op: SetOp::Assign(wit::Value::Integer(2)),
            },
        ];
        if columns_reversed {
            set.reverse();
        }
        Statement::Upsert {
            table: "faces".into(),
            key: vec![param("id", 1)],
            set,
        }
    }

    fn insert(value: i64) -> Statement {
        Statement::Insert {
            table: "t".into(),
            values: vec![param("c", value)],
            ignore_conflict: true,
        }
    }

    #[test]
    fn equal_writes_and_failures_of_one_kind_are_the_same() {
        let (a, b) = ([upsert(1, false)], [upsert(1, true)]);
        assert_eq!(compare(View::Writes(&a), View::Writes(&b)), Verdict::Same);
        let failed = |reason| View::Failed(FailureKind::Malformed, reason);
        assert_eq!(
            compare(
                failed("no mediaId (1.0.0)"),
                failed("mediaId missing (2.0.0)")
            ),
            Verdict::Same
        );
        assert_eq!(
            compare(View::Rejected("a"), View::Rejected("b")),
            Verdict::Same
        );
    }

    #[test]
    fn each_way_of_differing_has_its_verdict() {
        let (one, two) = ([upsert(1, false)], [upsert(2, false)]);
        let (one, two) = (View::Writes(&one), View::Writes(&two));
        assert_eq!(compare(one, two), Verdict::Different);
        let trap = View::Failed(FailureKind::PluginTrap, "boom");
        let rejected = View::Rejected("table `users` is not granted");
        assert_eq!(compare(one, trap), Verdict::CandidateFailed);
        assert_eq!(compare(trap, one), Verdict::CandidateSucceeded);
        assert_eq!(compare(rejected, one), Verdict::CandidateSucceeded);
        assert_eq!(compare(one, rejected), Verdict::CandidateRejected);
        assert_eq!(compare(trap, rejected), Verdict::CandidateRejected);
        let malformed = View::Failed(FailureKind::Malformed, "bad");
        assert_eq!(compare(trap, malformed), Verdict::Different);
    }

    #[test]
    fn the_order_of_columns_is_not_a_difference_the_order_of_commands_is() {
        let (a, b) = ([insert(1), insert(2)], [insert(2), insert(1)]);
        assert_eq!(
            compare(View::Writes(&a), View::Writes(&b)),
            Verdict::Different
        );
        let fewer = [insert(1)];
        assert_eq!(
            compare(View::Writes(&a), View::Writes(&fewer)),
            Verdict::Different
        );
    }

    #[test]
    fn a_statement_reads_like_the_command_it_came_from() {
        assert_eq!(
            statement_json(&upsert(1, false)),
            json!({"upsert": {"table": "faces", "key": {"id": 1}, "set": {"x": 1, "y": 2}}})
        );
    }
}
