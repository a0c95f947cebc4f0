//! The access log: one line per connection when it closes (and one per refusal), in JSON or
//! logfmt, written through `tracing` on the `interceptor::access` target at INFO. Whoever can
//! open connections can make lines, so they are sampled and rate limited; what is not written
//! is counted, and the metrics count every connection either way.

use std::{
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;

/// Fields in the order they are written.
type Fields = Vec<(&'static str, Value)>;

use super::{FlowMeta, RefusalMeta, TcpLabels};
use crate::config::{AccessLog as Settings, AccessLogFormat};

/// The `tracing` target of access lines; `main` gives it a writer of its own that prints the
/// line alone (no timestamp or level prefix of its own: the line has both).
pub const TARGET: &str = "interceptor::access";

pub(super) enum Admit {
    Write(AccessLogFormat),
    Off,
    NotSampled,
    RateLimited,
}

/// Sampling and rate limiting.
pub(super) struct AccessLog {
    enabled: bool,
    format: AccessLogFormat,
    percent: u64,
    max_per_second: u32,
    seen: AtomicU64,
    window: Mutex<(Instant, u32)>,
}

impl AccessLog {
    pub(super) fn new(s: &Settings) -> Self {
        Self {
            enabled: s.enabled,
            format: s.format,
            percent: u64::from(s.sample_percent.min(100)),
            max_per_second: s.max_per_second,
            seen: AtomicU64::new(0),
            window: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Whether to write the next line. Sampling is deterministic (`samplePercent` of every
    /// hundred connections, spread evenly), so a test and an operator get what they set.
    pub(super) fn admit(&self) -> Admit {
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return Admit::Off;
        }
        self.decide()
    }

    /// [`AccessLog::admit`] once a subscriber takes the line.
    pub(super) fn decide(&self) -> Admit {
        if !self.enabled {
            return Admit::Off;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if (n + 1) * self.percent / 100 == n * self.percent / 100 {
            return Admit::NotSampled;
        }
        if self.max_per_second == 0 {
            return Admit::Write(self.format);
        }
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0);
        }
        if w.1 >= self.max_per_second {
            return Admit::RateLimited;
        }
        w.1 += 1;
        Admit::Write(self.format)
    }
}

/// One access line, as the field `line` (a `&str`: the agent's stdout layer writes it as it
/// is, with no formatting pass over it; see `main.rs`).
pub(super) fn emit(line: &str) {
    tracing::info!(target: TARGET, line);
}

/// A closed flow.
pub(super) struct FlowLine<'a> {
    pub flow: &'a FlowMeta,
    pub labels: &'a TcpLabels,
    pub outcome: &'a str,
    pub reason: Option<&'a str>,
    /// A failed flow's failure name (`RelayError::reason`).
    pub code: Option<&'a str>,
    pub to_peer: u64,
    pub from_peer: u64,
    pub duration: Duration,
}

/// RFC 3339 UTC with milliseconds.
fn timestamp() -> String {
    let now = SystemTime::now();
    let t = time::OffsetDateTime::from(now);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn opt(v: Option<impl ToString>) -> Value {
    v.map_or(Value::Null, |v| Value::from(v.to_string()))
}

pub(super) fn flow_line(format: AccessLogFormat, l: &FlowLine<'_>) -> String {
    let f = l.flow;
    let (src_id, dst_id) = (&l.labels.source_principal, &l.labels.destination_principal);
    let known = |s: &super::Label| (&**s != super::UNKNOWN).then(|| s.to_string());
    let m: Fields = vec![
        ("ts", timestamp().into()),
        ("event", "flow_closed".into()),
        ("pod", f.pod.as_str().into()),
        ("direction", f.direction.as_str().into()),
        ("src_addr", f.source.to_string().into()),
        ("dst_addr", f.destination.to_string().into()),
        ("endpoint", opt(f.endpoint)),
        ("src_workload", (&*l.labels.source_workload).into()),
        (
            "src_namespace",
            (&*l.labels.source_workload_namespace).into(),
        ),
        ("dst_workload", (&*l.labels.destination_workload).into()),
        (
            "dst_namespace",
            (&*l.labels.destination_workload_namespace).into(),
        ),
        ("src_spiffe", opt(known(src_id))),
        ("dst_spiffe", opt(known(dst_id))),
        ("mode", f.mode.as_str().into()),
        ("cipher", opt(f.cipher.as_deref())),
        ("group", opt(f.group.as_deref())),
        ("ktls", f.mode.ktls().into()),
        ("bytes_sent", l.to_peer.into()),
        ("bytes_received", l.from_peer.into()),
        (
            "duration_ms",
            u64::try_from(l.duration.as_millis())
                .unwrap_or(u64::MAX)
                .into(),
        ),
        ("outcome", l.outcome.into()),
        ("reason", opt(l.reason.or(f.decision.as_deref()))),
        ("code", opt(l.code)),
        ("handed_over", f.handed_over.into()),
    ];
    render(format, m)
}

pub(super) fn refusal_line(format: AccessLogFormat, r: &RefusalMeta<'_>) -> String {
    let m: Fields = vec![
        ("ts", timestamp().into()),
        ("event", "refused".into()),
        ("pod", r.pod.into()),
        ("direction", r.direction.as_str().into()),
        ("src_addr", r.source.to_string().into()),
        ("dst_addr", r.destination.to_string().into()),
        ("endpoint", opt(r.endpoint)),
        ("src_spiffe", opt(r.client.as_deref())),
        ("dst_spiffe", opt(r.server.as_deref())),
        ("outcome", "refused".into()),
        ("code", r.code.into()),
        ("reason", r.reason.as_ref().into()),
    ];
    render(format, m)
}

fn render(format: AccessLogFormat, m: Fields) -> String {
    match format {
        AccessLogFormat::Json => json(&m),
        AccessLogFormat::Logfmt => logfmt(&m),
    }
}

/// One JSON object, fields in order.
fn json(m: &Fields) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::from(*k).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out.push('}');
    out
}

/// `key=value` pairs; a value with spaces, quotes, `=` or control characters is quoted and
/// escaped, a null one is left out.
fn logfmt(m: &Fields) -> String {
    let mut out = String::new();
    for (k, v) in m {
        let text = match v {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(k);
        out.push('=');
        let plain = !text.is_empty()
            && !text
                .chars()
                .any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
        if plain {
            out.push_str(&text);
        } else {
            out.push('"');
            for c in text.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    c if c.is_control() => {
                        let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
        }
    }
    out
}
