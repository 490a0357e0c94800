//! The error a stage handler returns: a retry classification and its cause.

use std::error::Error as StdError;
use std::fmt;

pub use facepipe_core::error::{chain, Classify, ErrorKind};

/// The cause of a [`StageError`], with its own source chain.
pub type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// A failed attempt at handling one message.
///
/// Any error that implements [`Classify`] converts with `?`, keeping its kind;
/// other failures are made explicit with [`StageError::transient`] or
/// [`StageError::permanent`]. Its `Display` is the cause's, and
/// [`StageError::message`] the whole chain, as recorded with the image and the
/// dead letter.
#[derive(Debug)]
pub struct StageError {
    kind: ErrorKind,
    cause: Cause,
}

impl StageError {
    /// A failure of `kind`, caused by `cause` (an error, or a message).
    pub fn new(kind: ErrorKind, cause: impl Into<Cause>) -> Self {
        Self { kind, cause: cause.into() }
    }

    /// A failure worth retrying.
    pub fn transient(cause: impl Into<Cause>) -> Self {
        Self::new(ErrorKind::Transient, cause)
    }

    /// A failure no retry can fix.
    pub fn permanent(cause: impl Into<Cause>) -> Self {
        Self::new(ErrorKind::Permanent, cause)
    }

    /// Retry classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True for [`ErrorKind::Permanent`].
    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }

    /// True for [`ErrorKind::Full`]: the message waits for space in place.
    pub fn is_full(&self) -> bool {
        self.kind == ErrorKind::Full
    }

    /// The cause and its sources, `a: b: c` (see [`chain`]).
    pub fn message(&self) -> String {
        chain(&*self.cause)
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.cause, f)
    }
}

impl StdError for StageError {
    // Transparent: the cause's own sources follow, so a chain is not printed twice.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.cause.source()
    }
}

impl<E: Classify> From<E> for StageError {
    fn from(e: E) -> Self {
        Self::new(e.kind(), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    impl Classify for Outer {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Permanent
        }
    }

    #[test]
    fn a_classified_error_keeps_its_kind_and_its_chain() {
        let e: StageError = Outer(std::io::Error::other("inner")).into();
        assert!(e.is_permanent());
        assert_eq!(e.to_string(), "outer");
        assert_eq!(e.message(), "outer: inner");
        assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("inner"));
    }

    #[test]
    fn a_plain_message_is_its_own_chain() {
        let e = StageError::transient(format!("store down after {} tries", 3));
        assert!(!e.is_permanent());
        assert_eq!(e.message(), "store down after 3 tries");
    }
}
