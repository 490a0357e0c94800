//! The object store holding originals and crops (`file://` or `s3://`).
//!
//! An `s3://bucket/prefix` store takes its endpoint, region and `allow_http`
//! from the topology's `[object_store]` (each falling back to its `AWS_*`
//! variable) and its keys from the environment only. Requests that fail on the
//! way (connection refused, reset, 5xx) are retried in place with a short
//! capped backoff for up to [`S3_RETRY_TIMEOUT`], so a brief outage of the
//! server costs time, not deliveries; past that the error reaches the stage,
//! which Naks the message and pauses while [`Store::ping`] fails.
//!
//! Large objects are read in place: [`Store::reader`] gives a `Read + Seek`
//! over a local file, or over ranged GETs of a remote object holding one
//! window of [`RANGE_BYTES`] at a time ([`RangedReader`]).

use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, PutPayload, RetryConfig};
use tokio::io::AsyncWriteExt;

use facepipe_core::telemetry::{self, Step};
use facepipe_core::topology::ObjectStoreConfig;

/// Bytes one ranged GET of [`RangedReader`] fetches: the most of a remote archive held at once.
pub const RANGE_BYTES: u64 = 8 << 20;

/// How long an S3 request is retried in place (connection errors, timeouts, 5xx) before it fails.
pub const S3_RETRY_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest pause between two in-place retries: a server back from an outage is used within it.
pub const S3_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why an object-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is not one we can open.
    #[error("invalid object store url `{0}`")]
    BadUrl(String),
    /// No object under this key.
    #[error("object `{0}` not found")]
    NotFound(String),
    /// The key is not a valid relative path.
    #[error("invalid object key `{0}`")]
    InvalidKey(String),
    /// The backend failed (I/O, network, permissions).
    #[error("object store: {0}")]
    Backend(#[from] object_store::Error),
    /// Local file I/O around the store failed.
    #[error("object store i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The store's disk (or quota) is full: the write waits for space, it does not fail.
    #[error("the object store is full (no space left for `{key}`)")]
    Full {
        /// The key that could not be written.
        key: String,
        /// The error that said so.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// True when `error`, or one of its causes, is a full disk or quota (ENOSPC, EDQUOT).
pub fn is_no_space(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::StorageFull || io.kind() == std::io::ErrorKind::QuotaExceeded {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

impl facepipe_core::error::Classify for StoreError {
    /// A missing object or a bad key will not appear on retry; an outage may end.
    fn kind(&self) -> facepipe_core::error::ErrorKind {
        use facepipe_core::error::ErrorKind;
        match self {
            StoreError::NotFound(_) | StoreError::InvalidKey(_) => ErrorKind::Permanent,
            StoreError::Full { .. } => ErrorKind::Full,
            _ => ErrorKind::Transient,
        }
    }
}

/// Bytes a readiness probe writes into a local store: about one crop, so a disk that
/// cannot take a crop is found full.
const PROBE_BYTES: usize = 64 << 10;

/// Writes and removes a probe file in `root`; [`StoreError::Full`] when there is no room.
async fn probe_write(root: &std::path::Path) -> Result<(), StoreError> {
    let probe = root.join(format!(".facepipe-probe-{}", std::process::id()));
    let written = tokio::fs::write(&probe, vec![0u8; PROBE_BYTES]).await;
    let _ = tokio::fs::remove_file(&probe).await;
    match written {
        Ok(()) => Ok(()),
        Err(e) if is_no_space(&e) => Err(StoreError::Full { key: ".facepipe-probe".into(), source: Box::new(e) }),
        Err(e) => Err(StoreError::Io(e)),
    }
}

/// Objects listed and deleted per round when a prefix is deleted.
const DELETE_PAGE: usize = 1000;

/// A handle on the configured object store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The same store answering at once: no retries, short timeouts (readiness probes).
    probe: Arc<dyn ObjectStore>,
    /// Filesystem root when the store is local, so large objects can be read in place.
    local_root: Option<PathBuf>,
    /// Key prefix inside the bucket (`s3://bucket/prefix`).
    prefix: Path,
}

/// An S3 client for `config`: the `AWS_*` variables first, then the topology's settings over them.
fn s3_client(config: &ObjectStoreConfig, retry: RetryConfig, timeouts: &[(ClientConfigKey, &str)]) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let mut builder = AmazonS3Builder::from_env().with_url(&config.url).with_retry(retry);
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &config.region {
        builder = builder.with_region(region);
    }
    if let Some(allow_http) = config.allow_http {
        builder = builder.with_allow_http(allow_http);
    }
    for (key, value) in timeouts {
        builder = builder.with_config(AmazonS3ConfigKey::Client(*key), *value);
    }
    Ok(Arc::new(builder.build()?))
}

impl Store {
    /// Opens `file:///abs`, `file://relative` (from the working directory) or
    /// `s3://bucket/prefix` as `config` describes it. S3 keys come from the environment.
    pub fn open(config: &ObjectStoreConfig) -> Result<Self, StoreError> {
        let url = config.url.as_str();
        if let Some(path) = url.strip_prefix("file://") {
            let root = std::path::absolute(if path.is_empty() { "." } else { path })?;
            std::fs::create_dir_all(&root)?;
            // Deleting a batch's last object removes its emptied folders too.
            let fs: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&root)?.with_automatic_cleanup(true));
            return Ok(Self { inner: fs.clone(), probe: fs, local_root: Some(root), prefix: Path::default() });
        }
        if config.is_s3() {
            let parsed = url::Url::parse(url).map_err(|_| StoreError::BadUrl(url.to_string()))?;
            let prefix = Path::parse(parsed.path().trim_matches('/')).map_err(|_| StoreError::BadUrl(url.to_string()))?;
            let retry = RetryConfig {
                backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: S3_MAX_BACKOFF, base: 2.0 },
                max_retries: usize::MAX,
                retry_timeout: S3_RETRY_TIMEOUT,
            };
            let inner = s3_client(config, retry, &[])?;
            let answer_now = RetryConfig { max_retries: 0, retry_timeout: Duration::ZERO, ..RetryConfig::default() };
            let probe = s3_client(config, answer_now, &[(ClientConfigKey::ConnectTimeout, "1s"), (ClientConfigKey::Timeout, "2s")])?;
            return Ok(Self { inner, probe, local_root: None, prefix });
        }
        Err(StoreError::BadUrl(url.to_string()))
    }

    /// An in-memory store, for unit tests only.
    pub fn in_memory() -> Self {
        let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        Self { inner: memory.clone(), probe: memory, local_root: None, prefix: Path::default() }
    }

    /// True when the store answers now: a local root that exists, or a server
    /// that answers a HEAD (a missing object is an answer). Never retries.
    pub async fn ping(&self) -> Result<(), StoreError> {
        if let Some(root) = &self.local_root {
            if !root.is_dir() {
                return Err(StoreError::NotFound(root.display().to_string()));
            }
            // A disk that is full answers every read: only a write tells.
            return probe_write(root).await;
        }
        let path = self.path(".facepipe-probe")?;
        match self.probe.head(&path).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::Backend(e)),
        }
    }

    fn path(&self, key: &str) -> Result<Path, StoreError> {
        let rel = Path::parse(key).map_err(|_| StoreError::InvalidKey(key.to_string()))?;
        if key.is_empty() || key.split('/').any(|p| p == ".." || p == ".") {
            return Err(StoreError::InvalidKey(key.to_string()));
        }
        Ok(self.prefix.parts().chain(rel.parts()).collect())
    }

    fn map_err(key: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound(key.to_string()),
            other if is_no_space(&other) => StoreError::Full { key: key.to_string(), source: Box::new(other) },
            other => StoreError::Backend(other),
        }
    }

    /// Writes an object (atomically on the local filesystem).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let _timer = Step::Store.start();
        let len = bytes.len() as u64;
        self.inner
            .put(&path, PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| Self::map_err(key, e))?;
        telemetry::object_written(len);
        Ok(())
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key)?;
        let _timer = Step::Fetch.start();
        let result = self.inner.get(&path).await.map_err(|e| Self::map_err(key, e))?;
        let bytes = result.bytes().await.map_err(|e| Self::map_err(key, e))?;
        telemetry::object_read(bytes.len() as u64);
        Ok(bytes)
    }

    /// True when an object exists under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        match self.inner.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError::Backend(e)),
        }
    }

    /// Keys of the objects under a prefix, in the backend's order, as they are listed.
    fn keys_under(&self, prefix: &str) -> Result<impl futures::Stream<Item = Result<String, object_store::Error>>, StoreError> {
        use futures::TryStreamExt;
        let path = self.path(prefix.trim_end_matches('/'))?;
        let strip = self.prefix.parts().count();
        Ok(self
            .inner
            .list(Some(&path))
            .map_ok(move |meta| meta.location.parts().skip(strip).map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/")))
    }

    /// Keys of all objects under a prefix, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let mut keys: Vec<String> = self.keys_under(prefix)?.try_collect().await?;
        keys.sort();
        Ok(keys)
    }

    /// Deletes objects (a missing one is no error), many per request where the
    /// backend allows it (S3 deletes up to 1,000 keys a request); returns how many were asked.
    pub async fn delete_many(&self, keys: &[String]) -> Result<usize, StoreError> {
        use futures::StreamExt;
        let paths: Vec<Path> = keys.iter().map(|k| self.path(k)).collect::<Result<_, _>>()?;
        let mut deleted = self.inner.delete_stream(futures::stream::iter(paths.into_iter().map(Ok)).boxed());
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StoreError::Backend(e)),
            }
        }
        Ok(keys.len())
    }

    /// Deletes every object under `prefix`; returns how many there were.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, StoreError> {
        let mut total = 0;
        // In pages, so a prefix of a million objects is never listed into memory at once.
        loop {
            use futures::{StreamExt, TryStreamExt};
            let page: Vec<String> = self.keys_under(prefix)?.take(DELETE_PAGE).try_collect().await?;
            if page.is_empty() {
                return Ok(total);
            }
            total += self.delete_many(&page).await?;
        }
    }

    /// In a local store, deletes staging files (`<key>#<n>`: a write that a crash
    /// interrupted before its rename) last modified more than `age` ago; returns how
    /// many. A store elsewhere has none: S3 writes are atomic.
    pub fn sweep_staging(&self, age: Duration) -> Result<usize, StoreError> {
        let Some(root) = &self.local_root else { return Ok(0) };
        let cutoff = std::time::SystemTime::now() - age;
        let mut removed = 0;
        for entry in walkdir::WalkDir::new(root).into_iter().filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy();
            let staging = name.rsplit_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !staging || !entry.file_type().is_file() {
                continue;
            }
            let old = entry.metadata().ok().and_then(|m| m.modified().ok()).is_some_and(|t| t < cutoff);
            if old {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::Io(e)),
                }
            }
        }
        Ok(removed)
    }

    /// Streams a local file into the store without holding it in memory.
    pub async fn put_file(&self, key: &str, file: &std::path::Path) -> Result<u64, StoreError> {
        let path = self.path(key)?;
        let _timer = Step::Store.start();
        // Each read of a tokio file is a hop to a blocking thread: read a MiB at a
        // time, not tokio::io::copy's 8 KiB (a 100 MB upload: 100 hops, not 12,000).
        let mut reader = tokio::io::BufReader::with_capacity(1 << 20, tokio::fs::File::open(file).await?);
        let mut writer = object_store::buffered::BufWriter::new(self.inner.clone(), path);
        let copied = tokio::io::copy_buf(&mut reader, &mut writer).await?;
        writer.shutdown().await?;
        telemetry::object_written(copied);
        Ok(copied)
    }

    /// Moves a spooled file the caller owns into the store: a rename when the
    /// store is local and on the same filesystem (no second copy of a large
    /// upload), otherwise a streamed copy. The rename is atomic, like a put.
    pub async fn put_spooled(&self, key: &str, spooled: tempfile::NamedTempFile) -> Result<u64, StoreError> {
        self.path(key)?;
        if let Some(root) = &self.local_root {
            let target = root.join(key);
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            let size = spooled.as_file().metadata()?.len();
            match spooled.persist(&target) {
                Ok(file) => {
                    use std::os::unix::fs::PermissionsExt;
                    // A rename copies nothing, but the object's bytes did enter the store.
                    telemetry::object_written(size);
                    // Spool files are private (0600); stored objects are not.
                    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
                    return Ok(size);
                }
                // Another filesystem: fall through to a copy (the file is handed back).
                Err(e) => return self.put_file(key, e.file.path()).await,
            }
        }
        self.put_file(key, spooled.path()).await
    }

    /// Reads an object in place, with bounded memory: the file itself in a
    /// `file://` store, otherwise ranged GETs of [`RANGE_BYTES`] at a time. Call
    /// from async code; read the result on a blocking thread (it blocks on the
    /// runtime for each GET).
    pub async fn reader(&self, key: &str) -> Result<ObjectReader, StoreError> {
        let path = self.path(key)?;
        if let Some(root) = &self.local_root {
            return match std::fs::File::open(root.join(key)) {
                Ok(file) if file.metadata()?.is_file() => Ok(ObjectReader::File(io::BufReader::new(file))),
                Ok(_) => Err(StoreError::NotFound(key.to_string())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound(key.to_string())),
                Err(e) => Err(StoreError::Io(e)),
            };
        }
        let meta = self.inner.head(&path).await.map_err(|e| Self::map_err(key, e))?;
        Ok(ObjectReader::Remote(RangedReader {
            store: self.inner.clone(),
            path,
            size: meta.size,
            pos: 0,
            window_start: 0,
            window: Bytes::new(),
            runtime: tokio::runtime::Handle::current(),
            requests: 0,
        }))
    }
}

/// An object read in place: a local file, or a remote object read by ranges.
#[derive(Debug)]
pub enum ObjectReader {
    /// A file on this machine (`file://` stores, or a path given directly).
    File(io::BufReader<std::fs::File>),
    /// A remote object.
    Remote(RangedReader),
}

impl ObjectReader {
    /// A local file, read in place.
    pub fn file(path: &std::path::Path) -> io::Result<Self> {
        Ok(Self::File(io::BufReader::new(std::fs::File::open(path)?)))
    }
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::File(f) => f.read(buf),
            Self::Remote(r) => r.read(buf),
        }
    }
}

impl Seek for ObjectReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match self {
            Self::File(f) => f.seek(pos),
            Self::Remote(r) => r.seek(pos),
        }
    }
}

/// `Read + Seek` over ranged GETs of one remote object, for readers (a ZIP's)
/// that seek. It holds one window of at most [`RANGE_BYTES`]: a read inside the
/// window is a copy, a read outside it fetches the window starting there. A
/// seek is free, and keeps the window (the ZIP reader asks for its position and
/// seeks to each entry, mostly inside the window it already has), unlike
/// `object_store::buffered::BufReader`, which drops its buffer on every seek.
///
/// Each GET blocks on the runtime it was made in, so it is read on a blocking
/// thread. A failed GET (after the store's own retries) is an I/O error of
/// kind `Other` whose source is the [`StoreError`].
pub struct RangedReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    pos: u64,
    window_start: u64,
    window: Bytes,
    runtime: tokio::runtime::Handle,
    requests: u64,
}

impl std::fmt::Debug for RangedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangedReader")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("pos", &self.pos)
            .field("requests", &self.requests)
            .finish()
    }
}

impl RangedReader {
    /// The object's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Ranged GETs made so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    fn in_window(&self) -> bool {
        self.pos >= self.window_start && self.pos < self.window_start + self.window.len() as u64
    }

    /// Replaces the window with the one starting at the current position.
    fn fill(&mut self) -> io::Result<()> {
        // Dropped first, so at most one window is held.
        self.window = Bytes::new();
        let range = self.pos..self.size.min(self.pos.saturating_add(RANGE_BYTES));
        let _timer = Step::Fetch.start();
        let fetched = self.runtime.block_on(self.store.get_range(&self.path, range.clone()));
        self.requests += 1;
        let bytes = fetched.map_err(|e| io::Error::other(StoreError::Backend(e)))?;
        if bytes.len() as u64 != range.end - range.start {
            let message = format!("asked for bytes {range:?} of `{}`, got {}", self.path, bytes.len());
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, message));
        }
        telemetry::object_read(bytes.len() as u64);
        self.window_start = range.start;
        self.window = bytes;
        Ok(())
    }
}

impl Read for RangedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.pos >= self.size {
            return Ok(0);
        }
        if !self.in_window() {
            self.fill()?;
        }
        let offset = (self.pos - self.window_start) as usize;
        let n = buf.len().min(self.window.len() - offset);
        buf[..n].copy_from_slice(&self.window[offset..offset + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RangedReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the object"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delete_prefix_deletes_only_under_it_in_pages() {
        let store = Store::in_memory();
        let crops: Vec<String> = (0..DELETE_PAGE + 5).map(|i| format!("batches/b/crops/{i:07}-0.jpg")).collect();
        for key in crops.iter().chain([&"batches/b/originals/0000000.jpg".to_string(), &"batches/bb/crops/x.jpg".to_string()]) {
            store.put(key, Bytes::from_static(b"x")).await.unwrap();
        }
        assert_eq!(store.delete_prefix("batches/b/crops/").await.unwrap(), crops.len());
        assert_eq!(store.list("batches").await.unwrap(), ["batches/b/originals/0000000.jpg", "batches/bb/crops/x.jpg"]);
        assert_eq!(store.delete_prefix("batches/b/crops/").await.unwrap(), 0);
        // A missing key among others is no error.
        assert_eq!(store.delete_many(&["batches/bb/crops/x.jpg".into(), "nothing/here".into()]).await.unwrap(), 2);
        assert_eq!(store.list("batches").await.unwrap(), ["batches/b/originals/0000000.jpg"]);
    }

    #[tokio::test]
    async fn local_store_round_trip_and_key_checks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&ObjectStoreConfig::at(format!("file://{}", dir.path().display()))).unwrap();
        store.put("batches/b/originals/1.jpg", Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(store.get("batches/b/originals/1.jpg").await.unwrap(), Bytes::from_static(b"abc"));
        assert!(dir.path().join("batches/b/originals/1.jpg").is_file());
        assert!(matches!(store.get("batches/b/missing").await, Err(StoreError::NotFound(_))));
        assert!(matches!(store.put("../escape", Bytes::new()).await, Err(StoreError::InvalidKey(_))));
        assert_eq!(store.list("batches/b").await.unwrap(), vec!["batches/b/originals/1.jpg"]);
        let mut reader = store.reader("batches/b/originals/1.jpg").await.unwrap();
        assert!(matches!(reader, ObjectReader::File(_)));
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "abc");
        assert!(matches!(store.reader("batches/b/missing").await, Err(StoreError::NotFound(_))));
        store.ping().await.unwrap();
    }

    /// A remote object read through ranged GETs gives the same bytes as the
    /// object, whatever the seeks; reads inside the window fetch nothing.
    #[tokio::test]
    async fn ranged_reads_of_a_remote_object() {
        let store = Store::in_memory();
        let size = 2 * RANGE_BYTES as usize + 12_345;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), &data).unwrap();
        assert_eq!(store.put_file("uploads/x.zip", src.path()).await.unwrap(), size as u64);
        assert!(matches!(store.reader("uploads/missing.zip").await, Err(StoreError::NotFound(_))));
        let ObjectReader::Remote(mut reader) = store.reader("uploads/x.zip").await.unwrap() else {
            panic!("an in-memory store is read remotely")
        };
        let data = Arc::new(data);
        let expected = data.clone();
        tokio::task::spawn_blocking(move || {
            assert_eq!(reader.size(), size as u64);
            // From the end, as a ZIP reader starts, then back to the beginning.
            let mut tail = [0u8; 100];
            reader.seek(SeekFrom::End(-100)).unwrap();
            reader.read_exact(&mut tail).unwrap();
            assert_eq!(&tail[..], &expected[size - 100..]);
            assert_eq!(reader.read(&mut tail).unwrap(), 0, "end of the object");
            reader.seek(SeekFrom::Start(0)).unwrap();
            let mut head = vec![0u8; 1000];
            reader.read_exact(&mut head).unwrap();
            let before = reader.requests();
            assert_eq!(reader.stream_position().unwrap(), 1000);
            reader.seek(SeekFrom::Current(-500)).unwrap();
            reader.read_exact(&mut head[..500]).unwrap();
            assert_eq!(&head[..500], &expected[500..1000]);
            assert_eq!(reader.requests(), before, "seeks and reads inside the window fetch nothing");
            // The whole object, sequentially: one GET per window after the first, which it holds.
            reader.seek(SeekFrom::Start(0)).unwrap();
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            assert!(all == *expected, "same bytes");
            assert_eq!(reader.requests(), before + 2);
            assert!(reader.seek(SeekFrom::Current(-(size as i64) - 1)).is_err());
        })
        .await
        .unwrap();
    }

    #[test]
    fn opens_s3_urls_with_a_key_prefix() {
        let config = ObjectStoreConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("eu-west-1".into()),
            allow_http: Some(true),
            ..ObjectStoreConfig::at("s3://bucket/some/prefix")
        };
        let store = Store::open(&config).unwrap();
        assert_eq!(store.path("a/b.jpg").unwrap().as_ref(), "some/prefix/a/b.jpg");
        assert!(store.local_root.is_none());
    }

    #[test]
    fn rejects_unknown_schemes() {
        assert!(matches!(Store::open(&ObjectStoreConfig::at("ftp://x")), Err(StoreError::BadUrl(_))));
    }
}
