//! Harness for adce end-to-end tests (placeholder).
