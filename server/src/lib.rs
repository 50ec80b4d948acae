//! adce server library (placeholder).
pub mod model;
