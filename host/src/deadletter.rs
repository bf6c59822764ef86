//! Dead letters: entries that will not be processed, with the reason, on a stream of their own.
//!
//! Every dead letter carries enough to understand and replay it: where it came from, what kind of
//! failure it was, the message, which plugin version failed it, how often it was delivered, when,
//! and the original fields as a JSON object.

use std::fmt;
use std::time::SystemTime;

/// Why an entry was dead-lettered. The names are part of the operator interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The entry can never be processed (the handler said so, or a field is not UTF-8).
    Malformed,
    /// It asked for retries (or its data was not there yet) until `ML_RETRY_ATTEMPTS` ran out.
    RetriesExhausted,
    /// The plugin trapped on every attempt.
    PluginTrap,
    /// The plugin ran past its deadline on every attempt.
    Timeout,
    /// The plugin hit its memory cap on every attempt.
    MemoryLimit,
    /// A command failed validation (table, column, type, key).
    ForbiddenCommand,
    /// PostgreSQL rejected the entry's commands for good (constraint or data error).
    Database,
}

impl FailureKind {
    /// The name written to the `failureKind` field.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Malformed => "malformed",
            FailureKind::RetriesExhausted => "retries-exhausted",
            FailureKind::PluginTrap => "plugin-trap",
            FailureKind::Timeout => "timeout",
            FailureKind::MemoryLimit => "memory-limit",
            FailureKind::ForbiddenCommand => "forbidden-command",
            FailureKind::Database => "database",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One dead letter, before it is written.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The logical source stream (without the host's stream prefix), so a replay can target it.
    pub source_stream: String,
    pub source_id: String,
    pub kind: FailureKind,
    pub error: String,
    pub plugin: String,
    pub plugin_version: String,
    pub deliveries: u32,
    /// The original fields; values that are not UTF-8 are shown with replacement characters.
    pub fields: Vec<(String, String)>,
}

impl DeadLetter {
    /// The fields of the dead-letter stream entry.
    pub fn to_stream_fields(&self) -> Vec<(String, String)> {
        let original: serde_json::Map<String, serde_json::Value> = self
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        vec![
            ("sourceStream".into(), self.source_stream.clone()),
            ("sourceId".into(), self.source_id.clone()),
            ("failureKind".into(), self.kind.as_str().into()),
            ("error".into(), self.error.clone()),
            ("plugin".into(), self.plugin.clone()),
            ("pluginVersion".into(), self.plugin_version.clone()),
            ("deliveries".into(), self.deliveries.to_string()),
            (
                "failedAt".into(),
                humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            ),
            (
                "fields".into(),
                serde_json::Value::Object(original).to_string(),
            ),
        ]
    }
}
