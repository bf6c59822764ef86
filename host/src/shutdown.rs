//! Telling every task of a host that it is time to stop, and waiting for that.
//!
//! A stop is a one-way switch: once pulled it stays pulled. Tasks either check it between units
//! of work ([`Shutdown::requested`]) or wait for it beside their work in a `select!`
//! ([`Shutdown::wait`]).

use tokio::sync::watch;

/// The switch: held by whoever decides when the host (or one consumer generation) stops.
#[derive(Debug)]
pub struct StopSwitch(watch::Sender<bool>);

/// What a task holds to learn that it should stop. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl StopSwitch {
    /// A switch not yet pulled.
    pub fn new() -> Self {
        StopSwitch(watch::channel(false).0)
    }

    /// Pulls the switch: every [`Shutdown`] of it sees the stop.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    /// Whether the switch was pulled.
    pub fn stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// A handle for a task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Default for StopSwitch {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// Whether the stop has been asked for.
    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the stop is asked for (at once if it was already). Never resolves when the
    /// switch is gone without having been pulled: nobody can ask for a stop any more.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_reaches_every_handle_and_stays() {
        let switch = StopSwitch::new();
        let mut first = switch.subscribe();
        let second = first.clone();
        assert!(!first.requested());
        switch.stop();
        first.wait().await;
        assert!(second.requested());
        assert!(switch.stopped());
        // Waiting again returns at once: a stop is not an event that can be missed.
        tokio::time::timeout(std::time::Duration::from_secs(5), first.wait())
            .await
            .expect("a stop already asked for is seen at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_switch_dropped_unpulled_never_stops_anyone() {
        let switch = StopSwitch::new();
        let mut handle = switch.subscribe();
        drop(switch);
        let waited =
            tokio::time::timeout(std::time::Duration::from_secs(3600), handle.wait()).await;
        assert!(waited.is_err());
        assert!(!handle.requested());
    }
}
