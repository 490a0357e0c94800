//! Queue statistics: each stage's backlog as JetStream sees it, the replicas
//! that answer a presence ping, and the images each stage failed, from the ledger
//! (`pipeline stats`, the API's `queue-stats` and `stats`, bench).

use std::time::Duration;

use facepipe_core::topology::{StageName, Topology};
use facepipe_ledger::{Db, DbError};
use facepipe_runtime::bus::{self, Bus, BusError};

/// A stage's queue as JetStream sees it (`pipeline stats`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStats {
    /// The stage.
    pub stage: StageName,
    /// Messages not yet delivered (the old design's "waiting").
    pub waiting: u64,
    /// Delivered and not yet acknowledged: being worked on, or Nak'd and waiting for their retry delay.
    pub active: usize,
    /// Of the unacknowledged, those delivered more than once (retrying).
    pub retrying: usize,
    /// Messages taken off the queue since the stream was created: done, or dead-lettered.
    pub completed: u64,
    /// Pull requests waiting at the server: replicas idle and asking for work.
    pub idle_pullers: usize,
    /// `waiting`, per priority band.
    pub waiting_by_band: std::collections::BTreeMap<String, u64>,
    /// Processes of the stage that answered a presence ping, wherever they run.
    pub replicas: usize,
    /// Those processes: host, pid, slots and messages in hand.
    pub processes: Vec<facepipe_runtime::presence::Presence>,
    /// Images this stage gave up on, over all batches (from PostgreSQL).
    pub failed: i64,
}

/// Why statistics could not be read, by the service that did not answer.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// JetStream did not answer.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// PostgreSQL did not answer.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Every stage's queue ([`queue_stats`]) with the images it failed, read at once.
pub async fn stage_stats(bus: &Bus, db: &Db, topology: &Topology) -> Result<Vec<QueueStats>, StatsError> {
    let (queues, failed) = tokio::join!(queue_stats(bus, topology), db.failed_by_stage());
    let (mut queues, failed) = (queues?, failed?);
    for q in &mut queues {
        q.failed = failed.get(&q.stage).copied().unwrap_or(0);
    }
    Ok(queues)
}

/// Queue statistics of every stage, in flow order. The replica count waits for
/// the stage processes' presence answers, while the streams are read: until
/// answers stop for [`PRESENCE_QUIET`] (half a second at most, when none answer).
pub async fn queue_stats(bus: &Bus, topology: &Topology) -> Result<Vec<QueueStats>, BusError> {
    let (present, queues) = tokio::join!(
        facepipe_runtime::presence::ping(bus, topology, Duration::from_millis(500), PRESENCE_QUIET),
        queues(bus, topology),
    );
    let present = present?;
    let mut queues = queues?;
    for q in &mut queues {
        q.processes = present.iter().filter(|p| p.stage == q.stage.as_str()).cloned().collect();
        q.processes.sort_by(|a, b| (&a.host, a.pid).cmp(&(&b.host, b.pid)));
        q.replicas = q.processes.len();
    }
    Ok(queues)
}

/// How long the replica count waits after the last presence answer for another:
/// every process answers at once, so a gap this long means all have answered.
pub const PRESENCE_QUIET: Duration = Duration::from_millis(100);

async fn queues(bus: &Bus, topology: &Topology) -> Result<Vec<QueueStats>, BusError> {
    let mut out = Vec::new();
    for stage in StageName::ALL {
        let name = topology.stream_name(stage);
        let mut stream = bus.js.get_stream(&name).await.map_err(|e| bus::setup(&name, e))?;
        let state = stream.info().await.map_err(|e| bus::setup(&name, e))?.state.clone();
        let mut stats = QueueStats {
            stage,
            waiting: 0,
            active: 0,
            retrying: 0,
            completed: state.last_sequence.saturating_sub(state.messages),
            idle_pullers: 0,
            waiting_by_band: std::collections::BTreeMap::new(),
            replicas: 0,
            processes: Vec::new(),
            failed: 0,
        };
        for band in topology.stage_bands(stage) {
            let info = stream.consumer_info(&band.durable).await.map_err(|e| bus::setup(&band.durable, e))?;
            stats.waiting += info.num_pending;
            stats.active += info.num_ack_pending;
            stats.retrying += info.num_redelivered;
            stats.idle_pullers += info.num_waiting;
            stats.waiting_by_band.insert(band.name, info.num_pending);
        }
        out.push(stats);
    }
    Ok(out)
}

