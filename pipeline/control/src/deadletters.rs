//! Reading and replaying the dead-letter stream (`pipeline dead-letters`).
//!
//! Dead letters stay in the `<prefix>_DLQ` stream (limits retention) until
//! replayed. A replay first reopens what the failure recorded (the image back
//! to `pending`, a failed batch back to `ingesting`), then publishes the
//! original payload on its original subject, and only then deletes the letter.
//! Lists are pages (ids are the letters' stream sequences, so a page ends on a
//! cursor), never the whole stream at once.

use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt;

use facepipe_runtime::bus::{Bus, BusError};
use facepipe_ledger::{Db, DbError};
use facepipe_core::messages::{self, DeadLetter, ExtractJob};
use facepipe_core::topology::{StageName, Topology};

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

/// Which dead letters to read: those after id `after`, at most `limit`,
/// optionally only one batch's, or one stage's.
#[derive(Debug, Clone, Default)]
pub struct Filter<'a> {
    /// Only the letters of this batch.
    pub batch: Option<&'a str>,
    /// Only the letters of this stage.
    pub stage: Option<StageName>,
    /// Start after this id (0: from the oldest).
    pub after: u64,
    /// Most letters in the page.
    pub limit: usize,
}

/// One page of dead letters, oldest first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Page {
    /// The letters.
    pub letters: Vec<Stored>,
    /// Pass as `after` for the next page; none when this page reached the end.
    pub next_after: Option<u64>,
}

fn matches(letter: &DeadLetter, filter: &Filter<'_>) -> bool {
    let batch = filter.batch;
    let stage_ok = filter.stage.is_none_or(|s| letter.stage == s.as_str());
    stage_ok && (batch.is_none() || letter.batch_id.as_deref() == batch || job_batch(letter).as_deref() == batch)
}

/// One page of dead letters: reads the stream from `filter.after` on and stops
/// at `filter.limit` matches, so a page costs the same however many letters
/// there are (with a batch filter, plus the other batches' letters it skips).
pub async fn list(bus: &Bus, topology: &Topology, filter: &Filter<'_>) -> Result<Page, DeadLetterError> {
    let mut stream = bus.js.get_stream(topology.dead_letter_stream()).await.map_err(read_err)?;
    let state = stream.info().await.map_err(read_err)?.state.clone();
    let mut page = Page { letters: Vec::new(), next_after: None };
    if state.messages == 0 || state.last_sequence <= filter.after || filter.limit == 0 {
        return Ok(page);
    }
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: filter.after + 1 },
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
            Ok(letter) if matches(&letter, filter) => page.letters.push(Stored { id, letter }),
            Ok(_) => {}
            Err(e) => tracing::warn!(id, error = %e, "unreadable dead letter"),
        }
        if pending == 0 {
            break;
        }
        if page.letters.len() == filter.limit {
            page.next_after = Some(id);
            break;
        }
    }
    Ok(page)
}

/// The dead letters with these ids, read directly by sequence; an id that is not
/// (or no longer) a dead letter is left out.
pub async fn get(bus: &Bus, topology: &Topology, ids: &[u64]) -> Result<Vec<Stored>, DeadLetterError> {
    let stream = bus.js.get_stream(topology.dead_letter_stream()).await.map_err(read_err)?;
    let mut found = Vec::new();
    for &id in ids {
        match stream.get_raw_message(id).await {
            Ok(msg) => match messages::decode::<DeadLetter>(&msg.payload) {
                Ok(letter) => found.push(Stored { id, letter }),
                Err(e) => tracing::warn!(id, error = %e, "unreadable dead letter"),
            },
            Err(e) if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    Ok(found)
}

/// Replays every dead letter (of one batch, or all), a page at a time, so
/// memory stays bounded however many there are; returns how many were replayed.
pub async fn replay_all(bus: &Bus, db: &Db, topology: &Topology, batch: Option<&str>) -> Result<usize, DeadLetterError> {
    let (mut after, mut total) = (0, 0);
    loop {
        let page = list(bus, topology, &Filter { batch, after, limit: REPLAY_PAGE, ..Filter::default() }).await?;
        total += replay(bus, db, topology, &page.letters).await?;
        match page.next_after {
            Some(next) => after = next,
            None => return Ok(total),
        }
    }
}

/// Letters replayed per page by [`replay_all`].
const REPLAY_PAGE: usize = 1000;

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
