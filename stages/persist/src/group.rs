//! Group commit: outcomes that arrive while a commit is in flight are recorded together
//! by the next one, in one statement ([`Db::record_outcomes`]). Nothing waits on a
//! timer: a lone outcome is committed at once, and under load the groups grow by
//! themselves, up to [`MAX_GROUP`]. Each handler call waits for the commit that holds
//! its outcome, so its message is acked only once the outcome is in PostgreSQL.

use facepipe_core::messages::Outcome;
use facepipe_core::telemetry;
use facepipe_ledger::{Db, DbError, Recorded};
use tokio::sync::{mpsc, oneshot};

/// The most outcomes one statement records.
pub const MAX_GROUP: usize = 256;

/// What a waiting handler gets back: its outcome's result, or the group's failure.
type Answer = Result<Recorded, DbError>;

/// The committer's queue; the committer runs as long as one sender lives.
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<(Outcome, oneshot::Sender<Answer>)>,
}

impl Committer {
    /// Starts the committer task on `db`.
    pub fn start(db: Db) -> Self {
        let (queue, arrivals) = mpsc::channel(MAX_GROUP * 4);
        tokio::spawn(commit_groups(db, arrivals));
        Self { queue }
    }

    /// Records `outcome` with the next group; returns once that group is committed.
    pub async fn record(&self, outcome: Outcome) -> Answer {
        let (answer, answered) = oneshot::channel();
        if self.queue.send((outcome, answer)).await.is_err() {
            return Err(DbError::Stored("the outcome committer has stopped".into()));
        }
        answered.await.unwrap_or_else(|_| Err(DbError::Stored("the outcome committer has stopped".into())))
    }
}

/// Commits what has arrived, one group at a time, until every sender is gone.
async fn commit_groups(db: Db, mut arrivals: mpsc::Receiver<(Outcome, oneshot::Sender<Answer>)>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while arrivals.recv_many(&mut group, MAX_GROUP).await > 0 {
        let outcomes: Vec<&Outcome> = group.iter().map(|(o, _)| o).collect();
        metrics::counter!(telemetry::OUTCOME_GROUPS).increment(1);
        metrics::counter!(telemetry::GROUPED_OUTCOMES).increment(outcomes.len() as u64);
        match db.record_outcomes(&outcomes).await {
            Ok(results) => {
                for ((_, answer), result) in group.drain(..).zip(results) {
                    let _ = answer.send(result);
                }
            }
            Err(e) => {
                // Nothing of the group was recorded: each message is retried as it would be alone.
                let shared = std::sync::Arc::new(e);
                for (_, answer) in group.drain(..) {
                    let _ = answer.send(Err(DbError::Group(shared.clone())));
                }
            }
        }
    }
}
