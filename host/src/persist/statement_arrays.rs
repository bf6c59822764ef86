//! How a set-based statement's rows travel to PostgreSQL: one array per column, spread into rows
//! by `unnest`, each of a single element type spelled out in the SQL (`$2::float8[]`) and cast to
//! its column's type in the statement, so a statement prepared for one set of value types is
//! never reused for another.

use crate::plugin::wit;

/// One column's values across the rows of a statement, as one array of a single element type.
pub(super) enum Array {
    Bool(Vec<Option<bool>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
    /// The float arrays of every row, one after the other (see [`Columns::add`]).
    Flat(Vec<f64>),
}

impl Array {
    /// The narrowest array that carries all `values` exactly: a native one when they are all of
    /// one scalar kind, else their text forms (which PostgreSQL casts to the column's type).
    pub(super) fn of(values: &[&wit::Value]) -> Array {
        use wit::Value as V;
        // Only NULLs: text, which PostgreSQL casts to any column type (a `bool[]` of NULLs
        // cannot become `real[]`, and the whole set-based statement would fail).
        if values.iter().all(|v| matches!(v, V::Null)) {
            return Array::Text(vec![None; values.len()]);
        }
        if let Some(v) = all_of(values, |v| match v {
            V::Boolean(b) => Some(*b),
            _ => None,
        }) {
            return Array::Bool(v);
        }
        if let Some(v) = all_of(values, |v| match v {
            V::Integer(i) => Some(*i),
            _ => None,
        }) {
            return Array::Int(v);
        }
        if let Some(v) = all_of(values, |v| match v {
            V::Float(f) => Some(*f),
            _ => None,
        }) {
            return Array::Float(v);
        }
        Array::Text(values.iter().map(|v| text_form(v)).collect())
    }

    fn sql_type(&self) -> &'static str {
        match self {
            Array::Bool(_) => "bool[]",
            Array::Int(_) => "int8[]",
            Array::Float(_) | Array::Flat(_) => "float8[]",
            Array::Text(_) => "text[]",
        }
    }
}

/// The values as one native array when `pick` takes every one that is not NULL.
fn all_of<T>(
    values: &[&wit::Value],
    pick: impl Fn(&wit::Value) -> Option<T>,
) -> Option<Vec<Option<T>>> {
    values
        .iter()
        .map(|v| match v {
            wit::Value::Null => Some(None),
            other => pick(other).map(Some),
        })
        .collect()
}

/// A value as PostgreSQL's text input for it (`None` for NULL).
fn text_form(value: &wit::Value) -> Option<String> {
    use wit::Value as V;
    Some(match value {
        V::Null => return None,
        V::Boolean(b) => b.to_string(),
        V::Integer(i) => i.to_string(),
        // The shortest text that reads back as the same f64 (validation let only finite ones
        // through).
        V::Float(f) => ryu::Buffer::new().format_finite(*f).to_string(),
        V::Text(s) | V::Json(s) | V::Timestamp(s) => s.clone(),
        // PostgreSQL reads the text `now` as the transaction's start time (`now()`).
        V::Now => "now".to_string(),
        V::TextArray(items) => array_literal(items.iter().map(|s| s.as_str())),
        // Embeddings: 1408 numbers each, so written straight into one string (numbers need no
        // quoting in an array literal).
        V::FloatArray(items) => {
            let mut out = String::with_capacity(items.len() * 12 + 2);
            let mut buffer = ryu::Buffer::new();
            out.push('{');
            for (i, f) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(buffer.format_finite(*f));
            }
            out.push('}');
            out
        }
    })
}

/// `{"a","b \"c\""}`: every element quoted, so no element is read as NULL or split.
fn array_literal<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("{");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// The arrays of a statement: those `unnest(...) AS u(c0, c1, ...)` spreads into rows, and
/// before them (`$1`, `$2`, ...) the float arrays of a column, every row's end to end.
#[derive(Default)]
pub(super) struct Columns {
    flat: Vec<Vec<f64>>,
    arrays: Vec<Array>,
    /// Arrays read on their own (`$n`), not spread by the `unnest`; numbered after its arrays.
    loose: Vec<Array>,
}

impl Columns {
    /// Adds a column; returns the expression that reads it, cast to `sql_type`.
    ///
    /// Float arrays (embeddings: 1408 numbers each) for a `real[]` or `double precision[]`
    /// column travel in binary: every row's numbers in one `float8[]` parameter, and each row
    /// its first and last position, so PostgreSQL slices them out instead of parsing a text
    /// literal per row (and the host writes no text). The cast to the column's type is
    /// PostgreSQL's own, out-of-range `real`s included.
    pub(super) fn add(&mut self, values: &[&wit::Value], sql_type: &str) -> String {
        debug_assert!(self.loose.is_empty(), "a column added after a loose array");
        if matches!(sql_type, "real[]" | "double precision[]")
            && let Some((flat, first, last)) = float_slices(values)
        {
            self.flat.push(flat);
            let param = self.flat.len();
            self.arrays.push(Array::Int(first));
            self.arrays.push(Array::Int(last));
            let last = self.arrays.len() - 1;
            let first = last - 1;
            return format!(
                "CAST((${param}::float8[])[u.c{first}::int4:u.c{last}::int4] AS {sql_type})"
            );
        }
        let array = Array::of(values);
        self.arrays.push(array);
        format!("CAST(u.c{} AS {sql_type})", self.arrays.len() - 1)
    }

    /// Adds an array read on its own; returns its placeholder (`$7::int8[]`). Its number
    /// follows the `unnest`'s arrays, so every column is added before the first loose array.
    pub(super) fn loose(&mut self, values: &[&wit::Value]) -> String {
        let array = Array::of(values);
        let placeholder = format!(
            "${}::{}",
            self.flat.len() + self.arrays.len() + self.loose.len() + 1,
            array.sql_type()
        );
        self.loose.push(array);
        placeholder
    }

    pub(super) fn unnest(&self, ordinality: bool) -> String {
        let before = self.flat.len();
        let params = self
            .arrays
            .iter()
            .enumerate()
            .map(|(i, a)| format!("${}::{}", before + i + 1, a.sql_type()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut names: Vec<String> = (0..self.arrays.len()).map(|i| format!("c{i}")).collect();
        if ordinality {
            names.push("n".into());
            format!(
                "unnest({params}) WITH ORDINALITY AS u({})",
                names.join(", ")
            )
        } else {
            format!("unnest({params}) AS u({})", names.join(", "))
        }
    }

    /// The arrays to bind, in the order of their placeholders.
    pub(super) fn into_params(self) -> Vec<Array> {
        self.flat
            .into_iter()
            .map(Array::Flat)
            .chain(self.arrays)
            .chain(self.loose)
            .collect()
    }
}

/// When every value is a float array or NULL: their numbers end to end, and each row's first
/// and last (1-based) position in them (NULL for NULL; an empty array is `[k:k-1]`, which
/// PostgreSQL slices to `{}`).
type FloatSlices = (Vec<f64>, Vec<Option<i64>>, Vec<Option<i64>>);

fn float_slices(values: &[&wit::Value]) -> Option<FloatSlices> {
    let mut flat = Vec::new();
    let mut first = Vec::with_capacity(values.len());
    let mut last = Vec::with_capacity(values.len());
    for value in values {
        match value {
            wit::Value::FloatArray(items) => {
                first.push(Some(flat.len() as i64 + 1));
                flat.extend_from_slice(items);
                last.push(Some(flat.len() as i64));
            }
            wit::Value::Null => {
                first.push(None);
                last.push(None);
            }
            _ => return None,
        }
    }
    Some((flat, first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_literals_quote_every_element() {
        assert_eq!(
            array_literal(["a", "b \"c\"", "d\\e", "NULL", ""].into_iter()),
            r#"{"a","b \"c\"","d\\e","NULL",""}"#
        );
        assert_eq!(array_literal(std::iter::empty()), "{}");
    }

    #[test]
    fn float_arrays_travel_end_to_end_with_each_rows_bounds() {
        let a = wit::Value::FloatArray(vec![1.0, 2.0]);
        let empty = wit::Value::FloatArray(vec![]);
        let b = wit::Value::FloatArray(vec![3.0]);
        let (flat, first, last) = float_slices(&[&a, &wit::Value::Null, &empty, &b]).unwrap();
        assert_eq!(flat, [1.0, 2.0, 3.0]);
        assert_eq!(first, [Some(1), None, Some(3), Some(3)]);
        assert_eq!(last, [Some(2), None, Some(2), Some(3)]);
        assert!(float_slices(&[&a, &wit::Value::Integer(1)]).is_none());
        // Numbered before the unnest's arrays; other column types keep their text form.
        let mut columns = Columns::default();
        let key = wit::Value::Integer(7);
        assert_eq!(columns.add(&[&key], "bigint"), "CAST(u.c0 AS bigint)");
        assert_eq!(
            columns.add(&[&a], "real[]"),
            "CAST(($1::float8[])[u.c1::int4:u.c2::int4] AS real[])"
        );
        assert_eq!(columns.add(&[&a], "numeric[]"), "CAST(u.c3 AS numeric[])");
        assert_eq!(
            columns.unnest(false),
            "unnest($2::int8[], $3::int8[], $4::int8[], $5::text[]) AS u(c0, c1, c2, c3)"
        );
        assert_eq!(columns.into_params().len(), 5);
    }

    #[test]
    fn one_kind_of_value_travels_natively_and_a_mix_as_text() {
        let int = wit::Value::Integer(2);
        let float = wit::Value::Float(0.1);
        let null = wit::Value::Null;
        assert!(matches!(Array::of(&[&int, &null]), Array::Int(v) if v == [Some(2), None]));
        assert!(
            matches!(Array::of(&[&int, &float]), Array::Text(v) if v == [Some("2".to_string()), Some("0.1".to_string())])
        );
        assert!(
            matches!(Array::of(&[&null, &null]), Array::Text(v) if v == [None, None]),
            "only NULLs travel as text, which casts to any column type"
        );
        let floats = wit::Value::FloatArray(vec![1.5, 2.0]);
        assert!(
            matches!(Array::of(&[&floats]), Array::Text(v) if v == [Some("{1.5,2.0}".to_string())])
        );
    }
}
