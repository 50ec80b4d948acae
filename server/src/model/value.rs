//! The rules for partition values and variable names: what a value must be to
//! be safe inside object keys, paths and argv, and the names of the built-in
//! placeholders that partition variables may not take.
//!
//! Invariant: every partition value — listed in the config, parsed out of a
//! key or extracted from a parent object — passes [`is_valid_value`] before it
//! reaches a key, a path or a command.

/// The longest partition value.
pub const MAX_VALUE_LEN: usize = 128;

/// Whether `s` is safe as a partition value inside object keys, paths and argv:
/// `[A-Za-z0-9._-]{1,128}` and not only dots. Every partition value passes this, whether
/// listed in the config, parsed out of a key or extracted from a parent object.
pub fn is_valid_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_VALUE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.bytes().all(|b| b == b'.')
}

/// Placeholder for the task's output directory (argv only; the agent fills it in).
pub const VAR_OUT: &str = "out";
/// Placeholder for the task's id.
pub const VAR_TASK_ID: &str = "task_id";
/// Placeholder for the attempt number, starting at 1.
pub const VAR_ATTEMPT: &str = "attempt";
/// Placeholder for the source's name.
pub const VAR_SOURCE: &str = "source";
/// Placeholder for the config file's directory.
pub const VAR_CONFIG_DIR: &str = "config_dir";
/// Every built-in placeholder; partition variables may not use these names.
pub const SPECIAL_VARS: [&str; 5] = [
    VAR_OUT,
    VAR_TASK_ID,
    VAR_ATTEMPT,
    VAR_SOURCE,
    VAR_CONFIG_DIR,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_safe_names_not_only_dots() {
        for ok in [
            "a",
            "2024-25",
            "401584893",
            "x.y_z",
            &"x".repeat(MAX_VALUE_LEN),
        ] {
            assert!(is_valid_value(ok), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            &"x".repeat(MAX_VALUE_LEN + 1),
        ] {
            assert!(!is_valid_value(bad), "{bad:?}");
        }
    }
}
