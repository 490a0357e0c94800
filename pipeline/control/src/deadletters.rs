//! Reading and replaying the dead-letter stream (`pipeline dead-letters`).
//!
//! Dead letters stay in the `<prefix>_DLQ` stream (limits retention) until
//! replayed. A replay first reopens what the failure recorded (the image back
//! to `pending`, a failed batch back to `ingesting`), then publishes the
//! original payload on its original subject, and only then deletes the letter.

use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt;

use facepipe_runtime::bus::{Bus, BusError};
use facepipe_runtime::db::{Db, DbError};
use facepipe_core::messages::{self, DeadLetter, ExtractJob};
use facepipe_core::topology::Topology;

/// Why listing or replaying failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// NATS failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// PostgreSQL failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Reading the stream failed.
    #[error("reading dead letters: {0}")]
    Read(String),
}

/// A dead letter and its id (its sequence in the dead-letter stream).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stored {
    /// Id to name it in `replay --id`.
    pub id: u64,
    /// The letter.
    #[serde(flatten)]
    pub letter: DeadLetter,
}

fn read_err(e: impl std::fmt::Display) -> DeadLetterError {
    DeadLetterError::Read(e.to_string())
}

/// Every dead letter, oldest first, optionally only those of one batch.
pub async fn list(bus: &Bus, topology: &Topology, batch: Option<&str>) -> Result<Vec<Stored>, DeadLetterError> {
    let mut stream = bus.js.get_stream(topology.dead_letter_stream()).await.map_err(read_err)?;
    let count = stream.info().await.map_err(read_err)?.state.messages;
    let mut letters = Vec::new();
    if count == 0 {
        return Ok(letters);
    }
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(read_err)?;
    let mut messages = reader.messages().await.map_err(read_err)?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let Ok(Some(Ok(msg))) = next else { break };
        let info = msg.info().map_err(read_err)?;
        let (id, pending) = (info.stream_sequence, info.pending);
        match messages::decode::<DeadLetter>(&msg.payload) {
            Ok(letter) if batch.is_none() || letter.batch_id.as_deref() == batch || job_batch(&letter).as_deref() == batch => {
                letters.push(Stored { id, letter })
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(id, error = %e, "unreadable dead letter"),
        }
        if pending == 0 {
            break;
        }
    }
    Ok(letters)
}

/// The batch id named inside an extract job's payload, if any.
fn job_batch(letter: &DeadLetter) -> Option<String> {
    messages::decode::<ExtractJob>(letter.payload.as_bytes()).ok().and_then(|j| j.batch_id)
}

/// Replays the given letters; returns how many were put back on their subjects.
pub async fn replay(bus: &Bus, db: &Db, topology: &Topology, letters: &[Stored]) -> Result<usize, DeadLetterError> {
    let stream = bus.js.get_stream(topology.dead_letter_stream()).await.map_err(read_err)?;
    let mut replayed = 0;
    for stored in letters {
        let letter = &stored.letter;
        if let (Some(batch), Some(image)) = (&letter.batch_id, &letter.image_id) {
            db.reopen_image(batch, image).await?;
        }
        if let Some(batch) = job_batch(letter) {
            db.reopen_batch(&batch).await?;
        }
        let msg_id = format!("replay:{}:{}", topology.dead_letter_stream(), stored.id);
        bus.publish(&letter.subject, &msg_id, letter.payload.clone().into_bytes().into()).await?;
        stream.delete_message(stored.id).await.map_err(read_err)?;
        replayed += 1;
    }
    Ok(replayed)
}
