//! The [`Handler`] trait a stage implements, and what it is told about a delivery.

use std::future::Future;

use facepipe_core::keys;
use facepipe_core::messages::{self, ImageRef, Outcome};
use serde::de::DeserializeOwned;

use crate::ctx::Ctx;
use crate::error::StageError;

/// Facts about the delivery of the message being handled.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// 1 on first delivery, then 2, 3, ...
    pub attempt: u32,
    /// The message's sequence in its stream (the same on every redelivery).
    pub stream_sequence: u64,
    /// When the server first stored the message, as text (the same on every redelivery).
    pub published: String,
}

/// What handling a message amounted to (counted as `outcome` in `facepipe_messages_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The work was done and its outputs are stored.
    Done,
    /// Nothing to do: its effect was already there (a redelivered outcome).
    Skipped,
}

/// One stage's work on one decoded message.
pub trait Handler: Send + Sync + 'static {
    /// The message type this stage consumes.
    type Input: DeserializeOwned + Send + 'static;

    /// Handles one message. Return `Ok` only when every output is stored and
    /// every publish acknowledged: the runtime acks right after.
    fn handle(
        &self,
        ctx: &Ctx,
        input: Self::Input,
        delivery: Delivery,
    ) -> impl Future<Output = Result<Handled, StageError>> + Send;

    /// `Ok` when every service this stage needs is reachable, else why not (shown
    /// by `/readyz`). The default checks NATS, JetStream (this stage's stream and the
    /// next one's) and the object store; stages
    /// that use PostgreSQL also ping it.
    fn ready(&self, ctx: &Ctx) -> impl Future<Output = Result<(), String>> + Send {
        async move {
            ctx.check_streams().await?;
            ctx.store.ping().await.map_err(|e| format!("the object store does not answer: {e}"))
        }
    }

    /// Records that a message failed for good, after it was dead-lettered and
    /// before it is Term'd. The default publishes the image named in the payload
    /// as failed, to persist, so its batch can still complete; persist, which
    /// records outcomes itself, overrides it.
    fn on_dead_letter(&self, ctx: &Ctx, failed: &Failed<'_>) -> impl Future<Output = Result<(), StageError>> + Send {
        let image = messages::decode::<ImageRef>(failed.payload).ok();
        let (message, attempts) = (failed.error.message(), failed.attempts);
        // Unique per failed message (a replay is a new message), stable across retries of this step.
        let msg_id_suffix = format!("{}:{}", ctx.stage, failed.stream_sequence);
        async move {
            match image {
                Some(image) => {
                    let msg_id = keys::msg_id(keys::MessageKind::Failure, &image.batch_id, &format!("{}:{msg_id_suffix}", image.image_id));
                    let outcome = Outcome::failed(image, ctx.stage, message, attempts);
                    ctx.publish_outcome(&msg_id, &outcome).await
                }
                None => Ok(()),
            }
        }
    }
}

/// A message that failed for good, however it was received.
pub struct Failed<'a> {
    /// Subject it was consumed from.
    pub subject: &'a str,
    /// Its payload.
    pub payload: &'a [u8],
    /// Its sequence in the stage's stream.
    pub stream_sequence: u64,
    /// When the server first stored it, as in [`Delivery::published`].
    pub published: String,
    /// Why it failed.
    pub error: &'a StageError,
    /// Deliveries made.
    pub attempts: u32,
}
