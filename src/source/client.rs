//! ClickHouse HTTP client: text queries and streamed Arrow reads.

use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::StreamDecoder;
use futures::{Stream, StreamExt};
use reqwest::header::HeaderMap;

use super::framing::MessageFramer;
use crate::config::ClickHouseConfig;
use crate::error::{OffloadError, Result};

/// The oldest ClickHouse this service supports: DateTime64 and ArrowStream output with
/// stable Arrow types, and query parameters over HTTP.
pub const MIN_SERVER_VERSION: (u32, u32) = (23, 3);

/// I1, complete reads: settings sent with every query, so that whatever a server profile
/// sets, ClickHouse fails a query instead of returning part of its result. Limits a profile
/// sets (`max_result_rows`, `max_rows_to_read`, `max_execution_time`, …) are kept; only what
/// happens when one is reached changes, from "return what you have" to "fail". All exist in
/// ClickHouse 23.3, the oldest server supported.
pub const COMPLETE_RESULTS: &[(&str, &str)] = &[
    // `break` returns the rows read so far as if the result were whole.
    ("result_overflow_mode", "throw"),
    ("read_overflow_mode", "throw"),
    ("read_overflow_mode_leaf", "throw"),
    ("timeout_overflow_mode", "throw"),
    ("timeout_overflow_mode_leaf", "throw"),
    ("sort_overflow_mode", "throw"),
    ("set_overflow_mode", "throw"),
    ("join_overflow_mode", "throw"),
    ("distinct_overflow_mode", "throw"),
    ("transfer_overflow_mode", "throw"),
    // `any` aggregates only the keys seen before the limit: counts would be short.
    ("group_by_overflow_mode", "throw"),
    // A profile-wide LIMIT/OFFSET applies to every SELECT.
    ("limit", "0"),
    ("offset", "0"),
    // A distributed table must not silently leave out shards it cannot reach.
    ("skip_unavailable_shards", "0"),
    // A cached result may predate rows that arrived since; counts must be fresh.
    ("use_query_cache", "0"),
    // Extra filters a profile may add to every table or result.
    ("additional_table_filters", "{}"),
    ("additional_result_filter", ""),
    // Extremes add rows to text results.
    ("extremes", "0"),
    // The window's WHERE compares columns, not the SELECT list's converted values that carry
    // the same names (`toString(uuid) AS uuid`).
    ("prefer_column_name_to_alias", "1"),
    // A Distributed table must not read a replica that lags behind (a short window).
    ("fallback_to_stale_replicas_for_distributed_queries", "0"),
    // One result, merged across shards: `count()` is one number.
    ("distributed_group_by_no_merge", "0"),
];

/// Of [`COMPLETE_RESULTS`], those without which a result could be wrong rather than merely
/// unguarded: a server that lacks one is refused.
const REQUIRED: &[&str] = &["prefer_column_name_to_alias", "result_overflow_mode", "limit", "offset"];

#[derive(Clone)]
pub struct ClickHouse {
    http: reqwest::Client,
    url: String,
    user: String,
    password: String,
    compression: String,
    /// The settings of [`COMPLETE_RESULTS`] this server knows (a setting it does not know, no
    /// profile of it can set either); all of them until [`ClickHouse::check_version`] asked.
    complete: std::sync::Arc<std::sync::OnceLock<Vec<(&'static str, &'static str)>>>,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse").field("url", &self.url).field("user", &self.user).finish_non_exhaustive()
    }
}

impl ClickHouse {
    pub fn new(cfg: &ClickHouseConfig) -> anyhow::Result<Self> {
        let password = cfg.password.read("clickhouse password")?.unwrap_or_default();
        let mut builder = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(cfg.query_timeout)
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("clickhouse.ca_file {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("clickhouse.ca_file {}: not a PEM certificate: {e}", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Self {
            http: builder.build()?,
            url: cfg.url.trim_end_matches('/').to_string() + "/",
            user: cfg.user.clone(),
            password,
            compression: cfg.compression.clone(),
            complete: Default::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn send(
        &self,
        sql: &str,
        params: &[(String, String)],
        settings: &[(&str, &str)],
    ) -> Result<reqwest::Response> {
        let complete = self.complete.get().map(Vec::as_slice).unwrap_or(COMPLETE_RESULTS);
        self.send_with(sql, params, complete.iter().chain(settings)).await
    }

    async fn send_with<'a>(
        &self,
        sql: &str,
        params: &[(String, String)],
        settings: impl Iterator<Item = &'a (&'a str, &'a str)>,
    ) -> Result<reqwest::Response> {
        let mut query: Vec<(String, String)> = params.iter().map(|(k, v)| (format!("param_{k}"), v.clone())).collect();
        for (k, v) in settings {
            query.push(((*k).to_string(), (*v).to_string()));
        }
        let response = self
            .http
            .post(&self.url)
            .query(&query)
            .header("X-ClickHouse-User", &self.user)
            .header("X-ClickHouse-Key", &self.password)
            .body(sql.to_string())
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let code = exception_code(response.headers());
        let body = response.text().await.unwrap_or_default();
        let message = redact(body.trim(), &self.password);
        Err(match code {
            Some(code) => OffloadError::ClickHouse { code, message },
            None => OffloadError::ClickHouse { code: 1002, message: format!("HTTP {status}: {message}") },
        })
    }

    fn transport_error(&self, e: reqwest::Error) -> OffloadError {
        let message = redact(&describe(&e), &self.password);
        if e.is_connect() || e.is_timeout() && !e.is_body() {
            OffloadError::ClickHouseUnreachable { url: self.url.clone(), message }
        } else if e.is_body() || e.is_decode() {
            OffloadError::ClickHouseStream(message)
        } else {
            OffloadError::ClickHouseUnreachable { url: self.url.clone(), message }
        }
    }

    /// Runs a query and returns its TabSeparated output.
    pub async fn query_text(&self, sql: &str, params: &[(String, String)]) -> Result<String> {
        let started = std::time::Instant::now();
        let response = self.send(&format!("{sql} FORMAT TabSeparated"), params, &[]).await?;
        let text = response.text().await.map_err(|e| self.transport_error(e))?;
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), "ClickHouse query: {sql}");
        Ok(text)
    }

    /// Runs a query and returns its rows, each as TabSeparated fields (unescaped).
    pub async fn query_rows(&self, sql: &str, params: &[(String, String)]) -> Result<Vec<Vec<String>>> {
        let text = self.query_text(sql, params).await?;
        Ok(text.lines().filter(|l| !l.is_empty()).map(|l| l.split('\t').map(unescape_tsv).collect()).collect())
    }

    /// The server's clock against this host's (I1): (the skew, ns from the middle of the round
    /// trip, for people; the offset to plan with, ns). The server read its clock somewhere in the
    /// round trip, so `server − after` is never later than the truth; and windows are cut on
    /// the earlier of the two clocks, since the rows' cursors come from producers whose clocks
    /// neither knows (a ClickHouse ahead of them would shorten the settle delay).
    pub async fn clock_offset_ns(&self) -> Result<(i64, i64)> {
        let before = crate::util::now_epoch_ns();
        let text = self.query_text("SELECT toUnixTimestamp64Nano(now64(9))", &[]).await?;
        let after = crate::util::now_epoch_ns();
        let server: i64 = text
            .trim()
            .parse()
            .map_err(|_| OffloadError::ClickHouseStream(format!("unexpected server time {text:?}")))?;
        Ok((server - before / 2 - after / 2, (server - after).min(0)))
    }

    /// The server version, refused with a clear message when too old.
    pub async fn check_version(&self) -> Result<String> {
        // Without COMPLETE_RESULTS: a server too old to know some of those settings must still
        // tell its version, so that it is refused by name.
        let response = self.send_with("SELECT version() FORMAT TabSeparated", &[], std::iter::empty()).await?;
        let version = response.text().await.map_err(|e| self.transport_error(e))?.trim().to_string();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < MIN_SERVER_VERSION {
            return Err(OffloadError::UnsupportedServer(format!(
                "ClickHouse server at {} is version {version}; iceberg-offload needs {}.{} or newer \
                 (ArrowStream output, DateTime64 and HTTP query parameters)",
                self.url, MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1
            )));
        }
        self.learn_settings().await?;
        Ok(version)
    }

    /// Keeps the settings of [`COMPLETE_RESULTS`] that this server has (older servers lack
    /// some `*_leaf` ones, and would refuse every query that names them).
    async fn learn_settings(&self) -> Result<()> {
        let names: Vec<String> = COMPLETE_RESULTS.iter().map(|(k, _)| format!("'{k}'")).collect();
        let params = [("names".to_string(), format!("[{}]", names.join(",")))];
        let sql = "SELECT name FROM system.settings WHERE has({names:Array(String)}, name) FORMAT TabSeparated";
        let response = self.send_with(sql, &params, std::iter::empty()).await?;
        let text = response.text().await.map_err(|e| self.transport_error(e))?;
        let known: std::collections::HashSet<&str> = text.lines().map(str::trim).collect();
        let kept: Vec<_> = COMPLETE_RESULTS.iter().copied().filter(|(k, _)| known.contains(k)).collect();
        if kept.len() < COMPLETE_RESULTS.len() {
            let missing: Vec<&str> = COMPLETE_RESULTS.iter().map(|(k, _)| *k).filter(|k| !known.contains(k)).collect();
            if let Some(required) = missing.iter().find(|k| REQUIRED.contains(k)) {
                return Err(OffloadError::UnsupportedServer(format!(
                    "ClickHouse at {} has no setting {required}, which iceberg-offload needs to read windows exactly",
                    self.url
                )));
            }
            tracing::info!("ClickHouse at {} does not have the settings {missing:?}; they are not sent", self.url);
        }
        let _ = self.complete.set(kept);
        Ok(())
    }

    /// Streams a query's result as Arrow record batches, decoded incrementally: memory holds
    /// the message being assembled (one exact-size allocation, see [`super::framing`]) and
    /// the batch being decoded, never the whole result. `block_rows` caps
    /// the rows of one batch (ClickHouse's `max_block_size`), so batches of wide tables stay small.
    pub async fn query_arrow(
        &self,
        sql: &str,
        params: &[(String, String)],
        block_rows: usize,
    ) -> Result<impl Stream<Item = Result<RecordBatch>> + Send + 'static> {
        let block_rows = block_rows.to_string();
        let settings = [
            ("max_block_size", block_rows.as_str()),
            (
                "output_format_arrow_compression_method",
                if self.compression == "lz4" { "lz4_frame" } else { self.compression.as_str() },
            ),
            ("output_format_arrow_string_as_string", "1"),
            ("output_format_arrow_low_cardinality_as_dictionary", "0"),
        ];
        let response = self.send(&format!("{sql} FORMAT ArrowStream"), params, &settings).await?;
        let this = self.clone();
        let bytes = response.bytes_stream();
        Ok(async_stream(bytes, this))
    }
}

/// Where the Arrow body of one query stands, between two batches.
struct ArrowBody<S> {
    bytes: std::pin::Pin<Box<S>>,
    framer: MessageFramer,
    /// Whole messages not yet given to the decoder.
    frames: std::collections::VecDeque<Buffer>,
    decoder: StreamDecoder,
    pending: Buffer,
    done: bool,
    client: ClickHouse,
}

impl<S> ArrowBody<S> {
    fn new(bytes: S, client: ClickHouse) -> Self {
        ArrowBody {
            bytes: Box::pin(bytes),
            framer: MessageFramer::default(),
            frames: Default::default(),
            decoder: StreamDecoder::new(),
            pending: Buffer::from(Vec::<u8>::new()),
            done: false,
            client,
        }
    }

    /// At the end of the body: why it is not a complete stream, if it is not. A stream cut
    /// short (or a server error written mid-stream) never ends with the end-of-stream marker:
    /// refuse to call it complete.
    fn incomplete(&mut self) -> Option<OffloadError> {
        if let Some(err) = mid_stream_exception(&self.client, &self.framer, &[]) {
            return Some(err);
        }
        if self.framer.pending() > 0 {
            let msg = format!(
                "incomplete ArrowStream: the body ended inside a message ({} bytes read of it)",
                self.framer.pending()
            );
            return Some(OffloadError::ClickHouseStream(msg));
        }
        match self.decoder.finish() {
            Ok(()) => None,
            Err(e) => Some(OffloadError::ClickHouseStream(format!("incomplete ArrowStream: {e}"))),
        }
    }
}

/// The record batches of an ArrowStream body; an error ends it, and a body that is not a
/// complete stream ends with one.
fn async_stream(
    bytes: impl Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
    client: ClickHouse,
) -> impl Stream<Item = Result<RecordBatch>> + Send + 'static {
    futures::stream::unfold(ArrowBody::new(bytes, client), |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            while !st.pending.is_empty() {
                match st.decoder.decode(&mut st.pending) {
                    Ok(Some(batch)) => return Some((Ok(batch), st)),
                    Ok(None) => {}
                    Err(e) => {
                        st.done = true;
                        return Some((Err(OffloadError::ClickHouseStream(format!("invalid ArrowStream: {e}"))), st));
                    }
                }
            }
            if let Some(frame) = st.frames.pop_front() {
                st.pending = frame;
                continue;
            }
            match st.bytes.next().await {
                Some(Ok(chunk)) => {
                    let mut frames = Vec::new();
                    let framed = st.framer.push(&chunk, &mut frames);
                    st.frames.extend(frames);
                    if let Err(e) = framed {
                        st.done = true;
                        let err = mid_stream_exception(&st.client, &st.framer, &chunk)
                            .unwrap_or_else(|| OffloadError::ClickHouseStream(format!("invalid ArrowStream: {e}")));
                        return Some((Err(err), st));
                    }
                }
                Some(Err(e)) => {
                    st.done = true;
                    let err = st.client.transport_error(e);
                    let err = match err {
                        OffloadError::ClickHouseUnreachable { message, .. } => OffloadError::ClickHouseStream(message),
                        other => other,
                    };
                    return Some((Err(mid_stream_exception(&st.client, &st.framer, &[]).unwrap_or(err)), st));
                }
                None => {
                    st.done = true;
                    return st.incomplete().map(|err| (Err(err), st));
                }
            }
        }
    })
}

/// A server error ClickHouse wrote into the body after the Arrow output had started: reported
/// as the ClickHouse error it is, not as a broken stream.
fn mid_stream_exception(client: &ClickHouse, framer: &MessageFramer, unread: &[u8]) -> Option<OffloadError> {
    let (code, message) = framer.server_exception(unread)?;
    Some(OffloadError::ClickHouse { code, message: redact(&message, &client.password) })
}

fn exception_code(headers: &HeaderMap) -> Option<u32> {
    headers.get("X-ClickHouse-Exception-Code")?.to_str().ok()?.trim().parse().ok()
}

/// The error and its causes, without the request URL reqwest puts in its message
/// (the URL carries query parameters; the password is never in it, but keep logs short).
fn describe(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = vec![];
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        let text = text.split(" for url (").next().unwrap_or(&text).to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Removes a secret from a message before it can reach a log, metric or error.
pub fn redact(message: &str, secret: &str) -> String {
    if secret.len() >= 3 { message.replace(secret, "[redacted]") } else { message.to_string() }
}

fn unescape_tsv(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_string();
    }
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('0') => out.push('\0'),
                Some('\\') => out.push('\\'),
                Some('\'') => out.push('\''),
                Some(other) => {
                    out.push('\\');
                    out.push(other)
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsv_unescaping() {
        assert_eq!(unescape_tsv("a\\tb\\\\c"), "a\tb\\c");
        assert_eq!(unescape_tsv("Enum8('a' = 1)"), "Enum8('a' = 1)");
        assert_eq!(unescape_tsv("Enum8(\\'a\\' = 1)"), "Enum8('a' = 1)");
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("bad password s3cret!", "s3cret!"), "bad password [redacted]");
    }
}
