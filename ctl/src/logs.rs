//! `logs`: prints `Control.Logs` entries, and with `--follow` keeps doing so
//! across dropped connections and server restarts without losing or
//! repeating a line (it resumes from the last sequence number printed).

use std::io;
use std::process::ExitCode;
use std::time::Duration;

use adce_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::client::{Target, describe_status, error_chain};
use crate::output;

/// The first wait before reconnecting a followed stream.
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(200);

/// The longest wait between reconnect attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// What to ask for, straight from the command line.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Past entries to print first.
    pub tail: u32,
    /// Keep streaming new entries.
    pub follow: bool,
    /// Start after this sequence number.
    pub since: Option<u64>,
    /// Only this task.
    pub task_id: i64,
    /// Only this agent.
    pub agent_id: String,
    /// Only this source.
    pub source: String,
    /// Only this level and above.
    pub min_level: pb::LogLevel,
}

impl Filter {
    /// The first request.
    pub fn request(&self) -> pb::LogsRequest {
        pb::LogsRequest {
            tail: self.tail,
            follow: self.follow,
            since_seq: self.since.unwrap_or(0),
            task_id: self.task_id,
            agent_id: self.agent_id.clone(),
            source: self.source.clone(),
            min_level: self.min_level as i32,
        }
    }

    /// The request after a reconnect: everything after the last entry
    /// printed and no tail, or the first request again when nothing has been
    /// printed yet.
    pub fn resume_request(&self, cursor: &Cursor) -> pb::LogsRequest {
        let mut request = self.request();
        if let Some(last) = cursor.last_seq {
            request.since_seq = last;
            request.tail = 0;
        }
        request
    }
}

/// The last sequence number printed; entries at or before it are not
/// printed again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The resume point, if any.
    pub last_seq: Option<u64>,
}

impl Cursor {
    /// Starts after `since` (from `--since`), or at the beginning.
    pub fn new(since: Option<u64>) -> Self {
        Cursor { last_seq: since }
    }

    /// Whether `seq` is new; if so it becomes the resume point.
    pub fn advance(&mut self, seq: u64) -> bool {
        match self.last_seq {
            Some(last) if seq <= last => false,
            _ => {
                self.last_seq = Some(seq);
                true
            }
        }
    }
}

/// Capped exponential backoff between reconnect attempts: 200ms, 400ms, …,
/// then 5s for ever.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: RECONNECT_INITIAL,
        }
    }
}

impl Backoff {
    /// The wait before the next attempt; each call doubles the following one
    /// up to [`RECONNECT_MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(RECONNECT_MAX);
        delay
    }

    /// Starts again from the initial delay (after a stream delivered entries).
    pub fn reset(&mut self) {
        self.next = RECONNECT_INITIAL;
    }
}

/// Why one stream ended.
#[derive(Debug)]
enum End {
    /// The server closed the stream.
    Closed,
    /// The stream or its connection failed.
    Failed(String, Option<tonic::Code>),
    /// Writing to stdout failed (typically a closed pipe).
    Output(io::Error),
}

/// Runs `logs`. Ctrl-C or SIGTERM stop it cleanly with exit code 0.
pub async fn run(target: &Target, filter: &Filter, json: bool) -> anyhow::Result<ExitCode> {
    let work = async {
        if filter.follow {
            follow(target, filter, json).await
        } else {
            once(target, filter, json).await
        }
    };
    tokio::select! {
        result = work => result,
        () = shutdown_signal() => Ok(ExitCode::SUCCESS),
    }
}

/// One stream until the server closes it.
async fn once(target: &Target, filter: &Filter, json: bool) -> anyhow::Result<ExitCode> {
    let mut cursor = Cursor::new(filter.since);
    let (end, _) = stream_once(target, filter.request(), &mut cursor, json, true).await;
    match end {
        End::Closed => Ok(ExitCode::SUCCESS),
        End::Failed(message, _) => Err(anyhow::anyhow!(message)),
        End::Output(e) => Err(e.into()),
    }
}

/// Streams until stopped, reconnecting with backoff whenever the stream
/// ends. Only a failure before the first stream ever opened (a wrong address,
/// a server that is not running) ends the command with an error.
async fn follow(target: &Target, filter: &Filter, json: bool) -> anyhow::Result<ExitCode> {
    let mut cursor = Cursor::new(filter.since);
    let mut backoff = Backoff::default();
    let mut ever_opened = false;
    loop {
        let request = filter.resume_request(&cursor);
        let (end, run) = stream_once(target, request, &mut cursor, json, false).await;
        ever_opened |= run.opened;
        if run.printed > 0 {
            backoff.reset();
        }
        let reason = match end {
            End::Closed => "the server closed the stream".to_owned(),
            End::Failed(message, Some(code)) if is_permanent(code) => {
                return Err(anyhow::anyhow!(message));
            }
            End::Failed(message, _) if !ever_opened => return Err(anyhow::anyhow!(message)),
            End::Failed(message, _) => message,
            End::Output(e) => return Err(e.into()),
        };
        let delay = backoff.next_delay();
        let resume = match cursor.last_seq {
            Some(seq) => format!("after seq {seq}"),
            None => "from the start".to_owned(),
        };
        eprintln!(
            "adcectl: log stream lost ({reason}); reconnecting in {} {resume}",
            humantime::format_duration(delay)
        );
        tokio::time::sleep(delay).await;
    }
}

/// Status codes a retry cannot fix: the request itself is wrong or refused.
fn is_permanent(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::Unimplemented
            | tonic::Code::OutOfRange
    )
}

/// What one stream achieved before it ended.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    /// The server accepted the request.
    opened: bool,
    /// Entries printed.
    printed: u64,
}

/// Opens one stream and prints its new entries until it ends. The opening
/// call is bounded by the timeout; with `idle_timeout`, so is each wait for
/// the next entry. Returns how it ended and what it achieved.
async fn stream_once(
    target: &Target,
    request: pb::LogsRequest,
    cursor: &mut Cursor,
    json: bool,
    idle_timeout: bool,
) -> (End, Run) {
    let mut run = Run::default();
    let mut client = match target.control().await {
        Ok(client) => client,
        Err(e) => return (End::Failed(format!("{e:#}"), None), run),
    };
    let opened = tokio::time::timeout(target.timeout, client.logs(request)).await;
    let mut stream = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            let message = describe_status(&target.url, &status);
            return (End::Failed(message, Some(status.code())), run);
        }
        Err(_) => return (End::Failed(target.timeout_message("logs"), None), run),
    };
    run.opened = true;
    loop {
        let next = if idle_timeout {
            match tokio::time::timeout(target.timeout, stream.next()).await {
                Ok(next) => next,
                Err(_) => return (End::Failed(target.timeout_message("logs"), None), run),
            }
        } else {
            stream.next().await
        };
        let entry = match next {
            None => return (End::Closed, run),
            Some(Ok(entry)) => entry,
            Some(Err(status)) => {
                let message = stream_error(&target.url, &status);
                return (End::Failed(message, Some(status.code())), run);
            }
        };
        if !cursor.advance(entry.seq) {
            continue;
        }
        let mut line = if json {
            output::log_entry_json(&entry).to_string()
        } else {
            output::log_entry_line(&entry)
        };
        line.push('\n');
        if let Err(e) = output::emit(&line) {
            return (End::Output(e), run);
        }
        run.printed += 1;
    }
}

/// The message for a stream that broke after it opened; a transport error
/// hides its cause in the status' source.
fn stream_error(url: &str, status: &tonic::Status) -> String {
    let base = describe_status(url, status);
    match std::error::Error::source(status) {
        Some(source) => {
            let cause = error_chain(source);
            if base.contains(&cause) {
                base
            } else {
                format!("{base}: {cause}")
            }
        }
        None => base,
    }
}

/// Resolves on Ctrl-C or SIGTERM. If a handler cannot be installed, that
/// signal keeps its default action (the process ends).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_200ms_and_caps_at_5s() {
        let mut backoff = Backoff::default();
        let delays: Vec<u128> = (0..8).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), RECONNECT_INITIAL);
    }

    #[test]
    fn cursor_skips_entries_already_printed() {
        let mut cursor = Cursor::new(None);
        assert!(cursor.advance(5));
        assert!(cursor.advance(6));
        assert!(!cursor.advance(6));
        assert!(!cursor.advance(3));
        assert!(cursor.advance(9));
        assert_eq!(cursor.last_seq, Some(9));
        let mut resumed = Cursor::new(Some(10));
        assert!(!resumed.advance(10));
        assert!(resumed.advance(11));
    }

    #[test]
    fn resume_asks_for_everything_after_the_last_seq_without_a_tail() {
        let filter = Filter {
            tail: 100,
            follow: true,
            since: None,
            task_id: 12,
            agent_id: "agent-1".into(),
            source: "espn_pbp".into(),
            min_level: pb::LogLevel::Warn,
        };
        let first = filter.resume_request(&Cursor::new(None));
        assert_eq!(first, filter.request());
        assert_eq!(first.tail, 100);
        assert_eq!(first.since_seq, 0);

        let mut cursor = Cursor::new(None);
        cursor.advance(41);
        let again = filter.resume_request(&cursor);
        assert_eq!(again.since_seq, 41);
        assert_eq!(again.tail, 0);
        assert!(again.follow);
        assert_eq!(again.task_id, 12);
        assert_eq!(again.agent_id, "agent-1");
        assert_eq!(again.source, "espn_pbp");
        assert_eq!(again.min_level, pb::LogLevel::Warn as i32);
    }

    #[test]
    fn since_sets_the_first_resume_point() {
        let filter = Filter {
            tail: 100,
            since: Some(7),
            ..Default::default()
        };
        assert_eq!(filter.request().since_seq, 7);
        let again = filter.resume_request(&Cursor::new(filter.since));
        assert_eq!(again.since_seq, 7);
        assert_eq!(again.tail, 0);
    }

    #[test]
    fn only_request_errors_stop_following() {
        assert!(is_permanent(tonic::Code::InvalidArgument));
        assert!(is_permanent(tonic::Code::Unimplemented));
        assert!(!is_permanent(tonic::Code::Unavailable));
        assert!(!is_permanent(tonic::Code::Internal));
        assert!(!is_permanent(tonic::Code::Unknown));
        assert!(!is_permanent(tonic::Code::Cancelled));
    }
}
