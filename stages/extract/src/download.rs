//! Downloads of images given by URL (`add-images`), for the extract stage.
//!
//! Each download has a time limit, a size cap (the extract stage's
//! `max_entry_bytes`), a redirect cap and a content check (the body must be an
//! image format, whatever the server claims). Transient failures (timeouts,
//! connection errors, 408, 429, 5xx) are retried with a doubling delay; other
//! failures are final for that image and say why.
//!
//! URLs come from API clients, so by default a download may only reach public
//! addresses: a host that is, or resolves only to, a loopback, private,
//! link-local (cloud metadata services), shared or otherwise reserved address
//! is refused before any connection, on every redirect too. Name resolution
//! goes through [`PublicOnly`], so a name cannot pass the check and then
//! connect elsewhere. `allow_private_addresses` lifts this for trusted inputs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use facepipe_core::topology::ExtractParams;

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
    /// The host is, or resolves only to, an address inside a private network.
    #[error("{0}")]
    NotPublic(NotPublic),
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

/// Why a host was refused: it is not reachable as a public address.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{host} is not a public address (loopback, private, link-local or reserved); \
         set stages.extract.params.allow_private_addresses = true to allow such URLs")]
pub struct NotPublic {
    /// The host as the URL names it.
    pub host: String,
}

pub use crate::address::is_public;

/// The host of `url` when it is an address literal that is not public.
fn literal_not_public(url: &url::Url) -> Option<NotPublic> {
    let ip = match url.host()? {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(_) => return None,
    };
    (!is_public(ip)).then(|| NotPublic { host: url.host_str().unwrap_or_default().to_string() })
}

/// A resolver that keeps only public addresses and fails when none is left.
#[derive(Debug)]
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.iter().copied().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() && !all.is_empty() {
                return Err(Box::new(NotPublic { host }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The [`NotPublic`] refusal somewhere in `error`'s chain of causes.
fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<NotPublic> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(refused) = e.downcast_ref::<NotPublic>() {
            return Some(refused.clone());
        }
        cause = e.source();
    }
    None
}

/// An HTTP client with the extract stage's download limits.
#[derive(Debug, Clone)]
pub struct Downloader {
    client: reqwest::Client,
    timeout: Duration,
    max_bytes: u64,
    attempts: u32,
    /// False: only public addresses (see the module's documentation).
    allow_private: bool,
}

impl Downloader {
    /// A downloader with `params`' limits.
    pub fn new(params: &ExtractParams) -> Result<Self, reqwest::Error> {
        let (max_redirects, allow_private) = (params.max_redirects, params.allow_private_addresses);
        // As `Policy::limited`, plus the address check on each hop: a public server
        // must not be able to redirect a download into the private network.
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error("too many redirects");
            }
            match literal_not_public(attempt.url()).filter(|_| !allow_private) {
                Some(refused) => attempt.error(refused),
                None => attempt.follow(),
            }
        });
        let mut builder = reqwest::Client::builder()
            .timeout(params.download_timeout)
            .connect_timeout(params.download_timeout.min(Duration::from_secs(10)))
            .redirect(redirects)
            .user_agent(concat!("facepipe/", env!("CARGO_PKG_VERSION")));
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(PublicOnly));
        }
        Ok(Self {
            client: builder.build()?,
            timeout: params.download_timeout,
            max_bytes: params.max_entry_bytes,
            attempts: params.download_attempts.max(1),
            allow_private,
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
        if let Some(refused) = literal_not_public(&parsed).filter(|_| !self.allow_private) {
            return Err(fail(DownloadErrorKind::NotPublic(refused)));
        }
        let transport = |e: reqwest::Error| {
            fail(if let Some(refused) = refusal_in(&e) {
                DownloadErrorKind::NotPublic(refused)
            } else if e.is_timeout() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_literals_are_checked_names_are_left_to_the_resolver() {
        let check = |u: &str| literal_not_public(&url::Url::parse(u).unwrap()).map(|r| r.host);
        assert_eq!(check("http://127.0.0.1:8080/a.jpg").as_deref(), Some("127.0.0.1"));
        assert_eq!(check("http://[::1]/a.jpg").as_deref(), Some("[::1]"));
        // The URL parser reads these spellings of 127.0.0.1 as the address itself.
        assert_eq!(check("http://2130706433/a.jpg").as_deref(), Some("127.0.0.1"));
        assert_eq!(check("http://0x7f.1/a.jpg").as_deref(), Some("127.0.0.1"));
        assert_eq!(check("http://[64:ff9b::7f00:1]/a.jpg").as_deref(), Some("[64:ff9b::7f00:1]"));
        assert_eq!(check("http://[2002:7f00:1::1]/a.jpg").as_deref(), Some("[2002:7f00:1::1]"));
        assert_eq!(check("http://192.0.2.1/a.jpg").as_deref(), Some("192.0.2.1"));
        assert_eq!(check("http://8.8.8.8/a.jpg"), None);
        assert_eq!(check("http://localhost/a.jpg"), None);
    }
}
