//! The pool, migrations, and connections outside the pool.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use facepipe_core::database_url::DatabaseUrl;
use facepipe_core::topology::PostgresConfig;

use crate::error::DbError;
use crate::tls::Target;

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

/// A pooled connection to the pipeline's database.
#[derive(Clone)]
pub struct Db {
    pub(crate) pool: Pool,
}

/// A session-level advisory lock, held on its own connection ([`Db::try_lock`]).
pub struct AdvisoryLock {
    client: deadpool_postgres::ClientWrapper,
}

impl AdvisoryLock {
    /// `Ok` while the lock's connection stands (and so the lock is held), else why not.
    pub async fn check(&self) -> Result<(), DbError> {
        self.client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// One connection outside the pool, through the same TLS connector as the pool's:
/// for what a pool cannot do, such as creating the database the pool would connect
/// to ([`ensure_database`]). Its connection task runs on the current runtime.
pub async fn connect_one(url: &DatabaseUrl) -> Result<tokio_postgres::Client, DbError> {
    let target = Target::new(url)?;
    let (client, conn) = target.config.connect(target.tls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Creates the database named in `url` when it does not exist, via the `postgres` database.
pub async fn ensure_database(url: &DatabaseUrl) -> Result<bool, DbError> {
    let name = url.dbname().unwrap_or("postgres").to_string();
    let client = connect_one(&url.with_dbname("postgres")).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = name.replace('"', "\"\"");
        client.batch_execute(&format!("CREATE DATABASE \"{quoted}\"")).await?;
    }
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

    /// A pool for `postgres`, with the schema migrated: what a process that records to the
    /// ledger starts with.
    pub async fn open(postgres: &PostgresConfig) -> Result<Self, DbError> {
        let db = Self::connect(&postgres.url, postgres.pool_size)?;
        db.migrate().await?;
        Ok(db)
    }

    /// Takes the session-level advisory lock `key` on a connection of its own, or
    /// `None` when another process holds it: how one sweeper and one reconciler work at
    /// a time in a deployment of any size. The lock lasts as long as the returned value
    /// and its connection: a holder that dies releases it.
    pub async fn try_lock(&self, key: i64) -> Result<Option<AdvisoryLock>, DbError> {
        // Taken out of the pool: a pooled connection would keep the lock after use.
        let client = deadpool_postgres::Object::take(self.pool.get().await?);
        let row = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await?;
        Ok(row.get::<_, bool>(0).then_some(AdvisoryLock { client }))
    }

    /// A connection from the pool, for the queries that live with their one user
    /// (the dashboard's listing, the bench's measurements) rather than here.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        Ok(self.pool.get().await?)
    }
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
