//! Handler for ML failures: records each one in `ml_processing_errors`.
//!
//! Two shapes are accepted (see `wire-format.md`):
//! - the seed's contract on `ml-error-results`: `correlationId`, `error`, `status` (`FAILED`);
//! - what the real Python services wrote to `ai-processing-dlq`: `originalMessageId`,
//!   `originalData` (a Python repr, kept as text), `serviceName`, `error`, `errorType`,
//!   `retryCount`, `timestamp` (epoch seconds). This plugin reads that stream too, so those
//!   failures are no longer invisible to the backend.
//!
//! The real services' entries carry no top-level `correlationId`: it is inside `originalData`,
//! which [`repr::parse_dict`] reads (a literal reader, never an evaluator), so their failures
//! fail their request at once instead of leaving it to time out.
//!
//! The row is keyed by the source stream and entry id, so it is written once however often the
//! entry is delivered.

pub mod repr;

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Fields, Handler, Manifest};

/// The seed's error stream.
pub const ERROR_STREAM: &str = "ml-error-results";
/// The real ML services' own dead-letter stream.
pub const PRODUCER_DLQ_STREAM: &str = "ai-processing-dlq";

struct MlErrors;

impl Handler for MlErrors {
    fn manifest() -> Manifest {
        sdk::manifest(
            "ml-errors",
            env!("CARGO_PKG_VERSION"),
            &[ERROR_STREAM, PRODUCER_DLQ_STREAM],
        )
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        to_commands(&entry.source, &entry.id, &Fields::new(&entry))
    }
}

sdk::export_handler!(MlErrors);

/// One insert of the error, ignored if this entry was recorded before, and the failure of the
/// request it answers.
pub fn to_commands(stream: &str, entry_id: &str, fields: &Fields) -> Result<Vec<Command>, Failure> {
    let error = fields.required("error")?;
    // The producers' DLQ shape keeps the original message's fields in `originalData`.
    let original = fields
        .get("originalData")
        .and_then(repr::parse_dict)
        .unwrap_or_default();
    let from_original = |name: &str| {
        original
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let correlation_id = fields
        .get("correlationId")
        .or_else(|| from_original("correlationId"))
        .filter(|c| !c.is_empty());
    let service = fields.get("serviceName");
    let mut commands = vec![
        sdk::insert("ml_processing_errors")
            .value("source_stream", stream)
            .value("entry_id", entry_id)
            .value_some("correlation_id", correlation_id)
            .value("error", error)
            .value("status", fields.get("status").unwrap_or("FAILED"))
            .value_some("service_name", service)
            .value_some("error_type", fields.get("errorType"))
            .value_some("retry_count", fields.i64("retryCount")?)
            .value_some("original_message_id", fields.get("originalMessageId"))
            .value_some("original_data", fields.get("originalData"))
            .value_some("producer_timestamp", fields.get("timestamp"))
            .into(),
    ];
    // A failure answers the request it belongs to (if this host published it and it is still
    // waiting), naming the service that failed.
    if let Some(correlation_id) = correlation_id {
        let reason = match service {
            Some(service) => format!("{service}: {error}"),
            None => error.to_string(),
        };
        commands.push(
            sdk::update("ml_requests")
                .key("correlation_id", correlation_id)
                .key("status", "PENDING")
                .set("status", "FAILED")
                .set("error", reason.as_str())
                .if_missing(sdk::IfMissing::Skip)
                .into(),
        );
    }
    Ok(commands)
}
