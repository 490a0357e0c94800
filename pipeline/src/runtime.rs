//! The stage runtime: pull, handle, ack/retry/dead-letter, shut down gracefully.
//!
//! Every stage binary is a [`Handler`] run by [`run`]. The runtime owns the
//! delivery semantics so no stage re-implements them:
//! - it pulls only as many messages as it has free worker slots;
//! - a message is acked only after its handler returned `Ok`, which handlers
//!   return only once their outputs are stored and their publishes acknowledged;
//! - a transient error is Nak'd with an exponential delay computed from the
//!   delivery count; a permanent error, or the last allowed attempt, becomes a
//!   dead letter, the image's failure is recorded, and only then is it Term'd;
//! - long work sends in-progress acks so it is not redelivered meanwhile;
//! - on shutdown it stops pulling, lets in-flight work finish within the grace
//!   period, Naks what is left, and drains the connection.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::error::StageError;
use crate::keys;
use crate::messages::{self, DeadLetter, ImageRef, Outcome};
use crate::store::Store;
use crate::topology::{StageName, Topology};

/// How long one pull request waits for messages; bounds how long shutdown waits for the pull loop.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Shared infrastructure handed to every handler call.
pub struct Ctx {
    /// Which stage this process runs.
    pub stage: StageName,
    /// The deployment.
    pub topology: Topology,
    /// NATS.
    pub bus: Bus,
    /// Object store.
    pub store: Store,
}

impl Ctx {
    /// Publishes `msg` on the stage's next subject with a deterministic message id.
    pub async fn publish_next<T: serde::Serialize>(
        &self,
        msg_id: &str,
        msg: &T,
    ) -> Result<(), StageError> {
        let subject = self.topology.stage(self.stage).next.ok_or_else(|| {
            StageError::permanent(format!("stage {} has no next subject", self.stage))
        })?;
        Ok(self.bus.publish(subject, msg_id, messages::encode(msg)).await?)
    }

    /// Publishes an image outcome straight to the persist stage.
    pub async fn publish_outcome(&self, msg_id: &str, outcome: &Outcome) -> Result<(), StageError> {
        let subject = self.topology.outcome_subject();
        Ok(self.bus.publish(subject, msg_id, messages::encode(outcome)).await?)
    }
}

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
    ) -> impl Future<Output = Result<(), StageError>> + Send;

    /// Records that a message failed for good, after it was dead-lettered and
    /// before it is Term'd. The default records the image named in the payload
    /// as failed, so its batch can still complete.
    fn on_dead_letter(
        &self,
        ctx: &Ctx,
        payload: &[u8],
        error: &StageError,
        attempts: u32,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        let image = messages::decode::<ImageRef>(payload).ok();
        let message = error.message.clone();
        async move {
            match image {
                Some(image) if ctx.stage != StageName::Persist => {
                    let msg_id = keys::msg_id("failed", &image.batch_id, &image.image_id);
                    let outcome = Outcome::failed(image, ctx.stage.as_str(), message, attempts);
                    ctx.publish_outcome(&msg_id, &outcome).await
                }
                _ => Ok(()),
            }
        }
    }
}

/// Runs blocking CPU work (OpenCV) on tokio's blocking pool, off the async reactor.
pub async fn blocking<T, F>(work: F) -> Result<T, StageError>
where
    F: FnOnce() -> Result<T, StageError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StageError::transient(format!("worker thread failed: {e}")))?
}

/// A future that resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs `handler` on the stage's consumer until `shutdown` is cancelled.
pub async fn run<H: Handler>(
    ctx: Arc<Ctx>,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    let settings = ctx.topology.stage(ctx.stage);
    let consumer = ctx.bus.stage_consumer(&ctx.topology, ctx.stage).await?;
    let slots = Arc::new(Semaphore::new(settings.concurrency));
    let abandon = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tracing::info!(stage = %ctx.stage, subject = settings.subject, concurrency = settings.concurrency, "stage started");

    'pull: loop {
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break 'pull,
        };
        let mut permits = vec![first];
        let want = 1 + slots.available_permits();
        let batch = consumer.batch().max_messages(want).expires(PULL_EXPIRES).messages().await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "pull failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(PULL_EXPIRES) => continue 'pull,
                    _ = shutdown.cancelled() => break 'pull,
                }
            }
        };
        while let Some(next) = batch.next().await {
            let msg = match next {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::debug!(error = %e, "pull batch ended");
                    break;
                }
            };
            let permit = match permits.pop() {
                Some(p) => p,
                None => slots.clone().acquire_owned().await.expect("semaphore is never closed"),
            };
            let (ctx, handler, abandon) = (ctx.clone(), handler.clone(), abandon.clone());
            tasks.spawn(async move {
                process(&ctx, &*handler, msg, &abandon).await;
                drop(permit);
            });
        }
        while tasks.try_join_next().is_some() {}
    }

    tracing::info!(in_flight = tasks.len(), grace = ?settings.shutdown_grace, "stopping: finishing in-flight work");
    let drained = tokio::time::timeout(settings.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(left = tasks.len(), "grace period over: returning unfinished messages");
        abandon.cancel();
        while tasks.join_next().await.is_some() {}
    }
    if let Err(e) = ctx.bus.client.drain().await {
        tracing::warn!(error = %e, "draining the NATS connection failed");
    }
    tracing::info!(stage = %ctx.stage, "stage stopped");
    Ok(())
}

/// Handles one message from delivery to its final ack, Nak or Term.
async fn process<H: Handler>(ctx: &Ctx, handler: &H, msg: Message, abandon: &CancellationToken) {
    let stage = ctx.stage.as_str();
    let settings = ctx.topology.stage(ctx.stage);
    let delivery = match msg.info() {
        Ok(info) => Delivery {
            attempt: info.delivered.max(1) as u32,
            stream_sequence: info.stream_sequence,
            published: info.published.to_string(),
        },
        Err(e) => {
            tracing::error!(error = %e, "message without JetStream metadata; dropping");
            return;
        }
    };
    if delivery.attempt > 1 {
        metrics::counter!("facepipe_redeliveries_total", "stage" => stage).increment(1);
    }
    let image = messages::decode::<ImageRef>(&msg.payload).ok();
    let span = tracing::info_span!(
        "message",
        stage,
        batch = image.as_ref().map(|i| i.batch_id.as_str()).unwrap_or(""),
        image = image.as_ref().map(|i| i.image_id.as_str()).unwrap_or(""),
        attempt = delivery.attempt,
    );
    let _in_flight = InFlight::new(stage);
    let started = Instant::now();
    let attempt = delivery.attempt;

    let work = async {
        let input = messages::decode::<H::Input>(&msg.payload)?;
        handler.handle(ctx, input, delivery).await
    };
    let result = tokio::select! {
        result = work => result,
        _ = keep_alive(&msg, settings.ack_wait) => unreachable!("keep_alive never returns"),
        _ = abandon.cancelled() => {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            tracing::info!(parent: &span, "returned to the queue at shutdown");
            return;
        }
    };
    metrics::histogram!("facepipe_processing_seconds", "stage" => stage)
        .record(started.elapsed().as_secs_f64());

    let outcome = match result {
        Ok(()) => match msg.ack().await {
            Ok(()) => "ok",
            Err(e) => {
                tracing::warn!(parent: &span, error = %e, "ack failed; the message will be redelivered");
                "ack_failed"
            }
        },
        Err(error) if !error.is_permanent() && i64::from(attempt) < settings.max_deliver => {
            let delay = ctx.topology.retry.delay(attempt as u64, &mut rand::rng());
            tracing::warn!(parent: &span, %error, ?delay, "transient failure; retrying later");
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            "retried"
        }
        Err(error) => {
            tracing::error!(parent: &span, %error, permanent = error.is_permanent(), "failed for good; dead-lettering");
            match give_up(ctx, handler, &msg, &error, attempt).await {
                Ok(()) => {
                    let _ = msg.ack_with(AckKind::Term).await;
                    "dead_lettered"
                }
                Err(e) => {
                    // Leave it un-acked: it comes back after ack_wait (or is swept as a
                    // max-deliveries dead letter) rather than vanishing unrecorded.
                    tracing::error!(parent: &span, error = %e, "could not dead-letter; leaving the message un-acked");
                    "dead_letter_failed"
                }
            }
        }
    };
    metrics::counter!("facepipe_messages_total", "stage" => stage, "outcome" => outcome).increment(1);
}

/// Sends in-progress acks at a third of `ack_wait` so long work keeps its message.
async fn keep_alive(msg: &Message, ack_wait: Duration) {
    let period = (ack_wait / 3).max(Duration::from_millis(500));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        ticker.tick().await;
        let _ = msg.ack_with(AckKind::Progress).await;
    }
}

/// Publishes the dead letter, then lets the handler record the failure.
async fn give_up<H: Handler>(
    ctx: &Ctx,
    handler: &H,
    msg: &Message,
    error: &StageError,
    attempts: u32,
) -> Result<(), StageError> {
    let image = messages::decode::<ImageRef>(&msg.payload).ok();
    let letter = DeadLetter {
        stage: ctx.stage.to_string(),
        subject: msg.subject.to_string(),
        payload: String::from_utf8_lossy(&msg.payload).into_owned(),
        error: error.message.clone(),
        permanent: error.is_permanent(),
        attempts,
        batch_id: image.as_ref().map(|i| i.batch_id.clone()),
        image_id: image.as_ref().map(|i| i.image_id.clone()),
        time: chrono::Utc::now(),
    };
    let sequence = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
    let msg_id = format!("dead:{}:{}", ctx.topology.stream_name(ctx.stage), sequence);
    ctx.bus
        .publish(&ctx.topology.dead_letter_subject(ctx.stage), &msg_id, messages::encode(&letter))
        .await?;
    handler.on_dead_letter(ctx, &msg.payload, error, attempts).await
}

/// Tracks the in-flight gauge for the lifetime of one message.
struct InFlight(&'static str);

impl InFlight {
    fn new(stage: &'static str) -> Self {
        metrics::gauge!("facepipe_in_flight_messages", "stage" => stage).increment(1.0);
        Self(stage)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("facepipe_in_flight_messages", "stage" => self.0).decrement(1.0);
    }
}
