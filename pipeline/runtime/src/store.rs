//! The object store holding originals and crops (`file://` or `s3://`).

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use tokio::io::AsyncWriteExt;

use facepipe_core::telemetry::{self, Step};

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
}

impl facepipe_core::retry::Classify for StoreError {
    /// A missing object or a bad key will not appear on retry; an outage may end.
    fn kind(&self) -> facepipe_core::retry::ErrorKind {
        use facepipe_core::retry::ErrorKind;
        match self {
            StoreError::NotFound(_) | StoreError::InvalidKey(_) => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        }
    }
}

/// A handle on the configured object store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// Filesystem root when the store is local, so large objects can be read in place.
    local_root: Option<PathBuf>,
    /// Key prefix inside the bucket (`s3://bucket/prefix`).
    prefix: Path,
}

/// A file on local disk holding an object; a downloaded copy is deleted on drop.
#[derive(Debug)]
pub enum LocalCopy {
    /// The object itself, in a `file://` store (or a local path that was never in the store).
    InPlace(PathBuf),
    /// A temporary download of a remote object.
    Temporary(tempfile::NamedTempFile),
}

impl LocalCopy {
    /// Path of the local file.
    pub fn path(&self) -> &FsPath {
        match self {
            Self::InPlace(p) => p,
            Self::Temporary(t) => t.path(),
        }
    }
}

impl Store {
    /// Opens `file:///abs`, `file://relative` (from the working directory) or `s3://bucket/prefix`.
    /// S3 credentials and endpoint come from the `AWS_*` environment variables.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("file://") {
            let root = std::path::absolute(if path.is_empty() { "." } else { path })?;
            std::fs::create_dir_all(&root)?;
            let fs = LocalFileSystem::new_with_prefix(&root)?;
            return Ok(Self { inner: Arc::new(fs), local_root: Some(root), prefix: Path::default() });
        }
        if url.starts_with("s3://") {
            let parsed = url::Url::parse(url).map_err(|_| StoreError::BadUrl(url.to_string()))?;
            // Credentials, region and endpoint (for S3-compatible stores) come from AWS_* variables.
            let store = object_store::aws::AmazonS3Builder::from_env().with_url(url).build()?;
            let prefix = Path::parse(parsed.path().trim_matches('/')).map_err(|_| StoreError::BadUrl(url.to_string()))?;
            return Ok(Self { inner: Arc::new(store), local_root: None, prefix });
        }
        Err(StoreError::BadUrl(url.to_string()))
    }

    /// An in-memory store, for unit tests only.
    pub fn in_memory() -> Self {
        Self {
            inner: Arc::new(object_store::memory::InMemory::new()),
            local_root: None,
            prefix: Path::default(),
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

    /// Keys of all objects under a prefix, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let path = self.path(prefix.trim_end_matches('/'))?;
        let strip = self.prefix.parts().count();
        let mut keys: Vec<String> = self
            .inner
            .list(Some(&path))
            .map_ok(|meta| meta.location.parts().skip(strip).map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"))
            .try_collect()
            .await?;
        keys.sort();
        Ok(keys)
    }

    /// Streams a local file into the store without holding it in memory.
    pub async fn put_file(&self, key: &str, file: &FsPath) -> Result<u64, StoreError> {
        let path = self.path(key)?;
        let _timer = Step::Store.start();
        let mut reader = tokio::fs::File::open(file).await?;
        let mut writer = object_store::buffered::BufWriter::new(self.inner.clone(), path);
        let copied = tokio::io::copy(&mut reader, &mut writer).await?;
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

    /// A local file holding the object: the file itself for `file://` stores,
    /// otherwise a streamed download into a temporary file.
    pub async fn local_copy(&self, key: &str) -> Result<LocalCopy, StoreError> {
        let path = self.path(key)?;
        if let Some(root) = &self.local_root {
            let file = root.join(key);
            return if file.is_file() {
                Ok(LocalCopy::InPlace(file))
            } else {
                Err(StoreError::NotFound(key.to_string()))
            };
        }
        // Only a download is a fetch: an in-place file is read by the caller.
        let _timer = Step::Fetch.start();
        use futures::StreamExt;
        let mut stream = self.inner.get(&path).await.map_err(|e| Self::map_err(key, e))?.into_stream();
        let temp = crate::scratch::file_in(&std::env::temp_dir(), "download")?;
        let mut out = tokio::fs::File::from_std(temp.reopen()?);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Self::map_err(key, e))?;
            out.write_all(&chunk).await?;
            telemetry::object_read(chunk.len() as u64);
        }
        out.flush().await?;
        Ok(LocalCopy::Temporary(temp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_round_trip_and_key_checks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
        store.put("batches/b/originals/1.jpg", Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(store.get("batches/b/originals/1.jpg").await.unwrap(), Bytes::from_static(b"abc"));
        assert!(dir.path().join("batches/b/originals/1.jpg").is_file());
        assert!(matches!(store.get("batches/b/missing").await, Err(StoreError::NotFound(_))));
        assert!(matches!(store.put("../escape", Bytes::new()).await, Err(StoreError::InvalidKey(_))));
        assert_eq!(store.list("batches/b").await.unwrap(), vec!["batches/b/originals/1.jpg"]);
        let copy = store.local_copy("batches/b/originals/1.jpg").await.unwrap();
        assert!(matches!(copy, LocalCopy::InPlace(_)));
    }

    #[tokio::test]
    async fn remote_style_store_downloads_to_a_temp_file() {
        let store = Store::in_memory();
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), vec![7u8; 100_000]).unwrap();
        assert_eq!(store.put_file("uploads/x.zip", src.path()).await.unwrap(), 100_000);
        let copy = store.local_copy("uploads/x.zip").await.unwrap();
        assert_eq!(std::fs::read(copy.path()).unwrap(), vec![7u8; 100_000]);
        let temp_path = copy.path().to_owned();
        drop(copy);
        assert!(!temp_path.exists(), "temporary download is removed");
    }

    #[test]
    fn opens_s3_urls_with_a_key_prefix() {
        let store = Store::open("s3://bucket/some/prefix").unwrap();
        assert_eq!(store.path("a/b.jpg").unwrap().as_ref(), "some/prefix/a/b.jpg");
        assert!(store.local_root.is_none());
    }

    #[test]
    fn rejects_unknown_schemes() {
        assert!(matches!(Store::open("ftp://x"), Err(StoreError::BadUrl(_))));
    }
}
