//! Streams an image over HTTP(S) into a `SlotWriter`: stops at the signed
//! size, resumes after a cut with a `Range` request from the bytes already in
//! the slot, gives up on a stalled or too-slow transfer, and retries with
//! exponential backoff and full jitter.
//!
//! Each attempt's checks (the stall timeout, the rate per window, the
//! fruitless-attempt count) are reset by any progress, so a server that
//! drips a few bytes a minute would pass them forever. The whole download
//! is held to a floor as well, which nothing the server sends resets:
//! after a grace of `give_up_after` plus one `stall_timeout`, it must have
//! averaged `min_rate` since it began (`RateFloor`). The floor counts from
//! the start of this process's download: only a restart of fleetd, which
//! no server can cause, starts it again.

mod adaptive;
mod http_source;
mod sink;
pub use http_source::{AdaptiveRequest, HttpSource, ImageRequest, ImageSource, LocalFuture};
pub use sink::{zstd_limit, DecodeError};

use super::slot_writer::{SlotWriter, WriteError};
use crate::update::Transfer;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use sink::{RawSink, Sink, SinkError, ZstdSink};
use std::time::Duration;
// tokio's clock, so that tests can run the retry timing on paused time.
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// No byte for this long ends the attempt.
    pub stall_timeout: Duration,
    /// Bytes per second that each `rate_window` must reach (0: no minimum).
    pub min_rate: u64,
    pub rate_window: Duration,
    /// Consecutive attempts that make no progress before giving up...
    pub max_attempts: u32,
    /// ...and at least this long without progress.
    pub give_up_after: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// fsync and report a durable offset this often.
    pub checkpoint_every: u64,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        Self {
            stall_timeout: Duration::from_secs(30),
            min_rate: 1024,
            rate_window: Duration::from_secs(60),
            max_attempts: 8,
            give_up_after: Duration::from_secs(300),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            checkpoint_every: 32 << 20,
        }
    }
}

crate::error_name::named_error! {
    #[derive(Debug, thiserror::Error)]
    pub enum FetchError {
        #[name(of 0)]
        #[error(transparent)]
        Write(#[from] WriteError),
        #[name(of 0)]
        #[error(transparent)]
        Decode(#[from] DecodeError),
        #[name(of 0)]
        #[error(transparent)]
        Index(#[from] crate::image::index::IndexError),
        #[name(of 0)]
        #[error(transparent)]
        Budget(#[from] crate::image::plan::BudgetError),
        /// A `Range` request answered with the whole file (200).
        #[name = "range-ignored"]
        #[error("{name}: {url} answered a Range request with the whole file; adaptive installs need single-range requests (adaptive_fallback = \"full\" downloads the whole image instead)")]
        RangeIgnored { url: String },
        /// The index does not hash to the signed digest.
        #[name = "index-hash-mismatch"]
        #[error("{name}: the index hashes to {got}, the message says {want}")]
        IndexHashMismatch { got: String, want: String },
        /// A fetched frame decoded to other bytes than the index lists.
        #[name = "frame-mismatch"]
        #[error("{name}: frame {frame} (image bytes {start}..{end}) does not decode to the blocks the index lists")]
        FrameMismatch { frame: usize, start: u64, end: u64 },
        /// A local slot could not be read while planning or copying.
        #[name = "slot-read"]
        #[error("{name}: {path}: {source}")]
        SlotRead { path: std::path::PathBuf, source: std::io::Error },
        #[name = "download-refused"]
        #[error("{name}: HTTP {status} from {url}")]
        Refused { status: u16, url: String },
        #[name = "download-failed"]
        #[error("{name}: {attempts} attempts without progress; last: {last}")]
        GaveUp { attempts: u32, last: String },
        #[name = "download-too-slow"]
        #[error(
            "{name}: {received} bytes in {elapsed_s} s, below the floor of {min_rate} bytes/s after a grace of {grace_s} s"
        )]
        TooSlow { received: u64, elapsed_s: u64, min_rate: u64, grace_s: u64 },
        #[name = "bad-url"]
        #[error("{name}: {0}")]
        BadUrl(String),
        /// The job's durable offset could not be saved.
        #[name = "checkpoint"]
        #[error("{name}: {0}")]
        Checkpoint(#[from] crate::store::StoreError),
        /// The TLS setup (the CA file) for an https image failed.
        #[name(hidden = "tls-config")]
        #[error(transparent)]
        Tls(crate::http::HttpError),
    }
}

/// What one attempt ended with, when it did not finish the image.
enum Interrupted {
    /// Worth retrying: a cut, a stall, a 5xx.
    Transient(String),
    Permanent(FetchError),
}

impl From<WriteError> for Interrupted {
    fn from(e: WriteError) -> Self {
        Self::Permanent(FetchError::Write(e))
    }
}

impl From<SinkError> for Interrupted {
    fn from(e: SinkError) -> Self {
        Self::Permanent(match e {
            SinkError::Write(e) => FetchError::Write(e),
            SinkError::Decode(e) => FetchError::Decode(e),
        })
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FetchStats {
    /// Bytes received over the network (including any re-sent), index included.
    pub received: u64,
    pub attempts: u32,
    /// Image bytes copied from the local slots (adaptive installs).
    pub reused: u64,
}

/// A durable point of a download: the image bytes fsynced in the slot, and
/// the transfer's state there (the job's whole figures, earlier runs included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub written: u64,
    pub transfer: Transfer,
}

pub type Client = crate::http::HttpsClient<Empty<Bytes>>;

/// What a download tells its caller as it goes.
pub struct FetchHooks<'a> {
    /// Each durable (fsynced) point; an error stops the download.
    pub on_checkpoint: &'a mut dyn FnMut(Checkpoint) -> Result<(), crate::store::StoreError>,
    /// Every received chunk: (image bytes done, total, the job's transfer so far).
    pub on_progress: &'a mut dyn FnMut(u64, u64, Transfer),
    /// An interrupted attempt: why, and the wait before the next.
    pub on_retry: &'a mut dyn FnMut(&str, Duration),
    /// A step worth a line in the journal (an adaptive install's plan).
    pub on_note: &'a mut dyn FnMut(String),
}

/// The whole download's floor: after `grace`, the bytes received since it
/// began must average at least `min_rate` per second. Pure: time is passed in.
#[derive(Debug, Clone, Copy)]
pub struct RateFloor {
    pub min_rate: u64,
    pub grace: Duration,
}

impl RateFloor {
    /// Bytes that must have arrived `elapsed` after the start.
    pub fn required(&self, elapsed: Duration) -> u64 {
        let over = elapsed.saturating_sub(self.grace);
        let whole = self.min_rate.saturating_mul(over.as_secs());
        whole.saturating_add(self.min_rate.saturating_mul(u64::from(over.subsec_millis())) / 1000)
    }

    pub fn check(&self, received: u64, elapsed: Duration) -> Result<(), FetchError> {
        if received < self.required(elapsed) {
            return Err(FetchError::TooSlow {
                received,
                elapsed_s: elapsed.as_secs(),
                min_rate: self.min_rate,
                grace_s: self.grace.as_secs(),
            });
        }
        Ok(())
    }
}

/// Where the whole download started: the floor's reference.
#[derive(Clone, Copy)]
struct Started {
    at: Instant,
    position: u64,
}

impl Started {
    fn check(&self, floor: &RateFloor, position: u64) -> Result<(), FetchError> {
        floor.check(position.saturating_sub(self.position), self.at.elapsed())
    }
}

/// Downloads a raw image until the writer holds all of it.
pub async fn fetch_into(
    client: &Client,
    url: &str,
    writer: &mut SlotWriter,
    policy: &FetchPolicy,
    base: Transfer,
    hooks: FetchHooks<'_>,
) -> Result<FetchStats, FetchError> {
    fetch_through(client, url, &mut RawSink { writer }, policy, base, hooks).await
}

/// Downloads a zstd image (`image.encoding = "zstd"`) from `base.source_offset`,
/// the frame that starts at the writer's position, decoding as it goes.
pub async fn fetch_zstd_into(
    client: &Client,
    url: &str,
    writer: &mut SlotWriter,
    policy: &FetchPolicy,
    base: Transfer,
    hooks: FetchHooks<'_>,
) -> Result<FetchStats, FetchError> {
    let source_offset = if writer.position() == 0 { 0 } else { base.source_offset };
    let mut sink = ZstdSink::new(writer, source_offset)?;
    fetch_through(client, url, &mut sink, policy, base, hooks).await
}

async fn fetch_through(
    client: &Client,
    url: &str,
    sink: &mut dyn Sink,
    policy: &FetchPolicy,
    base: Transfer,
    mut hooks: FetchHooks<'_>,
) -> Result<FetchStats, FetchError> {
    let uri: hyper::Uri = url.parse().map_err(|e| FetchError::BadUrl(format!("{url}: {e}")))?;
    let mut stats = FetchStats::default();
    let mut fruitless = 0u32;
    let mut last_progress = Instant::now();
    let mut last_checkpoint = sink.writer_ref().position();
    let mut changes = None;
    let mut netlink_tried = false;
    // The first attempt gets a whole stall timeout to start, on top of the
    // time an outage may last.
    let floor = RateFloor { min_rate: policy.min_rate, grace: policy.give_up_after + policy.stall_timeout };
    let started = Started { at: Instant::now(), position: sink.writer_ref().position() };
    loop {
        if sink.writer_ref().position() == sink.writer_ref().size() {
            return Ok(stats);
        }
        let before = sink.writer_ref().position();
        stats.attempts += 1;
        let mut progress = Progress { stats: &mut stats, base, last_checkpoint: &mut last_checkpoint };
        let result = attempt(client, &uri, sink, policy, &floor, &started, &mut progress, &mut hooks).await;
        match result {
            Ok(()) => return Ok(stats),
            Err(Interrupted::Permanent(e)) => return Err(e),
            Err(Interrupted::Transient(why)) => {
                // Keep what arrived: those bytes are never fetched again.
                sink.interrupted()?;
                if sink.writer_ref().position() > before {
                    fruitless = 0;
                    last_progress = Instant::now();
                } else {
                    fruitless += 1;
                }
                // An outage (a link down, a router rebooting) is ridden out:
                // give up only after enough attempts AND enough time.
                if fruitless >= policy.max_attempts && last_progress.elapsed() >= policy.give_up_after {
                    return Err(FetchError::GaveUp { attempts: fruitless, last: why });
                }
                started.check(&floor, sink.writer_ref().position())?;
                let wait = backoff(policy, fruitless);
                (hooks.on_retry)(&why, wait);
                // A network change (the link back up) ends the wait at once.
                if changes.is_none() && !netlink_tried {
                    netlink_tried = true;
                    changes = crate::sys::netlink::NetChanges::open().ok();
                }
                crate::sys::netlink::sleep_or_change(wait, &mut changes).await;
            }
        }
    }
}

/// Full jitter: a random delay up to `min(cap, base * 2^n)`.
pub fn backoff(policy: &FetchPolicy, n: u32) -> Duration {
    crate::backoff::Backoff { base: policy.backoff_base, cap: policy.backoff_cap }.delay(n)
}

/// One attempt's running figures.
struct Progress<'a> {
    stats: &'a mut FetchStats,
    base: Transfer,
    last_checkpoint: &'a mut u64,
}

impl Progress<'_> {
    fn transfer(&self, source_offset: u64) -> Transfer {
        Transfer {
            source_offset,
            bytes_fetched: self.base.bytes_fetched + self.stats.received,
            bytes_reused: self.base.bytes_reused + self.stats.reused,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    client: &Client,
    uri: &hyper::Uri,
    sink: &mut dyn Sink,
    policy: &FetchPolicy,
    floor: &RateFloor,
    started: &Started,
    progress: &mut Progress<'_>,
    hooks: &mut FetchHooks<'_>,
) -> Result<(), Interrupted> {
    let from = sink.resume_at();
    let size = sink.writer_ref().size();
    let limit = sink.source_limit();
    let mut request = hyper::Request::get(uri.clone())
        .header(hyper::header::USER_AGENT, concat!("fleetd/", env!("CARGO_PKG_VERSION")));
    if from > 0 {
        request = request.header(hyper::header::RANGE, format!("bytes={from}-"));
    }
    let request =
        request.body(Empty::new()).map_err(|e| Interrupted::Permanent(FetchError::BadUrl(e.to_string())))?;
    let response = match tokio::time::timeout(policy.stall_timeout, client.request(request)).await {
        Err(_) => return Err(Interrupted::Transient("no response (stall timeout)".into())),
        Ok(Err(e)) => return Err(Interrupted::Transient(format!("connect: {e}"))),
        Ok(Ok(r)) => r,
    };
    let status = response.status().as_u16();
    // Bytes of the body to drop: a server that ignores Range resends from 0.
    let mut skip = match status {
        206 => {
            check_content_range(response.headers(), from, sink.exact_source_size(), limit)?;
            0
        }
        200 => from,
        408 | 429 | 500..=599 => return Err(Interrupted::Transient(format!("HTTP {status}"))),
        _ => return Err(Interrupted::Permanent(FetchError::Refused { status, url: uri.to_string() })),
    };
    if let Some(len) = content_length(response.headers()) {
        let Some(end) = announced_end(status, from, len) else {
            return Err(WriteError::TooManyBytes { size }.into());
        };
        if end > limit {
            return Err(WriteError::TooManyBytes { size }.into());
        }
        // The server says the whole object is shorter: retrying cannot help.
        if let Some(exact) = sink.exact_source_size() {
            if end < exact && status == 200 {
                return Err(WriteError::Truncated { got: end, size }.into());
            }
        }
    }
    let mut body = response.into_body();
    let mut window_start = Instant::now();
    let mut window_bytes = 0u64;
    let mut source_position = from.saturating_sub(skip);
    loop {
        let position = sink.writer_ref().position();
        if position == size && sink.exact_source_size().is_none() {
            // A zstd image's seek table follows its last frame: not needed.
            return Ok(());
        }
        let frame = match tokio::time::timeout(policy.stall_timeout, body.frame()).await {
            Err(_) if position == size => return Ok(()),
            Err(_) => return Err(Interrupted::Transient(format!("stalled at {position} bytes"))),
            Ok(None) if position == size => return Ok(()),
            Ok(None) => return Err(Interrupted::Transient(format!("connection closed at {position} bytes"))),
            Ok(Some(Err(e))) => return Err(Interrupted::Transient(format!("receive: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        progress.stats.received += data.len() as u64;
        if skip > 0 {
            let n = skip.min(data.len() as u64) as usize;
            skip -= n as u64;
            data = data.slice(n..);
        }
        if data.is_empty() {
            continue;
        }
        source_position += data.len() as u64;
        if source_position > limit {
            return Err(WriteError::TooManyBytes { size }.into());
        }
        sink.push(&data)?;
        window_bytes += data.len() as u64;
        let position = sink.writer_ref().position();
        (hooks.on_progress)(position, size, progress.transfer(sink.source_offset()));
        if position - *progress.last_checkpoint >= policy.checkpoint_every || position == size {
            let written = sink.writer().sync()?;
            let checkpoint = Checkpoint { written, transfer: progress.transfer(sink.source_offset()) };
            (hooks.on_checkpoint)(checkpoint)
                .map_err(|e| Interrupted::Permanent(FetchError::Checkpoint(e)))?;
            *progress.last_checkpoint = written;
        }
        started.check(floor, position).map_err(Interrupted::Permanent)?;
        let elapsed = window_start.elapsed();
        if elapsed >= policy.rate_window {
            if policy.min_rate > 0 && window_bytes < policy.min_rate.saturating_mul(elapsed.as_secs().max(1))
            {
                return Err(Interrupted::Transient(format!(
                    "too slow: {window_bytes} bytes in {} s",
                    elapsed.as_secs()
                )));
            }
            window_start = Instant::now();
            window_bytes = 0;
        }
    }
}

/// Where the body would end in the image: a 206 continues at `from`, a 200
/// starts again at 0. `None` when a hostile Content-Length overflows.
fn announced_end(status: u16, from: u64, len: u64) -> Option<u64> {
    if status == 206 {
        from.checked_add(len)
    } else {
        Some(len)
    }
}

fn content_length(headers: &hyper::HeaderMap) -> Option<u64> {
    headers.get(hyper::header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// `Content-Range: bytes START-END/TOTAL` must start where we asked, and
/// its total be the signed size (`exact`, a raw image) or within `limit`.
fn check_content_range(
    headers: &hyper::HeaderMap,
    from: u64,
    exact: Option<u64>,
    limit: u64,
) -> Result<(), Interrupted> {
    let bad = |why: String| Interrupted::Transient(format!("bad Content-Range: {why}"));
    let value = headers
        .get(hyper::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad("missing".into()))?;
    let range = value.strip_prefix("bytes ").ok_or_else(|| bad(value.into()))?;
    let (span, total) = range.split_once('/').ok_or_else(|| bad(value.into()))?;
    let start: u64 = span.split('-').next().and_then(|s| s.parse().ok()).ok_or_else(|| bad(value.into()))?;
    if start != from {
        return Err(bad(format!("{value} does not start at {from}")));
    }
    if let Ok(total) = total.parse::<u64>() {
        if total > exact.unwrap_or(limit) {
            return Err(WriteError::TooManyBytes { size: exact.unwrap_or(limit) }.into());
        }
        if let Some(size) = exact.filter(|size| total < *size) {
            return Err(WriteError::Truncated { got: total, size }.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_needs_the_minimum_rate_on_average_after_the_grace() {
        let floor = RateFloor { min_rate: 1024, grace: Duration::from_secs(300) };
        let s = Duration::from_secs;
        // (received, elapsed, passes)
        let table = [
            (0, s(0), true),
            (0, s(300), true),
            (0, s(301), false),
            (1024, s(301), true),
            // A drip of 1 byte/s, every attempt "making progress".
            (600, s(600), false),
            (1024 * 300, s(600), true),
            (1024 * 300 - 1, s(600), false),
            (512, Duration::from_millis(300_500), true),
            (511, Duration::from_millis(300_500), false),
        ];
        for (received, elapsed, passes) in table {
            let result = floor.check(received, elapsed);
            assert_eq!(result.is_ok(), passes, "{received} bytes after {elapsed:?}: {result:?}");
            if let Err(e) = result {
                assert_eq!(e.name(), "download-too-slow");
            }
        }
        let none = RateFloor { min_rate: 0, grace: s(0) };
        assert!(none.check(0, s(1 << 40)).is_ok(), "no minimum rate: no floor");
        let huge = RateFloor { min_rate: u64::MAX, grace: s(0) };
        assert!(huge.check(u64::MAX - 1, s(u64::MAX)).is_err(), "saturates, never wraps");
    }

    #[test]
    fn a_content_length_that_overflows_the_offset_is_refused_not_wrapped() {
        assert_eq!(announced_end(206, 100, 50), Some(150));
        assert_eq!(announced_end(200, 100, 50), Some(50));
        // from + len would wrap to a small number (and panic in debug builds).
        assert_eq!(announced_end(206, 1 << 20, u64::MAX), None);
        assert_eq!(announced_end(206, u64::MAX, 1), None);
        assert_eq!(announced_end(200, 1 << 20, u64::MAX), Some(u64::MAX));
    }
}
