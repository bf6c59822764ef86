//! Builders for the generic persistence commands, so a handler reads like the effect it describes:
//!
//! ```ignore
//! sdk::upsert("media_ai_insights")
//!     .key("media_id", media_id)
//!     .set("caption", caption)
//!     .append_unique("services_completed", ["image_captioning"])
//!     .into()
//! ```
//!
//! Values convert from the obvious Rust types ([`Value`] implements `From` for integers, floats,
//! booleans, strings, string and float vectors, and `Option` of those, `None` being SQL NULL).

use crate::bindings::kaleidoscope::handler::types::{
    ColumnOp, ColumnSet, ColumnValue, Command, Condition, Delete, Emit, IfMissing, Insert,
    OnConflict, Update, Upsert, Value,
};

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Integer(value)
    }
}

impl From<i32> for Value {
    fn from(value: i32) -> Self {
        Value::Integer(value.into())
    }
}

impl From<u32> for Value {
    fn from(value: u32) -> Self {
        Value::Integer(value.into())
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Self {
        Value::Float(value)
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Self {
        Value::Boolean(value)
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_string())
    }
}

impl From<Vec<String>> for Value {
    fn from(value: Vec<String>) -> Self {
        Value::TextArray(value)
    }
}

impl From<Vec<f64>> for Value {
    fn from(value: Vec<f64>) -> Self {
        Value::FloatArray(value)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Self {
        value.map_or(Value::Null, Into::into)
    }
}

impl Value {
    /// A `json`/`jsonb` value from any serialisable JSON.
    pub fn json(value: &serde_json::Value) -> Self {
        Value::Json(value.to_string())
    }
}

fn column_value(column: &str, value: impl Into<Value>) -> ColumnValue {
    ColumnValue {
        column: column.to_string(),
        value: value.into(),
    }
}

fn assign(column: &str, value: impl Into<Value>) -> ColumnSet {
    ColumnSet {
        column: column.to_string(),
        op: ColumnOp::Assign(value.into()),
    }
}

fn append_unique<S: Into<String>>(column: &str, items: impl IntoIterator<Item = S>) -> ColumnSet {
    ColumnSet {
        column: column.to_string(),
        op: ColumnOp::AppendUnique(items.into_iter().map(Into::into).collect()),
    }
}

/// Starts an `upsert` (insert or update by key) on `table`.
pub fn upsert(table: &str) -> UpsertBuilder {
    UpsertBuilder(Upsert {
        table: table.to_string(),
        key: Vec::new(),
        set: Vec::new(),
    })
}

/// Builds an [`Upsert`]; finish with `.into()` to get a [`Command`].
pub struct UpsertBuilder(Upsert);

impl UpsertBuilder {
    /// Adds a key column (the key must match a primary key or unique constraint).
    pub fn key(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.0.key.push(column_value(column, value));
        self
    }

    /// Assigns a column.
    pub fn set(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.0.set.push(assign(column, value));
        self
    }

    /// Assigns a column only when `value` is `Some`: absent fields leave the stored value alone.
    pub fn set_some<T: Into<Value>>(self, column: &str, value: Option<T>) -> Self {
        match value {
            Some(value) => self.set(column, value),
            None => self,
        }
    }

    /// Adds strings to a `text[]` column that are not in it yet.
    pub fn append_unique<S: Into<String>>(
        mut self,
        column: &str,
        items: impl IntoIterator<Item = S>,
    ) -> Self {
        self.0.set.push(append_unique(column, items));
        self
    }
}

impl From<UpsertBuilder> for Command {
    fn from(builder: UpsertBuilder) -> Self {
        Command::Upsert(builder.0)
    }
}

/// Starts an `update` of existing rows of `table`; by default a missing row is a retry.
pub fn update(table: &str) -> UpdateBuilder {
    UpdateBuilder(Update {
        table: table.to_string(),
        key: Vec::new(),
        set: Vec::new(),
        if_missing: IfMissing::Retry,
        only_if: Vec::new(),
    })
}

/// Builds an [`Update`]; finish with `.into()` to get a [`Command`].
pub struct UpdateBuilder(Update);

impl UpdateBuilder {
    /// Adds a column that selects the rows to update.
    pub fn key(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.0.key.push(column_value(column, value));
        self
    }

    /// Assigns a column.
    pub fn set(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.0.set.push(assign(column, value));
        self
    }

    /// Assigns a column only when `value` is `Some`.
    pub fn set_some<T: Into<Value>>(self, column: &str, value: Option<T>) -> Self {
        match value {
            Some(value) => self.set(column, value),
            None => self,
        }
    }

    /// Adds strings to a `text[]` column that are not in it yet.
    pub fn append_unique<S: Into<String>>(
        mut self,
        column: &str,
        items: impl IntoIterator<Item = S>,
    ) -> Self {
        self.0.set.push(append_unique(column, items));
        self
    }

    /// What to do when no row matches the key (default [`IfMissing::Retry`]).
    pub fn if_missing(mut self, if_missing: IfMissing) -> Self {
        self.0.if_missing = if_missing;
        self
    }

    /// Guards the update: it applies only where `column` currently equals `value`. A row with
    /// the key that fails the guard is left as it is (a no-op, not a missing row).
    pub fn only_if_equals(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.0
            .only_if
            .push(Condition::Equals(column_value(column, value)));
        self
    }

    /// Guards the update: it applies only where `column` currently differs from `value` (NULL
    /// counts as different), e.g. `.unless("status", "CONFIRMED")`.
    pub fn unless(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.0
            .only_if
            .push(Condition::Differs(column_value(column, value)));
        self
    }
}

impl From<UpdateBuilder> for Command {
    fn from(builder: UpdateBuilder) -> Self {
        Command::Update(builder.0)
    }
}

/// Starts an `insert` into `table`; by default a conflicting row is kept (`ignore`).
pub fn insert(table: &str) -> InsertBuilder {
    InsertBuilder(Insert {
        table: table.to_string(),
        values: Vec::new(),
        on_conflict: OnConflict::Ignore,
    })
}

/// Builds an [`Insert`]; finish with `.into()` to get a [`Command`].
pub struct InsertBuilder(Insert);

impl InsertBuilder {
    /// Adds a column value.
    pub fn value(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.0.values.push(column_value(column, value));
        self
    }

    /// Adds a column value only when `value` is `Some` (the column gets its default otherwise).
    pub fn value_some<T: Into<Value>>(self, column: &str, value: Option<T>) -> Self {
        match value {
            Some(value) => self.value(column, value),
            None => self,
        }
    }

    /// What to do when the row collides with an existing one (default [`OnConflict::Ignore`]).
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.0.on_conflict = on_conflict;
        self
    }
}

impl From<InsertBuilder> for Command {
    fn from(builder: InsertBuilder) -> Self {
        Command::Insert(builder.0)
    }
}

/// Starts a `delete` from `table`.
pub fn delete(table: &str) -> DeleteBuilder {
    DeleteBuilder(Delete {
        table: table.to_string(),
        key: Vec::new(),
    })
}

/// Builds a [`Delete`]; finish with `.into()` to get a [`Command`].
pub struct DeleteBuilder(Delete);

impl DeleteBuilder {
    /// Adds a column that selects the rows to delete.
    pub fn key(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.0.key.push(column_value(column, value));
        self
    }
}

impl From<DeleteBuilder> for Command {
    fn from(builder: DeleteBuilder) -> Self {
        Command::Delete(builder.0)
    }
}

/// A message for `target` published after the entry's transaction commits.
pub fn emit<K: Into<String>, V: Into<String>>(
    target: &str,
    fields: impl IntoIterator<Item = (K, V)>,
) -> Command {
    Command::Emit(Emit {
        target: target.to_string(),
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
    })
}
