//! Parsing of the `--labels k=v,k=v` list an agent advertises to the server.

use std::collections::BTreeMap;

use crate::Error;

/// Parses `key=value` pairs separated by commas.
///
/// Whitespace around keys and values is trimmed, empty items (`a=1,,b=2` or
/// an empty string) are ignored, values may be empty and may contain `=`.
/// A missing `=`, an empty key or a key given twice is an error.
pub fn parse_labels(input: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut labels = BTreeMap::new();
    for item in input.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let invalid = |reason| Error::InvalidLabel {
            label: item.to_owned(),
            reason,
        };
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| invalid("expected key=value"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(invalid("the key is empty"));
        }
        if key.chars().any(char::is_whitespace) {
            return Err(invalid("the key contains whitespace"));
        }
        if labels
            .insert(key.to_owned(), value.trim().to_owned())
            .is_some()
        {
            return Err(invalid("the key is given twice"));
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_trims() {
        let labels = parse_labels(" region = eu-west ,gpu=true,empty=").expect("valid labels");
        let expected: BTreeMap<String, String> = [
            ("region".to_owned(), "eu-west".to_owned()),
            ("gpu".to_owned(), "true".to_owned()),
            ("empty".to_owned(), String::new()),
        ]
        .into_iter()
        .collect();
        assert_eq!(labels, expected);
    }

    #[test]
    fn empty_input_and_empty_items_give_no_labels() {
        assert!(parse_labels("").expect("empty is valid").is_empty());
        assert_eq!(parse_labels("a=1,,").expect("valid").len(), 1);
    }

    #[test]
    fn value_may_contain_equals() {
        let labels = parse_labels("url=a=b").expect("valid");
        assert_eq!(labels.get("url").map(String::as_str), Some("a=b"));
    }

    #[test]
    fn errors_name_the_item_and_the_reason() {
        let err = parse_labels("a=1,oops").expect_err("missing =");
        assert_eq!(err.to_string(), "invalid label `oops`: expected key=value");
        let err = parse_labels("=v").expect_err("empty key");
        assert_eq!(err.to_string(), "invalid label `=v`: the key is empty");
        let err = parse_labels("a=1,a=2").expect_err("duplicate");
        assert_eq!(
            err.to_string(),
            "invalid label `a=2`: the key is given twice"
        );
        let err = parse_labels("a b=1").expect_err("space in key");
        assert_eq!(
            err.to_string(),
            "invalid label `a b=1`: the key contains whitespace"
        );
    }
}
