//! The one place agents' wire messages become the scheduler's domain types
//! and back: Hello, results, output lines in; Welcome, Assign, Cancel, Drain,
//! the stop notice and a stream's end out.

use adce_proto::v1 as pb;
use pb::server_message::Kind as Out;
use tonic::Status;

use crate::catalog::ArgPiece;
use crate::model::LeaseId;
use crate::scheduler::{AgentHello, Assignment, Outcome, OutputLine, TaskResult, ToAgent};

/// Milliseconds of `d`, saturating.
fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<pb::Hello> for AgentHello {
    fn from(hello: pb::Hello) -> Self {
        AgentHello {
            agent_id: hello.agent_id,
            hostname: hello.hostname,
            labels: hello.labels.into_iter().collect(),
            slots: hello.slots,
            version: hello.version,
            running_leases: hello.running_leases.into_iter().map(LeaseId).collect(),
        }
    }
}

impl From<&pb::TaskResult> for Outcome {
    fn from(result: &pb::TaskResult) -> Self {
        match pb::Outcome::try_from(result.outcome).unwrap_or(pb::Outcome::Unspecified) {
            pb::Outcome::Exited => Outcome::Exited(result.exit_code),
            pb::Outcome::TimedOut => Outcome::TimedOut,
            pb::Outcome::Cancelled => Outcome::Cancelled,
            pb::Outcome::SpawnFailed => Outcome::SpawnFailed,
            pb::Outcome::UploadFailed => Outcome::UploadFailed(result.exit_code),
            pb::Outcome::Signaled => Outcome::Signaled(result.signal),
            pb::Outcome::Refused => Outcome::Refused,
            pb::Outcome::Unspecified => Outcome::Unreported,
        }
    }
}

impl From<pb::TaskResult> for TaskResult {
    fn from(result: pb::TaskResult) -> Self {
        TaskResult {
            outcome: Outcome::from(&result),
            lease: LeaseId(result.lease_id),
            message: result.message,
        }
    }
}

/// The lease and lines of a LogLines message.
pub fn output_lines(lines: pb::LogLines) -> (LeaseId, Vec<OutputLine>) {
    let out = lines
        .lines
        .into_iter()
        .map(|line| OutputLine {
            stream: pb::OutputStream::try_from(line.stream)
                .unwrap_or(pb::OutputStream::Unspecified)
                .into(),
            text: line.text,
            unix_ms: line.unix_ms,
        })
        .collect();
    (LeaseId(lines.lease_id), out)
}

impl From<Assignment> for pb::Assign {
    fn from(a: Assignment) -> Self {
        pb::Assign {
            task_id: a.task_id.0,
            lease_id: a.lease.0,
            source: a.source,
            scraper: a.scraper,
            attempt: a.attempt,
            partition: a.partition.to_pb(),
            argv: a
                .argv
                .into_iter()
                .map(|pieces| pb::Arg {
                    parts: pieces
                        .into_iter()
                        .map(|piece| pb::ArgPart {
                            part: Some(match piece {
                                ArgPiece::Text(text) => pb::arg_part::Part::Text(text),
                                ArgPiece::OutputDir => pb::arg_part::Part::OutputDir(true),
                            }),
                        })
                        .collect(),
                })
                .collect(),
            env: a.env,
            timeout_ms: ms(a.timeout),
            expected_keys: a.expected_keys,
            priority: pb::Priority::from(a.priority) as i32,
        }
    }
}

/// What goes down an agent's Connect stream for `message`.
pub fn server_message(message: ToAgent) -> Result<pb::ServerMessage, Status> {
    let kind = match message {
        ToAgent::Welcome {
            agent_id,
            heartbeat_interval,
            lease_ttl,
        } => Out::Welcome(pb::Welcome {
            agent_id: agent_id.0,
            heartbeat_interval_ms: ms(heartbeat_interval),
            lease_ttl_ms: ms(lease_ttl),
            server_version: env!("CARGO_PKG_VERSION").into(),
        }),
        ToAgent::Assign(assignment) => Out::Assign((*assignment).into()),
        ToAgent::Cancel { lease, reason } => Out::Cancel(pb::Cancel {
            lease_id: lease.0,
            reason,
        }),
        ToAgent::Drain { reason } => Out::Drain(pb::Drain { reason }),
        ToAgent::Stopping(notice) => Out::Stopping(pb::ServerStopping {
            reason: notice.reason,
            grace_ms: ms(notice.grace),
        }),
        ToAgent::End(error) => return Err(error.into()),
    };
    Ok(pb::ServerMessage { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_keep_their_exit_code_or_signal() {
        let result = |outcome: pb::Outcome, exit_code, signal| pb::TaskResult {
            lease_id: "l".into(),
            outcome: outcome as i32,
            exit_code,
            signal,
            ..pb::TaskResult::default()
        };
        let cases = [
            (result(pb::Outcome::Exited, 3, 0), Outcome::Exited(3)),
            (
                result(pb::Outcome::UploadFailed, 0, 0),
                Outcome::UploadFailed(0),
            ),
            (result(pb::Outcome::Signaled, 0, 9), Outcome::Signaled(9)),
            (result(pb::Outcome::Refused, 0, 0), Outcome::Refused),
            (result(pb::Outcome::Unspecified, 0, 0), Outcome::Unreported),
        ];
        for (wire, expected) in cases {
            assert_eq!(TaskResult::from(wire).outcome, expected);
        }
        let unknown = pb::TaskResult {
            outcome: 999,
            ..pb::TaskResult::default()
        };
        assert_eq!(TaskResult::from(unknown).outcome, Outcome::Unreported);
    }

    #[test]
    fn an_end_becomes_the_streams_error() {
        let end = server_message(ToAgent::End(crate::error::Error::TooLarge("flood".into())));
        let status = end.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.message(), "flood");
    }
}
