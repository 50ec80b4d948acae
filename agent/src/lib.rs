//! adce agent library (placeholder).
