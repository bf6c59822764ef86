//! Step 1: what can be decided about an entry without its handler.

use super::{Decision, Item};
use crate::deadletter::FailureKind;
use crate::state::HostState;
use crate::streams::StreamEntry;
use crate::text;

impl HostState {
    /// Decodes an entry and decides what needs no handler: values that are not UTF-8 or hold a
    /// NUL character (which no PostgreSQL text can store), and entries delivered more often than
    /// allowed (e.g. ones that crashed a host every time).
    pub(super) fn triage(&self, mut entry: StreamEntry) -> Item {
        let mut bad_field = None;
        let mut nul_field = None;
        // The values move from bytes to text without a copy; the raw bytes are not needed again.
        let fields: Vec<(String, String)> = std::mem::take(&mut entry.fields)
            .into_iter()
            .map(|(name, value)| match String::from_utf8(value) {
                Ok(text) => {
                    if text.contains('\0') || name.contains('\0') {
                        nul_field.get_or_insert_with(|| text::sanitize(name.clone()));
                    }
                    (name, text)
                }
                Err(error) => {
                    bad_field.get_or_insert_with(|| name.clone());
                    let text = String::from_utf8_lossy(error.as_bytes()).into_owned();
                    (name, text)
                }
            })
            .collect();
        let correlation_id = fields
            .iter()
            .find(|(k, _)| k == "correlationId")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let decision = if let Some(field) = bad_field {
            Some(Decision::DeadLetter(
                FailureKind::Malformed,
                format!("field `{field}` is not valid UTF-8"),
            ))
        } else if let Some(field) = nul_field {
            Some(Decision::DeadLetter(
                FailureKind::Malformed,
                format!("field `{field}` contains a NUL character, which no text column can hold"),
            ))
        } else if entry.deliveries > self.config.retry_attempts {
            Some(Decision::DeadLetter(
                FailureKind::RetriesExhausted,
                format!(
                    "delivered {} times, more than ML_RETRY_ATTEMPTS = {}, without being finished (did the host stop while handling it?)",
                    entry.deliveries, self.config.retry_attempts
                ),
            ))
        } else {
            None
        };
        Item {
            entry,
            fields,
            correlation_id,
            decision,
        }
    }
}

/// The Java backend wrote `init = "true"` into empty streams at start-up; such an entry carries
/// no result.
pub(super) fn is_init_sentinel(entry: &StreamEntry) -> bool {
    entry.fields.len() == 1 && entry.fields[0].0 == "init"
}
