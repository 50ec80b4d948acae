//! The one place that calls serde_yaml (deprecated upstream): reading a document into
//! a type with errors reduced to a position and a plain message, and writing one back.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::position::Position;

/// A YAML error: where (when known) and what, without serde_yaml's own position text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct YamlError {
    pub position: Option<Position>,
    pub message: String,
}

/// Deserializes `src` as one YAML document.
pub(crate) fn from_str<T: DeserializeOwned>(src: &str) -> Result<T, YamlError> {
    serde_yaml::from_str(src).map_err(|err| {
        let mut position = err.location().map(|loc| Position {
            line: loc.line(),
            column: loc.column(),
        });
        let mut message = err.to_string();
        if let Some(pos) = position {
            // serde_yaml appends " at line L column C" to the problem; the caller puts the
            // position in front instead.
            let suffix = format!(" at line {} column {}", pos.line, pos.column);
            if let Some(at) = message.find(&suffix) {
                message.replace_range(at..at + suffix.len(), "");
            }
        }
        // At the end of the input libyaml reports a line past the last
        // one; the place the construct it gave up on began ("while scanning
        // a simple key at line 2 column 1") is in the file, so use that.
        let lines = src.lines().count().max(1);
        if position.is_some_and(|p| p.line > lines) {
            if let Some((at, inner)) = inner_position(&message) {
                position = Some(inner);
                message.truncate(at);
            }
        }
        YamlError {
            position,
            message: strip_path(&message).to_owned(),
        }
    })
}

/// The last ` at line L column C` left in a message: its offset and position.
fn inner_position(message: &str) -> Option<(usize, Position)> {
    let at = message.rfind(" at line ")?;
    let (line, column) = message[at + " at line ".len()..].split_once(" column ")?;
    let column: String = column.chars().take_while(char::is_ascii_digit).collect();
    Some((
        at,
        Position {
            line: line.parse().ok()?,
            column: column.parse().ok()?,
        },
    ))
}

/// Drops serde_yaml's `path.to.node: ` prefix: the position already says where.
fn strip_path(message: &str) -> &str {
    match message.split_once(": ") {
        Some((head, rest))
            if !head.is_empty()
                && !head.contains(char::is_whitespace)
                && !head.contains('`')
                && (head.contains('.')
                    || head.contains('[')
                    || head.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')) =>
        {
            rest
        }
        _ => message,
    }
}

/// Serializes `value` as a YAML document.
pub(crate) fn to_string<T: Serialize>(value: &T) -> Result<String, String> {
    serde_yaml::to_string(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        inner: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        a: u32,
    }

    #[test]
    fn errors_carry_a_position_and_no_path_or_location_text() {
        let err = from_str::<Doc>("inner:\n  a: 1\n  b: 2\n").unwrap_err();
        assert_eq!(err.position, Some(Position { line: 3, column: 3 }));
        assert_eq!(err.message, "unknown field `b`, expected `a`");
        let err = from_str::<Doc>("inner:\n  a: [\n").unwrap_err();
        assert!(err.position.is_some(), "{err:?}");
        assert!(!err.message.contains(" at line "), "{err:?}");
    }

    #[test]
    fn a_scanner_error_points_inside_the_file() {
        let err = from_str::<serde_yaml::Value>("version: 1\na00").unwrap_err();
        assert_eq!(
            err.position,
            Some(Position { line: 2, column: 1 }),
            "{err:?}"
        );
        assert!(!err.message.contains(" at line "), "{err:?}");
    }

    #[test]
    fn path_stripping_keeps_ordinary_messages() {
        assert_eq!(strip_path("sources[0].name: invalid"), "invalid");
        assert_eq!(strip_path("server: unknown field"), "unknown field");
        assert_eq!(strip_path("invalid type: string"), "invalid type: string");
        assert_eq!(strip_path("invalid date `a: b`"), "invalid date `a: b`");
    }
}
