//! The error a stage handler returns, classified for the retry policy.

use std::fmt;

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A service was unavailable or slow (object store, database, NATS): Nak with a
    /// delay and try again, up to `max_deliver` attempts.
    Transient,
    /// The input itself is bad (undecodable image, malformed message, missing
    /// object): retrying cannot help, so it becomes a dead letter at once.
    Permanent,
}

/// A failed attempt at handling one message.
#[derive(Debug, thiserror::Error)]
pub struct StageError {
    /// Retry classification.
    pub kind: ErrorKind,
    /// Human-readable reason, recorded with the image and the dead letter.
    pub message: String,
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StageError {
    /// A failure worth retrying.
    pub fn transient(message: impl fmt::Display) -> Self {
        Self { kind: ErrorKind::Transient, message: message.to_string() }
    }

    /// A failure no retry can fix.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self { kind: ErrorKind::Permanent, message: message.to_string() }
    }

    /// True for [`ErrorKind::Permanent`].
    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }
}

impl From<crate::messages::MessageError> for StageError {
    fn from(e: crate::messages::MessageError) -> Self {
        Self::permanent(e)
    }
}

impl From<crate::store::StoreError> for StageError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::NotFound(_) | crate::store::StoreError::InvalidKey(_) => {
                Self::permanent(e)
            }
            _ => Self::transient(e),
        }
    }
}

impl From<crate::db::DbError> for StageError {
    fn from(e: crate::db::DbError) -> Self {
        // Outages and conflicts deserve a retry; an unknown image never will.
        if e.is_permanent() {
            Self::permanent(e)
        } else {
            Self::transient(e)
        }
    }
}

impl From<crate::bus::BusError> for StageError {
    fn from(e: crate::bus::BusError) -> Self {
        Self::transient(e)
    }
}
