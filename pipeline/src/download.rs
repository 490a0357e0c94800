//! Downloads of images given by URL (`add-images`), for the extract stage.
//!
//! Each download has a time limit, a size cap (the extract stage's
//! `max_entry_bytes`), a redirect cap and a content check (the body must be an
//! image format, whatever the server claims). Transient failures (timeouts,
//! connection errors, 408, 429, 5xx) are retried with a doubling delay; other
//! failures are final for that image and say why.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::topology::ExtractParams;

/// Why an image URL could not be downloaded.
#[derive(Debug, thiserror::Error)]
#[error("download of {url}: {kind}")]
pub struct DownloadError {
    /// The URL.
    pub url: String,
    /// What went wrong.
    pub kind: DownloadErrorKind,
}

/// What went wrong with a download.
#[derive(Debug, thiserror::Error)]
pub enum DownloadErrorKind {
    /// Not an `http`/`https` URL.
    #[error("not an http(s) URL")]
    BadUrl,
    /// The server answered with an error status.
    #[error("HTTP {0}")]
    Status(u16),
    /// The body is larger than the cap.
    #[error("larger than {0} bytes")]
    TooLarge(u64),
    /// The body is not an image.
    #[error("not an image (content type `{0}`)")]
    NotAnImage(String),
    /// No answer within the time limit.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// More redirects than allowed.
    #[error("too many redirects")]
    TooManyRedirects,
    /// Connection or protocol failure.
    #[error("{0}")]
    Transport(String),
}

impl DownloadError {
    /// True when another attempt may succeed.
    pub fn is_transient(&self) -> bool {
        match self.kind {
            DownloadErrorKind::Status(code) => code == 408 || code == 429 || code >= 500,
            DownloadErrorKind::Timeout(_) | DownloadErrorKind::Transport(_) => true,
            _ => false,
        }
    }
}

/// An HTTP client with the extract stage's download limits.
#[derive(Debug, Clone)]
pub struct Downloader {
    client: reqwest::Client,
    timeout: Duration,
    max_bytes: u64,
    attempts: u32,
}

impl Downloader {
    /// A downloader with `params`' limits.
    pub fn new(params: &ExtractParams) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(params.download_timeout)
            .connect_timeout(params.download_timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::limited(params.max_redirects))
            .user_agent(concat!("facepipe/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            timeout: params.download_timeout,
            max_bytes: params.max_entry_bytes,
            attempts: params.download_attempts.max(1),
        })
    }

    /// Downloads `url`, retrying transient failures.
    pub async fn fetch(&self, url: &str) -> Result<Bytes, DownloadError> {
        let mut delay = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match self.fetch_once(url).await {
                Err(e) if e.is_transient() && attempt < self.attempts => {
                    tracing::debug!(%url, attempt, error = %e, "download failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn fetch_once(&self, url: &str) -> Result<Bytes, DownloadError> {
        let fail = |kind| DownloadError { url: url.to_string(), kind };
        let parsed = url::Url::parse(url).map_err(|_| fail(DownloadErrorKind::BadUrl))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(fail(DownloadErrorKind::BadUrl));
        }
        let transport = |e: reqwest::Error| {
            fail(if e.is_timeout() {
                DownloadErrorKind::Timeout(self.timeout)
            } else if e.is_redirect() {
                DownloadErrorKind::TooManyRedirects
            } else {
                // reqwest's top-level message is vague; its source names the cause.
                let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
                DownloadErrorKind::Transport(format!("{e}{cause}"))
            })
        };
        let mut response = self.client.get(parsed).send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(fail(DownloadErrorKind::Status(status.as_u16())));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        // Servers often send images as octet-stream; anything else declared is refused unread.
        let declared_ok = content_type.is_empty()
            || content_type.starts_with("image/")
            || content_type.starts_with("application/octet-stream")
            || content_type.starts_with("binary/octet-stream");
        if !declared_ok {
            return Err(fail(DownloadErrorKind::NotAnImage(content_type)));
        }
        if response.content_length().is_some_and(|n| n > self.max_bytes) {
            return Err(fail(DownloadErrorKind::TooLarge(self.max_bytes)));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if (body.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(fail(DownloadErrorKind::TooLarge(self.max_bytes)));
            }
            body.extend_from_slice(&chunk);
        }
        // The bytes decide, not the header: the body must start like an image format.
        if imagesize::image_type(&body).is_err() {
            let shown = if content_type.is_empty() { "none".to_string() } else { content_type };
            return Err(fail(DownloadErrorKind::NotAnImage(shown)));
        }
        Ok(body.freeze())
    }
}
