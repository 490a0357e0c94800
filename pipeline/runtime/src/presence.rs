//! Who is running: every stage process answers presence pings, so `pipeline
//! stats` and the API's queue statistics can count the replicas connected to
//! each stage, wherever they run.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::bus::{Bus, BusError};
use crate::ctx::Ctx;
use facepipe_core::topology::Topology;

/// One stage process's answer to a ping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Presence {
    /// Stage it runs.
    pub stage: String,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: u32,
    /// Worker slots.
    pub concurrency: usize,
    /// Messages being handled now.
    pub in_flight: usize,
}

/// The subject pings go to (core NATS, not stored).
pub fn subject(topology: &Topology) -> String {
    format!("_facepipe.{}.presence", topology.nats.stream_prefix.to_lowercase())
}

/// Answers pings for this process until its connection closes.
pub async fn answer(ctx: Arc<Ctx>, slots: Arc<Semaphore>) {
    let mut pings = match ctx.bus.client.subscribe(subject(&ctx.topology)).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::warn!(error = %e, "cannot answer presence pings; this process will not show in stats");
            return;
        }
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    while let Some(ping) = pings.next().await {
        let Some(reply) = ping.reply else { continue };
        let concurrency = ctx.current().stage(ctx.stage).concurrency;
        let presence = Presence {
            stage: ctx.stage.to_string(),
            host: host.clone(),
            pid: std::process::id(),
            concurrency,
            in_flight: concurrency.saturating_sub(slots.available_permits()),
        };
        let _ = ctx.bus.client.publish(reply, facepipe_core::messages::encode(&presence)).await;
    }
}

/// Pings every stage process and collects the answers that arrive within `wait`,
/// stopping early once `quiet` passes after an answer without another one.
pub async fn ping(bus: &Bus, topology: &Topology, wait: Duration, quiet: Duration) -> Result<Vec<Presence>, BusError> {
    let err = |e: crate::error::Cause| BusError::Setup { what: "presence ping".into(), source: e };
    let inbox = bus.client.new_inbox();
    let mut answers = bus.client.subscribe(inbox.clone()).await.map_err(|e| err(e.into()))?;
    bus.client.publish_with_reply(subject(topology), inbox, bytes::Bytes::new()).await.map_err(|e| err(e.into()))?;
    bus.client.flush().await.map_err(|e| err(e.into()))?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut found = Vec::new();
    let mut until = deadline;
    while let Ok(Some(answer)) = tokio::time::timeout_at(until, answers.next()).await {
        if let Ok(presence) = serde_json::from_slice::<Presence>(&answer.payload) {
            found.push(presence);
        }
        until = deadline.min(tokio::time::Instant::now() + quiet);
    }
    Ok(found)
}
