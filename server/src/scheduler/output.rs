//! Scraper output: lines an agent forwards for a live lease become log
//! entries, cut to [`MAX_LINE_BYTES`], at most [`MAX_LINES_PER_MESSAGE`] per
//! message, and kept at [`LINES_PER_SECOND`] per lease on average with bursts
//! of [`LINE_BURST`] ([`LineBudget`], pure); what is dropped is counted and
//! reported.

use super::OutputLine;
use super::effects::Effects;
use super::state::State;
use crate::logs::Event;
use crate::model::{AgentId, LeaseId, UnixMs};

/// At most this many log lines are kept from one message.
const MAX_LINES_PER_MESSAGE: usize = 1000;
/// Log lines longer than this are cut.
const MAX_LINE_BYTES: usize = 8 * 1024;
/// One task's output is kept at this many lines a second on average...
const LINES_PER_SECOND: f64 = 200.0;
/// ...with bursts of this many; lines beyond are dropped and counted.
const LINE_BURST: f64 = 2000.0;

/// A lease's output budget: tokens refill at [`LINES_PER_SECOND`].
#[derive(Debug, Clone, Copy)]
pub(super) struct LineBudget {
    tokens: f64,
    at: UnixMs,
    dropped: u64,
    reported_at: UnixMs,
}

impl LineBudget {
    /// A full budget at `now`.
    fn new(now: UnixMs) -> Self {
        LineBudget {
            tokens: LINE_BURST,
            at: now,
            dropped: 0,
            reported_at: now,
        }
    }

    /// Takes up to `wanted` lines at `now`: how many may be kept, and how
    /// many dropped lines are due to be reported (at most once a second).
    fn take(&mut self, wanted: usize, now: UnixMs) -> (usize, u64) {
        let elapsed = (now - self.at).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * LINES_PER_SECOND).min(LINE_BURST);
        self.at = now;
        let allowed = wanted.min(self.tokens.max(0.0) as usize);
        self.tokens -= allowed as f64;
        self.dropped += (wanted - allowed) as u64;
        let report = if self.dropped > 0 && now - self.reported_at >= 1000 {
            self.reported_at = now;
            std::mem::take(&mut self.dropped)
        } else {
            0
        };
        (allowed, report)
    }
}

/// `text` cut to [`MAX_LINE_BYTES`] on a character boundary, marked.
fn cut_line(mut text: String) -> String {
    if text.len() > MAX_LINE_BYTES {
        let mut cut = MAX_LINE_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" … [truncated]");
    }
    text
}

impl State {
    /// Logs the lines the scraper of `lease` (held by `agent`) printed.
    pub(super) fn output(
        &mut self,
        fx: &mut Effects,
        agent: &AgentId,
        lease: &LeaseId,
        lines: Vec<OutputLine>,
        now: UnixMs,
    ) {
        self.seen(agent, now);
        let info = match self.lease_info(lease, Some(agent)) {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(agent = %agent, error = %e, "log lines for a lease that is not live dropped");
                return;
            }
        };
        let budget = self
            .line_budgets
            .entry(lease.clone())
            .or_insert_with(|| LineBudget::new(now));
        let too_many = lines.len().saturating_sub(MAX_LINES_PER_MESSAGE);
        let (allowed, over_rate) = budget.take(lines.len().min(MAX_LINES_PER_MESSAGE), now);
        let event = |e: Event| {
            e.task(info.task_id)
                .agent(agent.0.clone())
                .source(info.source.clone())
        };
        for line in lines.into_iter().take(allowed) {
            let at = if line.unix_ms > 0 { line.unix_ms } else { now };
            fx.log(
                event(Event::output(line.stream, cut_line(line.text)))
                    .at(at)
                    .row(),
            );
        }
        if over_rate > 0 {
            fx.log(event(Self::dropped_lines_event(over_rate)).row());
        }
        if too_many > 0 {
            fx.log(
                event(Event::warn(format!(
                    "{too_many} output lines dropped (too many in one batch)"
                )))
                .row(),
            );
        }
    }

    /// Forgets a finished lease's output budget; the dropped lines not yet
    /// reported, if any.
    pub(super) fn end_line_budget(&mut self, lease: &LeaseId) -> Option<u64> {
        self.line_budgets
            .remove(lease)
            .map(|b| b.dropped)
            .filter(|&d| d > 0)
    }

    /// The event reporting `dropped` lines over the rate.
    pub(super) fn dropped_lines_event(dropped: u64) -> Event {
        Event::warn(format!(
            "{dropped} output lines dropped (over {LINES_PER_SECOND} lines a second)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_a_burst_then_the_rate_and_reports_once_a_second() {
        let mut budget = LineBudget::new(0);
        assert_eq!(budget.take(1500, 0), (1500, 0));
        // 500 left: 600 wanted keeps 500, drops 100, reported only after a second.
        assert_eq!(budget.take(600, 0), (500, 0));
        // Half a second refills 100 lines.
        assert_eq!(budget.take(300, 500), (100, 0));
        // A second after the start: everything dropped so far is reported.
        assert_eq!(budget.take(0, 1000), (0, 300));
        assert_eq!(budget.take(0, 1500), (0, 0));
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_LINE_BYTES);
        let cut = cut_line(long);
        assert!(cut.ends_with(" … [truncated]"));
        assert!(cut.len() <= MAX_LINE_BYTES + " … [truncated]".len());
        assert_eq!(cut_line("short".into()), "short");
    }
}
