//! The live catalogue of the tables commands may name, read from PostgreSQL's system catalogue.
//!
//! Commands are checked against what the database really has, not against a list compiled into
//! the host, so a plugin for a new table needs only a migration, never a host change.

use anyhow::{Context, Result};
use sqlx::PgPool;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set when a statement failed because the schema is not what the catalogue says (a column or
/// table dropped, a unique key removed, a type changed): the next check reads the catalogue
/// again (see [`schema_changed`]). Process-wide: a second read of the catalogue is harmless.
static SCHEMA_CHANGED: AtomicBool = AtomicBool::new(false);

/// Notes that a statement found the schema changed under the catalogue.
pub fn note_schema_changed() {
    SCHEMA_CHANGED.store(true, Ordering::Relaxed);
}

/// Whether a statement found the schema changed since this was last asked.
pub fn schema_changed() -> bool {
    SCHEMA_CHANGED.swap(false, Ordering::Relaxed)
}

/// What kind of value a column accepts, derived from its SQL type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// `boolean`.
    Boolean,
    /// Integers with their inclusive range (`smallint`, `integer`, `bigint`).
    Integer {
        /// The smallest value the type holds.
        min: i64,
        /// The largest value the type holds.
        max: i64,
    },
    /// `real`, `double precision`, `numeric`.
    Float,
    /// `text`, `varchar(n)`, `char(n)` (with the length limit, if any).
    Text {
        /// The declared length of `varchar(n)` / `char(n)`, in characters.
        max_chars: Option<usize>,
    },
    /// `json`, `jsonb`: the value must parse as JSON.
    Json,
    /// `text[]`, `varchar[]`: the target of `append-unique`.
    TextArray,
    /// `real[]`, `double precision[]`, `numeric[]` (embeddings).
    FloatArray,
    /// `timestamp`, `timestamptz`: text that PostgreSQL parses.
    Timestamp,
    /// Any other type (uuid, date, ...): accepts text, converted by PostgreSQL.
    Other,
}

/// One column of a table.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    /// The type as PostgreSQL prints it (`double precision`, `text[]`, ...); used in casts.
    pub sql_type: String,
    pub kind: ColumnKind,
    pub nullable: bool,
    /// Generated columns cannot be written.
    pub generated: bool,
    /// The column's default as SQL (`now()`, `'PENDING'::text`), if it has one: what a row
    /// inserted without the column gets, spelled out where one statement inserts rows that set
    /// different columns ([`super::merged_upsert`]).
    pub default: Option<String>,
    /// The column's value when an insert leaves it out comes from somewhere no expression in
    /// the statement can stand for: an identity column's sequence, its domain type's default.
    pub implicit_default: bool,
}

/// One table with its columns and unique keys.
#[derive(Clone, Debug)]
pub struct Table {
    pub name: String,
    pub columns: HashMap<String, Column>,
    /// Column sets of the primary key and of every non-partial unique index.
    pub unique_keys: Vec<BTreeSet<String>>,
    /// Columns named by `UPDATE OF` triggers: such a trigger fires when its column is assigned,
    /// even to its own value, so these are never assigned on rows that did not set them.
    pub trigger_columns: BTreeSet<String>,
}

/// The tables of the current schema.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    tables: HashMap<String, Table>,
    /// How writes to one table can reach others through foreign keys.
    links: Links,
}

/// The foreign keys between the schema's tables, as far as they make writes to two tables
/// interact: a write to a table *reaches* the tables its referential actions (`ON DELETE` /
/// `ON UPDATE` `CASCADE`, `SET NULL`, `SET DEFAULT`) change, transitively, and *checks* the rows
/// its constraints look at (the tables it references, and those that reference it).
///
/// Two tables are related when one's writes reach what the other writes or checks. The batch plan
/// keeps the order of commands on related tables (and may reorder the rest), and a batch's locks
/// cover what its writes reach and check. Triggers that write other tables are not seen.
#[derive(Clone, Debug, Default)]
pub struct Links {
    /// Per table in any foreign key: the tables its writes reach (itself included).
    reach: HashMap<String, BTreeSet<String>>,
    /// Per table in any foreign key: the tables the writes of what it reaches check.
    checks: HashMap<String, BTreeSet<String>>,
    /// Per table: the tables it references.
    parents: HashMap<String, BTreeSet<String>>,
}

impl Links {
    /// Builds the links from `(child, parent, acts)` foreign keys, where `acts` says a change
    /// to the parent changes the child (a referential action other than `NO ACTION` /
    /// `RESTRICT`).
    pub fn new(foreign_keys: &[(String, String, bool)]) -> Links {
        let mut parents: HashMap<String, BTreeSet<String>> = HashMap::new();
        let mut children: HashMap<String, BTreeSet<String>> = HashMap::new();
        let mut acting: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (child, parent, acts) in foreign_keys {
            parents
                .entry(child.clone())
                .or_default()
                .insert(parent.clone());
            children
                .entry(parent.clone())
                .or_default()
                .insert(child.clone());
            if *acts {
                acting
                    .entry(parent.clone())
                    .or_default()
                    .insert(child.clone());
            }
        }
        let tables: BTreeSet<&String> = parents.keys().chain(children.keys()).collect();
        let mut reach = HashMap::new();
        let mut checks = HashMap::new();
        for &table in &tables {
            let mut reached = BTreeSet::from([table.clone()]);
            let mut queue = vec![table.clone()];
            while let Some(next) = queue.pop() {
                for child in acting.get(&next).into_iter().flatten() {
                    if reached.insert(child.clone()) {
                        queue.push(child.clone());
                    }
                }
            }
            let mut checked = BTreeSet::new();
            for t in &reached {
                checked.extend(parents.get(t).into_iter().flatten().cloned());
                checked.extend(children.get(t).into_iter().flatten().cloned());
            }
            reach.insert(table.clone(), reached);
            checks.insert(table.clone(), checked);
        }
        Links {
            reach,
            checks,
            parents,
        }
    }

    /// Whether writes to `a` and to `b` can change each other's outcome, so that their order
    /// matters: the same table, or one's writes reach what the other writes or checks.
    pub fn related(&self, a: &str, b: &str) -> bool {
        if a == b {
            return true;
        }
        let (Some(reach_a), Some(reach_b)) = (self.reach.get(a), self.reach.get(b)) else {
            return false;
        };
        let empty = BTreeSet::new();
        let checks_a = self.checks.get(a).unwrap_or(&empty);
        let checks_b = self.checks.get(b).unwrap_or(&empty);
        reach_a
            .iter()
            .any(|t| reach_b.contains(t) || checks_b.contains(t))
            || reach_b.iter().any(|t| checks_a.contains(t))
    }

    /// The tables `table` references: its writes take key-share locks on their rows.
    pub fn parents(&self, table: &str) -> impl Iterator<Item = &str> {
        self.parents
            .get(table)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// The tables a delete (or key change) in `table` changes through referential actions,
    /// `table` itself included.
    pub fn reach(&self, table: &str) -> Vec<&str> {
        match self.reach.get(table) {
            Some(reached) => reached.iter().map(String::as_str).collect(),
            None => Vec::new(),
        }
    }
}

impl Catalog {
    /// Reads the catalogue of the connection's current schema.
    pub async fn load(pool: &PgPool) -> Result<Catalog> {
        type ColumnRow = (
            String,
            String,
            String,
            String,
            i32,
            bool,
            bool,
            Option<String>,
            bool,
        );
        let columns: Vec<ColumnRow> = sqlx::query_as(
            "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod),
                    t.typname::text, a.atttypmod, NOT a.attnotnull, a.attgenerated <> '',
                    CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
                    a.attidentity <> '' OR (d.adbin IS NULL AND t.typtype = 'd')
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_type t ON t.oid = a.atttypid
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE n.nspname = current_schema()
                AND c.relkind IN ('r', 'p')
                AND a.attnum > 0
                AND NOT a.attisdropped",
        )
        .fetch_all(pool)
        .await
        .context("cannot read the table catalogue")?;

        let keys: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT c.relname::text, array_agg(a.attname::text ORDER BY a.attname)
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey)
              WHERE n.nspname = current_schema()
                AND i.indisunique
                AND i.indpred IS NULL
                AND i.indexprs IS NULL
              GROUP BY i.indexrelid, c.relname",
        )
        .fetch_all(pool)
        .await
        .context("cannot read the unique keys")?;

        let trigger_columns: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT c.relname::text, a.attname::text
               FROM pg_trigger g
               JOIN pg_class c ON c.oid = g.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (g.tgattr)
              WHERE n.nspname = current_schema() AND NOT g.tgisinternal",
        )
        .fetch_all(pool)
        .await
        .context("cannot read the triggers' columns")?;

        let mut tables: HashMap<String, Table> = HashMap::new();
        for (
            table,
            name,
            sql_type,
            type_name,
            type_mod,
            nullable,
            generated,
            default,
            implicit_default,
        ) in columns
        {
            let kind = column_kind(&type_name, type_mod);
            tables
                .entry(table.clone())
                .or_insert_with(|| Table {
                    name: table,
                    columns: HashMap::new(),
                    unique_keys: Vec::new(),
                    trigger_columns: BTreeSet::new(),
                })
                .columns
                .insert(
                    name.clone(),
                    Column {
                        name,
                        sql_type,
                        kind,
                        nullable,
                        generated,
                        default,
                        implicit_default,
                    },
                );
        }
        for (table, column) in trigger_columns {
            if let Some(table) = tables.get_mut(&table) {
                table.trigger_columns.insert(column);
            }
        }
        for (table, columns) in keys {
            if let Some(table) = tables.get_mut(&table) {
                table.unique_keys.push(columns.into_iter().collect());
            }
        }

        let foreign_keys: Vec<(String, String, bool)> = sqlx::query_as(
            "SELECT child.relname::text, parent.relname::text,
                    c.confdeltype NOT IN ('a', 'r') OR c.confupdtype NOT IN ('a', 'r')
               FROM pg_constraint c
               JOIN pg_class child ON child.oid = c.conrelid
               JOIN pg_class parent ON parent.oid = c.confrelid
               JOIN pg_namespace n ON n.oid = child.relnamespace
              WHERE c.contype = 'f' AND n.nspname = current_schema()",
        )
        .fetch_all(pool)
        .await
        .context("cannot read the foreign keys")?;
        Ok(Catalog {
            tables,
            links: Links::new(&foreign_keys),
        })
    }

    /// How writes to the schema's tables reach each other through foreign keys.
    pub fn links(&self) -> &Links {
        &self.links
    }

    /// A catalogue of the given tables, for unit tests of what is checked against it.
    #[cfg(test)]
    pub(crate) fn from_tables(tables: Vec<Table>) -> Catalog {
        Catalog {
            tables: tables.into_iter().map(|t| (t.name.clone(), t)).collect(),
            links: Links::default(),
        }
    }

    /// The table called `name`, if the schema has it.
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.get(name)
    }
}

fn column_kind(type_name: &str, type_mod: i32) -> ColumnKind {
    match type_name {
        "bool" => ColumnKind::Boolean,
        "int2" => ColumnKind::Integer {
            min: i16::MIN.into(),
            max: i16::MAX.into(),
        },
        "int4" => ColumnKind::Integer {
            min: i32::MIN.into(),
            max: i32::MAX.into(),
        },
        "int8" => ColumnKind::Integer {
            min: i64::MIN,
            max: i64::MAX,
        },
        "float4" | "float8" | "numeric" => ColumnKind::Float,
        "text" | "name" => ColumnKind::Text { max_chars: None },
        // For varchar(n) and char(n), atttypmod is n + 4.
        "varchar" | "bpchar" => ColumnKind::Text {
            max_chars: usize::try_from(type_mod - 4).ok(),
        },
        "json" | "jsonb" => ColumnKind::Json,
        "_text" | "_varchar" => ColumnKind::TextArray,
        "_float4" | "_float8" | "_numeric" => ColumnKind::FloatArray,
        "timestamp" | "timestamptz" => ColumnKind::Timestamp,
        _ => ColumnKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fk(child: &str, parent: &str, acts: bool) -> (String, String, bool) {
        (child.into(), parent.into(), acts)
    }

    #[test]
    fn tables_are_related_through_what_their_writes_reach_and_check() {
        let links = Links::new(&[
            fk("faces", "media", true),
            fk("insights", "media", true),
            fk("child", "parent", true),
            fk("grandchild", "child", true),
            fk("note", "parent", false),
        ]);
        // Siblings only check their common parent: independent unless it is written.
        assert!(!links.related("faces", "insights"));
        assert!(links.related("faces", "media"));
        // A cascade reaches through a table nobody writes.
        assert!(links.related("parent", "grandchild"));
        // A reference without action: deleting the parent checks the child.
        assert!(links.related("parent", "note"));
        assert!(!links.related("note", "grandchild"));
        assert!(!links.related("faces", "unlinked"));
        assert_eq!(links.reach("parent"), vec!["child", "grandchild", "parent"]);
        assert_eq!(links.parents("faces").collect::<Vec<_>>(), vec!["media"]);
    }
}
