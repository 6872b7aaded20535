//! Where log lines go. Everything logs through `tracing`: fleetd's own
//! events (`log`, `event`, `step`), hyper's and zbus's, and rumqttc's `log`
//! records (bridged here). One `tracing_subscriber::Layer` writes them. Under
//! systemd (`$JOURNAL_STREAM` names standard error's stream: it is the
//! journal) each event is one datagram of journald's native protocol to
//! `/run/systemd/journal/socket`; the event's fields and its spans' become
//! journal fields, uppercased (`FLEETD_JOB`, `FLEETD_VERSION`, `FLEETD_STEP`,
//! `FLEETD_ERROR`, `TARGET`), so that `journalctl FLEETD_JOB=…` finds a job's
//! whole story. Elsewhere, plain lines on standard error.
//!
//! Levels: `[log] level` (default info) is fleetd's own; other crates log at
//! warn at most, whatever it says. `RUST_LOG` (`level` or
//! `target=level,…`) goes on top: a bare level sets every target.
//!
//! The encoder is written here rather than taken from tracing-journald: one
//! small file, and a socket path a test can point at a stand-in
//! (`$FLEETD_JOURNAL_SOCKET`).

use crate::status::UpdateState;
use fleetd_core::update::engine::Failure;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::OnceLock;
pub use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// syslog priorities, as journald stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Error = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
    Debug = 7,
}

pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Journal field names fleetd adds.
pub const JOB: &str = "FLEETD_JOB";
pub const VERSION: &str = "FLEETD_VERSION";
pub const STEP: &str = "FLEETD_STEP";
pub const ERROR: &str = "FLEETD_ERROR";

/// The target of fleetd's own events: `[log] level` applies to it.
pub const TARGET: &str = "fleetd";
/// The target of records bridged from the `log` facade; their own target
/// travels in the `log.target` field (tracing-log's convention).
const BRIDGED: &str = "log";

enum Sink {
    Journal { socket: UnixDatagram, path: PathBuf },
    Stderr,
}

static SINK: OnceLock<Sink> = OnceLock::new();

fn sink() -> &'static Sink {
    SINK.get_or_init(|| {
        // `$FLEETD_JOURNAL_SOCKET` names another journal socket (a
        // container's, a test's stand-in) and turns the journal on.
        let path = match std::env::var_os("FLEETD_JOURNAL_SOCKET") {
            Some(p) => PathBuf::from(p),
            None if stderr_is_the_journal() => PathBuf::from(JOURNAL_SOCKET),
            None => return Sink::Stderr,
        };
        // Non-blocking: a stalled journald must not stall the daemon; a
        // refused datagram goes to standard error instead.
        match UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(socket) => Sink::Journal { socket, path },
            Err(_) => Sink::Stderr,
        }
    })
}

/// systemd.exec(5): `$JOURNAL_STREAM` is `DEVICE:INODE` of the stream
/// standard error is connected to; only if it still is, is it the journal.
fn stderr_is_the_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    std::fs::metadata("/proc/self/fd/2").map(|m| m.dev() == dev && m.ino() == ino).unwrap_or(false)
}

/// Which levels each target logs: the most specific target prefix wins
/// (`a` covers `a::b`), else the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default: LevelFilter,
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// `[log] level`: fleetd's own events at `level`; other crates' at
    /// warn at most, so their debug and info chatter stays out.
    pub fn for_level(level: LevelFilter) -> Self {
        Filter { default: level.min(LevelFilter::WARN), targets: vec![(TARGET.into(), level)] }
    }

    /// `RUST_LOG` on top of this filter: comma-separated `level` (every
    /// target, fleetd's too) or `target=level`; a bare `target` is all its
    /// levels. A bad directive is an error naming it.
    pub fn with_directives(mut self, spec: &str) -> Result<Self, String> {
        for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let bad = || format!("{directive:?} is neither a level nor target=level");
            match directive.split_once('=') {
                Some((target, level)) => {
                    let target = target.trim();
                    let level = parse_level(level.trim()).ok_or_else(bad)?;
                    if target.is_empty() {
                        return Err(bad());
                    }
                    self.set(target, level);
                }
                None => match parse_level(directive) {
                    Some(level) => {
                        self.default = level;
                        self.targets.clear();
                    }
                    None if directive.bytes().all(|b| b.is_ascii_alphanumeric() || b"_:-".contains(&b)) => {
                        self.set(directive, LevelFilter::TRACE)
                    }
                    None => return Err(bad()),
                },
            }
        }
        Ok(self)
    }

    fn set(&mut self, target: &str, level: LevelFilter) {
        self.targets.retain(|(t, _)| t != target);
        self.targets.push((target.to_string(), level));
    }

    pub fn level_for(&self, target: &str) -> LevelFilter {
        self.targets
            .iter()
            .filter(|(t, _)| {
                target.strip_prefix(t.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
            .max_by_key(|(t, _)| t.len())
            .map_or(self.default, |(_, level)| *level)
    }

    pub fn enabled(&self, target: &str, level: &Level) -> bool {
        *level <= self.level_for(target)
    }

    /// The most verbose level any target logs (what the callsites check first).
    pub fn max(&self) -> LevelFilter {
        self.targets.iter().map(|(_, l)| *l).fold(self.default, LevelFilter::max)
    }
}

/// `off`, `error`, `warn`, `info`, `debug` or `trace`, in any case.
pub fn parse_level(text: &str) -> Option<LevelFilter> {
    Some(match text.to_ascii_lowercase().as_str() {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// Installs the subscriber and the `log` bridge, once per process (later
/// calls change nothing). `level` is `[log] level`; `RUST_LOG` goes on top,
/// and a bad one is reported and ignored.
pub fn init(level: LevelFilter) {
    let mut bad_env = None;
    FILTER.get_or_init(|| {
        let filter = Filter::for_level(level);
        let filter = match std::env::var("RUST_LOG") {
            Ok(spec) => filter.clone().with_directives(&spec).unwrap_or_else(|e| {
                bad_env = Some(e);
                filter
            }),
            Err(_) => filter,
        };
        // A subscriber set before (a test's own) is left in place.
        let _ = tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(JournalLayer::new(filter.clone())),
        );
        if log::set_logger(&LogBridge).is_ok() {
            log::set_max_level(log_level(filter.max()));
        }
        filter
    });
    if let Some(e) = bad_env {
        event(Priority::Warning, &format!("RUST_LOG: {e}; ignored"), &[(ERROR, "rust-log")]);
    }
}

/// Code that logs before any `init` (fleetctl, tests) gets the defaults.
fn ensure_init() {
    if FILTER.get().is_none() {
        init(LevelFilter::INFO);
    }
}

/// An informational line.
pub fn log(line: &str) {
    event(Priority::Info, line, &[]);
}

/// One event with fleetd's fields (those of `JOB`, `VERSION`, `STEP` and
/// `ERROR`; other names are not carried), as a `tracing` event of target
/// `fleetd`. `PRIORITY` keeps syslog's notice, which `tracing` lacks.
pub fn event(priority: Priority, message: &str, fields: &[(&str, &str)]) {
    ensure_init();
    let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let (job, version, step, error) = (get(JOB), get(VERSION), get(STEP), get(ERROR));
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(
                target: TARGET,
                $level,
                PRIORITY = priority as u64,
                FLEETD_JOB = job,
                FLEETD_VERSION = version,
                FLEETD_STEP = step,
                FLEETD_ERROR = error,
                "{message}"
            )
        };
    }
    match priority {
        Priority::Error => emit!(Level::ERROR),
        Priority::Warning => emit!(Level::WARN),
        Priority::Notice | Priority::Info => emit!(Level::INFO),
        Priority::Debug => emit!(Level::DEBUG),
    }
}

/// Whether events go to the journal (fleetd runs under systemd).
pub fn to_journal() -> bool {
    matches!(sink(), Sink::Journal { .. })
}

/// A job's step, with the fields `journalctl FLEETD_JOB=…` finds; a failed
/// or rolled-back step carries its reason as `FLEETD_ERROR`: the failure's
/// text, else the step's sentence.
pub fn step(state: UpdateState, detail: &str, failure: Option<&Failure>, job: Option<&(String, u64)>) {
    let version = job.map(|j| j.1.to_string()).unwrap_or_default();
    let mut fields = vec![(STEP, state.as_str())];
    if let Some((jti, _)) = job {
        fields.push((JOB, jti.as_str()));
        fields.push((VERSION, version.as_str()));
    }
    let failed = state.is_failure();
    if failed {
        fields.push((ERROR, failure.map_or(detail, |f| f.text.as_str())));
    }
    let priority = if failed { Priority::Error } else { Priority::Notice };
    event(priority, &format!("{state}: {detail}"), &fields);
}

/// A job's fields, for the span that runs it: every event inside carries them.
pub fn job_span(jti: &str, version: u64) -> tracing::Span {
    // Error level: the span is on whenever any event is.
    tracing::error_span!(target: TARGET, "job", FLEETD_JOB = jti, FLEETD_VERSION = version)
}

/// What a layer does with an event: `write` (the journal or standard
/// error), or a test's capture.
type Out = fn(Priority, &str, &str, &[(&str, &str)]);

/// The journal (or standard error) as a `tracing` layer, with its filter.
pub struct JournalLayer {
    filter: Filter,
    out: Out,
}

impl JournalLayer {
    pub fn new(filter: Filter) -> Self {
        JournalLayer { filter, out: write }
    }
}

/// A span's fields, journal-named, kept in the registry for its events.
struct SpanFields(Vec<(String, String)>);

/// An event's (or span's) fields as the journal names them.
#[derive(Default)]
struct Fields {
    message: String,
    bridged_target: Option<String>,
    pairs: Vec<(String, String)>,
}

impl Fields {
    fn put(&mut self, name: &str, value: String) {
        match name {
            "message" => self.message = value,
            "log.target" => self.bridged_target = Some(value),
            _ => self.set(journal_key(name), value),
        }
    }

    /// Later wins: an event's field over its span's, an inner span's over an outer's.
    fn set(&mut self, key: String, value: String) {
        match self.pairs.iter_mut().find(|(k, _)| *k == key) {
            Some(pair) => pair.1 = value,
            None => self.pairs.push((key, value)),
        }
    }
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field.name(), value.to_string());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field.name(), format!("{value:?}"));
    }
}

/// `log.target` → `LOG_TARGET`: uppercase, anything else `_`.
fn journal_key(name: &str) -> String {
    name.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { b.to_ascii_uppercase() as char } else { '_' })
        .collect()
}

impl JournalLayer {
    fn wants(&self, meta: &Metadata<'_>) -> bool {
        // Bridged records were filtered by their own target already.
        meta.target() == BRIDGED || self.filter.enabled(meta.target(), meta.level())
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for JournalLayer {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.wants(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        self.wants(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter.max())
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.pairs));
        }
    }

    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        let mut fields = Fields {
            pairs: extensions.remove::<SpanFields>().map(|f| f.0).unwrap_or_default(),
            ..Default::default()
        };
        values.record(&mut fields);
        extensions.insert(SpanFields(fields.pairs));
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(pairs)) = span.extensions().get::<SpanFields>() {
                    for (key, value) in pairs {
                        fields.set(key.clone(), value.clone());
                    }
                }
            }
        }
        event.record(&mut fields);
        let meta = event.metadata();
        let (priority, target, message, pairs) = record(meta, fields);
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        (self.out)(priority, &target, &message, &pairs);
    }
}

/// An event's priority, target, message and journal fields. Pure.
fn record(meta: &Metadata<'_>, mut fields: Fields) -> (Priority, String, String, Vec<(String, String)>) {
    let mut priority = match *meta.level() {
        Level::ERROR => Priority::Error,
        Level::WARN => Priority::Warning,
        Level::INFO => Priority::Info,
        _ => Priority::Debug,
    };
    let target = fields.bridged_target.take().unwrap_or_else(|| meta.target().to_string());
    // Only fleetd's own events set their priority (notice); the encoder writes it.
    if let Some(i) = fields.pairs.iter().position(|(k, _)| k == "PRIORITY") {
        let (_, value) = fields.pairs.remove(i);
        if meta.target() == TARGET {
            priority = match value.as_str() {
                "3" => Priority::Error,
                "4" => Priority::Warning,
                "5" => Priority::Notice,
                "6" => Priority::Info,
                _ => priority,
            };
        }
    }
    fields.pairs.push(("TARGET".into(), target.clone()));
    (priority, target, fields.message, fields.pairs)
}

/// One event out. A journal that refuses the datagram gets the line on
/// standard error instead (which systemd also journals).
fn write(priority: Priority, target: &str, message: &str, fields: &[(&str, &str)]) {
    if let Sink::Journal { socket, path } = sink() {
        if socket.send_to(&encode(priority, message, fields), path).is_ok() {
            return;
        }
        // The journal takes `<N>` on its stream as the priority.
        eprintln!("<{}>{}", priority as u8, line(target, message, fields));
        return;
    }
    eprintln!("{}", line(target, message, fields));
}

/// The plain line: fleetd's own message as it is; another crate's with its
/// target and fields.
fn line(target: &str, message: &str, fields: &[(&str, &str)]) -> String {
    if target == TARGET || target.starts_with("fleetd::") {
        return message.to_string();
    }
    let mut line = format!("{target}: {message}");
    for (key, value) in fields.iter().filter(|(k, _)| *k != "TARGET") {
        line.push_str(&format!(" {key}={value}"));
    }
    line
}

/// `log` records (rumqttc's) into `tracing`, filtered by their own target.
struct LogBridge;

impl log::Log for LogBridge {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        let level = match meta.level() {
            log::Level::Error => Level::ERROR,
            log::Level::Warn => Level::WARN,
            log::Level::Info => Level::INFO,
            log::Level::Debug => Level::DEBUG,
            log::Level::Trace => Level::TRACE,
        };
        FILTER.get().is_some_and(|f| f.enabled(meta.target(), &level))
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let target = record.target();
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(target: BRIDGED, $level, log.target = target, "{}", record.args())
            };
        }
        match record.level() {
            log::Level::Error => emit!(Level::ERROR),
            log::Level::Warn => emit!(Level::WARN),
            log::Level::Info => emit!(Level::INFO),
            log::Level::Debug => emit!(Level::DEBUG),
            log::Level::Trace => emit!(Level::TRACE),
        }
    }

    fn flush(&self) {}
}

fn log_level(level: LevelFilter) -> log::LevelFilter {
    match level.into_level() {
        None => log::LevelFilter::Off,
        Some(Level::ERROR) => log::LevelFilter::Error,
        Some(Level::WARN) => log::LevelFilter::Warn,
        Some(Level::INFO) => log::LevelFilter::Info,
        Some(Level::DEBUG) => log::LevelFilter::Debug,
        Some(_) => log::LevelFilter::Trace,
    }
}

/// The native protocol: `KEY=value\n`, or for a value with a newline
/// `KEY\n`, its length as a little-endian u64, the value, `\n`. Pure.
pub fn encode(priority: Priority, message: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 128);
    let mut field = |key: &str, value: &str| {
        if value.contains('\n') {
            out.extend_from_slice(key.as_bytes());
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        } else {
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
    };
    field("PRIORITY", &(priority as u8).to_string());
    field("SYSLOG_IDENTIFIER", "fleetd");
    field("SYSLOG_PID", &std::process::id().to_string());
    field("MESSAGE", message);
    for (key, value) in fields {
        if valid_key(key) {
            field(key, value);
        }
    }
    out
}

/// journald's rule: uppercase letters, digits and `_`, starting with a
/// letter, at most 64 bytes.
fn valid_key(key: &str) -> bool {
    key.len() <= 64
        && key.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Reads a native-protocol datagram back into its fields (for tests and
/// the stand-in journal).
pub fn decode(datagram: &[u8]) -> Option<Vec<(String, String)>> {
    let mut fields = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let line_end = rest.iter().position(|b| *b == b'\n')?;
        let line = &rest[..line_end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            rest = &rest[line_end + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let after = &rest[line_end + 1..];
            let len = u64::from_le_bytes(after.get(..8)?.try_into().ok()?) as usize;
            let value = after.get(8..8 + len)?;
            fields.push((key, String::from_utf8_lossy(value).into_owned()));
            rest = after.get(8 + len + 1..)?;
        }
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_through_the_native_protocol() {
        let bytes = encode(
            Priority::Warning,
            "update refused: replayed",
            &[
                (ERROR, "replayed"),
                (JOB, "j-1"),
                ("bad key", "dropped"),
                ("1X", "dropped"),
                (STEP, "two\nlines"),
            ],
        );
        let fields = decode(&bytes).unwrap();
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PRIORITY"), Some("4"));
        assert_eq!(get("SYSLOG_IDENTIFIER"), Some("fleetd"));
        assert_eq!(get("MESSAGE"), Some("update refused: replayed"));
        assert_eq!(get(ERROR), Some("replayed"));
        assert_eq!(get(JOB), Some("j-1"));
        assert_eq!(get(STEP), Some("two\nlines"), "a newline takes the length-prefixed form");
        assert_eq!(get("bad key"), None, "an invalid key is left out");
        assert_eq!(get("1X"), None, "a key starts with a letter");
        assert!(bytes.windows(5).any(|w| w == b"STEP\n"), "binary form on the wire");
    }

    #[test]
    fn levels_and_directives_parse() {
        assert_eq!(parse_level("WARN"), Some(LevelFilter::WARN));
        assert_eq!(parse_level("verbose"), None);
        let default = Filter::for_level(LevelFilter::INFO);
        // fleetd at info, everyone else at warn.
        assert!(default.enabled("fleetd", &Level::INFO));
        assert!(default.enabled("fleetd::daemon", &Level::INFO));
        assert!(!default.enabled("fleetd", &Level::DEBUG));
        assert!(!default.enabled("rumqttc::state", &Level::INFO));
        assert!(default.enabled("rumqttc::state", &Level::WARN));
        assert!(!default.enabled("fleetdx", &Level::INFO), "a prefix ends at ::");
        assert_eq!(default.max(), LevelFilter::INFO);
        // A quiet config quiets the others too.
        assert!(!Filter::for_level(LevelFilter::ERROR).enabled("zbus", &Level::WARN));

        let all = default.clone().with_directives("debug").unwrap();
        assert!(all.enabled("fleetd", &Level::DEBUG) && all.enabled("rumqttc", &Level::DEBUG));
        assert!(!all.enabled("rumqttc", &Level::TRACE));

        let some = default.clone().with_directives(" rumqttc=debug, zbus::conn=TRACE,hyper_util ,").unwrap();
        assert!(some.enabled("rumqttc::eventloop", &Level::DEBUG));
        assert!(some.enabled("zbus::conn", &Level::TRACE) && !some.enabled("zbus", &Level::INFO));
        assert!(some.enabled("hyper_util::client", &Level::TRACE), "a bare target is all its levels");
        assert!(some.enabled("fleetd", &Level::INFO) && !some.enabled("fleetd", &Level::DEBUG));
        assert_eq!(some.max(), LevelFilter::TRACE);

        let later = default.clone().with_directives("fleetd=debug,warn,rumqttc=error,rumqttc=info").unwrap();
        assert!(!later.enabled("fleetd", &Level::INFO), "a bare level resets every target");
        assert!(later.enabled("rumqttc", &Level::INFO), "the last directive for a target wins");
        assert!(default.clone().with_directives("off").unwrap().max() == LevelFilter::OFF);

        for bad in ["rumqttc=loud", "=debug", "a b", "verbose=1=2"] {
            let e = default.clone().with_directives(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    static CAPTURED: std::sync::Mutex<Vec<Vec<(String, String)>>> = std::sync::Mutex::new(Vec::new());

    fn capture(priority: Priority, _target: &str, message: &str, fields: &[(&str, &str)]) {
        CAPTURED.lock().unwrap().push(decode(&encode(priority, message, fields)).unwrap());
    }

    #[test]
    fn the_layer_maps_fields_spans_and_levels() {
        use tracing_subscriber::layer::SubscriberExt;
        let filter = Filter::for_level(LevelFilter::INFO).with_directives("hyper_util=debug").unwrap();
        let subscriber = tracing_subscriber::registry().with(JournalLayer { filter, out: capture });
        tracing::subscriber::with_default(subscriber, || {
            let span = job_span("j-7", 8);
            let _in_job = span.enter();
            event(Priority::Notice, "downloading: 0%", &[(STEP, "downloading")]);
            tracing::debug!(target: "hyper_util::client", { pool.idle = 2 }, "reusing");
            tracing::info!(target: "zbus::conn", "hidden: others log at warn");
            tracing::debug!(target: "fleetd", "hidden: fleetd logs at info");
            // Explicit fields win over the span's.
            event(Priority::Error, "failed: hash", &[(STEP, "failed"), (JOB, "j-8"), (ERROR, "hash")]);
            // A `log` record through the bridge (its filter is the process's: warn).
            log::Log::log(
                &LogBridge,
                &log::Record::builder()
                    .target("rumqttc::state")
                    .level(log::Level::Warn)
                    .args(format_args!("bridged"))
                    .build(),
            );
        });
        let got = std::mem::take(&mut *CAPTURED.lock().unwrap());
        let get =
            |e: &Vec<(String, String)>, k: &str| e.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let messages: Vec<_> = got.iter().filter_map(|e| get(e, "MESSAGE")).collect();
        assert_eq!(messages, ["downloading: 0%", "reusing", "failed: hash", "bridged"], "{got:?}");

        let step = &got[0];
        assert_eq!(get(step, "PRIORITY").as_deref(), Some("5"), "notice survives tracing's levels");
        assert_eq!(get(step, STEP).as_deref(), Some("downloading"));
        assert_eq!(get(step, JOB).as_deref(), Some("j-7"), "from the span");
        assert_eq!(get(step, VERSION).as_deref(), Some("8"));
        assert_eq!(get(step, "TARGET").as_deref(), Some("fleetd"));
        assert_eq!(get(step, ERROR), None);

        let hyper = &got[1];
        assert_eq!(get(hyper, "PRIORITY").as_deref(), Some("7"));
        assert_eq!(get(hyper, "POOL_IDLE").as_deref(), Some("2"), "a field, uppercased");
        assert_eq!(get(hyper, "TARGET").as_deref(), Some("hyper_util::client"));
        assert_eq!(get(hyper, JOB).as_deref(), Some("j-7"), "third-party events get the span too");

        let failed = &got[2];
        assert_eq!(get(failed, "PRIORITY").as_deref(), Some("3"));
        assert_eq!(get(failed, JOB).as_deref(), Some("j-8"));
        assert_eq!(get(failed, ERROR).as_deref(), Some("hash"));
        assert_eq!(failed.iter().filter(|(k, _)| k == JOB).count(), 1, "{failed:?}");

        let bridged = &got[3];
        assert_eq!(get(bridged, "TARGET").as_deref(), Some("rumqttc::state"), "the record's own target");
        assert_eq!(get(bridged, "PRIORITY").as_deref(), Some("4"));
        assert_eq!(get(bridged, "LOG_TARGET"), None);
    }

    #[test]
    fn plain_lines_name_other_crates() {
        assert_eq!(line("fleetd", "mqtt: connected", &[("TARGET", "fleetd")]), "mqtt: connected");
        assert_eq!(
            line("rumqttc::state", "ping", &[("TARGET", "rumqttc::state"), ("A", "1")]),
            "rumqttc::state: ping A=1"
        );
    }
}
