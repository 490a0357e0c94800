//! [`Ctx`]: what every handler call is given.

use std::sync::Arc;

use facepipe_core::keys::{self, MessageKind};
use facepipe_core::messages::{self, ImageRef, Outcome};
use facepipe_core::topology::{StageName, Topology};

use crate::bus::Bus;
use crate::cpu::CpuPool;
use crate::error::StageError;
use crate::store::Store;

/// Shared infrastructure handed to every handler call.
pub struct Ctx {
    /// Which stage this process runs.
    pub stage: StageName,
    /// The deployment as the process started (connections, subjects). Settings
    /// that change live are read with [`Ctx::current`] instead.
    pub topology: Topology,
    /// NATS.
    pub bus: Bus,
    /// Object store.
    pub store: Store,
    /// Readiness reported on `/readyz`.
    pub health: Arc<crate::health::Health>,
    /// The topology with the latest live changes (see [`crate::live`]).
    pub(crate) live: tokio::sync::watch::Sender<Arc<Topology>>,
    /// The CPU threads for [`Ctx::blocking`], one per worker slot.
    cpu: CpuPool,
}

impl Ctx {
    /// Context for a stage process started with `topology`.
    pub fn new(stage: StageName, topology: Topology, bus: Bus, store: Store, health: Arc<crate::health::Health>) -> Self {
        let (live, _) = tokio::sync::watch::channel(Arc::new(topology.clone()));
        let cpu = CpuPool::new(topology.stage(stage).concurrency);
        Self { stage, topology, bus, store, health, live, cpu }
    }

    /// Runs blocking CPU work (OpenCV, ONNX Runtime) on the stage's CPU threads, off the async reactor.
    pub async fn blocking<T, F>(&self, work: F) -> Result<T, StageError>
    where
        F: FnOnce() -> Result<T, StageError> + Send + 'static,
        T: Send + 'static,
    {
        self.cpu.run(work).await
    }

    /// The CPU threads, grown when the concurrency grows live.
    pub(crate) fn cpu(&self) -> &CpuPool {
        &self.cpu
    }

    /// `Ok` while JetStream serves this stage's own stream and consumers, and the next
    /// stage's stream, where its output goes (a message whose output cannot be stored
    /// cannot be done), else why not.
    pub async fn check_streams(&self) -> Result<(), String> {
        self.bus.check(&self.topology.stream_name(self.stage)).await?;
        self.bus.check_consumers(&self.topology, self.stage).await?;
        match self.stage.next() {
            Some(next) => self.bus.check(&self.topology.stream_name(next)).await,
            None => Ok(()),
        }
    }

    /// The topology with the live changes applied so far: read it per message
    /// for parameters, concurrency and retry policy.
    pub fn current(&self) -> Arc<Topology> {
        self.live.borrow().clone()
    }

    /// Publishes `msg` about `image` to the next stage: on the image's batch's subject of
    /// its priority's band (so the stream's per-subject counts show what of the batch is
    /// queued), under the image's message id for `kind` (deterministic, so a redelivery
    /// publishes a duplicate JetStream drops).
    pub async fn publish_next<T: serde::Serialize>(&self, kind: MessageKind, image: &ImageRef, msg: &T) -> Result<(), StageError> {
        let next = self.stage.next().ok_or_else(|| StageError::permanent(format!("stage {} has no next stage", self.stage)))?;
        let subject = self.topology.batch_subject(next, image.priority, &image.batch_id);
        Ok(self.bus.publish(&subject, &keys::image_msg_id(kind, image), messages::encode(msg)).await?)
    }

    /// Publishes an image outcome straight to persist (its batch's subject of its
    /// priority's band) under `msg_id`.
    pub async fn publish_outcome(&self, msg_id: &str, outcome: &Outcome) -> Result<(), StageError> {
        let image = &outcome.image;
        let subject = self.topology.batch_subject(StageName::Persist, image.priority, &image.batch_id);
        Ok(self.bus.publish(&subject, msg_id, messages::encode(outcome)).await?)
    }
}
