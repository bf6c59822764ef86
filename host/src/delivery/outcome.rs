//! What a handler call that produced no commands means for its entry: the one mapping from a
//! plugin's [`HandlerOutcome`] to a dead-letter kind, shared by delivery and `plugin exec`, so what
//! a plugin author sees is what the host does. (The plugin layer reports what happened; what it
//! means for the protocol is decided here.)

use crate::dead_letter::FailureKind;
use crate::plugin::{HandlerOutcome, wit};

/// A handler call that produced no commands, as the host treats it. The one mapping from
/// [`HandlerOutcome`] to a failure kind, shared by delivery and `plugin exec`, so what a plugin
/// author sees is what the host does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerFailure {
    pub kind: FailureKind,
    /// The reason as it is logged and stored in the dead letter.
    pub reason: String,
    /// Whether another delivery may succeed (the entry is retried until `ML_RETRY_ATTEMPTS`),
    /// or the entry is dead-lettered at once.
    pub retryable: bool,
}

/// The commands of `outcome`, or the failure as the host treats it; `memory_cap` (the plugin's
/// cap, in bytes) goes into the reason of a memory-limit failure.
pub fn commands_of(
    outcome: HandlerOutcome,
    memory_cap: usize,
) -> Result<Vec<wit::Command>, HandlerFailure> {
    let (kind, reason, retryable) = match outcome {
        HandlerOutcome::Commands(commands) => return Ok(commands),
        HandlerOutcome::Malformed(reason) => (FailureKind::Malformed, reason, false),
        HandlerOutcome::Retry(reason) => (FailureKind::RetriesExhausted, reason, true),
        HandlerOutcome::Trap(message) => (
            FailureKind::PluginTrap,
            format!("plugin trapped: {message}"),
            true,
        ),
        HandlerOutcome::Timeout(after) => (
            FailureKind::Timeout,
            format!("plugin did not return within {after:?}"),
            true,
        ),
        HandlerOutcome::MemoryLimit { requested } => (
            FailureKind::MemoryLimit,
            format!(
                "plugin tried to grow its memory to {requested} bytes, over the cap of {memory_cap} bytes"
            ),
            true,
        ),
    };
    Err(HandlerFailure {
        kind,
        reason,
        retryable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_a_malformed_entry_is_dead_lettered_at_once() {
        let failure = |outcome| commands_of(outcome, 1 << 20).unwrap_err();
        let malformed = failure(HandlerOutcome::Malformed("no media id".into()));
        assert_eq!(malformed.kind, FailureKind::Malformed);
        assert!(!malformed.retryable);
        for outcome in [
            HandlerOutcome::Retry("later".into()),
            HandlerOutcome::Trap("panicked".into()),
            HandlerOutcome::Timeout(Duration::from_secs(5)),
            HandlerOutcome::MemoryLimit { requested: 2 << 20 },
        ] {
            assert!(failure(outcome).retryable);
        }
    }

    #[test]
    fn each_plugin_failure_has_its_own_kind_and_a_reason_that_says_it() {
        let trap = commands_of(HandlerOutcome::Trap("boom".into()), 0).unwrap_err();
        assert_eq!(trap.kind, FailureKind::PluginTrap);
        assert_eq!(trap.reason, "plugin trapped: boom");
        let retry =
            commands_of(HandlerOutcome::Retry("media not yet there".into()), 0).unwrap_err();
        assert_eq!(retry.kind, FailureKind::RetriesExhausted);
        let memory =
            commands_of(HandlerOutcome::MemoryLimit { requested: 3 << 20 }, 1 << 20).unwrap_err();
        assert_eq!(memory.kind, FailureKind::MemoryLimit);
        assert!(memory.reason.contains("3145728") && memory.reason.contains("1048576"));
        let timeout =
            commands_of(HandlerOutcome::Timeout(Duration::from_millis(250)), 0).unwrap_err();
        assert_eq!(timeout.kind, FailureKind::Timeout);
    }

    #[test]
    fn commands_pass_through() {
        assert_eq!(
            commands_of(HandlerOutcome::Commands(Vec::new()), 0)
                .unwrap()
                .len(),
            0
        );
    }
}
