//! Step 1: what can be decided about an entry without its handler.

use super::{Decision, Item};
use crate::dead_letter::FailureKind;
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
        // A replayed dead letter carries the id of the entry it replays; it is recorded in the
        // ledger under that identity (not under its own new id), and the marker is not the
        // handler's business.
        let mut fields = fields;
        let replay_of = fields
            .iter()
            .position(|(k, _)| k == REPLAY_OF_FIELD)
            .map(|at| fields.remove(at).1);
        let ledger_id = match replay_of {
            Some(original) if is_entry_id(&original) => format!("{original}/replay"),
            _ => entry.id.clone(),
        };
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
            ledger_id,
            fields,
            correlation_id,
            decision,
        }
    }
}

/// The field with which `dlq replay` marks a re-published dead letter: the id of the entry that
/// was dead-lettered.
pub const REPLAY_OF_FIELD: &str = "kaleidoscope-replay-of";

/// Whether `id` looks like a Redis stream entry id (`<ms>-<seq>`).
fn is_entry_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.bytes().all(|b| b.is_ascii_digit())
            && seq.bytes().all(|b| b.is_ascii_digit())
    })
}

/// The Java backend wrote `init = "true"` into empty streams at start-up; such an entry carries
/// no result.
pub(super) fn is_init_sentinel(entry: &StreamEntry) -> bool {
    entry.fields.len() == 1 && entry.fields[0].0 == "init"
}
