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

#[derive(Clone)]
pub struct ClickHouse {
    http: reqwest::Client,
    url: String,
    user: String,
    password: String,
    compression: String,
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

    /// The server version, refused with a clear message when too old.
    pub async fn check_version(&self) -> Result<String> {
        let version = self.query_text("SELECT version()", &[]).await?.trim().to_string();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < MIN_SERVER_VERSION {
            return Err(OffloadError::UnsupportedServer(format!(
                "ClickHouse server at {} is version {version}; iceberg-offload needs {}.{} or newer \
                 (ArrowStream output, DateTime64 and HTTP query parameters)",
                self.url, MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1
            )));
        }
        Ok(version)
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

fn async_stream(
    bytes: impl Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
    client: ClickHouse,
) -> impl Stream<Item = Result<RecordBatch>> + Send + 'static {
    struct State<S> {
        bytes: std::pin::Pin<Box<S>>,
        framer: MessageFramer,
        /// Whole messages not yet given to the decoder.
        frames: std::collections::VecDeque<Buffer>,
        decoder: StreamDecoder,
        pending: Buffer,
        done: bool,
        client: ClickHouse,
    }
    let state = State {
        bytes: Box::pin(bytes),
        framer: MessageFramer::default(),
        frames: Default::default(),
        decoder: StreamDecoder::new(),
        pending: Buffer::from(Vec::<u8>::new()),
        done: false,
        client,
    };
    futures::stream::unfold(state, |mut st| async move {
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
                        let err = mid_stream_exception(&st.client, &st.framer, &chunk).unwrap_or_else(|| {
                            OffloadError::ClickHouseStream(format!("invalid ArrowStream: {e}"))
                        });
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
                    // A stream cut short (or a server error written mid-stream) never
                    // ends with the end-of-stream marker: refuse to call it complete.
                    if let Some(err) = mid_stream_exception(&st.client, &st.framer, &[]) {
                        return Some((Err(err), st));
                    }
                    if st.framer.pending() > 0 {
                        let msg = format!(
                            "incomplete ArrowStream: the body ended inside a message ({} bytes read of it)",
                            st.framer.pending()
                        );
                        return Some((Err(OffloadError::ClickHouseStream(msg)), st));
                    }
                    return match st.decoder.finish() {
                        Ok(()) => None,
                        Err(e) => {
                            Some((Err(OffloadError::ClickHouseStream(format!("incomplete ArrowStream: {e}"))), st))
                        }
                    };
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
