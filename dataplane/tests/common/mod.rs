//! Shared test code: `mod common;` in a test file.

pub mod conformance;
pub mod vmlab;
