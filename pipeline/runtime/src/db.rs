//! PostgreSQL: connection pool, schema migrations, and every query the pipeline runs.
//!
//! Idempotency lives here. Images are inserted as `pending` by extract and
//! leave `pending` exactly once (the first outcome wins); the batch counters
//! move in the same transaction, so redelivered outcomes change nothing, and a
//! batch flips to `completed` by a conditional update that succeeds only once.

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use serde::Serialize;

use crate::postgres_tls::{handshake_failure, HandshakeFailure, Target};
use facepipe_core::database_url::DatabaseUrl;
pub use crate::postgres_tls::TlsSetupError;

use facepipe_core::domain::{BatchStatus, Detector, ImageStatus, Priority, StageName};
use facepipe_core::messages::Outcome;

mod listing;
mod results;
mod retention;

pub use listing::{BadCursor, BatchCursor, BatchFilter, BatchPage, FailureGroup};
pub use results::{ImageResult, PageStart};
pub use retention::{ObjectKind, SweepLock};

/// The schema migrations in `migrations/` (`V<n>__<name>.sql`), embedded at build
/// time and run by refinery, which records them in `refinery_schema_history`.
mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The table the pipeline's own runner kept before refinery; adopted once, then dropped.
const LEGACY_MIGRATIONS_TABLE: &str = "schema_migrations";

/// Longest wait for a connection before an operation fails as unavailable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Arbitrary constant for the advisory lock that serializes concurrent migrators.
const MIGRATION_LOCK: i64 = 0x6661_6365_7069_7065; // "facepipe"

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL could not be parsed.
    #[error("invalid database url: {0}")]
    Config(String),
    /// TLS to the server could not be set up from the URL (`sslmode`, `sslrootcert`).
    #[error("database TLS settings: {0}")]
    TlsSetup(#[from] TlsSetupError),
    /// The server's certificate failed verification (wrong CA, host name, expired...).
    #[error("TLS to PostgreSQL failed: the server's certificate could not be verified: {reason}")]
    CertificateNotVerified {
        /// Why, in words.
        reason: String,
        /// tokio-postgres's error.
        source: tokio_postgres::Error,
    },
    /// The URL's `sslmode` requires TLS and the server does not offer it.
    #[error("TLS to PostgreSQL failed: the server does not support TLS, and the URL's sslmode requires it")]
    ServerWithoutTls(#[source] tokio_postgres::Error),
    /// Another TLS failure in the handshake (protocol version, an alert from the server).
    #[error("TLS to PostgreSQL failed: {reason}")]
    TlsHandshake {
        /// Why, in words.
        reason: String,
        /// tokio-postgres's error.
        source: tokio_postgres::Error,
    },
    /// No connection could be had from the pool.
    #[error("database unavailable: {0}")]
    Pool(#[source] PoolError),
    /// A statement failed.
    #[error("database query failed: {0}")]
    Query(#[source] tokio_postgres::Error),
    /// The schema migrations could not be applied.
    #[error("schema migration failed: {0}")]
    Migration(#[from] refinery::Error),
    /// A stored value is not one the pipeline writes (the schema and the code disagree).
    #[error("unexpected value in the database: {0}")]
    Value(#[from] facepipe_core::domain::UnknownValue),
    /// A stored priority is outside 1-10.
    #[error("unexpected value in the database: {0}")]
    Priority(#[from] facepipe_core::domain::PriorityError),
    /// An outcome names an image extract never registered.
    #[error("unknown image {image_id} in batch {batch_id}")]
    UnknownImage {
        /// Batch named by the outcome.
        batch_id: String,
        /// Image named by the outcome.
        image_id: String,
    },
}

impl DbError {
    /// True when retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            // Refused certificates and servers without TLS stay transient, as refused
            // passwords do: the server's side may be fixed while the process waits.
            Self::Config(_) | Self::TlsSetup(_) | Self::UnknownImage { .. } => true,
            // Migrations that disagree with the database's history will not agree later.
            Self::Migration(e) => !matches!(e.kind(), refinery::error::Kind::Connection(..)),
            _ => false,
        }
    }
}

impl facepipe_core::retry::Classify for DbError {
    /// Outages and conflicts deserve a retry; an unknown image never will.
    fn kind(&self) -> facepipe_core::retry::ErrorKind {
        if self.is_permanent() {
            facepipe_core::retry::ErrorKind::Permanent
        } else {
            facepipe_core::retry::ErrorKind::Transient
        }
    }
}

/// A TLS failure in words, or the error as it was.
fn tls_or(e: tokio_postgres::Error, otherwise: impl FnOnce(tokio_postgres::Error) -> DbError) -> DbError {
    match handshake_failure(&e) {
        Some(HandshakeFailure::ServerWithoutTls) => DbError::ServerWithoutTls(e),
        Some(HandshakeFailure::Certificate(reason)) => DbError::CertificateNotVerified { reason, source: e },
        Some(HandshakeFailure::Other(reason)) => DbError::TlsHandshake { reason, source: e },
        None => otherwise(e),
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        tls_or(e, Self::Query)
    }
}

/// A pool whose new connection failed in the TLS handshake says why.
impl From<PoolError> for DbError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => tls_or(e, |e| Self::Pool(PoolError::Backend(e))),
            e => Self::Pool(e),
        }
    }
}

/// A pooled connection to the pipeline's database.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

/// One connection outside the pool (administration, tests), through the same TLS
/// connector as the pool's; its connection task runs on the current runtime.
pub async fn connect_one(url: &DatabaseUrl) -> Result<tokio_postgres::Client, DbError> {
    let target = Target::new(url)?;
    let (client, conn) = target.config.connect(target.tls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Creates the database named in `url` when it does not exist, via the `postgres` database.
pub async fn ensure_database(url: &DatabaseUrl) -> Result<bool, DbError> {
    let name = url.dbname().unwrap_or("postgres").to_string();
    let Target { config, tls } = Target::new(&url.with_dbname("postgres"))?;
    let (client, conn) = config.connect(tls).await?;
    let conn = tokio::spawn(conn);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = name.replace('"', "\"\"");
        client.batch_execute(&format!("CREATE DATABASE \"{quoted}\"")).await?;
    }
    drop(client);
    let _ = conn.await;
    Ok(!exists)
}

/// The migration run, under the advisory lock.
async fn migrate_locked(client: &mut tokio_postgres::Client) -> Result<Vec<i32>, DbError> {
    let exists = async |client: &tokio_postgres::Client, table: &str| -> Result<bool, DbError> {
        let row = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?;
        Ok(row.get(0))
    };
    if exists(client, LEGACY_MIGRATIONS_TABLE).await? && !exists(client, "refinery_schema_history").await? {
        // A database migrated before refinery: record what it has as applied, without running it.
        let row = client.query_one("SELECT max(version) FROM schema_migrations", &[]).await?;
        if let Some(version) = row.get::<_, Option<i32>>(0) {
            embedded::migrations::runner()
                .set_target(refinery::Target::FakeVersion(version))
                .run_async(client)
                .await?;
            tracing::info!(version, "adopted the schema history of the earlier migration runner");
        }
        client.batch_execute("DROP TABLE schema_migrations").await?;
    }
    let report = embedded::migrations::runner().set_grouped(true).run_async(client).await?;
    Ok(report.applied_migrations().iter().map(|m| m.version()).collect())
}

/// Progress of one batch, as `pipeline status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchSummary {
    /// Batch id.
    pub batch_id: String,
    /// Owner.
    pub project_id: String,
    /// 1-10.
    pub priority: Priority,
    /// Where the batch is.
    pub status: BatchStatus,
    /// Images in the archive, once known.
    pub image_count: Option<i32>,
    /// Images with a terminal outcome.
    pub processed: i32,
    /// Of those, failed ones.
    pub failed: i32,
    /// Faces found so far.
    pub faces: i32,
    /// Archive entries that were not images.
    pub skipped: i32,
    /// Share of images processed, 0-100 (0 while the count is unknown).
    pub progress_percent: f64,
    /// Why the batch failed, when it did.
    pub error: Option<String>,
    /// When the batch was created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When its last image was recorded.
    pub completed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When its row last changed (an outcome recorded, a state change).
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// The columns [`batch_summary`] reads, in its order.
pub(crate) const BATCH_COLUMNS: &str = "batch_id, project_id, priority, status, image_count, processed, failed,
     faces, skipped_count, error, created_at, completed_at, updated_at";

/// A batch row, selected with [`BATCH_COLUMNS`].
pub(crate) fn batch_summary(r: &tokio_postgres::Row) -> Result<BatchSummary, DbError> {
    let image_count: Option<i32> = r.get(4);
    let processed: i32 = r.get(5);
    let progress_percent = match image_count {
        Some(0) => 100.0,
        Some(n) => (processed as f64 * 100.0 / n as f64).min(100.0),
        None => 0.0,
    };
    Ok(BatchSummary {
        batch_id: r.get(0),
        project_id: r.get(1),
        priority: Priority::new(r.get::<_, i16>(2).into())?,
        status: r.get::<_, &str>(3).parse()?,
        image_count,
        processed,
        failed: r.get(6),
        faces: r.get(7),
        skipped: r.get(8),
        progress_percent,
        error: r.get(9),
        created_at: r.get(10),
        completed_at: r.get(11),
        updated_at: r.get(12),
    })
}

/// A newly registered image.
#[derive(Debug, Clone)]
pub struct NewImage {
    /// Image id.
    pub image_id: String,
    /// ZIP entry name, or the image's URL.
    pub entry_name: String,
    /// Original object key; empty for an entry that could not be read.
    pub original_key: String,
    /// The caller's id for an image given by URL.
    pub record_id: Option<String>,
}

/// What recording an outcome changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// False when the image already had an outcome (a redelivery): nothing changed.
    pub first: bool,
    /// True when this outcome completed its batch.
    pub completed_batch: bool,
    /// The batch's counters right after this outcome (absent when nothing changed).
    pub progress: Option<Progress>,
}

/// A batch's progress event, published on `<progress_subject>.<batch>` by persist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Progress {
    /// Batch id.
    pub batch_id: String,
    /// Images with an outcome.
    pub processed: i32,
    /// Of those, failed.
    pub failed: i32,
    /// Images in the archive, once extract has read it all.
    pub image_count: Option<i32>,
    /// True on the event that completed the batch.
    pub completed: bool,
}

impl Db {
    /// Builds a pool for `url` (connections are opened lazily).
    pub fn connect(url: &DatabaseUrl, pool_size: usize) -> Result<Self, DbError> {
        let Target { mut config, tls } = Target::new(url)?;
        // Fail fast while the server is down, so callers can back off instead of hanging.
        config.connect_timeout(CONNECT_TIMEOUT);
        let manager = Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| DbError::Config(e.to_string()))?;
        Ok(Self { pool })
    }

    /// Applies the migrations not yet applied, each group in one transaction, and
    /// returns their versions. Safe to run from many processes at once.
    pub async fn migrate(&self) -> Result<Vec<i32>, DbError> {
        let mut client = self.pool.get().await?;
        // refinery does not serialize concurrent runners; a session lock on this connection does.
        client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
        let result = migrate_locked(&mut client).await;
        let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
        let applied = result?;
        unlocked?;
        Ok(applied)
    }

    /// Cheap connectivity check.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.pool.get().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Registers a batch (no-op when it exists).
    pub async fn insert_batch(
        &self,
        batch_id: &str,
        project_id: &str,
        priority: Priority,
        source: &str,
    ) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO batches (batch_id, project_id, priority, source)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (batch_id) DO NOTHING",
                &[&batch_id, &project_id, &i16::from(priority.get()), &source],
            )
            .await?;
        Ok(())
    }

    /// Registers images as `pending` (existing rows are left alone).
    pub async fn insert_images(&self, batch_id: &str, images: &[NewImage]) -> Result<(), DbError> {
        if images.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = images.iter().map(|i| i.image_id.as_str()).collect();
        let names: Vec<&str> = images.iter().map(|i| i.entry_name.as_str()).collect();
        let keys: Vec<&str> = images.iter().map(|i| i.original_key.as_str()).collect();
        let records: Vec<Option<&str>> = images.iter().map(|i| i.record_id.as_deref()).collect();
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO images (batch_id, image_id, entry_name, original_key, record_id)
                 SELECT $1, id, name, NULLIF(key, ''), record
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS t(id, name, key, record)
                 ON CONFLICT (batch_id, image_id) DO NOTHING",
                &[&batch_id, &ids, &names, &keys, &records],
            )
            .await?;
        Ok(())
    }

    /// Marks the archive fully read: the image count is now known. Returns true when
    /// this also completed the batch (every image already had an outcome, or none exist).
    pub async fn finish_ingest(
        &self,
        batch_id: &str,
        image_count: usize,
        skipped: &[String],
    ) -> Result<bool, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE batches SET image_count = $2, skipped_count = $3, skipped_entries = $4,
                    status = 'processing', updated_at = now()
             WHERE batch_id = $1 AND status = 'ingesting'",
            &[&batch_id, &(image_count as i32), &(skipped.len() as i32), &serde_json::json!(skipped)],
        )
        .await?;
        let completed = try_complete(&tx, batch_id).await?;
        tx.commit().await?;
        Ok(completed)
    }

    /// Marks a batch failed as a whole (its archive could not be read).
    pub async fn fail_batch(&self, batch_id: &str, error: &str) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE batches SET status = 'failed', error = $2, updated_at = now(), completed_at = now()
                 WHERE batch_id = $1 AND status IN ('ingesting', 'processing')",
                &[&batch_id, &error],
            )
            .await?;
        Ok(())
    }

    /// Records an image's outcome. Only the first outcome for an image counts.
    pub async fn record_outcome(&self, outcome: &Outcome) -> Result<Recorded, DbError> {
        // One statement, so one round trip and one implicit transaction instead of
        // five: the image's row is claimed (only while pending, so a redelivery
        // changes nothing), and only then the batch's counters move and, when this
        // was its last image, the batch completes. The batch's row lock orders
        // outcomes of one batch, so exactly one of them sees the count reach
        // `image_count` in a `processing` batch: that one completes it.
        let client = self.pool.get().await?;
        let image = &outcome.image;
        let faces = serde_json::to_value(&outcome.faces).expect("faces serialize");
        // Prepared once per connection: a parse is a round trip of its own.
        let statement = client
            .prepare_cached(
                "WITH claimed AS (
                     UPDATE images SET status = $3, width = $4, height = $5, faces = $6, crop_keys = $7,
                            detector = $8, error = $9, failed_stage = $10, attempts = $11, updated_at = now()
                     WHERE batch_id = $1 AND image_id = $2 AND status = 'pending'
                     RETURNING 1
                 ), counted AS (
                     UPDATE batches SET processed = processed + 1, failed = failed + $12, faces = faces + $13,
                            updated_at = now(),
                            completed_at = CASE WHEN status = 'processing' AND processed + 1 >= image_count
                                                THEN now() ELSE completed_at END,
                            status = CASE WHEN status = 'processing' AND processed + 1 >= image_count
                                          THEN 'completed' ELSE status END
                     WHERE batch_id = $1 AND EXISTS (SELECT 1 FROM claimed)
                     RETURNING processed, failed, image_count,
                               COALESCE(status = 'completed' AND processed = image_count, false)
                 )
                 SELECT EXISTS (SELECT 1 FROM claimed),
                        EXISTS (SELECT 1 FROM images WHERE batch_id = $1 AND image_id = $2),
                        counted.*
                 FROM (SELECT 1) AS one LEFT JOIN counted ON true",
            )
            .await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &image.batch_id,
                    &image.image_id,
                    &outcome.status.as_str(),
                    &outcome.width.map(|v| v as i32),
                    &outcome.height.map(|v| v as i32),
                    &faces,
                    &outcome.crop_keys,
                    &outcome.detector.map(Detector::as_str),
                    &outcome.error,
                    &outcome.failed_stage.map(StageName::as_str),
                    &(outcome.attempts as i32),
                    &i32::from(outcome.status == ImageStatus::Failed),
                    &(outcome.faces.len() as i32),
                ],
            )
            .await?;
        let (claimed, exists): (bool, bool) = (row.get(0), row.get(1));
        if !claimed {
            return if exists {
                Ok(Recorded { first: false, completed_batch: false, progress: None })
            } else {
                Err(DbError::UnknownImage { batch_id: image.batch_id.clone(), image_id: image.image_id.clone() })
            };
        }
        // Claimed but no batch row: the batch was deleted under it; nothing to count.
        let Some(processed) = row.get::<_, Option<i32>>(2) else {
            return Ok(Recorded { first: true, completed_batch: false, progress: None });
        };
        let completed_batch: bool = row.get(5);
        let progress = Progress {
            batch_id: image.batch_id.clone(),
            processed,
            failed: row.get(3),
            image_count: row.get(4),
            completed: completed_batch,
        };
        Ok(Recorded { first: true, completed_batch, progress: Some(progress) })
    }

    /// Returns a failed image to `pending` (and its batch to `processing`) so a
    /// replayed message can record a new outcome. True when the image was failed.
    pub async fn reopen_image(&self, batch_id: &str, image_id: &str) -> Result<bool, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let reopened = tx
            .execute(
                "UPDATE images SET status = 'pending', error = NULL, failed_stage = NULL, updated_at = now()
                 WHERE batch_id = $1 AND image_id = $2 AND status = 'failed'",
                &[&batch_id, &image_id],
            )
            .await?;
        if reopened == 1 {
            tx.execute(
                "UPDATE batches SET processed = processed - 1, failed = failed - 1, updated_at = now(),
                        completed_at = NULL,
                        status = CASE WHEN status = 'completed' THEN 'processing' ELSE status END
                 WHERE batch_id = $1",
                &[&batch_id],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(reopened == 1)
    }

    /// Returns a failed batch to `ingesting` so a replayed extract job can read it again.
    pub async fn reopen_batch(&self, batch_id: &str) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE batches SET status = 'ingesting', error = NULL, completed_at = NULL, updated_at = now()
                 WHERE batch_id = $1 AND status = 'failed'",
                &[&batch_id],
            )
            .await?;
        Ok(n == 1)
    }

    /// A batch's progress, or `None` when it does not exist.
    pub async fn batch_status(&self, batch_id: &str) -> Result<Option<BatchSummary>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = $1"), &[&batch_id])
            .await?;
        row.as_ref().map(batch_summary).transpose()
    }

    /// Images that failed, per stage that gave up on them, over all batches.
    pub async fn failed_by_stage(&self) -> Result<std::collections::BTreeMap<String, i64>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT coalesce(failed_stage, '?'), count(*) FROM images WHERE status = 'failed' GROUP BY 1",
                &[],
            )
            .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Size of the database on disk, tables and indexes (`pg_database_size`).
    pub async fn database_bytes(&self) -> Result<i64, DbError> {
        let client = self.pool.get().await?;
        Ok(client.query_one("SELECT pg_database_size(current_database())", &[]).await?.get(0))
    }

    /// Transactions this database has committed since its statistics were reset
    /// (`pg_stat_database.xact_commit`, which PostgreSQL updates about once a second).
    pub async fn commits(&self) -> Result<i64, DbError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_one("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()", &[])
            .await?
            .get(0))
    }

    /// Seconds from each image's registration by extract to its recorded outcome, sorted.
    pub async fn latencies(&self, batch_id: &str) -> Result<Vec<f64>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT extract(epoch FROM updated_at - created_at)::float8 FROM images
                 WHERE batch_id = $1 AND status <> 'pending' ORDER BY 1",
                &[&batch_id],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }
}

/// Flips a batch to `completed` when every image has an outcome; true only for the call that flipped it.
async fn try_complete(tx: &deadpool_postgres::Transaction<'_>, batch_id: &str) -> Result<bool, DbError> {
    let flipped = tx
        .execute(
            "UPDATE batches SET status = 'completed', completed_at = now(), updated_at = now()
             WHERE batch_id = $1 AND status = 'processing' AND processed >= image_count",
            &[&batch_id],
        )
        .await?;
    Ok(flipped == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_tls_settings_are_permanent() {
        let url = "postgres://u:p@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem".parse().unwrap();
        let e = Db::connect(&url, 1).err().unwrap();
        assert!(matches!(e, DbError::TlsSetup(_)) && e.is_permanent(), "{e:?}");
    }
}
