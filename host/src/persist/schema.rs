//! The live catalogue of the tables commands may name, read from PostgreSQL's system catalogue.
//!
//! Commands are checked against what the database really has, not against a list compiled into
//! the host, so a plugin for a new table needs only a migration, never a host change.

use anyhow::{Context, Result};
use sqlx::PgPool;
use std::collections::{BTreeSet, HashMap};

/// Tables that only the host writes (its ledger, outbox and migration record); no plugin command
/// may name them, and no grant may include them.
pub const HOST_TABLES: &[&str] = &[
    "processed_entries",
    "ledger_horizons",
    "ledger_sources",
    "outbox",
    "_sqlx_migrations",
    "operator_migrations",
];

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
}

/// One table with its columns and unique keys.
#[derive(Clone, Debug)]
pub struct Table {
    pub name: String,
    pub columns: HashMap<String, Column>,
    /// Column sets of the primary key and of every non-partial unique index.
    pub unique_keys: Vec<BTreeSet<String>>,
}

/// The tables of the current schema.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    tables: HashMap<String, Table>,
}

impl Catalog {
    /// Reads the catalogue of the connection's current schema.
    pub async fn load(pool: &PgPool) -> Result<Catalog> {
        let columns: Vec<(String, String, String, String, i32, bool, bool)> = sqlx::query_as(
            "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod),
                    t.typname::text, a.atttypmod, NOT a.attnotnull, a.attgenerated <> ''
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_type t ON t.oid = a.atttypid
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

        let mut tables: HashMap<String, Table> = HashMap::new();
        for (table, name, sql_type, type_name, type_mod, nullable, generated) in columns {
            let kind = column_kind(&type_name, type_mod);
            tables
                .entry(table.clone())
                .or_insert_with(|| Table {
                    name: table,
                    columns: HashMap::new(),
                    unique_keys: Vec::new(),
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
                    },
                );
        }
        for (table, columns) in keys {
            if let Some(table) = tables.get_mut(&table) {
                table.unique_keys.push(columns.into_iter().collect());
            }
        }
        Ok(Catalog { tables })
    }

    /// A catalogue of the given tables, for unit tests of what is checked against it.
    #[cfg(test)]
    pub(crate) fn from_tables(tables: Vec<Table>) -> Catalog {
        Catalog {
            tables: tables.into_iter().map(|t| (t.name.clone(), t)).collect(),
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
