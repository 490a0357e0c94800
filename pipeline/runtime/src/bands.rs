//! Weighted pulling from a stage's priority bands.
//!
//! Each band (see `[priority]` in the topology) has its own durable consumer.
//! A worker asks the bands in a smooth weighted round robin (nginx's): with
//! weights 6:3:1 and every band busy, six pulls in ten go to the high band,
//! three to normal and one to low, interleaved, so low priority never starves;
//! a band with nothing waiting gives its turn to the next. The last band asked
//! is long-polled for up to 50 ms, so work arriving in any band is picked up
//! quickly, and a band found empty is not asked again for 100 ms while another
//! band is asked (each ask is a round trip to nats-server).

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::Message;
use futures::stream::BoxStream;
use futures::StreamExt;

use facepipe_core::topology::StageBand;

/// A stage's band consumers and the round robin's state.
pub struct BandPuller {
    bands: Vec<(StageBand, PullConsumer)>,
    turns: WeightedTurns,
    /// Per band: found empty until then, so a busy worker does not spend a round
    /// trip per pull asking bands that had nothing a moment ago.
    empty_until: Vec<tokio::time::Instant>,
    /// The band that last delivered: the one waited on when every band was empty
    /// a moment ago, so a stage fed from one band picks its work up at once.
    home: usize,
}

/// How long an idle worker long-polls one band before asking them all again: the
/// most a message arriving in another band waits, at the price of a few idle
/// pull requests a second.
const IDLE_BAND_WAIT: Duration = Duration::from_millis(50);

/// How long a band found empty is skipped (while another band has work).
const EMPTY_BAND_BACKOFF: Duration = Duration::from_millis(100);

/// How long a no-wait pull may go unanswered before it counts as failed.
const NO_WAIT_ANSWER: Duration = Duration::from_secs(5);

/// Smooth weighted round robin over bands.
#[derive(Debug, Clone)]
pub struct WeightedTurns {
    weights: Vec<u32>,
    scores: Vec<i64>,
}

impl WeightedTurns {
    /// Turns for bands of these weights.
    pub fn new(weights: Vec<u32>) -> Self {
        let scores = vec![0; weights.len()];
        Self { weights, scores }
    }

    /// The bands in the order the next pull asks them: the band whose turn it
    /// is, then the others by weight.
    pub fn next_order(&mut self) -> Vec<usize> {
        let total: i64 = self.weights.iter().map(|w| i64::from(*w)).sum();
        for (score, weight) in self.scores.iter_mut().zip(&self.weights) {
            *score += i64::from(*weight);
        }
        let turn = (0..self.weights.len()).max_by_key(|&i| (self.scores[i], -(i as i64))).unwrap_or(0);
        self.scores[turn] -= total;
        let mut order: Vec<usize> = (0..self.weights.len()).filter(|&i| i != turn).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.weights[i]));
        order.insert(0, turn);
        order
    }
}

/// A pull request failed (NATS unreachable, consumer deleted).
#[derive(Debug, thiserror::Error)]
#[error("pull from band `{band}` failed: {reason}")]
pub struct PullError {
    /// The band asked.
    pub band: String,
    /// Why.
    pub reason: String,
}

impl BandPuller {
    /// A puller over `bands` (highest first).
    pub fn new(bands: Vec<(StageBand, PullConsumer)>) -> Self {
        let turns = WeightedTurns::new(bands.iter().map(|(b, _)| b.weight).collect());
        let empty_until = vec![tokio::time::Instant::now(); bands.len()];
        Self { bands, turns, empty_until, home: 0 }
    }

    /// Up to `want` messages from the first band, in this turn's order, that has
    /// any ready; when none has, waits up to `wait` on the last band asked.
    /// Messages are yielded as they arrive, so work starts on the first at once.
    ///
    /// Bands found empty within [`EMPTY_BAND_BACKOFF`] are not asked again, and the
    /// last band asked gets a long poll rather than a no-wait pull followed by one:
    /// a long poll answers at once when messages are ready. A stage fed from one
    /// band thus makes one pull request per pull, not one per band plus one.
    pub async fn pull(&mut self, want: usize, wait: Duration) -> Result<BoxStream<'static, Message>, PullError> {
        let order = self.turns.next_order();
        if self.bands.len() == 1 {
            let (band, consumer) = &self.bands[0];
            let batch = consumer.batch().max_messages(want).expires(wait).messages().await.map_err(|e| fail(band, e))?;
            return Ok(messages(batch).boxed());
        }
        let now = tokio::time::Instant::now();
        let mut fresh: Vec<usize> = order.iter().copied().filter(|&i| self.empty_until[i] <= now).collect();
        // Every band was empty a moment ago: wait on the one that last had work.
        let last = fresh.pop().unwrap_or(self.home);
        for i in fresh {
            let (band, consumer) = &self.bands[i];
            let mut batch = consumer.fetch().max_messages(want).messages().await.map_err(|e| fail(band, e))?;
            // The server answers a no-wait pull at once; a request lost in a reconnect gets no
            // answer, and the client would wait for it forever.
            let first = tokio::time::timeout(NO_WAIT_ANSWER, batch.next())
                .await
                .map_err(|_| fail(band, format!("no answer to a pull within {NO_WAIT_ANSWER:?}")))?;
            if let Some(Ok(first)) = first {
                self.home = i;
                return Ok(futures::stream::once(std::future::ready(first)).chain(messages(batch)).boxed());
            }
            self.empty_until[i] = tokio::time::Instant::now() + EMPTY_BAND_BACKOFF;
        }
        let (band, consumer) = &self.bands[last];
        // Wait briefly: work may arrive in another band meanwhile.
        let batch = consumer.batch().max_messages(want).expires(wait.min(IDLE_BAND_WAIT)).messages().await.map_err(|e| fail(band, e))?;
        let mut batch = messages(batch).boxed().peekable();
        if std::pin::Pin::new(&mut batch).peek().await.is_some() {
            self.home = last;
        } else {
            // Empty for the whole wait: ask the other bands first next time.
            self.empty_until[last] = tokio::time::Instant::now() + EMPTY_BAND_BACKOFF;
        }
        Ok(batch.boxed())
    }
}

fn fail(band: &StageBand, e: impl std::fmt::Display) -> PullError {
    PullError { band: band.name.clone(), reason: e.to_string() }
}

/// The messages of a pull, ending at its first error (the request expired or the server ended it).
fn messages(batch: async_nats::jetstream::consumer::pull::Batch) -> impl futures::Stream<Item = Message> {
    batch
        .take_while(|next| {
            if let Err(e) = next {
                tracing::debug!(error = %e, "pull batch ended");
            }
            std::future::ready(next.is_ok())
        })
        .filter_map(|next| std::future::ready(next.ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_follow_the_weights_interleaved() {
        let mut turns = WeightedTurns::new(vec![6, 3, 1]);
        let firsts: Vec<usize> = (0..10).map(|_| turns.next_order()[0]).collect();
        assert_eq!(firsts.iter().filter(|&&b| b == 0).count(), 6);
        assert_eq!(firsts.iter().filter(|&&b| b == 1).count(), 3);
        assert_eq!(firsts.iter().filter(|&&b| b == 2).count(), 1, "the low band gets its turn: {firsts:?}");
        assert_ne!(&firsts[..2], &[0, 0], "smooth: the heavy band does not take its turns in one run");
        // Every order names every band once, so an empty band passes its turn on.
        let mut order = turns.next_order();
        order.sort();
        assert_eq!(order, vec![0, 1, 2]);
    }

    #[test]
    fn one_band_is_always_first() {
        let mut turns = WeightedTurns::new(vec![1]);
        assert!((0..5).all(|_| turns.next_order() == vec![0]));
    }
}
