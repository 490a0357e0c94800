//! One stage's handler, run by a test as the runtime would run it: a [`Ctx`] on a real
//! nats-server with the topology's streams and consumers applied, and an object store
//! in memory (the in-memory store is `object_store`'s own, for unit tests).

use std::sync::Arc;

use bytes::Bytes;
use facepipe_core::topology::{StageName, Topology};
use facepipe_runtime::bus::{self, Bus};
use facepipe_runtime::health::Health;
use facepipe_runtime::store::Store;
use facepipe_runtime::{Ctx, Delivery};

use crate::{repo_topology, NatsServer};

/// A stage's context and the server under it; the server stops when this drops.
pub struct StageHarness {
    /// What the handler is given.
    pub ctx: Arc<Ctx>,
    /// The nats-server.
    pub nats: NatsServer,
}

/// A message a stage published, as JetStream stored it.
#[derive(Debug)]
pub struct Published {
    /// Its subject (the band's).
    pub subject: String,
    /// Its `Nats-Msg-Id`.
    pub msg_id: Option<String>,
    /// Its JSON.
    pub payload: Bytes,
}

impl StageHarness {
    /// `stage` on a fresh nats-server, with the repository's topology (after `edit`) applied.
    pub async fn start(stage: StageName, edit: impl FnOnce(&mut Topology)) -> Self {
        let nats = NatsServer::start();
        let mut topology = repo_topology();
        topology.nats.url = nats.url.parse().unwrap();
        edit(&mut topology);
        let bus = Bus::connect(&topology.nats, "facepipe-test", false).await.unwrap();
        let plan = bus::plan(&bus, &topology).await.unwrap();
        bus::apply(&bus, &topology, &plan).await.unwrap();
        let ctx = Ctx::new(stage, topology, bus, Store::in_memory(), Arc::new(Health::default()));
        Self { ctx: Arc::new(ctx), nats }
    }

    /// A first delivery, as the runtime describes it to the handler.
    pub fn first_delivery() -> Delivery {
        Delivery { attempt: 1, stream_sequence: 1, published: "2026-12-07T00:00:00Z".into() }
    }

    /// Every message now in `stage`'s input stream, in order.
    pub async fn published_to(&self, stage: StageName) -> Vec<Published> {
        let stream = self.ctx.bus.js.get_stream(self.ctx.topology.stream_name(stage)).await.unwrap();
        let last = stream.get_info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                let msg_id = m.headers.get("Nats-Msg-Id").map(|v| v.to_string());
                out.push(Published { subject: m.subject.to_string(), msg_id, payload: m.payload });
            }
        }
        out
    }
}
