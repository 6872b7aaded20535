//! Where image bytes come from (`ImageSource`): HTTP(S) with resume on a
//! device (`HttpSource`, through `fetch_into`), memory in tests.

use super::{FetchError, FetchHooks, FetchPolicy, FetchStats};
use crate::update::slot_writer::SlotWriter;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Where image bytes come from: HTTP(S) on a device, memory in tests.
pub trait ImageSource: Send {
    fn fetch_into<'a>(
        &'a self,
        url: &'a str,
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
        url: &'a str,
        writer: &'a mut SlotWriter,
        policy: &'a FetchPolicy,
        hooks: FetchHooks<'a>,
    ) -> LocalFuture<'a, Result<FetchStats, FetchError>> {
        Box::pin(async move {
            let tls = match (crate::http::tls_config(self.ca_file.as_deref()), url.starts_with("https://")) {
                (Ok(t), _) => t,
                (Err(e), true) => return Err(FetchError::Tls(e)),
                (Err(_), false) => crate::http::plain_tls_config().map_err(FetchError::Tls)?,
            };
            let client: super::Client = crate::http::client(tls);
            super::fetch_into(&client, url, writer, policy, hooks).await
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
            on_progress: &mut |_, _| {},
            on_retry: &mut |_, wait| retries.borrow_mut().push(wait),
        };
        let source = HttpSource { ca_file: None };
        let started = tokio::time::Instant::now();
        let url = format!("http://127.0.0.1:{port}/x.img");
        let err = source.fetch_into(&url, &mut writer, &policy, hooks).await.unwrap_err();
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
