//! Where image bytes come from (`ImageSource`): HTTP(S) with resume on a
//! device (`HttpSource`: raw, zstd or adaptive), memory in tests.

use super::{FetchError, FetchHooks, FetchPolicy, FetchStats};
use crate::image::plan::Fallback;
use crate::trust::{Encoding, IndexRef};
use crate::update::slot_writer::SlotWriter;
use crate::update::Transfer;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// One job's download, as the executor asks for it.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub url: String,
    pub encoding: Encoding,
    /// The job's transfer at its last checkpoint (where a zstd stream resumes).
    pub base: Transfer,
    /// Set when the message offers an index and `[update] adaptive` is on.
    pub adaptive: Option<AdaptiveRequest>,
}

#[derive(Debug, Clone)]
pub struct AdaptiveRequest {
    pub index: IndexRef,
    /// The image's SHA-256 as signed: the index must be for it.
    pub sha256: String,
    /// The slot being written, read for blocks already there.
    pub target: PathBuf,
    /// The running slot, only ever read.
    pub booted: PathBuf,
    /// `[update] adaptive_max_fetch`, percent of the image.
    pub max_fetch_percent: u8,
    pub fallback: Fallback,
}

/// Where image bytes come from: HTTP(S) on a device, memory in tests.
pub trait ImageSource: Send {
    fn fetch_into<'a>(
        &'a self,
        request: &'a ImageRequest,
        writer: &'a mut SlotWriter,
        policy: &'a FetchPolicy,
        hooks: FetchHooks<'a>,
    ) -> LocalFuture<'a, Result<FetchStats, FetchError>>;
}

/// HTTP(S) with rustls; `ca_file` replaces the system roots when set.
pub struct HttpSource {
    pub ca_file: Option<PathBuf>,
}

impl ImageSource for HttpSource {
    fn fetch_into<'a>(
        &'a self,
        request: &'a ImageRequest,
        writer: &'a mut SlotWriter,
        policy: &'a FetchPolicy,
        hooks: FetchHooks<'a>,
    ) -> LocalFuture<'a, Result<FetchStats, FetchError>> {
        Box::pin(async move {
            let url = &request.url;
            let tls = match (crate::http::tls_config(self.ca_file.as_deref()), url.starts_with("https://")) {
                (Ok(t), _) => t,
                (Err(e), true) => return Err(FetchError::Tls(e)),
                (Err(_), false) => crate::http::plain_tls_config().map_err(FetchError::Tls)?,
            };
            let client: super::Client = crate::http::client(tls);
            match (&request.adaptive, request.encoding) {
                (Some(adaptive), _) => {
                    super::adaptive::install(&client, request, adaptive, writer, policy, hooks).await
                }
                (None, Encoding::Zstd) => {
                    super::fetch_zstd_into(&client, url, writer, policy, request.base, hooks).await
                }
                (None, Encoding::Raw) => {
                    super::fetch_into(&client, url, writer, policy, request.base, hooks).await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::slot_writer::DEFAULT_BLOCK;
    use std::time::Duration;

    /// Retries and give-up on paused time, against a real (closed) port:
    /// `retries` fruitless attempts and `give_up_after_s` of virtual time.
    #[tokio::test(start_paused = true)]
    async fn http_retries_give_up_after_the_configured_time() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot");
        std::fs::File::create(&slot).unwrap().set_len(1 << 20).unwrap();
        let mut writer = SlotWriter::open(&slot, 1000, 0, DEFAULT_BLOCK).unwrap();
        let policy = FetchPolicy {
            max_attempts: 3,
            give_up_after: Duration::from_secs(300),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            ..FetchPolicy::default()
        };
        let retries = std::cell::RefCell::new(Vec::new());
        let hooks = FetchHooks {
            on_checkpoint: &mut |_| Ok(()),
            on_progress: &mut |_, _, _| {},
            on_retry: &mut |_, wait| retries.borrow_mut().push(wait),
            on_note: &mut |_| {},
        };
        let source = HttpSource { ca_file: None };
        let started = tokio::time::Instant::now();
        let request = ImageRequest {
            url: format!("http://127.0.0.1:{port}/x.img"),
            encoding: Encoding::Raw,
            base: Transfer::default(),
            adaptive: None,
        };
        let err = source.fetch_into(&request, &mut writer, &policy, hooks).await.unwrap_err();
        assert_eq!(err.name(), "download-failed");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(300), "gave up after {waited:?}, before give_up_after");
        let retries = retries.into_inner();
        assert!(retries.len() >= 3, "{retries:?}");
        assert!(
            retries.iter().all(|w| *w <= Duration::from_secs(60)),
            "each wait under the cap: {retries:?}"
        );
    }
}
