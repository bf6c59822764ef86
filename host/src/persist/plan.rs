//! Turns the checked statements of a whole batch into a few set-based steps.
//!
//! Running one SQL statement per command costs a round trip per command; a batch of 500 entries
//! would need over a thousand. The plan instead gathers the commands of every entry into *stages*:
//! one stage per run of same-kind commands on one table, in which every row is distinct by key.
//! [`super::batch`] then runs each stage as one statement per column shape over arrays
//! (`unnest`).
//!
//! The plan must have the effect of applying the entries one by one in stream order, the commands
//! of one entry in their order. It keeps that promise by construction:
//! - a command joins the *last* stage that touches its table, and only when that stage is of the
//!   same kind and key; otherwise it opens a new stage after every existing one, so the order of
//!   commands on one table is always kept;
//! - two upserts (or updates) of the same key are folded into one row first — PostgreSQL cannot
//!   touch one row twice in one statement — where a later `assign` wins and `append-unique`
//!   becomes an ordered union, exactly what the two statements would have left;
//! - commands whose rows the host cannot tell apart reliably (an update keyed on a column type
//!   whose text form is not canonical, or one that changes its own key columns) run as a stage of
//!   their own, as single statements;
//! - a command joins an earlier stage only if it does not jump over a command on a *related*
//!   table ([`Links::related`]: one's writes reach, through `ON DELETE CASCADE` and the like,
//!   what the other writes or checks); commands on unrelated tables commute, so their stages may
//!   be run in any order;
//! - the stages are then run table by table in name order where no relation forbids it, so every
//!   batch takes its row locks in one global order (table name, then key) and concurrent batches
//!   never wait for each other in a cycle (see [`super::batch::table_locks`]).
//!
//! Triggers that write other tables are not seen: their effects follow the order of the writes
//! that fire them.

use super::schema::Links;
use super::validate::{Param, SetOp, SetParam, Statement};
use crate::plugin::wit;
use std::borrow::Cow;
use std::collections::HashMap;

/// The set-based steps of one batch, in the order they must run. It borrows the values of the
/// entries' statements (`'s`): a batch's rows are most of its memory, and copying each one out of
/// its statement was the plan's largest cost.
#[derive(Debug, Default)]
pub struct Plan<'s> {
    pub stages: Vec<Stage<'s>>,
    /// Whether the stages run in table-name order (always, unless related tables of the batch
    /// had to keep an order of their own): the condition for sharing table locks.
    pub in_table_order: bool,
}

/// One step: commands of one kind on one table whose rows do not interact.
#[derive(Debug)]
pub enum Stage<'s> {
    /// Upserts keyed on the same columns; one row per key, folded.
    Upsert {
        table: String,
        key_columns: Vec<String>,
        rows: Vec<KeyedRow<'s>>,
    },
    /// Updates keyed on the same columns with the same `if-missing`; one row per key, folded.
    Update {
        table: String,
        key_columns: Vec<String>,
        if_missing: wit::IfMissing,
        /// Key columns that the updates also set; the other key columns identify the rows.
        changed_key: Vec<String>,
        rows: Vec<KeyedRow<'s>>,
    },
    /// Deletes keyed on the same columns; one row per key.
    Delete {
        table: String,
        key_columns: Vec<String>,
        rows: Vec<KeyedRow<'s>>,
    },
    /// Inserts of the same columns and conflict rule, in stream order.
    Insert {
        table: String,
        columns: Vec<String>,
        ignore_conflict: bool,
        rows: Vec<InsertRow<'s>>,
    },
    /// A command that must run alone, as it is.
    Single {
        entry: usize,
        statement: &'s Statement,
    },
}

impl Stage<'_> {
    /// The table the stage writes.
    pub fn table(&self) -> &str {
        match self {
            Stage::Upsert { table, .. }
            | Stage::Update { table, .. }
            | Stage::Delete { table, .. }
            | Stage::Insert { table, .. } => table,
            Stage::Single { statement, .. } => statement_table(statement),
        }
    }
}

/// A row addressed by key: the key, what to set, and the entries (batch positions) whose commands
/// were folded into it. Borrowed from the first statement; `set` becomes the row's own only when
/// a later statement is folded into it.
#[derive(Debug)]
pub struct KeyedRow<'s> {
    pub key: &'s [Param],
    pub set: Cow<'s, [SetParam]>,
    pub entries: Vec<usize>,
    /// The key in text form, for folding and for a deterministic lock order.
    pub sort_key: String,
}

/// A row to insert and the entry it belongs to.
#[derive(Debug)]
pub struct InsertRow<'s> {
    pub values: &'s [Param],
    pub entry: usize,
}

/// A message to publish after commit, with the entry it belongs to.
#[derive(Debug)]
pub struct PlannedEmit {
    pub entry: usize,
    pub target: String,
    pub fields: Vec<(String, String)>,
}

/// Builds a plan from the statements of each entry, given in stream order as
/// `(batch position, statements)`. `Emit` statements are returned apart: they are outbox rows,
/// not SQL on a plugin's table.
pub fn plan<'s>(
    entries: impl IntoIterator<Item = (usize, &'s [Statement])>,
    links: &Links,
) -> (Plan<'s>, Vec<PlannedEmit>) {
    let mut builder = Builder {
        links,
        stages: Vec::new(),
        keys: Vec::new(),
        last_on_table: HashMap::new(),
    };
    let mut emits = Vec::new();
    for (entry, statements) in entries {
        for statement in statements {
            match statement {
                Statement::Emit { target, fields } => emits.push(PlannedEmit {
                    entry,
                    target: target.clone(),
                    fields: fields.clone(),
                }),
                other => builder.add(entry, other),
            }
        }
    }
    let mut stages = builder.stages;
    // Commands on unrelated tables commute: run the stages table by table in name order (stable,
    // so one table's stages keep theirs). With related tables among them, their order stays.
    let tables: Vec<&str> = {
        let mut tables: Vec<&str> = stages.iter().map(Stage::table).collect();
        tables.sort_unstable();
        tables.dedup();
        tables
    };
    let independent = tables
        .iter()
        .enumerate()
        .all(|(i, a)| tables[i + 1..].iter().all(|b| !links.related(a, b)));
    if independent {
        stages.sort_by(|a, b| a.table().cmp(b.table()));
    }
    let in_table_order = stages.windows(2).all(|w| w[0].table() <= w[1].table());
    let mut plan = Plan {
        stages,
        in_table_order,
    };
    for stage in &mut plan.stages {
        // Rows of one stage are locked in the order of their keys, whichever batch or host runs
        // them, so two batches touching the same rows never wait for each other in a cycle.
        match stage {
            Stage::Upsert { rows, .. }
            | Stage::Update { rows, .. }
            | Stage::Delete { rows, .. } => rows.sort_by(|a, b| a.sort_key.cmp(&b.sort_key)),
            Stage::Insert { .. } | Stage::Single { .. } => {}
        }
    }
    (plan, emits)
}

struct Builder<'l, 's> {
    links: &'l Links,
    stages: Vec<Stage<'s>>,
    /// Per stage, the position of each key among its rows (for folding).
    keys: Vec<HashMap<String, usize>>,
    /// The last stage touching each table.
    last_on_table: HashMap<String, usize>,
}

impl<'s> Builder<'_, 's> {
    /// Adds one statement of `entry`: to the last stage on its table when that stage takes it,
    /// else to a new stage (so the order of statements on a table is kept).
    fn add(&mut self, entry: usize, statement: &'s Statement) {
        match statement {
            Statement::Upsert { table, key, set } => self.add_upsert(entry, table, key, set),
            Statement::Update {
                table,
                key,
                set,
                if_missing,
                only_if,
            } => {
                let guarded = !only_if.is_empty();
                self.add_update(entry, statement, table, key, set, *if_missing, guarded)
            }
            Statement::Delete { table, key } => self.add_delete(entry, table, key),
            Statement::Insert {
                table,
                values,
                ignore_conflict,
            } => self.add_insert(entry, statement, table, values, *ignore_conflict),
            Statement::Emit { .. } => {}
        }
    }

    /// Upserts of one table and key columns share a stage; upserts of one key fold into one row.
    fn add_upsert(&mut self, entry: usize, table: &str, key: &'s [Param], set: &'s [SetParam]) {
        let stage = self.find(
            table,
            |stage| matches!(stage, Stage::Upsert { key_columns: k, .. } if same_columns(k, key)),
        );
        let stage = stage.unwrap_or_else(|| {
            self.open(Stage::Upsert {
                table: table.to_string(),
                key_columns: columns(key),
                rows: Vec::new(),
            })
        });
        if !self.fold(stage, entry, key, key, set, true) {
            let stage = self.open(Stage::Upsert {
                table: table.to_string(),
                key_columns: columns(key),
                rows: Vec::new(),
            });
            let folded = self.fold(stage, entry, key, key, set, true);
            debug_assert!(folded, "a new stage takes any row");
        }
    }

    /// Updates share a stage by table, key columns, missing-row rule and changed key columns;
    /// guarded updates and updates whose rows cannot be told apart run alone.
    #[allow(clippy::too_many_arguments)]
    fn add_update(
        &mut self,
        entry: usize,
        statement: &'s Statement,
        table: &str,
        key: &'s [Param],
        set: &'s [SetParam],
        if_missing: wit::IfMissing,
        guarded: bool,
    ) {
        // Key columns the update also sets (`SET status = 'FAILED' WHERE status =
        // 'PENDING'`): rows are then told apart by the key columns it leaves alone.
        let changed_key: Vec<String> = key
            .iter()
            .filter(|k| set.iter().any(|s| s.column == k.column))
            .map(|k| k.column.clone())
            .collect();
        let identity: Vec<Param> = key
            .iter()
            .filter(|k| !changed_key.contains(&k.column))
            .cloned()
            .collect();
        // A guarded update must tell "no row" from "the guard said no": it runs alone.
        if identity.is_empty() || !identity.iter().all(canonical_key) || guarded {
            self.open(Stage::Single { entry, statement });
            return;
        }
        let wanted = |stage: &Stage| {
            matches!(stage, Stage::Update { key_columns: k, if_missing: m, changed_key: c, .. }
                if same_columns(k, key) && *m == if_missing && *c == changed_key)
        };
        let new_stage = || Stage::Update {
            table: table.to_string(),
            key_columns: columns(key),
            if_missing,
            changed_key: changed_key.clone(),
            rows: Vec::new(),
        };
        // A second update that changes the key of the same row would see the first one's
        // result when run one by one, but not in one statement: never folded.
        let foldable = changed_key.is_empty();
        let stage = match self.find(table, wanted) {
            Some(stage) => stage,
            None => self.open(new_stage()),
        };
        if !self.fold(stage, entry, key, &identity, set, foldable) {
            let stage = self.open(new_stage());
            self.fold(stage, entry, key, &identity, set, foldable);
        }
    }

    /// Deletes of one table and key columns share a stage; deleting a key twice is once.
    fn add_delete(&mut self, entry: usize, table: &str, key: &'s [Param]) {
        let key_columns = columns(key);
        let stage = self
            .find(
                table,
                |stage| matches!(stage, Stage::Delete { key_columns: k, .. } if *k == key_columns),
            )
            .unwrap_or_else(|| {
                self.open(Stage::Delete {
                    table: table.to_string(),
                    key_columns,
                    rows: Vec::new(),
                })
            });
        // Deleting a key twice is deleting it once.
        self.fold(stage, entry, key, key, &[], true);
    }

    /// Inserts of one table, column set and conflict rule share a stage.
    fn add_insert(
        &mut self,
        entry: usize,
        statement: &'s Statement,
        table: &str,
        values: &'s [Param],
        ignore_conflict: bool,
    ) {
        if values.is_empty() {
            self.open(Stage::Single { entry, statement });
            return;
        }
        let insert_columns = columns(values);
        let stage = self
            .find(table, |stage| {
                matches!(stage, Stage::Insert { columns: c, ignore_conflict: i, .. }
                    if *c == insert_columns && *i == ignore_conflict)
            })
            .unwrap_or_else(|| {
                self.open(Stage::Insert {
                    table: table.to_string(),
                    columns: insert_columns,
                    ignore_conflict,
                    rows: Vec::new(),
                })
            });
        if let Stage::Insert { rows, .. } = &mut self.stages[stage] {
            rows.push(InsertRow { values, entry });
        }
    }

    /// The last stage on `table`, if it is one `accepts` takes and joining it does not move the
    /// command ahead of a later stage on a related table.
    fn find(&self, table: &str, accepts: impl Fn(&Stage<'s>) -> bool) -> Option<usize> {
        let index = *self.last_on_table.get(table)?;
        let jumps_a_related_write = self.stages[index + 1..]
            .iter()
            .any(|later| self.links.related(table, later.table()));
        (accepts(&self.stages[index]) && !jumps_a_related_write).then_some(index)
    }

    fn open(&mut self, stage: Stage<'s>) -> usize {
        let index = self.stages.len();
        self.last_on_table.insert(stage.table().to_string(), index);
        self.stages.push(stage);
        self.keys.push(HashMap::new());
        index
    }

    /// Adds a keyed row to `stage`, folding it into the row with the same `identity` (the key
    /// columns that tell rows apart) if there is one. Returns `false` when the two cannot be
    /// folded (the caller opens a new stage).
    fn fold(
        &mut self,
        stage: usize,
        entry: usize,
        key: &'s [Param],
        identity: &[Param],
        set: &'s [SetParam],
        foldable: bool,
    ) -> bool {
        let sort_key = key_text(identity);
        let rows = match &mut self.stages[stage] {
            Stage::Upsert { rows, .. }
            | Stage::Update { rows, .. }
            | Stage::Delete { rows, .. } => rows,
            Stage::Insert { .. } | Stage::Single { .. } => return false,
        };
        match self.keys[stage].get(&sort_key) {
            Some(_) if !foldable => false,
            Some(&position) => {
                let row = &mut rows[position];
                if !foldable_into(&row.set, set) {
                    return false;
                }
                fold_set(row.set.to_mut(), set);
                if row.entries.last() != Some(&entry) {
                    row.entries.push(entry);
                }
                true
            }
            None => {
                self.keys[stage].insert(sort_key.clone(), rows.len());
                rows.push(KeyedRow {
                    key,
                    set: Cow::Borrowed(set),
                    entries: vec![entry],
                    sort_key,
                });
                true
            }
        }
    }
}

/// Whether `later` can be folded into `earlier` as one `set` clause: not when it appends to a
/// column that `earlier` assigns something other than a text array (or NULL).
fn foldable_into(earlier: &[SetParam], later: &[SetParam]) -> bool {
    !later.iter().any(|next| {
        matches!(next.op, SetOp::AppendUnique(_))
            && earlier.iter().any(|s| {
                s.column == next.column
                    && matches!(&s.op, SetOp::Assign(v)
                        if !matches!(v, wit::Value::TextArray(_) | wit::Value::Null))
            })
    })
}

/// Folds `later` into `earlier` (which [`foldable_into`] allowed), so that `earlier` says what
/// the two leave in each column as one `set`. In place: most rows of a batch are folded into
/// several times (one media, several messages), and copying the whole set at every fold was the
/// plan's largest cost.
fn fold_set(earlier: &mut Vec<SetParam>, later: &[SetParam]) {
    for next in later {
        let Some(current) = earlier.iter_mut().find(|s| s.column == next.column) else {
            earlier.push(next.clone());
            continue;
        };
        current.op = match (&current.op, &next.op) {
            (_, SetOp::Assign(value)) => SetOp::Assign(value.clone()),
            (SetOp::AppendUnique(a), SetOp::AppendUnique(b)) => {
                SetOp::AppendUnique(ordered_union(a, b))
            }
            (SetOp::Assign(wit::Value::TextArray(a)), SetOp::AppendUnique(b)) => {
                SetOp::Assign(wit::Value::TextArray(ordered_union(a, b)))
            }
            (SetOp::Assign(_), SetOp::AppendUnique(b)) => {
                // Null, by `foldable_into`.
                SetOp::Assign(wit::Value::TextArray(ordered_union(&[], b)))
            }
        };
    }
}

/// `a` followed by the items of `b` not already present, each item once, in first-seen order:
/// what `append-unique` leaves in a column.
pub fn ordered_union(a: &[String], b: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    a.iter()
        .chain(b)
        .filter(|item| seen.insert(item.as_str()))
        .cloned()
        .collect()
}

fn columns(params: &[Param]) -> Vec<String> {
    params.iter().map(|p| p.column.clone()).collect()
}

/// Whether `params` name exactly `columns`, in order (without building the list).
fn same_columns(columns: &[String], params: &[Param]) -> bool {
    columns.len() == params.len() && columns.iter().zip(params).all(|(c, p)| *c == p.column)
}

/// Whether equal text forms of this key value mean the same row and different ones different
/// rows, so the host can fold and deduplicate by it. True for integers in integer columns and
/// text in `text` / `varchar` columns; not for, say, `char(n)` (padding) or `uuid` (case).
fn canonical_key(param: &Param) -> bool {
    let sql_type = param.sql_type.as_str();
    match &param.value {
        wit::Value::Integer(_) => matches!(sql_type, "bigint" | "integer" | "smallint"),
        wit::Value::Text(_) => sql_type == "text" || sql_type.starts_with("character varying"),
        _ => false,
    }
}

/// The key as text: equal for equal keys, and ordered the same way on every host.
fn key_text(key: &[Param]) -> String {
    let mut text = String::new();
    for param in key {
        match &param.value {
            // Zero-padded so that integer keys sort numerically (with an offset for negatives).
            wit::Value::Integer(i) => {
                text.push_str(&format!("i{:020}", (*i as i128) - (i64::MIN as i128)))
            }
            wit::Value::Text(s) => {
                text.push('t');
                text.push_str(&s.len().to_string());
                text.push(':');
                text.push_str(s);
            }
            other => text.push_str(&format!("{other:?}")),
        }
        text.push('\u{1}');
    }
    text
}

/// The table a statement writes (the target stream for an emit).
pub fn statement_table(statement: &Statement) -> &str {
    match statement {
        Statement::Upsert { table, .. }
        | Statement::Update { table, .. }
        | Statement::Insert { table, .. }
        | Statement::Delete { table, .. } => table,
        Statement::Emit { target, .. } => target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: i64) -> Vec<Param> {
        vec![Param {
            column: "id".into(),
            sql_type: "bigint".into(),
            value: wit::Value::Integer(id),
        }]
    }

    fn assign(column: &str, value: wit::Value) -> SetParam {
        SetParam {
            column: column.into(),
            sql_type: "text".into(),
            op: SetOp::Assign(value),
        }
    }

    fn append(column: &str, items: &[&str]) -> SetParam {
        SetParam {
            column: column.into(),
            sql_type: "text[]".into(),
            op: SetOp::AppendUnique(items.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn upsert(id: i64, set: Vec<SetParam>) -> Statement {
        Statement::Upsert {
            table: "t".into(),
            key: key(id),
            set,
        }
    }

    #[test]
    fn upserts_of_one_key_fold_into_one_row() {
        let first = [upsert(
            1,
            vec![
                assign("a", wit::Value::Text("x".into())),
                append("s", &["m", "t"]),
            ],
        )];
        let second = [upsert(
            1,
            vec![
                assign("a", wit::Value::Text("y".into())),
                append("s", &["t", "c"]),
            ],
        )];
        let third = [upsert(2, vec![assign("b", wit::Value::Integer(3))])];
        let (plan, _) = plan(
            [(0, &first[..]), (1, &second[..]), (2, &third[..])],
            &Links::default(),
        );
        assert_eq!(plan.stages.len(), 1);
        let Stage::Upsert { rows, .. } = &plan.stages[0] else {
            panic!("{plan:?}")
        };
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].entries, vec![0, 1]);
        assert!(matches!(&rows[0].set[0].op, SetOp::Assign(wit::Value::Text(t)) if t == "y"));
        assert!(
            matches!(&rows[0].set[1].op, SetOp::AppendUnique(items) if items == &["m", "t", "c"])
        );
    }

    #[test]
    fn a_different_kind_on_the_same_table_keeps_the_order() {
        let a = [upsert(1, vec![assign("a", wit::Value::Text("x".into()))])];
        let b = [Statement::Delete {
            table: "t".into(),
            key: key(1),
        }];
        let c = [upsert(1, vec![assign("a", wit::Value::Text("y".into()))])];
        let (plan, _) = plan([(0, &a[..]), (1, &b[..]), (2, &c[..])], &Links::default());
        let kinds: Vec<&str> = plan
            .stages
            .iter()
            .map(|s| match s {
                Stage::Upsert { .. } => "upsert",
                Stage::Delete { .. } => "delete",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["upsert", "delete", "upsert"]);
    }

    #[test]
    fn append_after_assign_of_a_text_array_folds_into_one_assign() {
        let a = [upsert(
            1,
            vec![SetParam {
                column: "s".into(),
                sql_type: "text[]".into(),
                op: SetOp::Assign(wit::Value::TextArray(vec!["a".into()])),
            }],
        )];
        let b = [upsert(1, vec![append("s", &["b", "a"])])];
        let (plan, _) = plan([(0, &a[..]), (1, &b[..])], &Links::default());
        let Stage::Upsert { rows, .. } = &plan.stages[0] else {
            panic!()
        };
        assert!(
            matches!(&rows[0].set[0].op, SetOp::Assign(wit::Value::TextArray(items)) if items == &["a", "b"])
        );
    }

    #[test]
    fn rows_are_sorted_by_key_and_updates_that_change_their_key_run_alone() {
        let a = [upsert(10, vec![]), upsert(9, vec![]), upsert(-1, vec![])];
        let b = [Statement::Update {
            table: "u".into(),
            key: vec![Param {
                column: "status".into(),
                sql_type: "text".into(),
                value: wit::Value::Text("PENDING".into()),
            }],
            set: vec![assign("status", wit::Value::Text("FAILED".into()))],
            if_missing: wit::IfMissing::Skip,
            only_if: Vec::new(),
        }];
        let (plan, _) = plan([(0, &a[..]), (1, &b[..])], &Links::default());
        let Stage::Upsert { rows, .. } = &plan.stages[0] else {
            panic!()
        };
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| match r.key[0].value {
                wit::Value::Integer(i) => i,
                _ => 0,
            })
            .collect();
        assert_eq!(ids, [-1, 9, 10]);
        assert!(matches!(plan.stages[1], Stage::Single { entry: 1, .. }));
    }

    #[test]
    fn updates_that_change_part_of_their_key_share_a_stage_but_never_fold() {
        let fail = |cid: &str| Statement::Update {
            table: "r".into(),
            key: vec![
                Param {
                    column: "cid".into(),
                    sql_type: "text".into(),
                    value: wit::Value::Text(cid.into()),
                },
                Param {
                    column: "status".into(),
                    sql_type: "text".into(),
                    value: wit::Value::Text("PENDING".into()),
                },
            ],
            set: vec![assign("status", wit::Value::Text("FAILED".into()))],
            if_missing: wit::IfMissing::Skip,
            only_if: Vec::new(),
        };
        let a = [fail("a")];
        let b = [fail("b")];
        let c = [fail("a")];
        let (plan, _) = plan([(0, &a[..]), (1, &b[..]), (2, &c[..])], &Links::default());
        assert_eq!(plan.stages.len(), 2, "{plan:?}");
        assert!(matches!(&plan.stages[0], Stage::Update { rows, .. } if rows.len() == 2));
    }

    fn insert(table: &str, id: i64) -> Statement {
        Statement::Insert {
            table: table.into(),
            values: key(id),
            ignore_conflict: false,
        }
    }

    fn delete(table: &str, id: i64) -> Statement {
        Statement::Delete {
            table: table.into(),
            key: key(id),
        }
    }

    #[test]
    fn a_command_never_jumps_over_a_command_on_a_related_table() {
        // child references parent ON DELETE CASCADE: deleting parent 1 between two child inserts
        // removes the first child only.
        let links = Links::new(&[("child".into(), "parent".into(), true)]);
        let a = [insert("child", 1)];
        let b = [delete("parent", 1)];
        let c = [insert("child", 2)];
        let (related, _) = plan([(0, &a[..]), (1, &b[..]), (2, &c[..])], &links);
        let tables: Vec<&str> = related.stages.iter().map(Stage::table).collect();
        assert_eq!(tables, ["child", "parent", "child"]);
        assert!(!related.in_table_order);
        // Without the relation the two inserts share a stage, and stages go in table order.
        let (unrelated, _) = plan([(0, &a[..]), (1, &b[..]), (2, &c[..])], &Links::default());
        let tables: Vec<&str> = unrelated.stages.iter().map(Stage::table).collect();
        assert_eq!(tables, ["child", "parent"]);
        assert!(unrelated.in_table_order);
    }

    #[test]
    fn stages_of_unrelated_tables_run_in_table_name_order() {
        let a = [insert("zebra", 1), insert("apple", 1)];
        let b = [insert("zebra", 2), insert("mango", 2)];
        let (plan, _) = plan([(0, &a[..]), (1, &b[..])], &Links::default());
        let tables: Vec<&str> = plan.stages.iter().map(Stage::table).collect();
        assert_eq!(tables, ["apple", "mango", "zebra"]);
        assert!(plan.in_table_order);
    }
}
