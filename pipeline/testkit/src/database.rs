//! PostgreSQL for the tests: a fresh database per test, one connection through the
//! pipeline's own connector, and a proxy that cuts the database without stopping it.
//!
//! `$PIPELINE_TEST_DATABASE_URL` (default `postgres://facepipe:facepipe@127.0.0.1:5432/postgres`,
//! the role `scripts/setup` makes) names a server where the tests may create and drop
//! databases (and, with `scripts/setup --test`, roles). Its `sslmode` and `sslrootcert`
//! apply to every connection the tests make.

use facepipe_ledger::Db;

/// The URL of a PostgreSQL server where tests may create databases (and roles).
pub fn admin_url() -> String {
    std::env::var("PIPELINE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://facepipe:facepipe@127.0.0.1:5432/postgres".into())
}

/// The port of the tests' PostgreSQL server.
pub fn connect_port() -> u16 {
    let url: facepipe_core::database_url::DatabaseUrl = admin_url().parse().unwrap();
    url.config().get_ports().first().copied().unwrap_or(5432)
}

/// One connection, through the pipeline's own connector (the URL's `sslmode` applies).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    facepipe_ledger::connect_one(&url.parse().expect("a database URL"))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL for tests unreachable (PIPELINE_TEST_DATABASE_URL): {e}"))
}

async fn admin_exec(url: &str, sql: &str) {
    connect(url).await.batch_execute(sql).await.unwrap();
}

/// A fresh PostgreSQL database, dropped on drop.
pub struct TestDb {
    /// URL of the fresh database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDb {
    /// Creates a uniquely named database.
    pub async fn create() -> Self {
        let admin_url = admin_url();
        let name = format!("facepipe_test_{}_{}", std::process::id(), rand::random::<u32>());
        admin_exec(&admin_url, &format!("CREATE DATABASE {name}")).await;
        // The query (sslmode, sslrootcert=/a/path) carries over to the new database.
        let (path, query) = admin_url.split_once('?').map_or((admin_url.as_str(), String::new()), |(p, q)| (p, format!("?{q}")));
        let base = path.rsplit_once('/').unwrap().0;
        Self { url: format!("{base}/{name}{query}"), admin_url, name }
    }

    /// A connection to the database, for checks beside the pipeline's own queries.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// A migrated pool on the database.
    pub async fn pool(&self) -> Db {
        let db = Db::connect(&self.url.parse().unwrap(), 4).unwrap();
        db.migrate().await.unwrap();
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (url, sql) = (self.admin_url.clone(), format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        // Drop may run inside a runtime; do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(admin_exec(&url, &sql))
        })
        .join();
    }
}

/// A TCP proxy in front of PostgreSQL that the test can cut: while down it
/// closes every open connection and refuses new ones, as a stopped server would,
/// without stopping the shared server other tests use.
pub struct PgProxy {
    /// Port the proxy listens on.
    pub port: u16,
    down: tokio::sync::watch::Sender<bool>,
}

impl PgProxy {
    /// Starts a proxy to the PostgreSQL of `PIPELINE_TEST_DATABASE_URL`.
    pub async fn start() -> Self {
        let config: tokio_postgres::Config = admin_url().parse().unwrap();
        let target_port = config.get_ports().first().copied().unwrap_or(5432);
        let target = format!("127.0.0.1:{target_port}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if *watch.borrow() {
                    continue; // dropped: connection refused, as far as the client can tell
                }
                let target = target.clone();
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Self { port, down }
    }

    /// Cuts (true) or restores (false) the database.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    /// `url` with its host and port replaced by the proxy's (its password kept).
    pub fn url_for(&self, url: &facepipe_core::database_url::DatabaseUrl) -> facepipe_core::database_url::DatabaseUrl {
        let shown = url.to_string();
        let (scheme_user, rest) = shown.split_once('@').unwrap();
        let db = rest.split_once('/').unwrap().1;
        let mut proxied: facepipe_core::database_url::DatabaseUrl = format!("{scheme_user}@127.0.0.1:{}/{db}", self.port).parse().unwrap();
        if let Some(password) = url.config().get_password() {
            proxied.set_password(&String::from_utf8_lossy(password).into_owned().into());
        }
        proxied
    }
}
