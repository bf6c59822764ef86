//! When PostgreSQL last answered a batch's work: the response deadline counts from there.
//!
//! A half-open connection (the server gone without a reset) never errors; the host notices it
//! only because no answer comes. But a healthy batch can run many quick statements (entry by
//! entry, one per command) and take far longer in total than any one statement may. So the
//! deadline is on the silence between answers, not on the batch: every statement of the delivery
//! path calls [`answered`] when its reply arrives, and [`watch`] fails the work only after
//! `deadline` without one.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

tokio::task_local! {
    static LAST_ANSWER: Answers;
}

/// The time of the last answer, in milliseconds since the work began.
#[derive(Clone)]
struct Answers {
    began: Instant,
    last_ms: Arc<AtomicU64>,
}

/// Records that the database answered the current work. Outside [`watch`] it does nothing.
pub fn answered() {
    let _ = LAST_ANSWER.try_with(|answers| {
        let now = answers.began.elapsed().as_millis() as u64;
        answers.last_ms.fetch_max(now, Ordering::Relaxed);
    });
}

/// Runs `work`, failing with `Err(silence)` once `deadline` passes without an [`answered`] call
/// inside it (counting from the start of the work).
pub async fn watch<T>(deadline: Duration, work: impl Future<Output = T>) -> Result<T, Duration> {
    let answers = Answers {
        began: Instant::now(),
        last_ms: Arc::new(AtomicU64::new(0)),
    };
    let last = answers.last_ms.clone();
    let began = answers.began;
    let work = LAST_ANSWER.scope(answers, work);
    tokio::pin!(work);
    loop {
        let due = began + Duration::from_millis(last.load(Ordering::Relaxed)) + deadline;
        tokio::select! {
            outcome = &mut work => return Ok(outcome),
            _ = tokio::time::sleep_until(due) => {
                let silence = began.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if silence >= deadline {
                    return Err(silence);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_that_keeps_answering_outlives_the_deadline_and_silence_does_not() {
        let deadline = Duration::from_millis(100);
        let chatty = async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                answered();
            }
            "done"
        };
        assert_eq!(watch(deadline, chatty).await, Ok("done"));
        let silent = async {
            answered();
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(watch(deadline, silent).await.is_err());
    }
}
