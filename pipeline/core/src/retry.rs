//! Whether a failure is worth retrying, decided by its cause.
//!
//! Each library error type says which of its variants are properties of the
//! input (retrying cannot help) and which are outages or runtime failures
//! (a later attempt may succeed). The stage runtime reads that through
//! [`Classify`] when it turns an error into a retry or a dead letter.

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A service was unavailable or slow (object store, database, NATS), or a
    /// runtime (OpenCV, ONNX Runtime) failed: Nak with a delay and try again, up
    /// to `max_deliver` attempts.
    Transient,
    /// The input itself is bad (undecodable image, malformed message, missing
    /// object): retrying cannot help, so it becomes a dead letter at once.
    Permanent,
}

/// An error that knows whether retrying can help.
pub trait Classify: std::error::Error + Send + Sync + 'static {
    /// Transient or permanent, by cause.
    fn kind(&self) -> ErrorKind;
}
