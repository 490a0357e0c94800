//! How errors are handled across crates: whether a failure is worth retrying,
//! decided by its cause ([`Classify`]), and how an error is shown with its causes
//! ([`chain`]).
//!
//! Each library error type says which of its variants are properties of the
//! input (retrying cannot help) and which are outages or runtime failures
//! (a later attempt may succeed). The stage runtime reads that through
//! [`Classify`] when it turns an error into a retry or a dead letter.

/// Whether retrying can help, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A service was unavailable or slow (object store, database, NATS), or a
    /// runtime (OpenCV, ONNX Runtime) failed: Nak with a delay and try again, up
    /// to `max_deliver` attempts.
    Transient,
    /// A place to write is full (the object store's disk, JetStream's store): the
    /// message waits for space in place, kept by in-progress acks, and no attempt is
    /// spent on it, so a full disk fails no image.
    Full,
    /// The input itself is bad (undecodable image, malformed message, missing
    /// object): retrying cannot help, so it becomes a dead letter at once.
    Permanent,
}

/// An error that knows whether retrying can help.
pub trait Classify: std::error::Error + Send + Sync + 'static {
    /// Transient or permanent, by cause.
    fn kind(&self) -> ErrorKind;
}

/// An error and its sources, `a: b: c`, leaving out a source whose text its parent
/// already shows.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let part = source.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        next = source.source();
    }
    text
}
