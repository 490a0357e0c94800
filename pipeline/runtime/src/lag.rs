//! The consumer-lag poller: every stage process reports its stream's consumer
//! lag as gauges (names in [`facepipe_core::telemetry`]).

use std::time::Duration;

use facepipe_core::telemetry::{CONSUMER_ACK_PENDING, CONSUMER_PENDING, CONSUMER_REDELIVERED};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;

/// Reads the lag of every consumer of `stream` (the stage's stream: one
/// durable per priority band) every `interval` into the consumer gauges,
/// labelled `consumer`, until `shutdown`. Every replica of a stage reports the
/// same values, so aggregate them with `max by (stage, consumer)`, not `sum`.
pub fn spawn_lag_poller(bus: Bus, stream: String, interval: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            // Best effort: an outage shows as stale gauges and is reported by /readyz.
            if let Err(reason) = read_lag(&bus, &stream).await {
                tracing::debug!(stream, reason, "consumer lag not read");
            }
        }
    });
}

async fn read_lag(bus: &Bus, stream: &str) -> Result<(), String> {
    let stream = bus.js.get_stream_no_info(stream).await.map_err(|e| e.to_string())?;
    let mut consumers = stream.consumers();
    while let Some(info) = consumers.next().await {
        let info = info.map_err(|e| e.to_string())?;
        let consumer = info.name.clone();
        metrics::gauge!(CONSUMER_PENDING, "consumer" => consumer.clone()).set(info.num_pending as f64);
        metrics::gauge!(CONSUMER_ACK_PENDING, "consumer" => consumer.clone()).set(info.num_ack_pending as f64);
        metrics::gauge!(CONSUMER_REDELIVERED, "consumer" => consumer).set(info.num_redelivered as f64);
    }
    Ok(())
}

