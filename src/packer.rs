//! Windows: requests of one input partition and one route (provider, model,
//! endpoint), streamed to a spool file as they arrive and sealed into a
//! batch when full (`max_requests`, `max_bytes`) or old (`max_wait`).
//!
//! A window keeps only about 30 bytes of memory per request: the request's
//! input offset, where its metadata lies in the side file, and a hash of its
//! `custom_id`. Bodies and metadata live on disk. The packer is a plain
//! synchronous struct that takes `now` as an argument.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{ProviderKind, RouteLimits};
use crate::model::OutputCap;

/// Where a request goes: a provider, a model and an endpoint. Requests of
/// one route share a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub provider: Arc<str>,
    pub kind: ProviderKind,
    pub model: Arc<str>,
    pub endpoint: &'static str,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}{}", self.provider, self.model, self.endpoint)
    }
}

/// A request as the packer takes it, borrowed from the input message.
#[derive(Debug, Clone, Copy)]
pub struct PackRequest<'a> {
    pub custom_id: &'a str,
    pub body: &'a RawValue,
    pub metadata: Option<&'a RawValue>,
    pub offset: i64,
    /// The input message's timestamp (Unix milliseconds).
    pub timestamp_ms: Option<i64>,
    /// The provider attempt and token-limit splits the request is due for:
    /// `(1, 0)`, unless the journal released it to a retry. Requests of
    /// different attempts never share a window.
    pub retry: (u32, u32),
    /// What the body caps its output at (read when it was decoded).
    pub output_cap: OutputCap,
}

/// What the side file keeps of each request for its result, borrowed from
/// the request as it is written and from the line as it is read back.
#[derive(Debug, Serialize, Deserialize)]
pub struct RequestMeta<'a> {
    #[serde(borrow)]
    pub custom_id: Cow<'a, str>,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    #[serde(borrow)]
    pub metadata: Option<&'a RawValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("custom_id `{0}` is already in an open window of this route")]
    Duplicate(String),
    #[error("request line of {size} bytes exceeds the route's max_bytes of {max}")]
    TooLarge { size: u64, max: u64 },
    #[error("writing spool file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The output tokens a batch's requests may produce at most, for the
/// budget's estimate: the sum of the caps requests set, and how many set
/// none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputCaps {
    pub tokens: u64,
    pub uncapped: u64,
}

impl OutputCaps {
    /// Adds one request of `endpoint`. Embeddings produce no output tokens.
    fn add(&mut self, endpoint: &str, cap: OutputCap) {
        if endpoint.ends_with("/embeddings") {
            return;
        }
        match cap.tokens {
            Some(tokens) => self.tokens += tokens.saturating_mul(cap.choices),
            None => self.uncapped += cap.choices,
        }
    }
}

fn hash_custom_id(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

/// How much of a batch's side file [`SealedBatch::read_meta`] reads at once.
pub const META_CHUNK: u64 = 64 * 1024;

/// A window on a batch's side file, reused across [`SealedBatch::read_meta`]
/// calls: at most [`META_CHUNK`] bytes, or one line if longer.
#[derive(Debug, Default)]
pub struct MetaBuf {
    bytes: Vec<u8>,
    /// The file offset of `bytes[0]`.
    at: u64,
}

/// A sealed window, ready to submit: its spool files and the small index
/// that maps provider result lines back to input offsets.
#[derive(Debug)]
pub struct SealedBatch {
    /// Local batch id, unique forever: `bl-<partition>-<uuidv7>`.
    pub id: String,
    pub topic: Arc<str>,
    pub partition: i32,
    pub route: Route,
    /// The batch input: one line per request in the route's format.
    pub input_path: PathBuf,
    /// One [`RequestMeta`] line per request, in input order.
    pub meta_path: PathBuf,
    pub input_bytes: u64,
    pub output_caps: OutputCaps,
    /// Input offsets, in request order.
    pub offsets: Vec<i64>,
    /// `meta_pos[i]..meta_pos[i + 1]` is request i's line in the side file.
    meta_pos: Vec<u64>,
    index: HashMap<u64, u32>,
    pub opened_at: Instant,
    pub attempt: u32,
    /// Token-limit splits its requests went through.
    pub requeues: u32,
    /// The epoch under which this instance owns the batch's partition; set
    /// by ingest when it hands the batch on. Journal writes carry it.
    pub epoch: String,
    /// For a batch rebuilt from the journal after a restart or hand-over:
    /// the furthest phase its earlier owner recorded.
    pub recovered: Option<Box<crate::journal::BatchRecord>>,
}

impl SealedBatch {
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The position of `custom_id` in this batch. A hash match is confirmed
    /// against the side file by [`Self::read_meta`]'s caller.
    pub fn index_of(&self, custom_id: &str) -> Option<usize> {
        self.index
            .get(&hash_custom_id(custom_id))
            .map(|&i| i as usize)
    }

    /// Opens the side file for [`Self::read_meta`].
    pub fn open_meta(&self) -> io::Result<File> {
        File::open(&self.meta_path)
    }

    /// Reads request `i`'s metadata, which borrows `buf`. Results mostly
    /// come in batch order, so `buf` reads the side file ahead in chunks
    /// and serves the next lines from memory: a system call per
    /// [`META_CHUNK`] rather than per request, whatever the order.
    pub fn read_meta<'b>(
        &self,
        file: &File,
        i: usize,
        buf: &'b mut MetaBuf,
    ) -> io::Result<RequestMeta<'b>> {
        let start = self.meta_pos[i];
        let end = self.meta_pos[i + 1];
        let cached = buf.at..buf.at + buf.bytes.len() as u64;
        if !(cached.contains(&start) && end <= cached.end) {
            let file_end = self.meta_pos.last().copied().unwrap_or(end);
            let len = (file_end - start).min(META_CHUNK.max(end - start));
            buf.bytes.clear();
            buf.bytes.resize(len as usize, 0);
            file.read_exact_at(&mut buf.bytes, start)?;
            buf.at = start;
        }
        let line = &buf.bytes[(start - buf.at) as usize..(end - buf.at) as usize];
        serde_json::from_slice(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// A new batch of the same partition and route, under a new id, holding
    /// the requests at positions `picks` (in any order) of this one: their
    /// lines are copied from this batch's spool files, one pass each.
    pub fn successor(
        &self,
        dir: &Path,
        picks: &[u32],
        attempt: u32,
        requeues: u32,
    ) -> Result<SealedBatch, PackError> {
        #[derive(Deserialize)]
        struct Line<'a> {
            #[serde(borrow, default)]
            body: Option<&'a RawValue>,
            #[serde(borrow, default)]
            params: Option<&'a RawValue>,
        }
        let limits = RouteLimits {
            max_requests: u32::MAX,
            max_bytes: u64::MAX,
            max_wait: std::time::Duration::MAX,
        };
        let mut w = Window::open(dir, self.partition, &self.route, limits, Instant::now())?;
        w.retry = (attempt, requeues);
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| PackError::Io { path, source }
        };
        let input = File::open(&self.input_path).map_err(io_err(&self.input_path))?;
        let meta_file = self.open_meta().map_err(io_err(&self.meta_path))?;
        let mut lines = io::BufReader::with_capacity(64 * 1024, input);
        let mut line = Vec::new();
        let mut meta_buf = MetaBuf::default();
        let mut picks = picks.to_vec();
        picks.sort_unstable();
        picks.dedup();
        let mut next = picks.into_iter().peekable();
        for i in 0..self.len() as u32 {
            let Some(&want) = next.peek() else { break };
            line.clear();
            io::BufRead::read_until(&mut lines, b'\n', &mut line)
                .map_err(io_err(&self.input_path))?;
            if i != want {
                continue;
            }
            next.next();
            let meta = self
                .read_meta(&meta_file, i as usize, &mut meta_buf)
                .map_err(io_err(&self.meta_path))?;
            let parsed: Line<'_> = serde_json::from_slice(&line).map_err(|e| PackError::Io {
                path: self.input_path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
            let body = parsed.body.or(parsed.params).ok_or_else(|| PackError::Io {
                path: self.input_path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, "a batch line without a body"),
            })?;
            let req = PackRequest {
                custom_id: &meta.custom_id,
                body,
                metadata: meta.metadata,
                offset: meta.offset,
                timestamp_ms: meta.timestamp_ms,
                retry: (attempt, requeues),
                output_cap: OutputCap::of_body(body),
            };
            w.write(&req, &line)?;
        }
        let mut batch = w.seal(&self.topic)?;
        batch.epoch = self.epoch.clone();
        Ok(batch)
    }

    /// Removes the spool files.
    pub fn remove_files(&self) {
        let _ = std::fs::remove_file(&self.input_path);
        let _ = std::fs::remove_file(&self.meta_path);
    }
}

struct Window {
    id: String,
    partition: i32,
    route: Route,
    limits: RouteLimits,
    opened_at: Instant,
    input_path: PathBuf,
    meta_path: PathBuf,
    input: BufWriter<File>,
    meta: BufWriter<File>,
    input_bytes: u64,
    output_caps: OutputCaps,
    offsets: Vec<i64>,
    meta_pos: Vec<u64>,
    index: HashMap<u64, u32>,
    /// Attempt and requeues of every request in it.
    retry: (u32, u32),
    /// The metadata line being written, reused for every request.
    meta_line: Vec<u8>,
}

impl Window {
    fn open(
        dir: &Path,
        partition: i32,
        route: &Route,
        limits: RouteLimits,
        now: Instant,
    ) -> Result<Window, PackError> {
        let id = format!("bl-{partition}-{}", uuid::Uuid::now_v7());
        Window::open_as(dir, id, partition, route, limits, now)
    }

    fn open_as(
        dir: &Path,
        id: String,
        partition: i32,
        route: &Route,
        limits: RouteLimits,
        now: Instant,
    ) -> Result<Window, PackError> {
        // A batch rebuilt under its old id (a partition taken back while the
        // old task still winds down) gets files of its own: the old task's
        // clean-up must not remove them.
        static SPOOL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SPOOL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let input_path = dir.join(format!("{id}.{seq}.jsonl"));
        let meta_path = dir.join(format!("{id}.{seq}.meta.jsonl"));
        let create = |path: &Path| {
            File::create(path)
                .map(|f| BufWriter::with_capacity(64 * 1024, f))
                .map_err(|source| PackError::Io {
                    path: path.to_owned(),
                    source,
                })
        };
        Ok(Window {
            input: create(&input_path)?,
            meta: create(&meta_path)?,
            id,
            partition,
            route: route.clone(),
            limits,
            opened_at: now,
            input_path,
            meta_path,
            input_bytes: 0,
            output_caps: OutputCaps::default(),
            offsets: Vec::new(),
            meta_pos: vec![0],
            index: HashMap::new(),
            retry: (1, 0),
            meta_line: Vec::new(),
        })
    }

    fn len(&self) -> usize {
        self.offsets.len()
    }

    fn is_full(&self) -> bool {
        self.len() >= self.limits.max_requests as usize || self.input_bytes >= self.limits.max_bytes
    }

    fn write(&mut self, req: &PackRequest<'_>, line: &[u8]) -> Result<(), PackError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| PackError::Io { path, source }
        };
        self.input
            .write_all(line)
            .map_err(io_err(&self.input_path))?;
        let meta = RequestMeta {
            custom_id: Cow::Borrowed(req.custom_id),
            offset: req.offset,
            timestamp_ms: req.timestamp_ms,
            metadata: req.metadata,
        };
        let meta_line = &mut self.meta_line;
        meta_line.clear();
        serde_json::to_writer(&mut *meta_line, &meta).expect("metadata serialises");
        meta_line.push(b'\n');
        self.meta
            .write_all(meta_line)
            .map_err(io_err(&self.meta_path))?;
        self.input_bytes += line.len() as u64;
        self.output_caps.add(self.route.endpoint, req.output_cap);
        let end = self.meta_pos.last().copied().unwrap_or(0) + meta_line.len() as u64;
        self.meta_pos.push(end);
        self.index
            .insert(hash_custom_id(req.custom_id), self.offsets.len() as u32);
        self.offsets.push(req.offset);
        Ok(())
    }

    fn seal(mut self, topic: &Arc<str>) -> Result<SealedBatch, PackError> {
        self.input.flush().map_err(|source| PackError::Io {
            path: self.input_path.clone(),
            source,
        })?;
        self.meta.flush().map_err(|source| PackError::Io {
            path: self.meta_path.clone(),
            source,
        })?;
        Ok(SealedBatch {
            id: self.id,
            topic: topic.clone(),
            partition: self.partition,
            route: self.route,
            input_path: self.input_path,
            meta_path: self.meta_path,
            input_bytes: self.input_bytes,
            output_caps: self.output_caps,
            offsets: self.offsets,
            meta_pos: self.meta_pos,
            index: self.index,
            opened_at: self.opened_at,
            attempt: self.retry.0,
            requeues: self.retry.1,
            epoch: String::new(),
            recovered: None,
        })
    }

    fn discard(self) {
        drop(self.input);
        drop(self.meta);
        let _ = std::fs::remove_file(&self.input_path);
        let _ = std::fs::remove_file(&self.meta_path);
    }
}

/// Encodes one request as a line of the route's batch input: OpenAI's JSONL
/// (OpenAI and xAI) or an Anthropic `requests[]` item.
pub fn encode_line(
    kind: ProviderKind,
    endpoint: &str,
    custom_id: &str,
    body: &RawValue,
) -> Vec<u8> {
    let mut line = Vec::new();
    encode_line_into(&mut line, kind, endpoint, custom_id, body);
    line
}

/// [`encode_line`] into `line`, cleared first.
fn encode_line_into(
    line: &mut Vec<u8>,
    kind: ProviderKind,
    endpoint: &str,
    custom_id: &str,
    body: &RawValue,
) {
    // custom_id is [A-Za-z0-9_-] and endpoint one of a fixed list: neither
    // needs JSON escaping; the body is copied verbatim.
    let body = body.get();
    line.clear();
    line.reserve(body.len() + custom_id.len() + endpoint.len() + 64);
    line.extend_from_slice(b"{\"custom_id\":\"");
    line.extend_from_slice(custom_id.as_bytes());
    match kind {
        ProviderKind::Anthropic => line.extend_from_slice(b"\",\"params\":"),
        ProviderKind::Openai | ProviderKind::Xai => {
            line.extend_from_slice(b"\",\"method\":\"POST\",\"url\":\"");
            line.extend_from_slice(endpoint.as_bytes());
            line.extend_from_slice(b"\",\"body\":");
        }
    }
    // Raw line breaks in valid JSON can only be whitespace between tokens
    // (inside strings they must be escaped): a pretty-printed body becomes
    // one line by turning them into spaces.
    let start = line.len();
    line.extend_from_slice(body.as_bytes());
    for b in &mut line[start..] {
        if *b == b'\n' || *b == b'\r' {
            *b = b' ';
        }
    }
    line.extend_from_slice(b"}\n");
}

/// A batch known from the journal, filled again from the input topic by
/// offset after a restart or hand-over, under its original id.
pub struct RebuildWindow {
    window: Window,
    topic: Arc<str>,
}

impl RebuildWindow {
    pub fn open(
        dir: &Path,
        topic: Arc<str>,
        id: &str,
        partition: i32,
        route: &Route,
        limits: RouteLimits,
    ) -> Result<RebuildWindow, PackError> {
        let window = Window::open_as(dir, id.to_owned(), partition, route, limits, Instant::now())?;
        Ok(RebuildWindow { window, topic })
    }

    /// Adds a request as the original window did.
    pub fn add(&mut self, req: &PackRequest<'_>) -> Result<(), PackError> {
        let route = &self.window.route;
        let line = encode_line(route.kind, route.endpoint, req.custom_id, req.body);
        self.window.write(req, &line)
    }

    pub fn len(&self) -> usize {
        self.window.len()
    }

    pub fn is_empty(&self) -> bool {
        self.window.len() == 0
    }

    pub fn seal(self) -> Result<SealedBatch, PackError> {
        self.window.seal(&self.topic)
    }

    pub fn discard(self) {
        self.window.discard();
    }
}

/// The open windows of every partition this instance owns.
pub struct Packer {
    dir: PathBuf,
    topic: Arc<str>,
    windows: Vec<Window>,
    /// The batch line being added, reused for every request.
    line: Vec<u8>,
}

/// Requests and bytes held in open windows, for backpressure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub requests: u64,
    pub bytes: u64,
}

impl Packer {
    pub fn new(dir: impl Into<PathBuf>, topic: impl Into<Arc<str>>) -> io::Result<Packer> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Packer {
            dir,
            topic: topic.into(),
            windows: Vec::new(),
            line: Vec::new(),
        })
    }

    /// Adds a request to its route's window, opening one if needed. Returns
    /// the windows sealed by this request: the previous one when the request
    /// would push it past `max_bytes`, and the current one when it is now
    /// full.
    pub fn add(
        &mut self,
        partition: i32,
        route: &Route,
        limits: RouteLimits,
        req: &PackRequest<'_>,
        now: Instant,
    ) -> Result<Vec<SealedBatch>, PackError> {
        encode_line_into(
            &mut self.line,
            route.kind,
            route.endpoint,
            req.custom_id,
            req.body,
        );
        let size = self.line.len() as u64;
        if size > limits.max_bytes {
            return Err(PackError::TooLarge {
                size,
                max: limits.max_bytes,
            });
        }
        let hash = hash_custom_id(req.custom_id);
        let mut sealed = Vec::new();
        let same =
            |w: &Window| w.partition == partition && &w.route == route && w.retry == req.retry;
        let pos = self.windows.iter().position(same);
        if let Some(i) = pos {
            if self.windows[i].index.contains_key(&hash) {
                return Err(PackError::Duplicate(req.custom_id.to_owned()));
            }
            if self.windows[i].input_bytes + size > limits.max_bytes {
                let full = self.windows.swap_remove(i);
                sealed.push(full.seal(&self.topic)?);
            }
        }
        let i = match self.windows.iter().position(same) {
            Some(i) => i,
            None => {
                let mut w = Window::open(&self.dir, partition, route, limits, now)?;
                w.retry = req.retry;
                self.windows.push(w);
                self.windows.len() - 1
            }
        };
        self.windows[i].write(req, &self.line)?;
        if self.windows[i].is_full() {
            let full = self.windows.swap_remove(i);
            sealed.push(full.seal(&self.topic)?);
        }
        Ok(sealed)
    }

    /// Seals every window whose oldest request has waited `max_wait`.
    pub fn seal_due(&mut self, now: Instant) -> Result<Vec<SealedBatch>, PackError> {
        let mut sealed = Vec::new();
        let mut i = 0;
        while i < self.windows.len() {
            let w = &self.windows[i];
            if now.saturating_duration_since(w.opened_at) >= w.limits.max_wait {
                let w = self.windows.swap_remove(i);
                sealed.push(w.seal(&self.topic)?);
            } else {
                i += 1;
            }
        }
        Ok(sealed)
    }

    /// When the next window falls due, if any is open.
    pub fn next_due(&self) -> Option<Instant> {
        self.windows
            .iter()
            .map(|w| w.opened_at + w.limits.max_wait)
            .min()
    }

    /// Discards the open windows of `partition` (revoked, or shutting down):
    /// their requests stay uncommitted in the input topic. Returns what they
    /// held.
    pub fn discard_partition(&mut self, partition: i32) -> Held {
        let mut held = Held::default();
        let mut i = 0;
        while i < self.windows.len() {
            if self.windows[i].partition == partition {
                let w = self.windows.swap_remove(i);
                held.requests += w.len() as u64;
                held.bytes += w.input_bytes;
                w.discard();
            } else {
                i += 1;
            }
        }
        held
    }

    /// Discards every open window. Returns what they held.
    pub fn discard_all(&mut self) -> Held {
        let mut held = Held::default();
        for w in self.windows.drain(..) {
            held.requests += w.len() as u64;
            held.bytes += w.input_bytes;
            w.discard();
        }
        held
    }

    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn route(model: &str) -> Route {
        Route {
            provider: "openai".into(),
            kind: ProviderKind::Openai,
            model: model.into(),
            endpoint: "/v1/chat/completions",
        }
    }

    fn limits(max_requests: u32, max_bytes: u64) -> RouteLimits {
        RouteLimits {
            max_requests,
            max_bytes,
            max_wait: Duration::from_secs(10),
        }
    }

    fn body() -> Box<RawValue> {
        RawValue::from_string(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#.into())
            .unwrap()
    }

    fn req<'a>(id: &'a str, body: &'a RawValue, offset: i64) -> PackRequest<'a> {
        PackRequest {
            custom_id: id,
            body,
            metadata: None,
            offset,
            timestamp_ms: Some(1_700_000_000_000),
            retry: (1, 0),
            output_cap: OutputCap::of_body(body),
        }
    }

    #[test]
    fn seals_on_request_count_and_writes_openai_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Packer::new(dir.path(), "in").unwrap();
        let b = body();
        let now = Instant::now();
        assert!(p
            .add(0, &route("m"), limits(2, 1 << 20), &req("a", &b, 0), now)
            .unwrap()
            .is_empty());
        let sealed = p
            .add(0, &route("m"), limits(2, 1 << 20), &req("b", &b, 1), now)
            .unwrap();
        assert_eq!(sealed.len(), 1);
        let batch = &sealed[0];
        assert_eq!(batch.offsets, vec![0, 1]);
        assert!(batch.id.starts_with("bl-0-"));
        let text = std::fs::read_to_string(&batch.input_path).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["custom_id"], "a");
        assert_eq!(first["method"], "POST");
        assert_eq!(first["url"], "/v1/chat/completions");
        assert_eq!(first["body"]["model"], "m");
        let meta_file = batch.open_meta().unwrap();
        let i = batch.index_of("b").unwrap();
        let mut buf = MetaBuf::default();
        let meta = batch.read_meta(&meta_file, i, &mut buf).unwrap();
        assert_eq!((meta.custom_id.as_ref(), meta.offset), ("b", 1));
        assert_eq!(p.open_windows(), 0);
    }

    #[test]
    fn metadata_reads_ahead_in_any_order_and_past_the_chunk_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Packer::new(dir.path(), "in").unwrap();
        let b = body();
        let n = 3000;
        // Lines of varying length, one of them longer than a chunk, so that
        // lines straddle chunk ends and one line needs a read of its own.
        let metas: Vec<Box<RawValue>> = (0..n)
            .map(|i| {
                let pad = if i == 1234 { 70_000 } else { i % 97 };
                RawValue::from_string(format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(pad)))
                    .unwrap()
            })
            .collect();
        let ids: Vec<String> = (0..n).map(|i| format!("id-{i}")).collect();
        let mut sealed = Vec::new();
        for i in 0..n {
            let mut r = req(&ids[i], &b, i as i64);
            r.metadata = Some(&metas[i]);
            sealed = p
                .add(
                    0,
                    &route("m"),
                    limits(n as u32, 1 << 30),
                    &r,
                    Instant::now(),
                )
                .unwrap();
        }
        let batch = &sealed[0];
        assert!(
            batch.meta_pos[n] > 2 * META_CHUNK,
            "the side file spans chunks"
        );
        let file = batch.open_meta().unwrap();
        let forward: Vec<usize> = (0..n).collect();
        let backward: Vec<usize> = (0..n).rev().collect();
        let strided: Vec<usize> = (0..n).map(|i| i * 7919 % n).collect();
        for order in [forward, backward, strided] {
            let mut buf = MetaBuf::default();
            for i in order {
                let m = batch.read_meta(&file, i, &mut buf).unwrap();
                assert_eq!(
                    (m.custom_id.as_ref(), m.offset),
                    (ids[i].as_str(), i as i64)
                );
                assert_eq!(m.metadata.unwrap().get(), metas[i].get());
                assert!(buf.bytes.len() as u64 <= META_CHUNK.max(70_100));
            }
        }
    }

    #[test]
    fn metadata_is_read_back_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Packer::new(dir.path(), "in").unwrap();
        let b = body();
        let metadata =
            RawValue::from_string(r#"{"tenant":"acme \"q\"","note":"é\n✓","n":[1,2]}"#.into())
                .unwrap();
        let mut with_meta = req("a", &b, 7);
        with_meta.metadata = Some(&metadata);
        p.add(
            0,
            &route("m"),
            limits(2, 1 << 20),
            &with_meta,
            Instant::now(),
        )
        .unwrap();
        let sealed = p
            .add(
                0,
                &route("m"),
                limits(2, 1 << 20),
                &req("b", &b, 8),
                Instant::now(),
            )
            .unwrap();
        let batch = &sealed[0];
        let file = batch.open_meta().unwrap();
        let mut buf = MetaBuf::default();
        let a = batch.read_meta(&file, 0, &mut buf).unwrap();
        assert_eq!((a.custom_id.as_ref(), a.offset), ("a", 7));
        assert_eq!(a.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(a.metadata.unwrap().get(), metadata.get());
        let b = batch.read_meta(&file, 1, &mut buf).unwrap();
        assert_eq!((b.custom_id.as_ref(), b.offset), ("b", 8));
        assert!(b.metadata.is_none());
    }

    #[test]
    fn seals_on_bytes_before_overflowing() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Packer::new(dir.path(), "in").unwrap();
        let b = body();
        let line = encode_line(ProviderKind::Openai, "/v1/chat/completions", "a", &b).len() as u64;
        let l = limits(100, line * 2 + 1);
        let now = Instant::now();
        assert!(p
            .add(0, &route("m"), l, &req("a", &b, 0), now)
            .unwrap()
            .is_empty());
        assert!(p
            .add(0, &route("m"), l, &req("b", &b, 1), now)
            .unwrap()
            .is_empty());
        let sealed = p.add(0, &route("m"), l, &req("c", &b, 2), now).unwrap();
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].offsets, vec![0, 1]);
        assert!(sealed[0].input_bytes <= l.max_bytes);
        let err = p
            .add(0, &route("m"), limits(100, 10), &req("d", &b, 3), now)
            .unwrap_err();
        assert!(matches!(err, PackError::TooLarge { .. }));
    }

    #[test]
    fn seals_on_age_and_keeps_routes_and_partitions_apart() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Packer::new(dir.path(), "in").unwrap();
        let b = body();
        let t0 = Instant::now();
        let l = limits(100, 1 << 20);
        p.add(0, &route("m1"), l, &req("a", &b, 0), t0).unwrap();
        p.add(0, &route("m2"), l, &req("a", &b, 1), t0).unwrap();
        p.add(
            1,
            &route("m1"),
            l,
            &req("a", &b, 0),
            t0 + Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(p.open_windows(), 3);
        assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(10)));
        assert!(p.seal_due(t0 + Duration::from_secs(9)).unwrap().is_empty());
        let sealed = p.seal_due(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(sealed.len(), 2);
        assert!(sealed.iter().all(|b| b.partition == 0));
        assert_eq!(p.open_windows(), 1);
    }

    #[test]
    fn pretty_printed_bodies_become_one_line() {
        let body = RawValue::from_string("{\n  \"model\": \"m\",\r\n  \"x\": \"a\\nb\"\n}".into())
            .unwrap();
        let line = encode_line(ProviderKind::Openai, "/v1/chat/completions", "a", &body);
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["body"]["x"], "a\nb");
        let line = encode_line(ProviderKind::Anthropic, "/v1/messages", "a", &body);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["params"]["model"], "m");
    }

    #[test]
    fn duplicate_custom_id_in_a_window_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Packer::new(dir.path(), "in").unwrap();
        let b = body();
        let now = Instant::now();
        let l = limits(100, 1 << 20);
        p.add(0, &route("m"), l, &req("a", &b, 0), now).unwrap();
        let err = p.add(0, &route("m"), l, &req("a", &b, 1), now).unwrap_err();
        assert!(matches!(err, PackError::Duplicate(_)));
        let held = p.discard_partition(0);
        assert_eq!(held.requests, 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn output_caps_sum_each_requests_cap_times_n() {
        let mut caps = OutputCaps::default();
        let add = |caps: &mut OutputCaps, endpoint: &str, body: &str| {
            let body = RawValue::from_string(body.to_owned()).unwrap();
            caps.add(endpoint, OutputCap::of_body(&body));
        };
        add(
            &mut caps,
            "/v1/chat/completions",
            r#"{"max_tokens":100,"n":3}"#,
        );
        add(
            &mut caps,
            "/v1/chat/completions",
            r#"{"max_completion_tokens":50,"max_tokens":9}"#,
        );
        add(&mut caps, "/v1/responses", r#"{"max_output_tokens":7}"#);
        add(
            &mut caps,
            "/v1/messages",
            r#"{"model":"m","max_tokens":20,"messages":[]}"#,
        );
        add(&mut caps, "/v1/chat/completions", r#"{"messages":[]}"#);
        add(
            &mut caps,
            "/v1/chat/completions",
            r#"{"max_tokens":"many"}"#,
        );
        add(&mut caps, "/v1/embeddings", r#"{"input":"x"}"#);
        assert_eq!(
            caps,
            OutputCaps {
                tokens: 300 + 50 + 7 + 20,
                uncapped: 2
            }
        );
    }

    #[test]
    fn a_successor_copies_the_picked_requests_under_a_new_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Packer::new(dir.path(), "in").unwrap();
        let now = Instant::now();
        let l = limits(4, 1 << 20);
        let bodies: Vec<Box<RawValue>> = (0..4)
            .map(|i| {
                RawValue::from_string(format!(r#"{{"model":"m","max_tokens":{}}}"#, 10 + i))
                    .unwrap()
            })
            .collect();
        let ids = ["a", "b", "c", "d"];
        let mut sealed = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let meta = RawValue::from_string(format!(r#"{{"n":{i}}}"#)).unwrap();
            let mut r = req(id, &bodies[i], 100 + i as i64);
            r.metadata = Some(&meta);
            sealed.extend(p.add(0, &route("m"), l, &r, now).unwrap());
        }
        let mut parent = sealed.pop().expect("sealed at 4 requests");
        parent.epoch = "e1".into();
        let next = parent.successor(dir.path(), &[3, 1, 3], 2, 0).unwrap();
        assert_ne!(next.id, parent.id);
        assert!(next.id.starts_with("bl-0-"));
        assert_eq!(
            (next.attempt, next.requeues, next.epoch.as_str()),
            (2, 0, "e1")
        );
        assert_eq!(next.offsets, vec![101, 103]);
        assert_eq!(
            next.output_caps,
            OutputCaps {
                tokens: 11 + 13,
                uncapped: 0
            }
        );
        let input = std::fs::read_to_string(&next.input_path).unwrap();
        let parent_input = std::fs::read_to_string(&parent.input_path).unwrap();
        let parent_lines: Vec<&str> = parent_input.lines().collect();
        assert_eq!(
            input.lines().collect::<Vec<_>>(),
            vec![parent_lines[1], parent_lines[3]]
        );
        assert_eq!(next.input_bytes, input.len() as u64);
        let meta = next.open_meta().unwrap();
        for (i, (id, n)) in [("b", 1), ("d", 3)].into_iter().enumerate() {
            assert_eq!(next.index_of(id), Some(i));
            let mut buf = MetaBuf::default();
            let m = next.read_meta(&meta, i, &mut buf).unwrap();
            assert_eq!(m.custom_id, id);
            assert_eq!(m.metadata.unwrap().get(), format!(r#"{{"n":{n}}}"#));
        }
        assert_eq!(next.index_of("a"), None);
    }
}
