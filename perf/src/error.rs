//! The crate's one error type.

/// A problem with a [`Schema`](crate::Schema).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A metric name that is not `[a-zA-Z_][a-zA-Z0-9_]*`.
    #[error("metric name {name:?} is invalid: use [a-zA-Z_][a-zA-Z0-9_]*")]
    InvalidName {
        /// The offending name.
        name: &'static str,
    },
    /// Two metrics with the same name, or whose Prometheus series would collide.
    #[error("metric name {name:?} is declared twice or collides with another metric's series")]
    DuplicateName {
        /// The second declaration.
        name: &'static str,
    },
}
