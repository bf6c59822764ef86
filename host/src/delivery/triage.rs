//! Step 1: what can be decided about an entry without its handler.

use super::{Decision, Item, Role};
use crate::dead_letter::FailureKind;
use crate::dead_letter::{REPLAY_OF_FIELD, REPLAY_PROOF_FIELD};
use crate::state::HostState;
use crate::streams::StreamEntry;
use crate::text;

impl HostState {
    /// Decodes an entry of `stream` and decides what needs no handler (see [`triage`]).
    pub(super) fn triage(&self, stream: &str, entry: StreamEntry) -> Item {
        triage(
            entry,
            self.config.retry_attempts,
            &|original: &str, proof: &str| {
                crate::persist::ledger::replay_proof(&self.replay_secret, stream, original) == proof
            },
        )
    }
}

/// Whether a replay mark (the original entry's id and its proof) was made by `dlq replay`.
type ReplayCheck<'a> = &'a dyn Fn(&str, &str) -> bool;

/// Decodes an entry and decides what needs no handler: values that are not UTF-8 or hold a NUL
/// character (which no PostgreSQL text can store), and entries delivered more often than
/// `retry_attempts` (e.g. ones that crashed a host every time).
fn triage(mut entry: StreamEntry, retry_attempts: u32, genuine: ReplayCheck) -> Item {
    // A field whose name lost bytes lost them as much as one whose value did: replay must not
    // pretend it has the original.
    let mut lossy_fields = entry.lossy_names.clone();
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
                lossy_fields.push(name.clone());
                let text = String::from_utf8_lossy(error.as_bytes()).into_owned();
                (name, text)
            }
        })
        .collect();
    let mut fields = fields;
    let ledger_id = ledger_identity(&entry.id, &mut fields, genuine);
    let correlation_id = fields
        .iter()
        .find(|(k, _)| k == "correlationId")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let decision = unreadable_or_overdue(&entry, &lossy_fields, nul_field, retry_attempts);
    Item {
        entry,
        ledger_id,
        fields,
        correlation_id,
        decision,
        lossy_fields,
        role: Role::Live,
        shadow: None,
    }
}

/// The identity the ledger records `own_id` under. A replayed dead letter carries the id of the
/// entry it replays and the proof that `dlq replay` wrote it; it is recorded under that identity
/// (not under its own new id). A mark without a valid proof (a producer's, forged or mistaken)
/// is ignored: the entry is itself. Neither field is the handler's business: both are removed.
fn ledger_identity(
    own_id: &str,
    fields: &mut Vec<(String, String)>,
    genuine: ReplayCheck,
) -> String {
    let mut take = |name: &str| {
        fields
            .iter()
            .position(|(k, _)| k == name)
            .map(|at| fields.remove(at).1)
    };
    let replay_of = take(REPLAY_OF_FIELD);
    let proof = take(REPLAY_PROOF_FIELD);
    match (replay_of, proof) {
        (Some(original), Some(proof)) if is_entry_id(&original) && genuine(&original, &proof) => {
            format!("{original}/replay")
        }
        (Some(original), _) => {
            tracing::warn!(
                entry = %own_id,
                replay_of = %text::sanitize(original),
                "the entry says it replays another but carries no valid proof from `dlq replay`; processed as itself"
            );
            own_id.to_string()
        }
        _ => own_id.to_string(),
    }
}

/// The dead letter an entry gets without a handler: a field name or value that is not UTF-8, a
/// NUL character, or more deliveries than `retry_attempts` (say, it crashed a host every time).
fn unreadable_or_overdue(
    entry: &StreamEntry,
    lossy_fields: &[String],
    nul_field: Option<String>,
    retry_attempts: u32,
) -> Option<Decision> {
    if let Some(name) = entry.lossy_names.first() {
        Some(Decision::DeadLetter(
            FailureKind::Malformed,
            format!(
                "the name of field `{}` is not valid UTF-8",
                text::sanitize(name.clone())
            ),
        ))
    } else if let Some(field) = lossy_fields.first() {
        Some(Decision::DeadLetter(
            FailureKind::Malformed,
            format!("field `{field}` is not valid UTF-8"),
        ))
    } else if let Some(field) = nul_field {
        Some(Decision::DeadLetter(
            FailureKind::Malformed,
            format!("field `{field}` contains a NUL character, which no text column can hold"),
        ))
    } else if entry.deliveries > retry_attempts {
        Some(Decision::DeadLetter(
            FailureKind::RetriesExhausted,
            format!(
                "delivered {} times, more than ML_RETRY_ATTEMPTS = {}, without being finished (did the host stop while handling it?)",
                entry.deliveries, retry_attempts
            ),
        ))
    } else {
        None
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, fields: &[(&str, &[u8])], deliveries: u32) -> StreamEntry {
        StreamEntry {
            id: id.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
            lossy_names: Vec::new(),
            deliveries,
        }
    }

    fn no_proof(_: &str, _: &str) -> bool {
        false
    }

    fn reason(item: &Item) -> (FailureKind, String) {
        match &item.decision {
            Some(Decision::DeadLetter(kind, reason)) => (*kind, reason.clone()),
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn a_readable_entry_is_left_to_its_handler_with_its_correlation_id() {
        let item = triage(
            entry("1-0", &[("mediaId", b"7"), ("correlationId", b"c-1")], 3),
            3,
            &no_proof,
        );
        assert!(item.decision.is_none());
        assert_eq!(item.ledger_id, "1-0");
        assert_eq!(item.correlation_id, "c-1");
        assert_eq!(item.fields[0], ("mediaId".to_string(), "7".to_string()));
    }

    #[test]
    fn bytes_no_text_column_can_hold_make_the_entry_malformed_naming_the_field() {
        let (kind, why) = reason(&triage(
            entry("1-0", &[("a", b"ok"), ("b", &[0xff])], 1),
            3,
            &no_proof,
        ));
        assert_eq!(kind, FailureKind::Malformed);
        assert!(why.contains("`b`") && why.contains("UTF-8"), "{why}");
        let (kind, why) = reason(&triage(entry("1-0", &[("c", b"x\0y")], 1), 3, &no_proof));
        assert_eq!(kind, FailureKind::Malformed);
        assert!(why.contains("`c`") && why.contains("NUL"), "{why}");
    }

    #[test]
    fn an_entry_delivered_more_often_than_allowed_is_given_up_without_a_handler() {
        assert!(
            triage(entry("1-0", &[("a", b"x")], 3), 3, &no_proof)
                .decision
                .is_none()
        );
        let (kind, why) = reason(&triage(entry("1-0", &[("a", b"x")], 4), 3, &no_proof));
        assert_eq!(kind, FailureKind::RetriesExhausted);
        assert!(why.contains("delivered 4 times"), "{why}");
    }

    #[test]
    fn a_replayed_dead_letter_takes_the_ledger_identity_of_the_entry_it_replays() {
        let genuine = |original: &str, proof: &str| proof == format!("ok:{original}");
        let item = triage(
            entry(
                "9-0",
                &[
                    ("a", b"x"),
                    (REPLAY_OF_FIELD, b"1-5"),
                    (REPLAY_PROOF_FIELD, b"ok:1-5"),
                ],
                1,
            ),
            3,
            &genuine,
        );
        assert_eq!(item.ledger_id, "1-5/replay");
        assert_eq!(item.fields, vec![("a".to_string(), "x".to_string())]);
        // A mark without a valid proof (a producer's) is ignored: the entry is itself.
        for proof in [&b"forged"[..], &b"ok:1-6"[..]] {
            let item = triage(
                entry(
                    "9-0",
                    &[(REPLAY_OF_FIELD, b"1-5"), (REPLAY_PROOF_FIELD, proof)],
                    1,
                ),
                3,
                &genuine,
            );
            assert_eq!(item.ledger_id, "9-0");
            assert!(item.fields.is_empty());
        }
        let item = triage(entry("9-0", &[(REPLAY_OF_FIELD, b"1-5")], 1), 3, &genuine);
        assert_eq!(item.ledger_id, "9-0");
        // A marker that is not an entry id is dropped and the entry keeps its own identity.
        let item = triage(
            entry("9-0", &[(REPLAY_OF_FIELD, b"1-5/replay")], 1),
            3,
            &genuine,
        );
        assert_eq!(item.ledger_id, "9-0");
        assert!(item.fields.is_empty());
    }

    #[test]
    fn only_a_lone_init_field_is_the_start_up_sentinel() {
        assert!(is_init_sentinel(&entry("1-0", &[("init", b"true")], 1)));
        assert!(!is_init_sentinel(&entry(
            "1-0",
            &[("init", b"true"), ("a", b"b")],
            1
        )));
        assert!(!is_init_sentinel(&entry("1-0", &[("mediaId", b"1")], 1)));
    }
}
