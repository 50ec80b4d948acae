//! The rules that make a string safe to be an object key: what every key must
//! satisfy before it touches a path, an S3 request or a template's output.
//!
//! Invariant: a key that passes [`validate_key`] is non-empty, at most
//! [`MAX_KEY_LEN`] bytes, relative (no leading `/`), `/`-separated (no
//! backslash), free of control characters and of empty, `.` and `..`
//! segments, so joining it under a root never leaves the root.

/// The longest object key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid object key {key:?}: {reason}")]
pub struct InvalidKey {
    /// The key as given, cut to 200 characters (debug-escaped when printed).
    pub key: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks that `key` is a safe, normalized relative key: non-empty, at most
/// [`MAX_KEY_LEN`] bytes, no leading `/`, no backslash, no control characters,
/// no empty, `.` or `..` segments.
pub fn validate_key(key: &str) -> Result<(), InvalidKey> {
    let invalid = |reason| {
        Err(InvalidKey {
            key: key.chars().take(200).collect(),
            reason,
        })
    };
    if key.is_empty() {
        return invalid("empty");
    }
    if key.len() > MAX_KEY_LEN {
        return invalid("longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return invalid("starts with `/`");
    }
    if key.contains('\\') {
        return invalid("contains a backslash");
    }
    if key.chars().any(char::is_control) {
        return invalid("contains a control character");
    }
    for segment in key.split('/') {
        match segment {
            "" => return invalid("contains an empty path segment"),
            "." | ".." => return invalid("contains a `.` or `..` segment"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_key_accepts_normal_keys() {
        for key in ["a", "nba/schedule/20241022.json", "x/y.z/..a/b..", "a b/c"] {
            assert!(validate_key(key).is_ok(), "{key}");
        }
    }

    #[test]
    fn validate_key_refuses_hostile_keys() {
        let long = "a".repeat(MAX_KEY_LEN + 1);
        for key in [
            "",
            "/etc/passwd",
            "../etc/passwd",
            "a/../../b",
            "a/./b",
            "a//b",
            "a/",
            "a\\b",
            "a\nb",
            "a\0b",
            long.as_str(),
        ] {
            assert!(validate_key(key).is_err(), "{key:?} was accepted");
        }
    }
}
