//! The log bus: every server event and scraper output line becomes a
//! [`LogRow`] with a sequence number assigned by the store. The scheduler
//! publishes each committed row here; `Control.Logs` followers subscribe.

use std::sync::Arc;

use adce_proto::v1 as pb;
use tokio::sync::broadcast;

use crate::model::{TaskId, now_ms};
use crate::store::LogRow;

/// How many entries a slow follower may fall behind before it re-reads the store.
const BUS_CAPACITY: usize = 4096;

/// Publishes committed log rows to live followers.
#[derive(Debug, Clone)]
pub struct LogBus {
    tx: broadcast::Sender<Arc<LogRow>>,
}

impl Default for LogBus {
    fn default() -> Self {
        LogBus {
            tx: broadcast::channel(BUS_CAPACITY).0,
        }
    }
}

impl LogBus {
    /// Publishes a committed row (with its sequence number).
    pub fn publish(&self, row: Arc<LogRow>) {
        // No subscriber is fine.
        let _ = self.tx.send(row);
    }

    /// A receiver of every row published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LogRow>> {
        self.tx.subscribe()
    }
}

/// Which stream a scraper's output line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Not said.
    Unknown,
}

impl From<OutputStream> for pb::OutputStream {
    fn from(stream: OutputStream) -> Self {
        match stream {
            OutputStream::Stdout => pb::OutputStream::Stdout,
            OutputStream::Stderr => pb::OutputStream::Stderr,
            OutputStream::Unknown => pb::OutputStream::Unspecified,
        }
    }
}

impl From<pb::OutputStream> for OutputStream {
    fn from(stream: pb::OutputStream) -> Self {
        match stream {
            pb::OutputStream::Stdout => OutputStream::Stdout,
            pb::OutputStream::Stderr => OutputStream::Stderr,
            pb::OutputStream::Unspecified => OutputStream::Unknown,
        }
    }
}

/// Builds server event rows.
#[derive(Debug, Clone, Default)]
pub struct Event {
    row: LogRow,
}

impl Event {
    /// A server event at `level` with `message`.
    pub fn new(level: pb::LogLevel, message: impl Into<String>) -> Self {
        Event {
            row: LogRow {
                seq: 0,
                at: now_ms(),
                level: level as i32,
                task_id: 0,
                agent_id: String::new(),
                source: String::new(),
                stream: pb::OutputStream::Unspecified as i32,
                message: message.into(),
            },
        }
    }

    /// A debug event.
    pub fn debug(message: impl Into<String>) -> Self {
        Event::new(pb::LogLevel::Debug, message)
    }

    /// A line a scraper printed on `stream`: a warning on stderr, info
    /// otherwise.
    pub fn output(stream: OutputStream, text: impl Into<String>) -> Self {
        let level = if stream == OutputStream::Stderr {
            pb::LogLevel::Warn
        } else {
            pb::LogLevel::Info
        };
        let mut event = Event::new(level, text);
        event.row.stream = pb::OutputStream::from(stream) as i32;
        event
    }

    /// At `at` rather than now.
    pub fn at(mut self, at: crate::model::UnixMs) -> Self {
        self.row.at = at;
        self
    }

    /// An info event.
    pub fn info(message: impl Into<String>) -> Self {
        Event::new(pb::LogLevel::Info, message)
    }

    /// A warning event.
    pub fn warn(message: impl Into<String>) -> Self {
        Event::new(pb::LogLevel::Warn, message)
    }

    /// An error event.
    pub fn error(message: impl Into<String>) -> Self {
        Event::new(pb::LogLevel::Error, message)
    }

    /// About this task.
    pub fn task(mut self, id: TaskId) -> Self {
        self.row.task_id = id.0;
        self
    }

    /// About this agent.
    pub fn agent(mut self, id: impl Into<String>) -> Self {
        self.row.agent_id = id.into();
        self
    }

    /// About this source.
    pub fn source(mut self, name: impl Into<String>) -> Self {
        self.row.source = name.into();
        self
    }

    /// The row.
    pub fn row(self) -> LogRow {
        self.row
    }
}

/// The wire form of a row.
pub fn to_pb(row: &LogRow) -> pb::LogEntry {
    pb::LogEntry {
        seq: row.seq,
        unix_ms: row.at,
        level: row.level,
        task_id: row.task_id,
        agent_id: row.agent_id.clone(),
        source: row.source.clone(),
        stream: row.stream,
        message: row.message.clone(),
    }
}
