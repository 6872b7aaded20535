//! Adaptive installs: fetch the block index, read the local slots to find
//! the blocks the device already has, then fetch only the frames it lacks,
//! with single-range requests (S3 and CDNs serve these), a few in flight.
//!
//! The image still goes through the `SlotWriter` in order, so the whole
//! image's SHA-256 is checked as on every install, a cut resumes from the
//! last checkpoint (a frame boundary), and the running slot is only read.
//! The plan itself is `image::plan`, pure; this file reads and fetches.

use super::{
    backoff, Checkpoint, Client, FetchError, FetchHooks, FetchPolicy, FetchStats, ImageRequest, RateFloor,
};
use super::{AdaptiveRequest, DecodeError};
use crate::image::index::{block_hash, Frame, Index};
use crate::image::plan::{block_source, decide, BitSet, BlockSource, Decision, FetchRange, Lookup, Plan};
use crate::image::BLOCK;
use crate::update::slot_writer::SlotWriter;
use crate::update::Transfer;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use tokio::time::Instant;

/// Range requests open at once: enough to hide a round trip behind the
/// body being read, few enough to stay polite to a CDN.
const IN_FLIGHT: usize = 3;

/// Reads of the local slots, in bytes per read.
const READ_CHUNK: usize = 256 << 10;

pub(super) async fn install(
    client: &Client,
    request: &ImageRequest,
    adaptive: &AdaptiveRequest,
    writer: &mut SlotWriter,
    policy: &FetchPolicy,
    mut hooks: FetchHooks<'_>,
) -> Result<FetchStats, FetchError> {
    let mut stats = FetchStats::default();
    let index_bytes = fetch_index(client, adaptive, policy, &mut stats).await?;
    let index = Index::parse(index_bytes)?;
    index.check_image(writer.size(), &adaptive.sha256)?;

    let frame_size = u64::from(index.frame_size);
    let start_frame = (writer.position() / frame_size) as usize;
    let planning = std::time::Instant::now();
    let (in_target, lookup) = scan(&index, &adaptive.target, &adaptive.booted, start_frame)?;
    let plan = Plan::new(&index, start_frame, &in_target, &lookup);
    (hooks.on_note)(format!(
        "adaptive plan in {:.1} s: fetch {} bytes in {} range(s), reuse {} bytes from the slots (index {} bytes)",
        planning.elapsed().as_secs_f64(),
        plan.fetch_bytes,
        plan.ranges.len(),
        plan.reuse_bytes,
        adaptive.index.size,
    ));
    let base = Transfer {
        source_offset: request.base.source_offset,
        bytes_fetched: request.base.bytes_fetched,
        bytes_reused: request.base.bytes_reused,
    };
    match decide(&plan, adaptive.index.size, writer.size(), adaptive.max_fetch_percent, adaptive.fallback) {
        Decision::Adaptive => {}
        Decision::Fail(e) => return Err(e.into()),
        Decision::Full => {
            (hooks.on_note)(format!(
                "the plan is above adaptive_max_fetch = {} %: downloading the whole image",
                adaptive.max_fetch_percent
            ));
            return full_from_here(client, request, &index, writer, policy, base, stats, hooks).await;
        }
    }
    let mut assembly = Assembly::new(&index, &plan, adaptive, client, &request.url, policy)?;
    match assembly.run(writer, base, &mut stats, &in_target, &lookup, &mut hooks).await {
        Err(FetchError::RangeIgnored { url }) if adaptive.fallback == crate::image::plan::Fallback::Full => {
            (hooks.on_note)(format!("{url} ignores Range requests: downloading the rest of the image whole"));
            drop(assembly);
            full_from_here(client, request, &index, writer, policy, base, stats, hooks).await
        }
        other => other.map(|()| stats),
    }
}

/// The fallback: the rest of the `.zst` as one stream, from the frame at the
/// writer's position (a frame boundary, by construction).
#[allow(clippy::too_many_arguments)]
async fn full_from_here(
    client: &Client,
    request: &ImageRequest,
    index: &Index,
    writer: &mut SlotWriter,
    policy: &FetchPolicy,
    base: Transfer,
    stats: FetchStats,
    hooks: FetchHooks<'_>,
) -> Result<FetchStats, FetchError> {
    writer.write_pending()?;
    let frame = (writer.position() / u64::from(index.frame_size)) as usize;
    let source_offset = index.frames.get(frame).map_or(index.zst_size, |f| f.offset);
    let base = Transfer {
        source_offset,
        bytes_fetched: base.bytes_fetched + stats.received,
        bytes_reused: base.bytes_reused + stats.reused,
    };
    let rest = super::fetch_zstd_into(client, &request.url, writer, policy, base, hooks).await?;
    Ok(FetchStats {
        received: stats.received + rest.received,
        attempts: stats.attempts + rest.attempts,
        reused: stats.reused,
    })
}

/// The index, whole, checked against the signed digest before it is parsed.
async fn fetch_index(
    client: &Client,
    adaptive: &AdaptiveRequest,
    policy: &FetchPolicy,
    stats: &mut FetchStats,
) -> Result<Vec<u8>, FetchError> {
    let url = &adaptive.index.url;
    let uri: hyper::Uri = url.parse().map_err(|e| FetchError::BadUrl(format!("{url}: {e}")))?;
    let limit = adaptive.index.size;
    let mut fruitless = 0u32;
    let started = Instant::now();
    loop {
        stats.attempts += 1;
        match get_whole(client, &uri, limit, policy, stats).await {
            Ok(bytes) => {
                let got = crate::trust::hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
                if got != adaptive.index.sha256 {
                    return Err(FetchError::IndexHashMismatch { got, want: adaptive.index.sha256.clone() });
                }
                return Ok(bytes);
            }
            Err(Interrupted::Permanent(e)) => return Err(e),
            Err(Interrupted::Transient(why)) => {
                fruitless += 1;
                if fruitless >= policy.max_attempts && started.elapsed() >= policy.give_up_after {
                    return Err(FetchError::GaveUp { attempts: fruitless, last: why });
                }
                tokio::time::sleep(backoff(policy, fruitless)).await;
            }
        }
    }
}

enum Interrupted {
    Transient(String),
    Permanent(FetchError),
}

async fn get_whole(
    client: &Client,
    uri: &hyper::Uri,
    size: u64,
    policy: &FetchPolicy,
    stats: &mut FetchStats,
) -> Result<Vec<u8>, Interrupted> {
    let request = hyper::Request::get(uri.clone())
        .header(hyper::header::USER_AGENT, concat!("fleetd/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| Interrupted::Permanent(FetchError::BadUrl(e.to_string())))?;
    let response = match tokio::time::timeout(policy.stall_timeout, client.request(request)).await {
        Err(_) => return Err(Interrupted::Transient("no response (stall timeout)".into())),
        Ok(Err(e)) => return Err(Interrupted::Transient(format!("connect: {e}"))),
        Ok(Ok(r)) => r,
    };
    match response.status().as_u16() {
        200 => {}
        408 | 429 | 500..=599 => return Err(Interrupted::Transient(format!("HTTP {}", response.status()))),
        status => {
            return Err(Interrupted::Permanent(FetchError::Refused { status, url: uri.to_string() }));
        }
    }
    let mut body = response.into_body();
    let mut out = Vec::with_capacity(size as usize);
    loop {
        match tokio::time::timeout(policy.stall_timeout, body.frame()).await {
            Err(_) => return Err(Interrupted::Transient("stalled".into())),
            Ok(None) if out.len() as u64 == size => return Ok(out),
            Ok(None) => return Err(Interrupted::Transient(format!("closed at {} bytes", out.len()))),
            Ok(Some(Err(e))) => return Err(Interrupted::Transient(format!("receive: {e}"))),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    stats.received += data.len() as u64;
                    if out.len() as u64 + data.len() as u64 > size {
                        // More than signed: not the index, whatever it hashes to.
                        return Err(Interrupted::Permanent(FetchError::IndexHashMismatch {
                            got: format!("more than {size} bytes"),
                            want: "the signed index".into(),
                        }));
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

fn open_read(path: &Path) -> Result<File, FetchError> {
    File::open(path).map_err(|source| FetchError::SlotRead { path: path.to_path_buf(), source })
}

fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<usize, FetchError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(FetchError::SlotRead { path: path.to_path_buf(), source }),
        }
    }
    Ok(done)
}

/// Both local slots at once, one thread each, each read once in order: the
/// target for blocks already at their own offset, the booted slot for blocks
/// anywhere (up to twice the image's size: an image rarely moves data
/// further than it grew).
fn scan(
    index: &Index,
    target: &Path,
    booted: &Path,
    start_frame: usize,
) -> Result<(BitSet, Lookup), FetchError> {
    let start_block = start_frame * index.blocks_per_frame();
    std::thread::scope(|scope| {
        let in_target = scope.spawn(|| scan_target(index, target, start_block));
        let lookup = scan_booted(index, booted);
        let in_target = in_target.join().unwrap_or_else(|_| {
            Err(FetchError::SlotRead {
                path: target.to_path_buf(),
                source: std::io::Error::other("scan panicked"),
            })
        });
        Ok((in_target?, lookup?))
    })
}

fn scan_target(index: &Index, path: &Path, start_block: usize) -> Result<BitSet, FetchError> {
    let file = open_read(path)?;
    let mut present = BitSet::new(index.block_count());
    let mut buf = vec![0u8; READ_CHUNK];
    let mut block = start_block;
    while block < index.block_count() {
        let offset = block as u64 * BLOCK as u64;
        let want = ((index.size - offset) as usize).min(READ_CHUNK);
        let got = read_at(&file, path, &mut buf[..want], offset)?;
        if got == 0 {
            break;
        }
        for chunk in buf[..got].chunks(BLOCK) {
            if chunk.len() == index.block_len(block) && block_hash(chunk) == *index.block(block) {
                present.set(block);
            }
            block += 1;
        }
    }
    Ok(present)
}

fn scan_booted(index: &Index, path: &Path) -> Result<Lookup, FetchError> {
    let mut lookup = Lookup::new(index);
    let file = open_read(path)?;
    let end = index.size.saturating_mul(2);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut offset = 0u64;
    while offset < end {
        let want = ((end - offset) as usize).min(READ_CHUNK);
        let got = read_at(&file, path, &mut buf[..want], offset)?;
        for (i, chunk) in buf[..got].chunks_exact(BLOCK).enumerate() {
            let block = (offset / BLOCK as u64) as usize + i;
            lookup.record(index, &block_hash(chunk), u32::try_from(block).unwrap_or(u32::MAX));
        }
        if got < want {
            break;
        }
        offset += got as u64;
    }
    Ok(lookup)
}

/// The second pass: every frame from the start, in order, into the writer.
struct Assembly<'a> {
    index: &'a Index,
    plan: &'a Plan,
    target: (File, &'a Path),
    booted: (File, &'a Path),
    fetcher: Fetcher<'a>,
    decompressor: zstd::bulk::Decompressor<'static>,
    raw: Vec<u8>,
}

impl<'a> Assembly<'a> {
    fn new(
        index: &'a Index,
        plan: &'a Plan,
        adaptive: &'a AdaptiveRequest,
        client: &'a Client,
        url: &'a str,
        policy: &'a FetchPolicy,
    ) -> Result<Self, FetchError> {
        let uri: hyper::Uri = url.parse().map_err(|e| FetchError::BadUrl(format!("{url}: {e}")))?;
        let mut decompressor = zstd::bulk::Decompressor::new()
            .map_err(|e| DecodeError::Corrupt { offset: 0, detail: e.to_string() })?;
        decompressor
            .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(super::sink::WINDOW_LOG_MAX))
            .map_err(|e| DecodeError::Corrupt { offset: 0, detail: e.to_string() })?;
        Ok(Self {
            index,
            plan,
            target: (open_read(&adaptive.target)?, &adaptive.target),
            booted: (open_read(&adaptive.booted)?, &adaptive.booted),
            fetcher: Fetcher::new(client, uri, plan.ranges.iter().copied().collect(), policy),
            decompressor,
            raw: Vec::with_capacity(index.frame_size as usize),
        })
    }

    async fn run(
        &mut self,
        writer: &mut SlotWriter,
        base: Transfer,
        stats: &mut FetchStats,
        in_target: &BitSet,
        lookup: &Lookup,
        hooks: &mut FetchHooks<'_>,
    ) -> Result<(), FetchError> {
        let index = self.index;
        let mut last_checkpoint = writer.position();
        let transfer = |stats: &FetchStats, fetcher: &Fetcher<'_>| Transfer {
            source_offset: 0,
            bytes_fetched: base.bytes_fetched + stats.received + fetcher.received,
            bytes_reused: base.bytes_reused + stats.reused,
        };
        for f in self.plan.start_frame..index.frames.len() {
            let raw = index.frame_raw_range(f);
            // A resumed install may start inside its first frame.
            let skip = writer.position().saturating_sub(raw.start) as usize;
            let planned = self.plan.fetches(f);
            if !planned && self.copy_local(f, in_target, lookup, writer, skip)? {
                stats.reused += raw.end - raw.start - skip as u64;
            } else {
                let compressed = if planned {
                    self.fetcher.planned(index.frames[f]).await?
                } else {
                    self.fetcher.alone(index.frames[f]).await?
                };
                self.decode(f, &compressed)?;
                writer.push(&self.raw[skip..])?;
            }
            let position = writer.position();
            (hooks.on_progress)(position, writer.size(), transfer(stats, &self.fetcher));
            if position - last_checkpoint >= self.fetcher.policy.checkpoint_every || position == writer.size()
            {
                let written = writer.sync()?;
                let mut t = transfer(stats, &self.fetcher);
                t.source_offset = index.frames.get(f + 1).map_or(index.zst_size, |fr| fr.offset);
                (hooks.on_checkpoint)(Checkpoint { written, transfer: t }).map_err(FetchError::Checkpoint)?;
                last_checkpoint = written;
            }
        }
        stats.received += self.fetcher.received;
        self.fetcher.received = 0;
        Ok(())
    }

    /// Frame `f` from the local slots, each block re-hashed as it is read.
    /// `false` (nothing pushed) when a block is not what the plan found
    /// there any more: the frame is then fetched.
    fn copy_local(
        &mut self,
        f: usize,
        in_target: &BitSet,
        lookup: &Lookup,
        writer: &mut SlotWriter,
        skip: usize,
    ) -> Result<bool, FetchError> {
        let index = self.index;
        let per = index.blocks_per_frame();
        let first = f * per;
        let last = ((f + 1) * per).min(index.block_count());
        self.raw.clear();
        let mut sources = Vec::with_capacity(last - first);
        for b in first..last {
            let len = index.block_len(b);
            let at = self.raw.len();
            self.raw.resize(at + len, 0);
            let source = block_source(index, in_target, lookup, b);
            let (file, path, offset) = match source {
                BlockSource::Target => (&self.target.0, self.target.1, b as u64 * BLOCK as u64),
                BlockSource::Booted(offset) => (&self.booted.0, self.booted.1, offset),
                BlockSource::Fetch => return Ok(false),
            };
            let got = read_at(file, path, &mut self.raw[at..], offset)?;
            if got != len || block_hash(&self.raw[at..]) != *index.block(b) {
                return Ok(false);
            }
            sources.push(source);
        }
        // Blocks already in place are hashed, not written again.
        let mut at = 0;
        for (i, source) in sources.iter().enumerate() {
            let len = index.block_len(first + i);
            let (from, to) = (at.max(skip), at + len);
            at = to;
            if from >= to {
                continue;
            }
            if *source == BlockSource::Target {
                writer.push_unchanged(&self.raw[from..to])?;
            } else {
                writer.push(&self.raw[from..to])?;
            }
        }
        Ok(true)
    }

    /// A fetched frame, decompressed into `raw` and checked block by block.
    fn decode(&mut self, f: usize, compressed: &[u8]) -> Result<(), FetchError> {
        let range = self.index.frame_raw_range(f);
        let len = (range.end - range.start) as usize;
        self.raw.clear();
        self.raw.reserve(len);
        let mismatch = || FetchError::FrameMismatch { frame: f, start: range.start, end: range.end };
        let n = self.decompressor.decompress_to_buffer(compressed, &mut self.raw).map_err(|_| mismatch())?;
        if n != len {
            return Err(mismatch());
        }
        let first = f * self.index.blocks_per_frame();
        for (i, block) in self.raw.chunks(BLOCK).enumerate() {
            if block_hash(block) != *self.index.block(first + i) {
                return Err(mismatch());
            }
        }
        Ok(())
    }
}

/// The planned ranges, fetched in order with up to `IN_FLIGHT` requests open,
/// handed out one frame at a time. A cut asks again from the first frame not
/// handed out; a frame outside the plan (a local block that changed since
/// planning) is asked alone.
struct Fetcher<'a> {
    client: &'a Client,
    uri: hyper::Uri,
    policy: &'a FetchPolicy,
    /// Ranges not yet requested.
    queue: VecDeque<FetchRange>,
    /// Requested, in order, with their responses on the way.
    open: VecDeque<(FetchRange, ResponseTask)>,
    /// The rest of a range to ask again before anything else (after a cut).
    again: Option<FetchRange>,
    /// Bytes read before the cut, at their offset: `again` continues them.
    carry: Option<(u64, Vec<u8>)>,
    /// The range being read.
    current: Option<Reading>,
    /// Bytes received from the network.
    received: u64,
    fruitless: u32,
    last_progress: Instant,
    floor: RateFloor,
    started: Instant,
}

type ResponseTask = tokio::task::JoinHandle<Result<hyper::Response<hyper::body::Incoming>, String>>;

struct Reading {
    /// Where the range asked for ends in the `.zst`.
    end: u64,
    first_frame: usize,
    body: hyper::body::Incoming,
    /// Bytes read and not yet handed out, starting at `pending_at`.
    pending: Vec<u8>,
    pending_at: u64,
    /// Where the server's answer ends (a CDN may answer less than asked).
    answered_end: u64,
    /// A frame of this answer was handed out: a short answer still made progress.
    handed_any: bool,
    /// Where this answer started.
    answer_start: u64,
}

/// A short answer of at least this many bytes is progress enough to ask for
/// the rest at once; less waits out a backoff like any failed attempt.
const MIN_ANSWER: u64 = 16 << 10;

impl<'a> Fetcher<'a> {
    fn new(
        client: &'a Client,
        uri: hyper::Uri,
        ranges: VecDeque<FetchRange>,
        policy: &'a FetchPolicy,
    ) -> Self {
        Self {
            client,
            uri,
            policy,
            queue: ranges,
            open: VecDeque::new(),
            again: None,
            carry: None,
            current: None,
            received: 0,
            fruitless: 0,
            last_progress: Instant::now(),
            floor: RateFloor {
                min_rate: policy.min_rate,
                grace: policy.give_up_after + policy.stall_timeout,
            },
            started: Instant::now(),
        }
    }

    fn request(&self, offset: u64, len: u64) -> ResponseTask {
        let request = hyper::Request::get(self.uri.clone())
            .header(hyper::header::USER_AGENT, concat!("fleetd/", env!("CARGO_PKG_VERSION")))
            .header(hyper::header::RANGE, format!("bytes={}-{}", offset, offset + len - 1))
            .body(Empty::<Bytes>::new());
        let client = self.client.clone();
        let stall = self.policy.stall_timeout;
        // Spawned, so that the next ranges' requests travel while this body is read.
        tokio::spawn(async move {
            let request = request.map_err(|e| e.to_string())?;
            match tokio::time::timeout(stall, client.request(request)).await {
                Err(_) => Err("no response (stall timeout)".to_string()),
                Ok(Err(e)) => Err(format!("connect: {e}")),
                Ok(Ok(r)) => Ok(r),
            }
        })
    }

    fn fill(&mut self) {
        while self.open.len() < IN_FLIGHT {
            let Some(range) = self.queue.pop_front() else { break };
            let task = self.request(range.offset, range.len);
            self.open.push_back((range, task));
        }
    }

    /// Frame `f`'s compressed bytes, from the planned ranges.
    async fn planned(&mut self, frame: Frame) -> Result<Vec<u8>, FetchError> {
        loop {
            let result = self.next_planned(frame).await;
            if let Some(bytes) = self.settle(result).await? {
                return Ok(bytes);
            }
        }
    }

    /// A frame outside the plan, asked alone; the planned ranges wait.
    async fn alone(&mut self, frame: Frame) -> Result<Vec<u8>, FetchError> {
        loop {
            let result = self.read_alone(frame).await;
            if let Some(bytes) = self.settle(result).await? {
                return Ok(bytes);
            }
        }
    }

    /// A frame, or the wait before trying again, or the end of trying.
    async fn settle(&mut self, result: Result<Vec<u8>, Interrupted>) -> Result<Option<Vec<u8>>, FetchError> {
        match result {
            Ok(bytes) => {
                self.fruitless = 0;
                self.last_progress = Instant::now();
                Ok(Some(bytes))
            }
            Err(Interrupted::Permanent(e)) => Err(e),
            Err(Interrupted::Transient(why)) => {
                self.fruitless += 1;
                if self.fruitless >= self.policy.max_attempts
                    && self.last_progress.elapsed() >= self.policy.give_up_after
                {
                    return Err(FetchError::GaveUp { attempts: self.fruitless, last: why });
                }
                self.floor.check(self.received, self.started.elapsed())?;
                tokio::time::sleep(backoff(self.policy, self.fruitless)).await;
                Ok(None)
            }
        }
    }

    async fn read_alone(&mut self, frame: Frame) -> Result<Vec<u8>, Interrupted> {
        let len = u64::from(frame.len);
        let response = self.request(frame.offset, len).await;
        let mut reading = self.reading(response, frame.offset, frame.offset + len, 0)?;
        loop {
            if reading.pending.len() as u64 == len {
                return Ok(reading.pending);
            }
            if reading.pending_at + reading.pending.len() as u64 >= reading.answered_end {
                return Err(Interrupted::Transient("the server answered part of a frame".into()));
            }
            self.read_more(&mut reading).await?;
        }
    }

    /// A response to a range request, checked: 206 from the offset asked.
    fn reading(
        &self,
        response: Result<Result<hyper::Response<hyper::body::Incoming>, String>, tokio::task::JoinError>,
        offset: u64,
        end: u64,
        first_frame: usize,
    ) -> Result<Reading, Interrupted> {
        let response = match response {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => return Err(Interrupted::Transient(why)),
            Err(e) => return Err(Interrupted::Transient(format!("request task: {e}"))),
        };
        let status = response.status().as_u16();
        match status {
            206 => {}
            200 => {
                return Err(Interrupted::Permanent(FetchError::RangeIgnored { url: self.uri.to_string() }))
            }
            408 | 429 | 500..=599 => return Err(Interrupted::Transient(format!("HTTP {status}"))),
            _ => {
                return Err(Interrupted::Permanent(FetchError::Refused { status, url: self.uri.to_string() }))
            }
        }
        let answered_end = match answered_range(response.headers(), offset) {
            Some(answered) if answered > offset && answered <= end => answered,
            _ => {
                return Err(Interrupted::Transient("a 206 whose Content-Range is not the range asked".into()))
            }
        };
        Ok(Reading {
            end,
            first_frame,
            body: response.into_body(),
            pending: Vec::new(),
            pending_at: offset,
            answered_end,
            handed_any: false,
            answer_start: offset,
        })
    }

    async fn read_more(&mut self, reading: &mut Reading) -> Result<(), Interrupted> {
        match tokio::time::timeout(self.policy.stall_timeout, reading.body.frame()).await {
            Err(_) => Err(Interrupted::Transient("stalled in a range".into())),
            Ok(None) => Err(Interrupted::Transient("connection closed in a range".into())),
            Ok(Some(Err(e))) => Err(Interrupted::Transient(format!("receive: {e}"))),
            Ok(Some(Ok(data))) => {
                if let Ok(data) = data.into_data() {
                    self.received += data.len() as u64;
                    let read_end = reading.pending_at + reading.pending.len() as u64;
                    if read_end + data.len() as u64 > reading.answered_end {
                        return Err(Interrupted::Transient("more bytes than the Content-Range says".into()));
                    }
                    reading.pending.extend_from_slice(&data);
                }
                Ok(())
            }
        }
    }

    async fn next_planned(&mut self, frame: Frame) -> Result<Vec<u8>, Interrupted> {
        let want = frame.len as usize;
        loop {
            let mut reading = match self.current.take() {
                Some(reading) => reading,
                None => {
                    let (range, response) = match self.again.take() {
                        Some(range) => (range, self.request(range.offset, range.len).await),
                        None => {
                            self.fill();
                            let Some((range, task)) = self.open.pop_front() else {
                                return Err(Interrupted::Permanent(FetchError::BadUrl(
                                    "the plan has no range for a frame it fetches".into(),
                                )));
                            };
                            self.fill();
                            (range, task.await)
                        }
                    };
                    match self.reading(response, range.offset, range.offset + range.len, range.first_frame) {
                        Ok(mut reading) => {
                            if let Some((at, bytes)) = self.carry.take() {
                                if at + bytes.len() as u64 == range.offset {
                                    reading.pending = bytes;
                                    reading.pending_at = at;
                                }
                            }
                            reading
                        }
                        Err(e) => {
                            self.again = Some(range);
                            return Err(e);
                        }
                    }
                }
            };
            if frame.offset < reading.pending_at || frame.offset >= reading.end {
                // Not this range's frame: the plan and the reading disagree.
                return Err(Interrupted::Permanent(FetchError::BadUrl(format!(
                    "frame at {} is outside the range being read ({}..{})",
                    frame.offset, reading.pending_at, reading.end
                ))));
            }
            let rel = (frame.offset - reading.pending_at) as usize;
            if reading.pending.len() >= rel + want {
                let bytes = reading.pending[rel..rel + want].to_vec();
                reading.pending.drain(..rel + want);
                reading.pending_at = frame.offset + want as u64;
                reading.handed_any = true;
                if reading.pending_at < reading.end {
                    self.current = Some(reading);
                }
                return Ok(bytes);
            }
            let read_end = reading.pending_at + reading.pending.len() as u64;
            let result = if read_end >= reading.answered_end {
                // The server answered less than asked (a CDN's cap): ask for the rest.
                Err(Interrupted::Transient(format!(
                    "the server answered up to byte {read_end} of {}",
                    reading.end
                )))
            } else {
                self.read_more(&mut reading).await
            };
            match result {
                Ok(()) => self.current = Some(reading),
                Err(e) => {
                    // Ask again from the first byte not read, keeping what was.
                    self.again = Some(FetchRange {
                        first_frame: reading.first_frame,
                        frames: 0,
                        offset: read_end,
                        len: reading.end - read_end,
                    });
                    let delivered = read_end - reading.answer_start;
                    self.carry = Some((reading.pending_at, std::mem::take(&mut reading.pending)));
                    let short =
                        matches!(&e, Interrupted::Transient(why) if why.starts_with("the server answered"));
                    if short && (reading.handed_any || delivered >= MIN_ANSWER) {
                        // A short answer is progress, not a failure: go on at once.
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }
}

impl Drop for Fetcher<'_> {
    fn drop(&mut self) {
        for (_, task) in &self.open {
            task.abort();
        }
    }
}

/// `Content-Range: bytes START-END/TOTAL` starting at `from`: the end, exclusive.
fn answered_range(headers: &hyper::HeaderMap, from: u64) -> Option<u64> {
    let value = headers.get(hyper::header::CONTENT_RANGE)?.to_str().ok()?;
    let span = value.strip_prefix("bytes ")?.split('/').next()?;
    let (start, end) = span.split_once('-')?;
    let (start, end): (u64, u64) = (start.trim().parse().ok()?, end.trim().parse().ok()?);
    (start == from && end >= start).then_some(end + 1)
}
