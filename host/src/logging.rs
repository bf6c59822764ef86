//! Log output: text for people, or one flat JSON object per line for log pipelines.
//!
//! The JSON lines are flat on purpose: a pipeline filters on `plugin`, `version`, `stream`,
//! `entry` or `correlation_id` without knowing which span set them (the `batch` and `entry`
//! spans' fields are merged into the line, the event's own fields last). Numbers and booleans
//! stay numbers and booleans; a list logged with [`List`] is a JSON array; nothing is Rust
//! `Debug` text.

use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// A list as a log field: `["a","b"]` in text, a JSON array in JSON lines.
pub struct List<'a, T: AsRef<str>>(pub &'a [T]);

impl<T: AsRef<str>> fmt::Display for List<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<&str> = self.0.iter().map(AsRef::as_ref).collect();
        match serde_json::to_string(&items) {
            Ok(text) => f.write_str(&text),
            Err(_) => Err(fmt::Error),
        }
    }
}

/// The JSON line format (`--log-format json`), with span fields recorded by [`JsonFields`].
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        if let Some(scope) = ctx.event_scope() {
            let mut names = Vec::new();
            for span in scope.from_root() {
                names.push(serde_json::Value::from(span.name()));
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                // JsonFields wrote them as a JSON object (empty for a span without fields).
                if let Ok(serde_json::Value::Object(fields)) =
                    serde_json::from_str::<serde_json::Value>(fields)
                {
                    line.extend(fields);
                }
            }
            line.insert("spans".into(), names.into());
        }
        event.record(&mut FieldsInto(&mut line));
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

/// The span fields' recorder to pair with [`JsonLines`].
pub fn json_fields() -> JsonFields {
    JsonFields::new()
}

/// Records an event's fields into a JSON object, keeping their types.
struct FieldsInto<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for FieldsInto<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // With its causes, each once (see `text::causes`).
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            let message = cause.to_string();
            if !text.ends_with(&message) {
                text.push_str(": ");
                text.push_str(&message);
            }
            source = cause.source();
        }
        self.0.insert(field.name().into(), text.into());
    }
    /// `%value` and the message arrive here too (as their `Display` text); a [`List`] is
    /// recognised by being a JSON array of strings.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        let value = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(list @ serde_json::Value::Array(_)) if field.name() != "message" => list,
            _ => text.into(),
        };
        self.0.insert(field.name().into(), value);
    }
}
