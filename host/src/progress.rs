//! Progress of the long-running commands (`demo`, `bench`) on stderr.
//!
//! On a terminal an `indicatif` bar redraws in place; in a log or CI, where a redrawn line would
//! be a wall of carriage returns, a plain line is written every few seconds and at the end.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::{Duration, Instant};

/// How often the plain line is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// One phase's progress towards `total` things.
pub struct Progress {
    bar: ProgressBar,
    /// What the plain lines start with (the bar shows it as its prefix).
    label: String,
    /// " entries", or nothing.
    unit: String,
    last_line: Option<Instant>,
}

impl Progress {
    /// A bar labelled `label` (e.g. "host loading") counting `unit` (e.g. "entries").
    pub fn new(label: &str, total: u64, unit: &str) -> Self {
        let bar = ProgressBar::new(total);
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        let template = format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}}{unit} {{rate}} {{msg}}");
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0}/s", state.per_sec());
                },
            )
            .progress_chars("#>.");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        Self {
            bar,
            label: label.to_string(),
            unit,
            last_line: None,
        }
    }

    /// Moves to `done` of a total that may have grown; `message` follows the counts (e.g. what
    /// is still in flight).
    pub fn update(&mut self, done: u64, total: u64, message: &str) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        if !message.is_empty() {
            self.bar.set_message(message.to_string());
        }
        if self.bar.is_hidden() && self.last_line.is_none_or(|at| at.elapsed() >= PLAIN_EVERY) {
            self.plain_line(done, total, message);
        }
    }

    /// Ends the phase: the bar stays on screen with its last counts; a plain line says them.
    pub fn finish(&mut self, done: u64, total: u64, message: &str) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        self.bar.set_message(message.to_string());
        if self.bar.is_hidden() {
            self.plain_line(done, total, message);
        }
        self.bar.finish();
    }

    fn plain_line(&mut self, done: u64, total: u64, message: &str) {
        let elapsed = self.bar.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 / elapsed;
        // The bar's label is padded into columns; a log line needs none of that.
        let label = self.label.split_whitespace().collect::<Vec<_>>().join(" ");
        let line = format!(
            "{label}: {done}/{total}{} ({rate:.0}/s) {message}",
            self.unit
        );
        eprintln!("{}", line.trim_end());
        self.last_line = Some(Instant::now());
    }
}
