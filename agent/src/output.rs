//! A scraper's output lines: reading a pipe line by line with a bounded line
//! length, lossy UTF-8 decoding and truncation, and recognising
//! `::progress:: <0..1> [message]` lines.

use std::time::{SystemTime, UNIX_EPOCH};

use adce_proto::v1::{LogLine, OutputStream};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

/// Longest line forwarded, in bytes of UTF-8 before the truncation marker.
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// Appended to a line that was cut at [`MAX_LINE_BYTES`].
pub const TRUNCATION_MARKER: &str = "… [truncated]";
/// A stdout line starting with this reports progress.
pub const PROGRESS_PREFIX: &str = "::progress::";
/// Read buffer of each pipe.
const PIPE_BUFFER_BYTES: usize = 64 * 1024;

/// Turns the raw bytes of one line (without its newline) into forwarded text.
///
/// Invalid UTF-8 becomes U+FFFD. A line longer than [`MAX_LINE_BYTES`], or one
/// the reader already had to cut (`overflowed`), is cut at a character
/// boundary and gets [`TRUNCATION_MARKER`] appended.
pub fn finish_line(raw: &[u8], overflowed: bool) -> String {
    let truncated = overflowed || raw.len() > MAX_LINE_BYTES;
    let mut bytes = &raw[..raw.len().min(MAX_LINE_BYTES)];
    if truncated {
        bytes = &bytes[..complete_prefix_len(bytes)];
    }
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if truncated {
        text.push_str(TRUNCATION_MARKER);
    }
    text
}

/// Length of `bytes` without a multi-byte UTF-8 sequence cut off at its end.
fn complete_prefix_len(bytes: &[u8]) -> usize {
    // A UTF-8 sequence is at most 4 bytes: look for the start of the last one.
    let tail_start = bytes.len().saturating_sub(4);
    let Some(last_start) = (tail_start..bytes.len())
        .rev()
        .find(|&i| bytes[i] & 0b1100_0000 != 0b1000_0000)
    else {
        return bytes.len();
    };
    match std::str::from_utf8(&bytes[last_start..]) {
        // An incomplete sequence at the very end has no error length.
        Err(err) if err.error_len().is_none() => last_start + err.valid_up_to(),
        _ => bytes.len(),
    }
}

/// Parses a `::progress:: <fraction> [message]` line.
///
/// Returns the fraction clamped to `0..=1` and the trimmed message, or `None`
/// when the line is not a well-formed progress line (it is then only a log
/// line).
pub fn parse_progress(line: &str) -> Option<(f64, &str)> {
    let rest = line.strip_prefix(PROGRESS_PREFIX)?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = rest.trim_start();
    let (number, message) = match rest.find(char::is_whitespace) {
        Some(end) => (&rest[..end], rest[end..].trim()),
        None => (rest, ""),
    };
    let fraction: f64 = number.parse().ok()?;
    if !fraction.is_finite() {
        return None;
    }
    Some((fraction.clamp(0.0, 1.0), message))
}

/// Milliseconds since the Unix epoch, for [`LogLine::unix_ms`].
pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Builds a log line stamped now.
pub fn log_line(stream: OutputStream, text: String) -> LogLine {
    LogLine {
        stream: stream.into(),
        text,
        unix_ms: unix_ms_now(),
    }
}

/// Reads `pipe` line by line until end of file, sending each finished line
/// to `lines`. Memory per line stays bounded by [`MAX_LINE_BYTES`] however long
/// the line is. Stops early when `lines` is closed.
pub async fn read_lines<R>(pipe: R, stream: OutputStream, lines: mpsc::Sender<LogLine>)
where
    R: AsyncRead + Unpin,
{
    let mut reader = BufReader::with_capacity(PIPE_BUFFER_BYTES, pipe);
    let mut line: Vec<u8> = Vec::new();
    let mut overflowed = false;
    loop {
        let buffer = match reader.fill_buf().await {
            Ok(buffer) => buffer,
            Err(error) => {
                tracing::debug!(%error, ?stream, "reading scraper output failed");
                return;
            }
        };
        if buffer.is_empty() {
            if !line.is_empty() || overflowed {
                // A closed receiver only means nobody wants the line any more.
                let _ = lines.send(finish(&line, overflowed, stream)).await;
            }
            return;
        }
        let (chunk, consumed, complete) = match buffer.iter().position(|&b| b == b'\n') {
            Some(newline) => (&buffer[..newline], newline + 1, true),
            None => (buffer, buffer.len(), false),
        };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        if chunk.len() > room {
            overflowed = true;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(consumed);
        if complete {
            let text = finish(&line, overflowed, stream);
            line.clear();
            overflowed = false;
            if lines.send(text).await.is_err() {
                return;
            }
        }
    }
}

fn finish(line: &[u8], overflowed: bool, stream: OutputStream) -> LogLine {
    let raw = match line.last() {
        Some(b'\r') if !overflowed => &line[..line.len() - 1],
        _ => line,
    };
    log_line(stream, finish_line(raw, overflowed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_lines_pass_unchanged_and_invalid_utf8_is_replaced() {
        assert_eq!(finish_line(b"hello", false), "hello");
        assert_eq!(finish_line(b"a\xffb", false), "a\u{fffd}b");
    }

    #[test]
    fn long_lines_are_cut_with_a_marker() {
        let raw = vec![b'x'; MAX_LINE_BYTES + 10];
        let text = finish_line(&raw, false);
        assert!(text.ends_with(TRUNCATION_MARKER));
        assert_eq!(text.len(), MAX_LINE_BYTES + TRUNCATION_MARKER.len());
        // Exactly at the limit nothing is cut.
        let raw = vec![b'x'; MAX_LINE_BYTES];
        assert_eq!(finish_line(&raw, false).len(), MAX_LINE_BYTES);
    }

    #[test]
    fn cut_never_splits_a_character() {
        // "é" is two bytes; put one straddling the limit.
        let mut raw = vec![b'x'; MAX_LINE_BYTES - 1];
        raw.extend_from_slice("é".as_bytes());
        raw.extend_from_slice(b"tail");
        let text = finish_line(&raw, false);
        assert_eq!(
            text,
            format!("{}{TRUNCATION_MARKER}", "x".repeat(MAX_LINE_BYTES - 1))
        );
        // A 4-byte character cut after its second byte by the reader.
        let mut raw = b"ab".to_vec();
        raw.extend_from_slice(&"😀".as_bytes()[..2]);
        assert_eq!(finish_line(&raw, true), format!("ab{TRUNCATION_MARKER}"));
    }

    #[test]
    fn progress_lines_parse_and_clamp() {
        assert_eq!(parse_progress("::progress:: 0.5"), Some((0.5, "")));
        assert_eq!(
            parse_progress("::progress:: 0.25  fetched 3 of 12 "),
            Some((0.25, "fetched 3 of 12"))
        );
        assert_eq!(parse_progress("::progress:: 1.7 done"), Some((1.0, "done")));
        assert_eq!(parse_progress("::progress:: -2"), Some((0.0, "")));
        assert_eq!(parse_progress("::progress::\t1"), Some((1.0, "")));
    }

    #[test]
    fn malformed_progress_lines_are_rejected() {
        assert_eq!(parse_progress("::progress::"), None);
        assert_eq!(parse_progress("::progress::0.5"), None);
        assert_eq!(parse_progress("::progress:: half"), None);
        assert_eq!(parse_progress("::progress:: 50%"), None);
        assert_eq!(parse_progress("::progress:: NaN"), None);
        assert_eq!(parse_progress("::progress:: inf"), None);
        assert_eq!(parse_progress(" ::progress:: 0.5"), None);
        assert_eq!(parse_progress("progress 0.5"), None);
    }

    #[tokio::test]
    async fn reader_splits_lines_bounds_memory_and_keeps_the_last_partial_line() {
        let mut input = b"first\r\nsecond\n".to_vec();
        input.extend(std::iter::repeat_n(b'y', 3 * MAX_LINE_BYTES));
        input.extend_from_slice(b"\nlast without newline");
        let (tx, mut rx) = mpsc::channel(16);
        read_lines(&input[..], OutputStream::Stderr, tx).await;
        let mut texts = Vec::new();
        while let Some(line) = rx.recv().await {
            assert_eq!(line.stream, i32::from(OutputStream::Stderr));
            texts.push(line.text);
        }
        assert_eq!(texts.len(), 4);
        assert_eq!(texts[0], "first");
        assert_eq!(texts[1], "second");
        assert_eq!(
            texts[2],
            format!("{}{TRUNCATION_MARKER}", "y".repeat(MAX_LINE_BYTES))
        );
        assert_eq!(texts[3], "last without newline");
    }
}
