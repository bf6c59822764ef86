//! Reading the string fields of an entry the way the real ML producers write them.
//!
//! Every value on the wire is text: numbers as `"123"`, booleans as `"true"`, lists as JSON text.
//! Optional fields are absent, but some producers send `""` or `"null"` instead; [`Fields`] treats
//! all three as absent so handlers only deal with "present and valid" or "absent".
//!
//! Every parse error is a [`Failure::Malformed`] that names the field and quotes the bad value.

use crate::bindings::kaleidoscope::handler::types::{Entry, Failure};
use crate::malformed;

/// The longest excerpt of a bad value quoted in an error message.
const QUOTE_LIMIT: usize = 60;

/// Read access to an entry's fields with absent-value normalisation and typed parsing.
pub struct Fields<'a> {
    fields: &'a [(String, String)],
}

impl<'a> Fields<'a> {
    /// Wraps the fields of `entry`.
    pub fn new(entry: &'a Entry) -> Self {
        Self {
            fields: &entry.fields,
        }
    }

    /// Wraps a plain list of fields (handy in unit tests).
    pub fn from_pairs(fields: &'a [(String, String)]) -> Self {
        Self { fields }
    }

    /// The field's value, or `None` when it is absent, empty (after trimming) or `"null"`.
    /// If a field occurs twice, the first occurrence wins.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        let value = self
            .fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.trim())?;
        if value.is_empty() || value == "null" {
            None
        } else {
            Some(value)
        }
    }

    /// True when the field carries a value (see [`Fields::get`]).
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The field's value; `malformed` naming the field when it is absent.
    pub fn required(&self, name: &str) -> Result<&'a str, Failure> {
        self.get(name)
            .ok_or_else(|| malformed(format!("missing field `{name}`")))
    }

    /// An optional integer field.
    pub fn i64(&self, name: &str) -> Result<Option<i64>, Failure> {
        self.get(name).map(|v| parse_i64(name, v)).transpose()
    }

    /// A required integer field.
    pub fn required_i64(&self, name: &str) -> Result<i64, Failure> {
        parse_i64(name, self.required(name)?)
    }

    /// An optional floating-point field (finite values only).
    pub fn f64(&self, name: &str) -> Result<Option<f64>, Failure> {
        self.get(name).map(|v| parse_f64(name, v)).transpose()
    }

    /// A required floating-point field (finite values only).
    pub fn required_f64(&self, name: &str) -> Result<f64, Failure> {
        parse_f64(name, self.required(name)?)
    }

    /// An optional boolean field (`true`/`false`, any case, also `1`/`0`).
    pub fn bool(&self, name: &str) -> Result<Option<bool>, Failure> {
        self.get(name).map(|v| parse_bool(name, v)).transpose()
    }

    /// An optional list of strings: JSON text (`["a", "b"]`), or comma-separated text as the
    /// original Java consumer accepted (`a, b`).
    pub fn string_list(&self, name: &str) -> Result<Option<Vec<String>>, Failure> {
        self.get(name)
            .map(|v| parse_string_list(name, v))
            .transpose()
    }

    /// An optional JSON list of numbers (e.g. an embedding).
    pub fn f64_list(&self, name: &str) -> Result<Option<Vec<f64>>, Failure> {
        self.get(name).map(|v| parse_f64_list(name, v)).transpose()
    }

    /// An optional field holding JSON text of any shape.
    pub fn json(&self, name: &str) -> Result<Option<serde_json::Value>, Failure> {
        self.get(name)
            .map(|v| {
                serde_json::from_str(v).map_err(|e| {
                    malformed(format!(
                        "field `{name}`: not valid JSON ({e}): {}",
                        quote(v)
                    ))
                })
            })
            .transpose()
    }
}

/// Parses an integer sent as text; the error names `field`.
pub fn parse_i64(field: &str, value: &str) -> Result<i64, Failure> {
    value.trim().parse::<i64>().map_err(|_| {
        malformed(format!(
            "field `{field}`: expected an integer, got {}",
            quote(value)
        ))
    })
}

/// Parses a finite floating-point number sent as text (exponent form allowed); the error names
/// `field`.
pub fn parse_f64(field: &str, value: &str) -> Result<f64, Failure> {
    match value.trim().parse::<f64>() {
        Ok(number) if number.is_finite() => Ok(number),
        _ => Err(malformed(format!(
            "field `{field}`: expected a finite number, got {}",
            quote(value)
        ))),
    }
}

/// Parses `true`/`false` (any case) or `1`/`0`; the error names `field`.
pub fn parse_bool(field: &str, value: &str) -> Result<bool, Failure> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(malformed(format!(
            "field `{field}`: expected true or false, got {}",
            quote(value)
        ))),
    }
}

/// Parses a list of strings: JSON text when it starts with `[`, otherwise comma-separated text.
/// Blank items are dropped; JSON items that are not strings make the field malformed.
pub fn parse_string_list(field: &str, value: &str) -> Result<Vec<String>, Failure> {
    let value = value.trim();
    if !value.starts_with('[') {
        return Ok(value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_string)
            .collect());
    }
    let items: Vec<serde_json::Value> = serde_json::from_str(value).map_err(|e| {
        malformed(format!(
            "field `{field}`: not a valid JSON list ({e}): {}",
            quote(value)
        ))
    })?;
    items
        .into_iter()
        .enumerate()
        .filter_map(|(index, item)| match item {
            serde_json::Value::String(s) if s.trim().is_empty() => None,
            serde_json::Value::String(s) => Some(Ok(s)),
            other => Some(Err(malformed(format!(
                "field `{field}`: item {index} is not a string: {}",
                quote(&other.to_string())
            )))),
        })
        .collect()
}

/// Parses a JSON list of finite numbers; the error names `field` and the bad item.
pub fn parse_f64_list(field: &str, value: &str) -> Result<Vec<f64>, Failure> {
    let items: Vec<serde_json::Value> = serde_json::from_str(value.trim()).map_err(|e| {
        malformed(format!(
            "field `{field}`: not a valid JSON list of numbers ({e}): {}",
            quote(value)
        ))
    })?;
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            item.as_f64().filter(|n| n.is_finite()).ok_or_else(|| {
                malformed(format!(
                    "field `{field}`: item {index} is not a finite number: {}",
                    quote(&item.to_string())
                ))
            })
        })
        .collect()
}

/// Quotes a value for an error message, cut to a readable length on a character boundary.
fn quote(value: &str) -> String {
    match value.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
        None => format!("{value:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn reason(failure: Failure) -> String {
        match failure {
            Failure::Malformed(reason) | Failure::Retry(reason) => reason,
        }
    }

    #[test]
    fn empty_and_null_values_are_absent() {
        let fields = pairs(&[("a", ""), ("b", "null"), ("c", " x ")]);
        let fields = Fields::from_pairs(&fields);
        assert_eq!(fields.get("a"), None);
        assert_eq!(fields.get("b"), None);
        assert_eq!(fields.get("c"), Some("x"));
        assert_eq!(fields.get("d"), None);
    }

    #[test]
    fn required_numbers_parse_or_name_the_field() {
        let fields = pairs(&[("score", "0.75"), ("bad", "NaN")]);
        let fields = Fields::from_pairs(&fields);
        assert_eq!(fields.required_f64("score").ok(), Some(0.75));
        assert!(reason(fields.required_f64("bad").unwrap_err()).contains("`bad`"));
        assert!(reason(fields.required_f64("absent").unwrap_err()).contains("`absent`"));
    }

    #[test]
    fn logging_works_in_a_native_unit_test() {
        // Natively there is no host to import `log` from; it must not abort the test binary.
        crate::log::info("a line from a native test");
        crate::log::error("and another");
    }

    #[test]
    fn missing_required_field_names_the_field() {
        let fields = pairs(&[]);
        let error = Fields::from_pairs(&fields)
            .required_i64("mediaId")
            .unwrap_err();
        assert_eq!(reason(error), "missing field `mediaId`");
    }

    #[test]
    fn string_lists_accept_json_and_commas() {
        assert_eq!(parse_string_list("t", r#"["a", "b"]"#).unwrap(), ["a", "b"]);
        assert_eq!(parse_string_list("t", "a, b,,c ").unwrap(), ["a", "b", "c"]);
        assert!(parse_string_list("t", "[]").unwrap().is_empty());
        assert!(reason(parse_string_list("t", "[1]").unwrap_err()).contains("item 0"));
    }

    #[test]
    fn numbers_accept_exponent_form_and_reject_non_finite() {
        assert_eq!(parse_f64("x", "1e-05").unwrap(), 1e-05);
        assert_eq!(parse_f64_list("x", "[1.0E-4, 2]").unwrap(), [1.0e-4, 2.0]);
        assert!(parse_f64("x", "NaN").is_err());
        assert!(parse_f64("x", "inf").is_err());
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let long = "é".repeat(500);
        let message = reason(parse_i64("n", &long).unwrap_err());
        assert!(message.len() < 200, "{message}");
        assert!(message.contains("1000 bytes"));
    }
}
