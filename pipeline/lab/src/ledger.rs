//! What the bench asks PostgreSQL beside the pipeline's own queries: commits,
//! latencies, the database's size.

use facepipe_ledger::{Db, DbError};

/// Size of the database on disk, tables and indexes (`pg_database_size`).
pub async fn database_bytes(db: &Db) -> Result<i64, DbError> {
    Ok(db.client().await?.query_one("SELECT pg_database_size(current_database())", &[]).await?.get(0))
}

/// Transactions this database has committed since its statistics were reset
/// (`pg_stat_database.xact_commit`, which PostgreSQL updates about once a second).
pub async fn commits(db: &Db) -> Result<i64, DbError> {
    let sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()";
    Ok(db.client().await?.query_one(sql, &[]).await?.get(0))
}

/// Seconds from each image's registration by extract to its recorded outcome, sorted.
pub async fn latencies(db: &Db, batch_id: &str) -> Result<Vec<f64>, DbError> {
    let rows = db
        .client()
        .await?
        .query(
            "SELECT extract(epoch FROM updated_at - created_at)::float8 FROM images
             WHERE batch_id = $1 AND status <> 'pending' ORDER BY 1",
            &[&batch_id],
        )
        .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}
