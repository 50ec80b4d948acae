//! Messages waiting for the server: an ordered queue in which results are
//! never dropped and logs and progress ("chatter") are bounded by bytes,
//! oldest dropped first. Results sent on a session that broke soon after are
//! kept for a while so they can be sent again on the next session.

use std::collections::VecDeque;
use std::time::Duration;

use adce_proto::v1::{AgentMessage, TaskResult, agent_message};
use prost::Message as _;
use tokio::time::Instant;

/// Bytes of logs and progress kept while they cannot be sent.
pub const MAX_CHATTER_BYTES: usize = 8 * 1024 * 1024;
/// A result sent at most this long before its session broke is sent again
/// on the next session (the server ignores results for leases that are no
/// longer live, so a duplicate is harmless; a loss is not).
pub const RESULT_RESEND_WINDOW: Duration = Duration::from_secs(30);

/// The agent's queue towards the server.
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: VecDeque<AgentMessage>,
    chatter_bytes: usize,
    max_chatter_bytes: usize,
    dropped_chatter: u64,
    sent_results: VecDeque<(Instant, TaskResult)>,
}

fn is_result(message: &AgentMessage) -> bool {
    matches!(message.kind, Some(agent_message::Kind::Result(_)))
}

impl Outbox {
    /// An empty outbox keeping at most `max_chatter_bytes` of chatter.
    pub(crate) fn new(max_chatter_bytes: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            chatter_bytes: 0,
            max_chatter_bytes,
            dropped_chatter: 0,
            sent_results: VecDeque::new(),
        }
    }

    /// Queues `message` at the back, dropping the oldest chatter when the
    /// chatter budget is exceeded.
    pub(crate) fn push(&mut self, message: AgentMessage) {
        if !is_result(&message) {
            let size = message.encoded_len();
            while self.chatter_bytes + size > self.max_chatter_bytes {
                let Some(oldest) = self.queue.iter().position(|queued| !is_result(queued)) else {
                    break;
                };
                if let Some(dropped) = self.queue.remove(oldest) {
                    self.chatter_bytes -= dropped.encoded_len();
                    self.dropped_chatter += 1;
                }
            }
            if self.chatter_bytes + size > self.max_chatter_bytes {
                self.dropped_chatter += 1;
                return;
            }
            self.chatter_bytes += size;
        }
        self.queue.push_back(message);
    }

    /// Takes the oldest message.
    pub(crate) fn pop(&mut self) -> Option<AgentMessage> {
        let message = self.queue.pop_front()?;
        if !is_result(&message) {
            self.chatter_bytes -= message.encoded_len();
        }
        Some(message)
    }

    /// Puts back a message [`Outbox::pop`] returned that could not be sent.
    pub(crate) fn unpop(&mut self, message: AgentMessage) {
        if !is_result(&message) {
            self.chatter_bytes += message.encoded_len();
        }
        self.queue.push_front(message);
    }

    /// Remembers a result handed to a session at `now`.
    pub(crate) fn mark_sent(&mut self, result: TaskResult, now: Instant) {
        self.sent_results.push_back((now, result));
    }

    /// The session broke at `now`: results sent within
    /// [`RESULT_RESEND_WINDOW`] go back to the front of the queue, in their
    /// original order; older ones are forgotten.
    pub(crate) fn session_lost(&mut self, now: Instant) {
        let recent: Vec<TaskResult> = self
            .sent_results
            .drain(..)
            .filter(|(sent, _)| now.saturating_duration_since(*sent) <= RESULT_RESEND_WINDOW)
            .map(|(_, result)| result)
            .collect();
        for result in recent.into_iter().rev() {
            self.queue.push_front(AgentMessage {
                kind: Some(agent_message::Kind::Result(result)),
            });
        }
    }

    /// Forgets sent results older than [`RESULT_RESEND_WINDOW`].
    pub(crate) fn prune_sent(&mut self, now: Instant) {
        while let Some((sent, _)) = self.sent_results.front() {
            if now.saturating_duration_since(*sent) <= RESULT_RESEND_WINDOW {
                break;
            }
            self.sent_results.pop_front();
        }
    }

    /// Leases whose results are still queued.
    pub(crate) fn result_leases(&self) -> impl Iterator<Item = &str> {
        self.queue.iter().filter_map(|message| match &message.kind {
            Some(agent_message::Kind::Result(result)) => Some(result.lease_id.as_str()),
            _ => None,
        })
    }

    /// Whether a result is still queued.
    pub(crate) fn has_results(&self) -> bool {
        self.queue.iter().any(is_result)
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Chatter messages dropped so far, and resets the count.
    pub(crate) fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped_chatter)
    }
}

#[cfg(test)]
mod tests {
    use adce_proto::v1::{LogLine, LogLines};

    use super::*;

    fn logs(lease: &str, text: &str) -> AgentMessage {
        AgentMessage {
            kind: Some(agent_message::Kind::LogLines(LogLines {
                lease_id: lease.into(),
                lines: vec![LogLine {
                    stream: 1,
                    text: text.into(),
                    unix_ms: 1,
                }],
            })),
        }
    }

    fn result(lease: &str) -> TaskResult {
        TaskResult {
            lease_id: lease.into(),
            ..TaskResult::default()
        }
    }

    fn result_message(lease: &str) -> AgentMessage {
        AgentMessage {
            kind: Some(agent_message::Kind::Result(result(lease))),
        }
    }

    fn lease_of(message: &AgentMessage) -> &str {
        match &message.kind {
            Some(agent_message::Kind::Result(result)) => &result.lease_id,
            Some(agent_message::Kind::LogLines(lines)) => &lines.lease_id,
            _ => "",
        }
    }

    #[test]
    fn chatter_is_bounded_but_results_are_never_dropped() {
        let one = logs("l0", &"x".repeat(100)).encoded_len();
        let mut outbox = Outbox::new(one * 3);
        for i in 0..10 {
            outbox.push(logs(&format!("l{i}"), &"x".repeat(100)));
            outbox.push(result_message(&format!("r{i}")));
        }
        let leases: Vec<String> = std::iter::from_fn(|| outbox.pop())
            .map(|message| lease_of(&message).to_owned())
            .collect();
        // All ten results survive; only the three newest log batches do.
        let results: Vec<&String> = leases.iter().filter(|l| l.starts_with('r')).collect();
        assert_eq!(results.len(), 10);
        let kept_logs: Vec<&str> = leases
            .iter()
            .filter(|l| l.starts_with('l'))
            .map(String::as_str)
            .collect();
        assert_eq!(kept_logs, ["l7", "l8", "l9"]);
        assert_eq!(outbox.take_dropped(), 7);
        assert!(outbox.is_empty());
    }

    #[test]
    fn order_is_kept_and_unpop_restores_the_front() {
        let mut outbox = Outbox::new(MAX_CHATTER_BYTES);
        outbox.push(logs("a", "1"));
        outbox.push(result_message("a"));
        let first = outbox.pop().expect("queued");
        assert_eq!(lease_of(&first), "a");
        outbox.unpop(first);
        assert_eq!(outbox.result_leases().collect::<Vec<_>>(), ["a"]);
        assert!(matches!(
            outbox.pop().and_then(|m| m.kind),
            Some(agent_message::Kind::LogLines(_))
        ));
        assert!(outbox.has_results());
        assert!(matches!(
            outbox.pop().and_then(|m| m.kind),
            Some(agent_message::Kind::Result(_))
        ));
        assert!(!outbox.has_results());
    }

    #[test]
    fn recently_sent_results_are_requeued_when_the_session_breaks() {
        let mut outbox = Outbox::new(MAX_CHATTER_BYTES);
        let start = Instant::now();
        outbox.mark_sent(result("old"), start);
        outbox.mark_sent(result("new1"), start + Duration::from_secs(40));
        outbox.mark_sent(result("new2"), start + Duration::from_secs(41));
        outbox.push(result_message("queued"));
        outbox.session_lost(start + Duration::from_secs(45));
        let leases: Vec<&str> = outbox.result_leases().collect();
        assert_eq!(leases, ["new1", "new2", "queued"]);
        // The window was consumed: a second loss requeues nothing more.
        outbox.session_lost(start + Duration::from_secs(46));
        assert_eq!(outbox.result_leases().count(), 3);
    }

    #[test]
    fn pruning_forgets_results_outside_the_window() {
        let mut outbox = Outbox::new(MAX_CHATTER_BYTES);
        let start = Instant::now();
        outbox.mark_sent(result("a"), start);
        outbox.prune_sent(start + RESULT_RESEND_WINDOW + Duration::from_secs(1));
        outbox.session_lost(start + RESULT_RESEND_WINDOW + Duration::from_secs(1));
        assert!(outbox.is_empty());
    }
}
