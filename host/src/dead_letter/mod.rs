//! Dead letters: entries that will not be processed, with the reason, on a stream of their own.
//!
//! Every dead letter carries enough to understand and replay it: where it came from, what kind of
//! failure it was, the message, which plugin version failed it, how often it was delivered, when,
//! and the original fields as a JSON object. This file is the format — [`DeadLetter`] is written
//! by the delivery protocol, [`StoredDeadLetter`] is read back by the tools — so writer and reader
//! cannot drift apart; [`admin`] lists and replays them (`kaleidoscope dlq`).

pub mod admin;

use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::time::SystemTime;

/// The field names of a dead-letter stream entry (camelCase, like the seed's DTOs; operators'
/// scripts read them).
pub mod field {
    /// The logical stream the entry came from (where `dlq replay` re-publishes it).
    pub const SOURCE_STREAM: &str = "sourceStream";
    /// The entry's id on that stream.
    pub const SOURCE_ID: &str = "sourceId";
    /// One of [`super::FailureKind`]'s names.
    pub const FAILURE_KIND: &str = "failureKind";
    /// Why, naming plugin, command, table, column or field as far as known.
    pub const ERROR: &str = "error";
    /// The plugin that failed it (empty when no plugin was involved).
    pub const PLUGIN: &str = "plugin";
    /// That plugin's version, so a fix can be told from the version that failed.
    pub const PLUGIN_VERSION: &str = "pluginVersion";
    /// The build of the plugin (the first 12 hex digits of its file's SHA-256).
    pub const PLUGIN_BUILD: &str = "pluginBuild";
    /// How often the entry was delivered.
    pub const DELIVERIES: &str = "deliveries";
    /// When it was dead-lettered (RFC 3339).
    pub const FAILED_AT: &str = "failedAt";
    /// The original entry's fields as one JSON object.
    pub const FIELDS: &str = "fields";
    /// Present only when some original values were not UTF-8: the names of those fields
    /// (comma-separated), whose bytes `fields` cannot carry (they hold U+FFFD instead).
    pub const BYTES_LOST: &str = "bytesLost";
    /// Present only for an entry a reprocessing run dead-lettered (`kaleidoscope reprocess`):
    /// the run's id. Its live processing is not what failed, and `dlq replay` leaves it to the
    /// run (`reprocess --ids`).
    pub const REPROCESS_RUN: &str = "reprocessRun";
}

/// The field with which `dlq replay` marks a re-published dead letter: the id of the entry that
/// was dead-lettered.
pub const REPLAY_OF_FIELD: &str = "kaleidoscope-replay-of";

/// The field with the proof that `dlq replay` wrote the mark
/// ([`crate::persist::ledger::replay_proof`]).
pub const REPLAY_PROOF_FIELD: &str = "kaleidoscope-replay-proof";

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
    /// Every kind, in the order operators see them listed.
    pub const ALL: [FailureKind; 7] = [
        FailureKind::Malformed,
        FailureKind::RetriesExhausted,
        FailureKind::PluginTrap,
        FailureKind::Timeout,
        FailureKind::MemoryLimit,
        FailureKind::ForbiddenCommand,
        FailureKind::Database,
    ];

    /// The kind named `name` (as written in `failureKind`), or an error listing the kinds, for
    /// `--kind` arguments.
    pub fn parse(name: &str) -> Result<FailureKind, String> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown dead-letter kind {name:?}; the kinds are {}",
                    names.join(", ")
                )
            })
    }

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
    /// The first 12 hex digits of the plugin file's SHA-256: which build, when several carry
    /// the same version.
    pub plugin_build: String,
    pub deliveries: u32,
    /// The original fields; values that are not UTF-8 are shown with replacement characters.
    pub fields: Vec<(String, String)>,
    /// The fields among them whose value was not UTF-8 (their bytes are lost).
    pub lossy_fields: Vec<String>,
    /// The reprocessing run that dead-lettered the entry, if one did.
    pub reprocess_run: Option<i64>,
}

/// The most the original fields may take in a dead letter (as JSON). An entry Redis accepted can
/// still make a dead letter Redis refuses (JSON escapes a control character in six bytes), and
/// a dead letter that cannot be written blocks its entry; beyond this, the large values are cut
/// and listed in `bytesLost`, so `dlq replay` will not pass the cut text off as the original.
pub const MAX_FIELDS_BYTES: usize = 16 << 20;

/// The most of a failure reason a dead letter keeps.
pub const MAX_ERROR_BYTES: usize = 64 << 10;

/// How much of a cut value a dead letter keeps.
const KEPT_OF_A_CUT_VALUE: usize = 1024;

impl DeadLetter {
    /// The fields of the dead-letter stream entry.
    pub fn to_stream_fields(&self) -> Vec<(String, String)> {
        let mut lossy = self.lossy_fields.clone();
        let json = |cut: bool, lossy: &mut Vec<String>| -> String {
            let original: serde_json::Map<String, serde_json::Value> = self
                .fields
                .iter()
                .map(|(k, v)| {
                    let v = if cut && v.len() > KEPT_OF_A_CUT_VALUE {
                        if !lossy.contains(k) {
                            lossy.push(k.clone());
                        }
                        format!(
                            "{}… ({} bytes cut: the dead letter keeps at most {} MiB of fields)",
                            prefix(v, KEPT_OF_A_CUT_VALUE),
                            v.len(),
                            MAX_FIELDS_BYTES >> 20
                        )
                    } else {
                        v.clone()
                    };
                    (k.clone(), serde_json::Value::String(v))
                })
                .collect();
            serde_json::Value::Object(original).to_string()
        };
        let mut original = json(false, &mut lossy);
        if original.len() > MAX_FIELDS_BYTES {
            original = json(true, &mut lossy);
        }
        let error = if self.error.len() > MAX_ERROR_BYTES {
            format!("{}… (cut)", prefix(&self.error, MAX_ERROR_BYTES))
        } else {
            self.error.clone()
        };
        let mut fields = vec![
            (field::SOURCE_STREAM.into(), self.source_stream.clone()),
            (field::SOURCE_ID.into(), self.source_id.clone()),
            (field::FAILURE_KIND.into(), self.kind.as_str().into()),
            (field::ERROR.into(), error),
            (field::PLUGIN.into(), self.plugin.clone()),
            (field::PLUGIN_VERSION.into(), self.plugin_version.clone()),
            (field::PLUGIN_BUILD.into(), self.plugin_build.clone()),
            (field::DELIVERIES.into(), self.deliveries.to_string()),
            (
                field::FAILED_AT.into(),
                humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            ),
            (field::FIELDS.into(), original),
        ];
        if !lossy.is_empty() {
            fields.push((field::BYTES_LOST.into(), lossy.join(",")));
        }
        if let Some(run) = self.reprocess_run {
            fields.push((field::REPROCESS_RUN.into(), run.to_string()));
        }
        fields
    }
}

/// The longest prefix of `text` of at most `bytes` bytes that ends on a character boundary.
fn prefix(text: &str, bytes: usize) -> &str {
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One dead letter as read back from the dead-letter stream. Lenient: a field that is missing
/// or unreadable (a letter written by hand, or by another version) reads as empty, so one odd
/// letter never stops `dlq list`.
#[derive(Clone, Debug, Serialize)]
pub struct StoredDeadLetter {
    /// The dead letter's own id on the dead-letter stream.
    pub id: String,
    pub source_stream: String,
    pub source_id: String,
    pub failure_kind: String,
    pub error: String,
    pub plugin: String,
    pub plugin_version: String,
    pub plugin_build: String,
    pub deliveries: u32,
    pub failed_at: String,
    /// The original entry's fields.
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Fields whose original bytes were lost (not UTF-8); empty for almost every dead letter.
    pub bytes_lost: Vec<String>,
    /// The reprocessing run that dead-lettered the entry (`None` for live processing).
    pub reprocess_run: Option<i64>,
}

impl StoredDeadLetter {
    /// Reads the entry `id` of the dead-letter stream.
    pub fn from_stream_fields(id: String, mut fields: HashMap<String, String>) -> Self {
        let mut take = |name: &str| fields.remove(name).unwrap_or_default();
        let original = take(field::FIELDS);
        StoredDeadLetter {
            id,
            source_stream: take(field::SOURCE_STREAM),
            source_id: take(field::SOURCE_ID),
            failure_kind: take(field::FAILURE_KIND),
            error: take(field::ERROR),
            plugin: take(field::PLUGIN),
            plugin_version: take(field::PLUGIN_VERSION),
            plugin_build: take(field::PLUGIN_BUILD),
            deliveries: take(field::DELIVERIES).parse().unwrap_or(0),
            failed_at: take(field::FAILED_AT),
            fields: serde_json::from_str(&original).unwrap_or_default(),
            bytes_lost: take(field::BYTES_LOST)
                .split(',')
                .filter(|name| !name.is_empty())
                .map(str::to_string)
                .collect(),
            reprocess_run: take(field::REPROCESS_RUN).parse().ok(),
        }
    }
}

/// One page of a stream read as raw bytes (`XRANGE` / `XREVRANGE`).
pub type RawEntries = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

/// Entries of the dead-letter stream as text. Anyone with access to Redis can write there; a name
/// or value that is not UTF-8 is read with U+FFFD in place of its bad bytes, so one odd entry
/// cannot make `status`, `dlq list` or `dlq show` fail.
pub fn decode_lossy(page: RawEntries) -> Vec<(String, std::collections::HashMap<String, String>)> {
    page.into_iter()
        .map(|(id, fields)| {
            let fields = fields
                .into_iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(&k).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    )
                })
                .collect();
            (id, fields)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_dead_letter_reads_back_field_for_field() {
        let letter = DeadLetter {
            source_stream: "ml-insights-results".into(),
            source_id: "1-2".into(),
            kind: FailureKind::PluginTrap,
            error: "boom".into(),
            plugin: "insights".into(),
            plugin_version: "1.2.3".into(),
            plugin_build: "0123456789ab".into(),
            deliveries: 3,
            fields: vec![
                ("mediaId".into(), "7".into()),
                ("odd".into(), "a\"b".into()),
            ],
            lossy_fields: vec!["odd".into()],
            reprocess_run: Some(7),
        };
        let stored = StoredDeadLetter::from_stream_fields(
            "9-0".into(),
            letter.to_stream_fields().into_iter().collect(),
        );
        assert_eq!(stored.id, "9-0");
        assert_eq!(stored.source_stream, "ml-insights-results");
        assert_eq!(stored.source_id, "1-2");
        assert_eq!(stored.failure_kind, "plugin-trap");
        assert_eq!(stored.error, "boom");
        assert_eq!(stored.plugin, "insights");
        assert_eq!(stored.plugin_version, "1.2.3");
        assert_eq!(stored.deliveries, 3);
        assert_eq!(stored.reprocess_run, Some(7));
        assert!(!stored.failed_at.is_empty());
        assert_eq!(stored.fields["mediaId"], "7");
        assert_eq!(stored.fields["odd"], "a\"b");
        assert_eq!(stored.bytes_lost, vec!["odd".to_string()]);
    }

    #[test]
    fn every_kind_parses_from_its_name_and_a_wrong_name_lists_them() {
        for kind in FailureKind::ALL {
            assert_eq!(FailureKind::parse(kind.as_str()), Ok(kind));
        }
        let error = FailureKind::parse("bogus").unwrap_err();
        assert!(error.contains("\"bogus\""), "{error}");
        assert!(
            error.contains("plugin-trap") && error.contains("database"),
            "{error}"
        );
    }
}
