//! A shadow's differences made readable: the two command lists of an entry matched command by
//! command (same kind, table and key), and each matched pair shown per column, old value → new
//! value; what only one version wrote is shown whole. What `kaleidoscope rollout diff` prints.

use serde::Serialize;
use serde_json::{Map, Value as Json};

/// One column one version writes differently from the other (`None`: that version does not
/// write it, or does not write the row at all).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColumnChange {
    /// `upsert`, `update`, `insert`, `delete` or `emit`.
    pub command: String,
    /// The table (or, for an emit, the target stream).
    pub table: String,
    /// The row's key as the command gives it (for an insert, its values' position among the
    /// table's inserts).
    pub key: Json,
    pub column: String,
    pub live: Option<Json>,
    pub candidate: Option<Json>,
}

/// A command reduced to what identifies it and what it writes.
struct Write<'a> {
    command: &'a str,
    table: String,
    key: Json,
    columns: Map<String, Json>,
}

/// The writes of a canonical command list, each identified; an insert or emit by its position
/// among those of its table or target.
fn writes(commands: &[Json]) -> Vec<Write<'_>> {
    let mut counts: std::collections::HashMap<(String, String), usize> = Default::default();
    let mut writes = Vec::new();
    for command in commands {
        let Some((kind, body)) = command.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let text = |field: &str| body.get(field).and_then(Json::as_str).unwrap_or_default();
        let object = |field: &str| {
            body.get(field)
                .and_then(Json::as_object)
                .cloned()
                .unwrap_or_default()
        };
        let table = match kind.as_str() {
            "emit" => text("target").to_string(),
            _ => text("table").to_string(),
        };
        let (key, columns) = match kind.as_str() {
            "insert" | "emit" => {
                let n = counts.entry((kind.clone(), table.clone())).or_default();
                *n += 1;
                let columns = if kind == "insert" {
                    object("values")
                } else {
                    object("fields")
                };
                (Json::from(format!("#{n}")), columns)
            }
            "delete" => (body.get("key").cloned().unwrap_or(Json::Null), Map::new()),
            _ => (
                body.get("key").cloned().unwrap_or(Json::Null),
                object("set"),
            ),
        };
        writes.push(Write {
            command: kind.as_str(),
            table,
            key,
            columns,
        });
    }
    writes
}

/// The column-by-column differences between the `live` and `candidate` command lists of one
/// entry (both in canonical form).
pub fn column_changes(live: &[Json], candidate: &[Json]) -> Vec<ColumnChange> {
    let live = writes(live);
    let candidate = writes(candidate);
    let same_row =
        |a: &Write, b: &Write| a.command == b.command && a.table == b.table && a.key == b.key;
    let mut changes = Vec::new();
    let mut change = |w: &Write, column: &str, live: Option<&Json>, candidate: Option<&Json>| {
        changes.push(ColumnChange {
            command: w.command.to_string(),
            table: w.table.clone(),
            key: w.key.clone(),
            column: column.to_string(),
            live: live.cloned(),
            candidate: candidate.cloned(),
        });
    };
    for old in &live {
        match candidate.iter().find(|new| same_row(old, new)) {
            Some(new) => {
                let mut columns: Vec<&String> =
                    old.columns.keys().chain(new.columns.keys()).collect();
                columns.sort();
                columns.dedup();
                for column in columns {
                    let (a, b) = (old.columns.get(column), new.columns.get(column));
                    if a != b {
                        change(old, column, a, b);
                    }
                }
            }
            None => row_only_in(old, &mut |column, value| change(old, column, value, None)),
        }
    }
    for new in candidate
        .iter()
        .filter(|new| !live.iter().any(|old| same_row(old, new)))
    {
        row_only_in(new, &mut |column, value| change(new, column, None, value));
    }
    changes
}

/// Reports each column of a row only one version writes (a delete, which writes none, as `*`).
fn row_only_in(write: &Write, report: &mut dyn FnMut(&str, Option<&Json>)) {
    if write.columns.is_empty() {
        report("*", Some(&Json::String(write.command.to_string())));
    }
    for (column, value) in &write.columns {
        report(column, Some(value));
    }
}

/// A value as the diff shows it: JSON, `—` for none.
fn shown(value: Option<&Json>) -> String {
    value.map_or("—".to_string(), Json::to_string)
}

/// The difference of one entry as lines of text: the verdict, then per row its changed columns
/// (`table.column: old → new`), or the failure or refusal of a version that did not write.
pub fn render(
    stream: &str,
    entry_id: &str,
    verdict: &str,
    live: &Json,
    candidate: &Json,
) -> Vec<String> {
    let mut lines = vec![format!("{stream} {entry_id}: {verdict}")];
    let commands = |outcome: &Json| -> Option<Vec<Json>> {
        if outcome.get("rejected").is_some() || outcome.get("failed").is_some() {
            return None;
        }
        outcome.get("commands").and_then(Json::as_array).cloned()
    };
    for (who, outcome) in [("live", live), ("candidate", candidate)] {
        if let Some(kind) = outcome.get("failed").and_then(Json::as_str) {
            let reason = outcome
                .get("reason")
                .and_then(Json::as_str)
                .unwrap_or_default();
            lines.push(format!("  {who} failed ({kind}): {reason}"));
        }
        if let Some(reason) = outcome.get("rejected").and_then(Json::as_str) {
            lines.push(format!("  {who} refused by validation: {reason}"));
        }
    }
    let (Some(old), Some(new)) = (commands(live), commands(candidate)) else {
        return lines;
    };
    let mut row = None;
    for change in column_changes(&old, &new) {
        let this_row = (
            change.command.clone(),
            change.table.clone(),
            change.key.clone(),
        );
        if row.as_ref() != Some(&this_row) {
            lines.push(format!(
                "  {} {} {}",
                change.command, change.table, change.key
            ));
            row = Some(this_row);
        }
        lines.push(format!(
            "    {}.{}: {} → {}",
            change.table,
            change.column,
            shown(change.live.as_ref()),
            shown(change.candidate.as_ref())
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn face(index: i64, x2: i64) -> Json {
        json!({"upsert": {"table": "faces", "key": {"media_id": 7, "face_index": index},
            "set": {"x1": 10, "x2": x2, "score": 0.9}}})
    }

    #[test]
    fn a_matched_row_shows_only_its_changed_columns() {
        let changes = column_changes(&[face(0, 50), face(1, 80)], &[face(0, 40), face(1, 80)]);
        assert_eq!(changes.len(), 1);
        let change = &changes[0];
        assert_eq!(
            (change.table.as_str(), change.column.as_str()),
            ("faces", "x2")
        );
        assert_eq!(change.key, json!({"media_id": 7, "face_index": 0}));
        assert_eq!(
            (change.live.clone(), change.candidate.clone()),
            (Some(json!(50)), Some(json!(40)))
        );
    }

    #[test]
    fn a_row_only_one_version_writes_is_shown_whole_on_its_side() {
        let changes = column_changes(&[face(0, 50)], &[face(0, 50), face(1, 60)]);
        assert!(
            changes
                .iter()
                .all(|c| c.live.is_none() && c.key == json!({"media_id": 7, "face_index": 1}))
        );
        assert_eq!(changes.len(), 3, "{changes:?}");
        let gone = column_changes(
            &[json!({"delete": {"table": "faces", "key": {"id": 1}}})],
            &[],
        );
        assert_eq!(gone[0].column, "*");
        assert_eq!(gone[0].candidate, None);
    }

    #[test]
    fn the_rendering_names_table_column_and_both_values() {
        let lines = render(
            "face-detection-results",
            "1-0",
            "different",
            &json!({"commands": [face(0, 50)]}),
            &json!({"commands": [face(0, 40)]}),
        );
        assert_eq!(lines[0], "face-detection-results 1-0: different");
        assert!(
            lines.iter().any(|l| l.trim() == "faces.x2: 50 → 40"),
            "{lines:?}"
        );
        let failed = render(
            "s",
            "1-0",
            "candidate-failed",
            &json!({"commands": []}),
            &json!({"failed": "plugin-trap", "reason": "plugin trapped: boom"}),
        );
        assert!(
            failed
                .iter()
                .any(|l| l.contains("candidate failed (plugin-trap): plugin trapped: boom"))
        );
    }
}
