//! The one schedule of pauses between attempts after failures: the consumer's reads, a batch
//! through an outage, publishing a request, waiting for a dependency at start-up.

use std::time::Duration;

/// Pauses that double after each failure, from `first` up to `max`, and start over after a
/// success: quick to notice a short hiccup, gentle on a dependency that is down for long.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A schedule from `first` to `max` (a constant pause when they are equal).
    pub const fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The pause the next failure gets, without using it up (for the log line that announces it).
    pub fn upcoming(&self) -> Duration {
        self.next
    }

    /// The pause for this failure; the next one gets twice as long, up to the maximum.
    pub fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    /// After a success: the next failure starts from the first pause again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_maximum_and_start_over_after_a_success() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(backoff.upcoming(), Duration::from_millis(100));
        let pauses: Vec<_> = (0..4).map(|_| backoff.pause().as_millis()).collect();
        assert_eq!(pauses, [100, 200, 350, 350]);
        backoff.reset();
        assert_eq!(backoff.pause(), Duration::from_millis(100));
    }

    #[test]
    fn equal_bounds_make_a_constant_pause() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(backoff.pause(), backoff.pause());
    }
}
