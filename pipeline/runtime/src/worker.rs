//! The stage runtime: pull, handle, ack/retry/dead-letter, shut down gracefully.
//!
//! Every stage binary is a [`Handler`] run by [`run`] with a [`Ctx`]. The runtime owns the
//! delivery semantics so no stage re-implements them:
//! - it pulls only as many messages as it has free worker slots;
//! - a message is acked only after its handler returned `Ok`, which handlers
//!   return only once their outputs are stored and their publishes acknowledged;
//! - a transient error is Nak'd with an exponential delay computed from the
//!   delivery count; a permanent error, or the last allowed attempt, becomes a
//!   dead letter, the image's failure is recorded, and only then is it Term'd;
//! - long work sends in-progress acks so it is not redelivered meanwhile;
//! - while a service it needs is down (NATS, PostgreSQL) it stops pulling and
//!   waits with backoff, and a message on its last attempt waits for the
//!   service instead of becoming a dead letter for an outage;
//! - a message that exhausts `max_deliver` by ack timeouts (its worker crashed
//!   every time) is caught from JetStream's MAX_DELIVERIES advisory and
//!   dead-lettered like any other, so it cannot vanish;
//! - on shutdown it stops pulling, lets in-flight work finish within the grace
//!   period, Naks what is left, and drains the connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use facepipe_core::messages::{self, DeadLetter, MessageIds};
use facepipe_core::telemetry::{self, Handling};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bands::BandPuller;
use crate::ctx::Ctx;
use crate::error::StageError;
use crate::handler::{Delivery, Failed, Handled, Handler};

/// How long one pull request waits for messages; bounds how long shutdown waits for the pull loop.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// How long a message that found no space to write waits before trying again, at
/// first (the wait doubles from one try to the next)...
const FULL_WAIT_FIRST: Duration = Duration::from_millis(500);
/// ...and at most.
const FULL_WAIT_MAX: Duration = Duration::from_secs(15);

/// How long shutdown waits for the NATS connection to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Follows live changes of the stage's concurrency: more slots (and CPU threads)
/// at once; fewer as soon as enough in-flight messages finish.
async fn follow_concurrency(ctx: Arc<Ctx>, slots: Arc<Semaphore>, mut limit: usize) {
    let mut changes = ctx.live.subscribe();
    while changes.changed().await.is_ok() {
        let wanted = changes.borrow_and_update().stage(ctx.stage).concurrency;
        if wanted > limit {
            ctx.cpu().grow_to(wanted);
            slots.add_permits(wanted - limit);
        } else if wanted < limit {
            // Take the surplus slots out of circulation as they come free.
            let surplus = (limit - wanted) as u32;
            if let Ok(permits) = slots.clone().acquire_many_owned(surplus).await {
                permits.forget();
            }
        }
        if wanted != limit {
            tracing::info!(stage = %ctx.stage, from = limit, to = wanted, "concurrency changed live");
            limit = wanted;
        }
    }
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

/// State shared by the pull loop and the message tasks of one process.
struct Worker<H> {
    ctx: Arc<Ctx>,
    handler: Arc<H>,
    /// Set by a transient failure; the pull loop then waits for readiness before pulling more.
    degraded: AtomicBool,
    /// Messages waiting in place for space to write: while any does, readiness stays
    /// "waiting for space" (the periodic probe cannot see a full JetStream store).
    waiting_for_space: std::sync::atomic::AtomicUsize,
    /// Cancelled when the shutdown grace period is over: unfinished messages are Nak'd.
    abandon: CancellationToken,
    /// Test hooks, read once at start (feature `fault-injection` only).
    #[cfg(feature = "fault-injection")]
    faults: crate::faults::Faults,
}

/// Runs `handler` on the stage's consumer until `shutdown` is cancelled.
pub async fn run<H: Handler>(
    ctx: Arc<Ctx>,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    let settings = ctx.topology.stage(ctx.stage);
    let mut puller = BandPuller::new(ctx.bus.stage_consumers(&ctx.topology, ctx.stage).await?);
    let worker = Arc::new(Worker {
        ctx: ctx.clone(),
        handler,
        degraded: AtomicBool::new(false),
        waiting_for_space: std::sync::atomic::AtomicUsize::new(0),
        abandon: CancellationToken::new(),
        #[cfg(feature = "fault-injection")]
        faults: crate::faults::Faults::from_env(),
    });
    let watcher = tokio::spawn(crate::live::watch(ctx.bus.clone(), ctx.stage, ctx.live.clone()));
    let sweeper = tokio::spawn(sweep_max_deliveries(worker.clone()));
    let prober = tokio::spawn(probe_readiness(worker.clone()));
    let slots = Arc::new(Semaphore::new(settings.concurrency));
    let resizer = tokio::spawn(follow_concurrency(ctx.clone(), slots.clone(), settings.concurrency));
    let presence = tokio::spawn(crate::presence::answer(ctx.clone(), slots.clone()));
    let mut tasks = JoinSet::new();
    tracing::info!(stage = %ctx.stage, subject = settings.subject, concurrency = settings.concurrency, "stage started");
    ctx.health.set_ready(true);

    'pull: loop {
        if worker.degraded.swap(false, Ordering::SeqCst) {
            tokio::select! {
                _ = worker.wait_ready() => {}
                _ = shutdown.cancelled() => break 'pull,
            }
        }
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break 'pull,
        };
        let mut permits = vec![first];
        let want = 1 + slots.available_permits();
        // A pull abandoned at shutdown leaves at most its messages un-acked: they are redelivered.
        let pulled = tokio::select! {
            pulled = puller.pull(want, PULL_EXPIRES) => pulled,
            _ = shutdown.cancelled() => break 'pull,
        };
        let mut messages = match pulled {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(error = %e, "pull failed; retrying");
                ctx.health.set_services(Err(format!("pulling from JetStream failed: {e}")));
                worker.degraded.store(true, Ordering::SeqCst);
                tokio::select! {
                    _ = tokio::time::sleep(PULL_EXPIRES) => continue 'pull,
                    _ = shutdown.cancelled() => break 'pull,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                msg = messages.next() => msg,
                _ = shutdown.cancelled() => None,
            };
            let Some(msg) = msg else { break };
            let permit = match permits.pop() {
                Some(p) => p,
                None => tokio::select! {
                    p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
                    _ = shutdown.cancelled() => {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        break;
                    }
                },
            };
            let worker = worker.clone();
            tasks.spawn(async move {
                worker.process(msg).await;
                drop(permit);
            });
        }
        while tasks.try_join_next().is_some() {}
    }

    // The grace period may have changed live since start-up.
    let grace = ctx.current().stage(ctx.stage).shutdown_grace;
    tracing::info!(in_flight = tasks.len(), ?grace, "stopping: finishing in-flight work");
    sweeper.abort();
    prober.abort();
    watcher.abort();
    resizer.abort();
    presence.abort();
    ctx.health.set_ready(false);
    let drained = tokio::time::timeout(grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(left = tasks.len(), "grace period over: returning unfinished messages");
        worker.abandon.cancel();
        while tasks.join_next().await.is_some() {}
    }
    // Draining waits on the server; during an outage it would wait for the server's return.
    match tokio::time::timeout(DRAIN_TIMEOUT, ctx.bus.client.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "draining the NATS connection failed"),
        Err(_) => tracing::warn!(timeout = ?DRAIN_TIMEOUT, "draining the NATS connection timed out"),
    }
    tracing::info!(stage = %ctx.stage, "stage stopped");
    Ok(())
}

impl<H: Handler> Worker<H> {
    /// Waits, with capped exponential backoff, until the handler reports its services reachable.
    async fn wait_ready(&self) {
        let mut delay = Duration::from_millis(100);
        let mut warned = false;
        while let Err(why) = self.handler.ready(&self.ctx).await {
            if !warned {
                tracing::warn!(stage = %self.ctx.stage, reason = %why, "a service is unavailable; pausing until it is back");
                warned = true;
            }
            self.ctx.health.set_services(Err(why));
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        if warned {
            tracing::info!(stage = %self.ctx.stage, "services available again; resuming");
        }
        self.ctx.health.set_ready(true);
    }

    /// Handles one message from delivery to its final ack, Nak or Term.
    async fn process(&self, msg: Message) {
        let ctx = &*self.ctx;
        let stage = ctx.stage.as_str();
        // Read once per message: a live change applies from the next message on.
        let current = ctx.current();
        let settings = current.stage(ctx.stage);
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
        let attempt = delivery.attempt;
        // Every line about this message, the handler's too, carries its batch and image.
        let ids = MessageIds::read(&msg.payload);
        let span = tracing::info_span!(
            "message",
            stage,
            batch = ids.batch_id.as_deref().unwrap_or(""),
            image = ids.image_id.as_deref().unwrap_or(""),
            attempt,
        );
        if attempt > 1 {
            metrics::counter!(telemetry::REDELIVERIES, "stage" => stage).increment(1);
            tracing::info!(parent: &span, "redelivered message");
        }
        #[cfg(feature = "fault-injection")]
        self.faults.crash_if_marked(&msg.payload, &span);
        let _in_flight = InFlight::new(stage);
        let started = Instant::now();

        let work = async {
            #[cfg(feature = "fault-injection")]
            self.faults.stall_if_marked(&msg.payload, &span).await;
            let mut full_wait = FULL_WAIT_FIRST;
            loop {
                let result = async {
                    if msg.payload.len() > settings.max_message_bytes {
                        return Err(StageError::permanent(format!(
                            "message of {} bytes exceeds max_message_bytes ({}); not read",
                            msg.payload.len(),
                            settings.max_message_bytes
                        )));
                    }
                    let input = messages::decode::<H::Input>(&msg.payload)?;
                    self.handler.handle(ctx, input, delivery.clone()).await
                }
                .await;
                match result {
                    // A full disk or store fails no image: the message waits for space here
                    // (kept by in-progress acks, no attempt spent), readiness says why, and
                    // the stage stops pulling until its services answer again.
                    Err(e) if e.is_full() => {
                        tracing::warn!(parent: &span, error = %e.message(), retry_in = ?full_wait, "no space to write; waiting for space, then trying again in place");
                        self.ctx.health.set_services(Err(format!("waiting for space: {}", e.message())));
                        self.degraded.store(true, Ordering::SeqCst);
                        {
                            let _waiting = Counted::new(&self.waiting_for_space);
                            tokio::time::sleep(full_wait).await;
                        }
                        full_wait = (full_wait * 2).min(FULL_WAIT_MAX);
                        self.wait_ready().await;
                    }
                    // On the last attempt, an outage must not turn a good message into a
                    // dead letter: wait for the services and try again in place.
                    Err(e) if is_last_transient(&e, attempt, settings.max_deliver) && self.handler.ready(ctx).await.is_err() =>
                    {
                        tracing::warn!(parent: &span, error = %e, "last attempt failed during an outage; waiting for the service");
                        self.wait_ready().await;
                    }
                    other => return other,
                }
            }
        };
        let result = tokio::select! {
            result = work.instrument(span.clone()) => result,
            _ = keep_alive(&msg, settings.ack_wait) => unreachable!("keep_alive never returns"),
            _ = self.abandon.cancelled() => {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                tracing::info!(parent: &span, "returned to the queue at shutdown");
                return;
            }
        };
        metrics::histogram!(telemetry::PROCESSING_SECONDS, "stage" => stage)
            .record(started.elapsed().as_secs_f64());

        let verdict = verdict(&result, attempt, settings.max_deliver, &current.retry, &mut rand::rng());
        let outcome = match verdict {
            Verdict::Ack(handled) => match msg.ack().await {
                Ok(()) if handled == Handled::Skipped => Handling::Skipped,
                Ok(()) => Handling::Ok,
                Err(e) => {
                    tracing::warn!(parent: &span, error = %e, "ack failed; the message will be redelivered");
                    Handling::AckFailed
                }
            },
            Verdict::Retry(delay, error) => {
                self.degraded.store(true, Ordering::SeqCst);
                tracing::warn!(parent: &span, %error, ?delay, "transient failure; retrying later");
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                Handling::Retried
            }
            Verdict::DeadLetter(error) => {
                tracing::error!(parent: &span, %error, permanent = error.is_permanent(), "failed for good; dead-lettering");
                let failed = Failed {
                    subject: &msg.subject,
                    payload: &msg.payload,
                    stream_sequence: delivery.stream_sequence,
                    published: delivery.published.clone(),
                    error,
                    attempts: attempt,
                };
                match self.give_up(failed).await {
                    Ok(()) => {
                        let _ = msg.ack_with(AckKind::Term).await;
                        Handling::DeadLettered
                    }
                    Err(e) => {
                        // Leave it un-acked: it comes back after ack_wait, or is swept as a
                        // max-deliveries dead letter, rather than vanishing unrecorded.
                        tracing::error!(parent: &span, error = %e, "could not dead-letter; leaving the message un-acked");
                        Handling::DeadLetterFailed
                    }
                }
            }
        };
        outcome.count(ctx.stage);
    }

    /// Publishes the dead letter, then lets the handler record the failure.
    async fn give_up(&self, failed: Failed<'_>) -> Result<(), StageError> {
        let ctx = &*self.ctx;
        let ids = MessageIds::read(failed.payload);
        let letter = DeadLetter {
            stage: ctx.stage.to_string(),
            subject: failed.subject.to_string(),
            payload: String::from_utf8_lossy(failed.payload).into_owned(),
            error: failed.error.message(),
            permanent: failed.error.is_permanent(),
            attempts: failed.attempts,
            batch_id: ids.batch_id,
            image_id: ids.image_id,
            time: chrono::Utc::now(),
        };
        let msg_id = facepipe_core::keys::dead_letter_msg_id(&ctx.topology.stream_name(ctx.stage), failed.stream_sequence);
        ctx.bus
            .publish(&ctx.topology.dead_letter_subject(ctx.stage), &msg_id, messages::encode(&letter))
            .await?;
        self.handler.on_dead_letter(ctx, &failed).await
    }
}

/// One more in a count while it lives (dropped, also when its future is, one less).
struct Counted<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Counted<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the runtime does with a message once its handler is done with it.
#[derive(Debug)]
enum Verdict<'a> {
    /// Ack it: handled, or its effect was already there.
    Ack(Handled),
    /// Nak it, to be redelivered after this delay.
    Retry(std::time::Duration, &'a StageError),
    /// Dead-letter it, record its failure, then Term it.
    DeadLetter(&'a StageError),
}

/// The runtime's rule: a success is acked; a transient failure is retried with the
/// policy's delay until the `max_deliver`-th attempt; a permanent failure, or a
/// transient one on the last attempt, is dead-lettered.
fn verdict<'a>(
    result: &'a Result<Handled, StageError>,
    attempt: u32,
    max_deliver: i64,
    retry: &facepipe_core::topology::RetryConfig,
    rng: &mut impl rand::Rng,
) -> Verdict<'a> {
    match result {
        Ok(handled) => Verdict::Ack(*handled),
        // A full store is waited out in place before a verdict; should one reach here, it is retried.
        Err(e) if e.is_full() || (!e.is_permanent() && i64::from(attempt) < max_deliver) => Verdict::Retry(retry.delay(u64::from(attempt), rng), e),
        Err(e) => Verdict::DeadLetter(e),
    }
}

/// A transient failure on the last attempt allowed: the one case where an outage
/// would turn a good message into a dead letter, so the runtime waits for the service.
fn is_last_transient(error: &StageError, attempt: u32, max_deliver: i64) -> bool {
    !error.is_permanent() && i64::from(attempt) >= max_deliver
}

/// How often `/readyz` re-checks the stage's services while nothing else does.
const READINESS_PROBE: Duration = Duration::from_secs(2);

/// Keeps `/readyz` true to the services' state even while no message flows, and
/// says in the log when that state changes (a stream gone, a service back).
async fn probe_readiness<H: Handler>(worker: Arc<Worker<H>>) {
    let mut last: Result<(), String> = Ok(());
    loop {
        tokio::time::sleep(READINESS_PROBE).await;
        let services = worker.handler.ready(&worker.ctx).await;
        if worker.waiting_for_space.load(Ordering::SeqCst) > 0 {
            continue;
        }
        if services != last {
            match &services {
                Err(why) => tracing::warn!(stage = %worker.ctx.stage, reason = %why, "not ready"),
                Ok(()) => tracing::info!(stage = %worker.ctx.stage, "ready again"),
            }
            last = services.clone();
        }
        worker.ctx.health.set_services(services);
    }
}

/// The body of JetStream's `CONSUMER.MAX_DELIVERIES` advisory (the fields we use).
#[derive(serde::Deserialize)]
struct MaxDeliveriesAdvisory {
    stream_seq: u64,
    deliveries: u32,
}

/// Dead-letters messages whose every delivery timed out without an ack (the
/// worker crashed or hung each time). JetStream keeps such a message in the
/// WorkQueue stream but never delivers it again; its advisory names it. The
/// replicas of a stage share the subscription through a queue group, so each
/// advisory is handled once.
async fn sweep_max_deliveries<H: Handler>(worker: Arc<Worker<H>>) {
    let ctx = &*worker.ctx;
    let stream_name = ctx.topology.stream_name(ctx.stage);
    let durable = ctx.topology.stage(ctx.stage).durable;
    // Every band's consumer of the stage's stream.
    let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream_name}.*");
    let mut advisories = match ctx.bus.client.queue_subscribe(subject, format!("{durable}-sweeper")).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch max-deliveries advisories");
            return;
        }
    };
    while let Some(advisory) = advisories.next().await {
        let Ok(advisory) = serde_json::from_slice::<MaxDeliveriesAdvisory>(&advisory.payload) else {
            continue;
        };
        let seq = advisory.stream_seq;
        let result = async {
            let stream = ctx.bus.js.get_stream(&stream_name).await.map_err(StageError::transient)?;
            let original = match stream.get_raw_message(seq).await {
                Ok(m) => m,
                Err(_) => return Ok(()), // already gone: acked late, or swept by another replica
            };
            let error = StageError::transient(format!(
                "gave up after {} deliveries without an ack: the worker crashed or hung each time",
                advisory.deliveries
            ));
            worker
                .give_up(Failed {
                    subject: &original.subject,
                    payload: &original.payload,
                    stream_sequence: seq,
                    published: original.time.to_string(),
                    error: &error,
                    attempts: advisory.deliveries,
                })
                .await?;
            stream.delete_message(seq).await.map_err(StageError::transient)?;
            Handling::DeadLettered.count(ctx.stage);
            tracing::error!(stage = %ctx.stage, seq, deliveries = advisory.deliveries, "message exhausted its deliveries by ack timeout; dead-lettered");
            Ok::<(), StageError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, seq, "cannot dead-letter a message that exhausted its deliveries");
        }
    }
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

/// Tracks the in-flight gauge for the lifetime of one message.
struct InFlight(&'static str);

impl InFlight {
    fn new(stage: &'static str) -> Self {
        metrics::gauge!(telemetry::IN_FLIGHT, "stage" => stage).increment(1.0);
        Self(stage)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::IN_FLIGHT, "stage" => self.0).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use facepipe_core::topology::RetryConfig;
    use std::time::Duration;

    fn retry() -> RetryConfig {
        RetryConfig { base: Duration::from_secs(1), factor: 4.0, max: Duration::from_secs(60), jitter: 0.0 }
    }

    /// The verdict, as text: `ack Done`, `retry 4s`, `dead letter`.
    fn decide(result: Result<Handled, StageError>, attempt: u32, max_deliver: i64) -> String {
        match verdict(&result, attempt, max_deliver, &retry(), &mut rand::rng()) {
            Verdict::Ack(handled) => format!("ack {handled:?}"),
            Verdict::Retry(delay, _) => format!("retry {delay:?}"),
            Verdict::DeadLetter(_) => "dead letter".into(),
        }
    }

    #[test]
    fn a_success_is_acked_as_done_or_skipped() {
        assert_eq!(decide(Ok(Handled::Done), 1, 3), "ack Done");
        assert_eq!(decide(Ok(Handled::Skipped), 3, 3), "ack Skipped", "even on the last attempt");
    }

    #[test]
    fn a_transient_failure_is_retried_with_growing_delays_until_the_last_attempt() {
        assert_eq!(decide(Err(StageError::transient("store down")), 1, 3), "retry 1s");
        assert_eq!(decide(Err(StageError::transient("store down")), 2, 3), "retry 4s");
        assert_eq!(decide(Err(StageError::transient("store down")), 3, 3), "dead letter");
        assert!(!is_last_transient(&StageError::transient("x"), 2, 3));
        assert!(is_last_transient(&StageError::transient("x"), 3, 3), "the last attempt waits out an outage");
    }

    #[test]
    fn a_permanent_failure_is_dead_lettered_at_once_and_never_waits() {
        assert_eq!(decide(Err(StageError::permanent("not an image")), 1, 3), "dead letter");
        assert!(!is_last_transient(&StageError::permanent("x"), 3, 3));
    }
}
