//! A small etcd v3 client over etcd's HTTP/JSON gateway (`POST /v3/...`).
//!
//! Why not gRPC: the control plane needs a dozen calls, and a hand-written HTTP/1.1
//! exchange on a `TcpStream` costs one small dependency (`base64`) instead of a
//! protobuf/gRPC stack. Every request opens its own connection (`Connection: close`):
//! the control plane sends a few requests per second, and with no pooled connections
//! there is never a half-dead one to detect, so timeouts and failover stay trivial.
//!
//! The gateway speaks proto3 JSON: keys and values are base64, int64 fields are JSON
//! strings (`"123"`), fields holding their default value are left out (read as 0,
//! empty or false here), and streamed calls (watch, lease keep-alive) answer with one
//! `{"result":{...}}` or `{"error":{...}}` object per line.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::Error;

type Result<T> = std::result::Result<T, Error>;

/// Longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Longest response body accepted (etcd caps a request at 1.5 MiB by default, but a
/// prefix range may be larger); more than this is a broken peer, not data.
const MAX_BODY: usize = 256 * 1024 * 1024;

/// A client for one etcd cluster. Cheap to clone; clones share the endpoint preference.
#[derive(Clone, Debug)]
pub struct Etcd {
    endpoints: Arc<[Endpoint]>,
    timeout: Duration,
    /// The endpoint that last accepted a connection: requests start there, so a dead
    /// first endpoint costs one failed connect, not one per request.
    preferred: Arc<AtomicUsize>,
}

/// A key-value pair as etcd stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value (empty in a delete event).
    pub value: Vec<u8>,
    /// Revision that created the key (0 in a delete event).
    pub create_revision: i64,
    /// Revision of the last change (for a delete event: the deletion).
    pub mod_revision: i64,
    /// The lease the key is attached to, or 0.
    pub lease: i64,
}

/// What a watch event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or changed.
    Put,
    /// The key was deleted (or its lease expired).
    Delete,
}

/// One change seen by a [`Watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete only `key` and `mod_revision` are set.
    pub kv: Kv,
}

/// A watch on a key prefix: one streaming HTTP response that lives as long as this value.
#[derive(Debug)]
pub struct Watch {
    resp: Response,
}

impl Etcd {
    /// A client for `endpoints` (each `http://host:port`, tried in order), giving every
    /// attempt at most `request_timeout`.
    pub fn new(endpoints: &[String], request_timeout: Duration) -> Result<Etcd> {
        if endpoints.is_empty() {
            return Err(err("-", "no endpoints given"));
        }
        if request_timeout.is_zero() {
            return Err(err(
                &endpoints.join(","),
                "request timeout must not be zero",
            ));
        }
        let endpoints = endpoints
            .iter()
            .map(|u| parse_url(u).map_err(|e| err(u, format!("bad endpoint URL: {e}"))))
            .collect::<Result<Arc<[Endpoint]>>>()?;
        Ok(Etcd {
            endpoints,
            timeout: request_timeout,
            preferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Grants a lease of `ttl_s` seconds (etcd may round it up); returns its id.
    pub async fn grant(&self, ttl_s: i64) -> Result<i64> {
        let (ep, r) = self
            .call("/v3/lease/grant", json!({ "TTL": ttl_s.to_string() }))
            .await?;
        match r.id.0 {
            0 => Err(err(&ep, format!("lease grant refused: {:?}", r.error))),
            id => Ok(id),
        }
    }

    /// Refreshes a lease; returns its remaining TTL in seconds, 0 when the lease is gone.
    pub async fn keep_alive(&self, lease: i64) -> Result<i64> {
        let req = json!({ "ID": lease.to_string() });
        let (_, first) = self.first_message("/v3/lease/keepalive", &req).await?;
        Ok(first.ttl.0.max(0))
    }

    /// Revokes a lease, deleting its keys. A lease that is already gone is not an error.
    pub async fn revoke(&self, lease: i64) -> Result<()> {
        let (ep, status, body) = self
            .call_raw("/v3/lease/revoke", &json!({ "ID": lease.to_string() }))
            .await?;
        // "requested lease not found" is gRPC NotFound (5), which the gateway sends as 404.
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if status == 404 && json.is_some_and(|v| v["code"] == 5) {
            return Ok(());
        }
        check_status(&ep, status, &body)
    }

    /// Sets `key` to `value`, attached to `lease` if given; returns the new revision.
    pub async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<i64> {
        let (_, r) = self
            .call("/v3/kv/put", put_request(key, value, lease))
            .await?;
        Ok(r.header.revision.0)
    }

    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>> {
        let (ep, r) = self
            .call("/v3/kv/range", json!({ "key": BASE64.encode(key) }))
            .await?;
        r.kvs
            .into_iter()
            .next()
            .map(|kv| kv.into_kv(&ep))
            .transpose()
    }

    /// Reads every key starting with `prefix`, sorted by key (etcd returns ranges in
    /// key order), and the revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64)> {
        let end = BASE64.encode(range_end(prefix));
        let req = json!({ "key": BASE64.encode(prefix), "range_end": end });
        let (ep, r) = self.call("/v3/kv/range", req).await?;
        let kvs = r.kvs.into_iter().map(|kv| kv.into_kv(&ep));
        Ok((kvs.collect::<Result<_>>()?, r.header.revision.0))
    }

    /// Deletes one key (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<()> {
        let req = json!({ "key": BASE64.encode(key) });
        self.call("/v3/kv/deleterange", req).await.map(drop)
    }

    /// Creates `key` only if it does not exist; true if this call created it.
    pub async fn create_if_absent(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<bool> {
        let cmp = json!({ "target": "CREATE", "create_revision": "0" });
        self.txn(key, cmp, put_request(key, value, lease)).await
    }

    /// Sets `key` only if its last change was at `mod_revision` (0: only if it does not
    /// exist, since etcd compares an absent key as all zeros); true if it was set.
    pub async fn put_if_mod_revision(
        &self,
        key: &str,
        value: &[u8],
        mod_revision: i64,
    ) -> Result<bool> {
        let cmp = json!({ "target": "MOD", "mod_revision": mod_revision.to_string() });
        self.txn(key, cmp, put_request(key, value, None)).await
    }

    /// Watches every key starting with `prefix`, from `start_revision` (0: from now).
    /// Returns once etcd has acknowledged the watch.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<Watch> {
        let req = json!({ "create_request": {
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(range_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        let (resp, first) = self.first_message("/v3/watch", &req).await?;
        first.check_canceled(&resp.endpoint)?;
        if !first.created {
            return Err(err(
                &resp.endpoint,
                "watch: first message is not the creation ack",
            ));
        }
        Ok(Watch { resp })
    }

    /// A transaction: `put` if `key` passes the comparison `cmp` (`result` EQUAL).
    async fn txn(&self, key: &str, mut cmp: Value, put: Value) -> Result<bool> {
        cmp["key"] = json!(BASE64.encode(key));
        cmp["result"] = json!("EQUAL");
        let req = json!({ "compare": [cmp], "success": [{ "request_put": put }] });
        Ok(self.call("/v3/kv/txn", req).await?.1.succeeded)
    }

    /// A unary call: a 2xx answer decoded, with the endpoint that gave it.
    async fn call(&self, path: &str, req: Value) -> Result<(String, Reply)> {
        let (ep, status, body) = self.call_raw(path, &req).await?;
        check_status(&ep, status, &body)?;
        let t = serde_json::from_slice(&body)
            .map_err(|e| err(&ep, format!("{path}: bad response: {e}")))?;
        Ok((ep, t))
    }

    /// Opens a streamed call and reads its first message.
    async fn first_message(&self, path: &str, req: &Value) -> Result<(Response, Reply)> {
        let (mut resp, deadline) = self.open(path, req).await?;
        let ep = resp.endpoint.clone();
        let line = self.within(deadline, &ep, resp.next_line()).await?;
        let line = line.ok_or_else(|| err(&ep, format!("{path}: stream ended at once")))?;
        Ok((resp, stream_result(&ep, path, &line)?))
    }

    async fn call_raw(&self, path: &str, req: &Value) -> Result<(String, u16, Vec<u8>)> {
        let (mut resp, deadline) = self.open(path, req).await?;
        let ep = resp.endpoint.clone();
        let body = self.within(deadline, &ep, resp.read_to_end()).await?;
        Ok((ep, resp.status, body))
    }

    /// Sends one POST and reads the response head. Fails over to the next endpoint only
    /// when no connection can be made: once a request is sent etcd may have applied it,
    /// and sending it elsewhere could apply it twice. Returns the attempt's deadline.
    async fn open(&self, path: &str, req: &Value) -> Result<(Response, Instant)> {
        let body = req.to_string();
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for idx in (first..n).chain(0..first) {
            let ep = &self.endpoints[idx];
            let deadline = Instant::now() + self.timeout;
            let connect = TcpStream::connect((ep.host.as_str(), ep.port));
            let why = match timeout_at(deadline, connect).await {
                Ok(Ok(stream)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    let start = Response::start(stream, ep, path, &body);
                    return Ok((self.within(deadline, &ep.url, start).await?, deadline));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no connection within {:?}", self.timeout),
            };
            failures.push(format!("{}: {why}", ep.url));
        }
        let all: Vec<&str> = self.endpoints.iter().map(|e| e.url.as_str()).collect();
        Err(err(
            &all.join(","),
            format!("no endpoint reachable: {}", failures.join("; ")),
        ))
    }

    async fn within<T>(
        &self,
        deadline: Instant,
        ep: &str,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        timeout_at(deadline, f)
            .await
            .unwrap_or_else(|_| Err(err(ep, format!("no answer within {:?}", self.timeout))))
    }
}

impl Watch {
    /// Waits for the next batch of events (never empty), in revision order. Fails when
    /// the stream ends (etcd went away) or etcd cancels the watch, e.g. because the
    /// start revision was compacted; the caller then re-reads with
    /// [`Etcd::get_prefix`] and watches again from the revision it returned + 1.
    ///
    /// It waits without a time limit; bound it with `tokio::time::timeout` if needed:
    /// it is cancel-safe (all state lives in `self`, and socket reads lose nothing).
    pub async fn next(&mut self) -> Result<Vec<Event>> {
        loop {
            let line = self.resp.next_line().await?;
            let ep = &self.resp.endpoint;
            let line = line.ok_or_else(|| err(ep, "watch stream ended"))?;
            let r = stream_result(ep, "watch", &line)?;
            r.check_canceled(ep)?;
            // The creation ack and progress notifications carry no events.
            if !r.events.is_empty() {
                return r.events.into_iter().map(|e| e.into_event(ep)).collect();
            }
        }
    }
}

fn err(endpoint: &str, reason: impl Into<String>) -> Error {
    Error::Etcd {
        endpoint: endpoint.to_string(),
        reason: reason.into(),
    }
}

fn put_request(key: &str, value: &[u8], lease: Option<i64>) -> Value {
    let mut req = json!({ "key": BASE64.encode(key), "value": BASE64.encode(value) });
    if let Some(l) = lease {
        req["lease"] = Value::String(l.to_string());
    }
    req
}

/// The end of the range holding every key that starts with `prefix`: the prefix with its
/// last byte below 0xff incremented (bytes after it dropped); `"\0"` (every key from
/// `prefix` on) when there is none, as in etcd's `clientv3.GetPrefixRangeEnd`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// One `http://host:port` endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    /// `http://host:port`, for messages.
    url: String,
    /// `host:port` as written, for the `Host` header.
    authority: String,
    /// The host without IPv6 brackets, for connecting.
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> std::result::Result<Endpoint, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("expected http://host:port (https is not supported)")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err("expected http://host:port with no path or user".into());
    }
    let (host, port) = authority.rsplit_once(':').ok_or("missing :port")?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']').ok_or("unclosed [ in host")?,
        None if host.contains(':') => {
            return Err("IPv6 hosts need brackets: http://[::1]:2379".into())
        }
        None => host,
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or("port must be 1-65535")?;
    Ok(Endpoint {
        url: format!("http://{authority}"),
        authority: authority.to_string(),
        host: host.to_string(),
        port,
    })
}

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// `Content-Length`: this many bytes still to come.
    Length(usize),
    Chunked(Chunk),
    /// Neither: the body runs until the server closes.
    ToEof,
}

/// Where a chunked decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Expecting a size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(usize),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
}

/// A response being read: head parsed, body decoded on demand.
#[derive(Debug)]
struct Response {
    stream: TcpStream,
    endpoint: String,
    status: u16,
    framing: Framing,
    /// Bytes read from the socket and not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes not yet consumed.
    body: Vec<u8>,
    done: bool,
}

impl Response {
    async fn start(
        mut stream: TcpStream,
        ep: &Endpoint,
        path: &str,
        body: &str,
    ) -> Result<Response> {
        let io = |e: std::io::Error| err(&ep.url, format!("{path}: {e}"));
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            ep.authority,
            body.len()
        );
        stream.write_all(req.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        let end = loop {
            if let Some(i) = find(&raw, b"\r\n\r\n") {
                break i;
            }
            if raw.len() > MAX_HEAD {
                return Err(err(
                    &ep.url,
                    format!("{path}: response head over {MAX_HEAD} bytes"),
                ));
            }
            if read_some(&mut stream, &mut raw).await.map_err(io)? == 0 {
                return Err(err(
                    &ep.url,
                    format!("{path}: connection closed before the response"),
                ));
            }
        };
        let (status, framing) =
            parse_head(&raw[..end]).map_err(|e| err(&ep.url, format!("{path}: {e}")))?;
        raw.drain(..end + 4);
        let mut resp = Response {
            stream,
            endpoint: ep.url.clone(),
            status,
            framing,
            raw,
            body: Vec::new(),
            done: false,
        };
        resp.decode()?;
        Ok(resp)
    }

    /// Moves what can be decoded from `raw` into `body`; sets `done` at the body's end.
    fn decode(&mut self) -> Result<()> {
        match &mut self.framing {
            Framing::Length(left) => {
                let n = (*left).min(self.raw.len());
                self.body.extend(self.raw.drain(..n));
                *left -= n;
                self.done = *left == 0;
            }
            Framing::Chunked(state) => {
                self.done = dechunk(state, &mut self.raw, &mut self.body)
                    .map_err(|e| err(&self.endpoint, e))?;
            }
            Framing::ToEof => self.body.append(&mut self.raw),
        }
        if self.body.len() > MAX_BODY {
            return Err(err(
                &self.endpoint,
                format!("response body over {MAX_BODY} bytes"),
            ));
        }
        Ok(())
    }

    /// Reads until more body bytes are decoded or the body ends.
    async fn read_more(&mut self) -> Result<()> {
        let have = self.body.len();
        while !self.done && self.body.len() == have {
            let n = read_some(&mut self.stream, &mut self.raw)
                .await
                .map_err(|e| err(&self.endpoint, e.to_string()))?;
            if n == 0 {
                if self.framing != Framing::ToEof {
                    return Err(err(
                        &self.endpoint,
                        "connection closed in the middle of the response",
                    ));
                }
                self.done = true;
            }
            self.decode()?;
        }
        Ok(())
    }

    async fn read_to_end(&mut self) -> Result<Vec<u8>> {
        while !self.done {
            self.read_more().await?;
        }
        Ok(std::mem::take(&mut self.body))
    }

    /// The next message of a streamed body (the gateway ends each with a newline), or
    /// `None` at the end. A non-2xx answer is read whole and returned as the error.
    async fn next_line(&mut self) -> Result<Option<Vec<u8>>> {
        if !(200..300).contains(&self.status) {
            let body = self.read_to_end().await?;
            check_status(&self.endpoint, self.status, &body)?;
        }
        loop {
            if let Some(i) = self.body.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.body.drain(..=i).collect();
                if !line.trim_ascii().is_empty() {
                    return Ok(Some(line));
                }
            } else if self.done {
                let rest = std::mem::take(&mut self.body);
                return Ok((!rest.trim_ascii().is_empty()).then_some(rest));
            } else {
                self.read_more().await?;
            }
        }
    }
}

/// One socket read appended to `raw`. Reading into a local buffer first keeps callers
/// cancel-safe: a read that is dropped has consumed nothing.
async fn read_some(stream: &mut TcpStream, raw: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut buf = [0u8; 16 * 1024];
    let n = stream.read(&mut buf).await?;
    raw.extend_from_slice(&buf[..n]);
    Ok(n)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Status and body framing from a response head (without the blank line).
fn parse_head(head: &[u8]) -> std::result::Result<(u16, Framing), String> {
    let head = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [v, code, ..] if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut framing = Framing::ToEof;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked(Chunk::Size);
        } else if name.eq_ignore_ascii_case("content-length") && framing == Framing::ToEof {
            let n = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            framing = Framing::Length(n);
        }
    }
    if let Framing::Length(n) = framing {
        if n > MAX_BODY {
            return Err(format!("Content-Length {n} over {MAX_BODY}"));
        }
    }
    Ok((status, framing))
}

/// Decodes chunked transfer-encoding from `raw` into `out`, consuming what it used;
/// true once the last chunk and its trailers are consumed.
fn dechunk(
    state: &mut Chunk,
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> std::result::Result<bool, String> {
    let mut pos = 0;
    let done = loop {
        let rest = &raw[pos..];
        match *state {
            Chunk::Size | Chunk::Trailer => {
                let Some(end) = find(rest, b"\r\n") else {
                    if rest.len() > 4096 {
                        return Err("chunk size or trailer line too long".into());
                    }
                    break false;
                };
                let line = &rest[..end];
                pos += end + 2;
                if *state == Chunk::Trailer {
                    if line.is_empty() {
                        break true;
                    }
                    continue;
                }
                // A size may be followed by `;extension`, which means nothing to us.
                let hex = line.split(|&b| b == b';').next().unwrap_or_default();
                let hex = std::str::from_utf8(hex).unwrap_or("?").trim();
                let n = usize::from_str_radix(hex, 16)
                    .ok()
                    .filter(|&n| n <= MAX_BODY)
                    .ok_or_else(|| format!("bad chunk size {:?}", String::from_utf8_lossy(line)))?;
                *state = if n == 0 {
                    Chunk::Trailer
                } else {
                    Chunk::Data(n)
                };
            }
            Chunk::Data(n) => {
                let take = n.min(rest.len());
                if take == 0 {
                    break false;
                }
                out.extend_from_slice(&rest[..take]);
                pos += take;
                *state = if take == n {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(n - take)
                };
            }
            Chunk::DataEnd => {
                if rest.len() < 2 {
                    break false;
                }
                if &rest[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF".into());
                }
                pos += 2;
                *state = Chunk::Size;
            }
        }
    };
    raw.drain(..pos);
    Ok(done)
}

/// An error for a non-2xx answer, with etcd's message when the body carries one.
fn check_status(ep: &str, status: u16, body: &[u8]) -> Result<()> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let msg = match json.as_ref().and_then(|v| v["message"].as_str()) {
        Some(m) => m.to_string(),
        None => String::from_utf8_lossy(&body[..body.len().min(300)])
            .trim()
            .to_string(),
    };
    Err(err(ep, format!("HTTP {status}: {msg}")))
}

/// The `result` of one streamed message, or its `error` as an error.
fn stream_result(ep: &str, what: &str, line: &[u8]) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Msg {
        result: Option<Reply>,
        error: Option<Value>,
    }
    let bad = |e: String| err(ep, format!("{what}: bad message: {e}"));
    match serde_json::from_slice::<Msg>(line).map_err(|e| bad(e.to_string()))? {
        Msg { error: Some(e), .. } => match e["message"].as_str() {
            Some(m) => Err(err(ep, format!("{what}: {m}"))),
            None => Err(err(ep, format!("{what}: {e}"))),
        },
        Msg {
            result: Some(r), ..
        } => Ok(r),
        _ => Err(bad("neither result nor error".into())),
    }
}

/// Every response field this client reads, from any call. Proto3 JSON leaves out
/// fields holding their default value, so each one defaults to 0, false or empty.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Reply {
    header: Header,
    kvs: Vec<RawKv>,
    succeeded: bool,
    #[serde(rename = "ID")]
    id: Int,
    #[serde(rename = "TTL")]
    ttl: Int,
    error: String,
    created: bool,
    canceled: bool,
    compact_revision: Int,
    cancel_reason: String,
    events: Vec<RawEvent>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Header {
    revision: Int,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawKv {
    key: Bytes,
    value: Bytes,
    create_revision: Int,
    mod_revision: Int,
    lease: Int,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawEvent {
    /// Absent for PUT (the enum's default).
    #[serde(rename = "type")]
    kind: String,
    kv: RawKv,
}

/// An int64, which proto3 JSON writes as a string (a number is accepted too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Int, D::Error> {
        let n = match Value::deserialize(d)? {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_i64(),
            _ => None,
        };
        n.map(Int)
            .ok_or_else(|| D::Error::custom("expected an int64"))
    }
}

/// Bytes, which proto3 JSON writes as base64.
#[derive(Debug, Default)]
struct Bytes(Vec<u8>);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Bytes, D::Error> {
        let s = String::deserialize(d)?;
        BASE64
            .decode(s)
            .map(Bytes)
            .map_err(|e| D::Error::custom(format!("bad base64: {e}")))
    }
}

impl Reply {
    fn check_canceled(&self, ep: &str) -> Result<()> {
        match (self.canceled, self.compact_revision.0) {
            (false, _) => Ok(()),
            (true, 0) => Err(err(ep, format!("watch canceled: {:?}", self.cancel_reason))),
            (true, c) => Err(err(
                ep,
                format!("watch canceled: revisions before {c} are compacted"),
            )),
        }
    }
}

impl RawKv {
    fn into_kv(self, ep: &str) -> Result<Kv> {
        let key = String::from_utf8(self.key.0).map_err(|_| err(ep, "key is not UTF-8"))?;
        let (create_revision, mod_revision) = (self.create_revision.0, self.mod_revision.0);
        Ok(Kv {
            key,
            value: self.value.0,
            create_revision,
            mod_revision,
            lease: self.lease.0,
        })
    }
}

impl RawEvent {
    fn into_event(self, ep: &str) -> Result<Event> {
        let kind = match self.kind.as_str() {
            "" | "PUT" => EventKind::Put,
            "DELETE" => EventKind::Delete,
            other => return Err(err(ep, format!("watch: unknown event type {other:?}"))),
        };
        Ok(Event {
            kind,
            kv: self.kv.into_kv(ep)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = parse_url("http://127.0.0.1:2379").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.url.as_str()),
            ("127.0.0.1", 2379, "http://127.0.0.1:2379")
        );
        let e = parse_url("http://etcd-1.lan:23790/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.authority.as_str()),
            ("etcd-1.lan", 23790, "etcd-1.lan:23790")
        );
        let e = parse_url("http://[::1]:2379").unwrap();
        assert_eq!(
            (e.host.as_str(), e.authority.as_str()),
            ("::1", "[::1]:2379")
        );
        for bad in [
            "https://h:1",
            "h:2379",
            "http://h",
            "http://h:",
            "http://h:0",
            "http://h:70000",
            "http://:2379",
            "http://h:2379/v3",
            "http://u@h:1",
            "http://::1:2379",
            "http://[::1:2379",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
        let e = Etcd::new(
            &["http://a:1".into(), "ftp://b".into()],
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("etcd ftp://b: bad endpoint URL"),
            "{e}"
        );
        assert!(Etcd::new(&[], Duration::from_secs(1)).is_err());
        assert!(Etcd::new(&["http://a:1".into()], Duration::ZERO).is_err());
    }

    #[test]
    fn prefix_range_end() {
        assert_eq!(range_end("a/"), b"a0");
        assert_eq!(range_end("abc"), b"abd");
        assert_eq!(range_end(""), b"\0");
        assert_eq!(range_end("a\u{7f}"), b"a\x80");
        // "ÿ" is c3 bf in UTF-8; only the last byte moves.
        assert_eq!(range_end("ÿ"), b"\xc3\xc0");
    }

    #[test]
    fn heads() {
        let (s, f) =
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\nContent-Type: x").unwrap();
        assert_eq!((s, f), (200, Framing::Length(17)));
        let h = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: Chunked\r\nContent-Length: 3";
        assert_eq!(parse_head(h).unwrap(), (404, Framing::Chunked(Chunk::Size)));
        assert_eq!(
            parse_head(b"HTTP/1.0 200 OK").unwrap(),
            (200, Framing::ToEof)
        );
        for bad in [
            &b"SSH-2.0 x"[..],
            b"HTTP/1.1 abc OK",
            b"HTTP/1.1 200 OK\r\nnocolon",
            b"HTTP/1.1 200\r\nContent-Length: -1",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Feeds `input` in pieces of every size; the result must not depend on how the
    /// bytes arrive.
    fn dechunk_all(input: &[u8]) -> std::result::Result<(Vec<u8>, bool), String> {
        let mut first: Option<(Vec<u8>, bool)> = None;
        for step in 1..=input.len() {
            let (mut state, mut raw, mut out, mut done) =
                (Chunk::Size, Vec::new(), Vec::new(), false);
            for piece in input.chunks(step) {
                raw.extend_from_slice(piece);
                done = dechunk(&mut state, &mut raw, &mut out)?;
                if done {
                    break;
                }
            }
            match &first {
                None => first = Some((out, done)),
                Some(f) => assert_eq!(f, &(out, done), "step {step}"),
            }
        }
        Ok(first.unwrap())
    }

    #[test]
    fn chunked() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nGrpc-Trailer: x\r\n\r\n";
        assert_eq!(dechunk_all(body).unwrap(), (b"hello, world".to_vec(), true));
        assert_eq!(dechunk_all(b"a3\r\n").unwrap(), (vec![], false));
        assert_eq!(
            dechunk_all(b"3\r\nabc\r\n").unwrap(),
            (b"abc".to_vec(), false)
        );
        // Bytes after the end stay for whoever reads next.
        let (mut st, mut raw, mut out) = (
            Chunk::Size,
            b"1\r\nx\r\n0\r\n\r\nEXTRA".to_vec(),
            Vec::new(),
        );
        assert!(dechunk(&mut st, &mut raw, &mut out).unwrap());
        assert_eq!((out.as_slice(), raw.as_slice()), (&b"x"[..], &b"EXTRA"[..]));
        assert!(dechunk_all(b"zz\r\n").is_err());
        assert!(dechunk_all(b"3\r\nabcX\r\n").is_err());
        assert!(dechunk_all(b"ffffffffffffffffffff\r\n").is_err());
        assert!(dechunk_all(&[b'1'; 5000]).is_err());
    }

    #[test]
    fn range_responses() {
        // As the gateway sends them: int64 as strings, defaults left out.
        let full = br#"{"header":{"cluster_id":"1","revision":"7"},"kvs":[
            {"key":"YQ==","create_revision":"2","mod_revision":"5","version":"3","value":"MQ==","lease":"99"},
            {"key":"Yg==","create_revision":2,"mod_revision":"2"}],"count":"2"}"#;
        let r: Reply = serde_json::from_slice(full).unwrap();
        assert_eq!(r.header.revision, Int(7));
        let kvs: Vec<Kv> = r.kvs.into_iter().map(|k| k.into_kv("e").unwrap()).collect();
        assert_eq!(
            kvs[0],
            Kv {
                key: "a".into(),
                value: b"1".to_vec(),
                create_revision: 2,
                mod_revision: 5,
                lease: 99
            }
        );
        assert_eq!(
            kvs[1],
            Kv {
                key: "b".into(),
                value: vec![],
                create_revision: 2,
                mod_revision: 2,
                lease: 0
            }
        );
        let empty: Reply = serde_json::from_slice(br#"{"header":{"revision":"2"}}"#).unwrap();
        assert!(empty.kvs.is_empty());
        let nothing: Reply = serde_json::from_slice(b"{}").unwrap();
        assert_eq!(nothing.header.revision, Int(0));
        for bad in [
            &br#"{"kvs":[{"key":"!!"}]}"#[..],
            br#"{"header":{"revision":"x"}}"#,
            br#"{"kvs":{}}"#,
            br#"{"header":{"revision":1.5}}"#,
            b"[",
            b"",
        ] {
            assert!(
                serde_json::from_slice::<Reply>(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let raw: Reply = serde_json::from_slice(br#"{"kvs":[{"key":"/w=="}]}"#).unwrap();
        assert!(
            raw.kvs.into_iter().next().unwrap().into_kv("e").is_err(),
            "non-UTF-8 key"
        );
    }

    #[test]
    fn lease_and_txn_responses() {
        let g: Reply =
            serde_json::from_slice(br#"{"header":{},"ID":"4111120150984541705","TTL":"5"}"#)
                .unwrap();
        assert_eq!((g.id, g.ttl), (Int(4111120150984541705), Int(5)));
        let gone = br#"{"result":{"header":{"revision":"3"},"ID":"123"}}"#;
        assert_eq!(stream_result("e", "ka", gone).unwrap().ttl, Int(0));
        let t: Reply =
            serde_json::from_slice(br#"{"header":{},"succeeded":true,"responses":[]}"#).unwrap();
        assert!(t.succeeded);
        let f: Reply = serde_json::from_slice(br#"{"header":{"revision":"3"}}"#).unwrap();
        assert!(!f.succeeded);
    }

    #[test]
    fn stream_messages() {
        let ev = br#"{"result":{"header":{"revision":"6"},"events":[
            {"kv":{"key":"cC9h","create_revision":"5","mod_revision":"5","version":"1","value":"MQ=="}},
            {"type":"DELETE","kv":{"key":"cC9h","mod_revision":"6"}}]}}"#;
        let r: Reply = stream_result("e", "watch", ev).unwrap();
        let evs: Vec<Event> = r
            .events
            .into_iter()
            .map(|e| e.into_event("e").unwrap())
            .collect();
        assert_eq!(evs[0].kind, EventKind::Put);
        assert_eq!(evs[0].kv.value, b"1");
        assert_eq!(evs[1].kind, EventKind::Delete);
        assert_eq!(
            (
                evs[1].kv.key.as_str(),
                evs[1].kv.mod_revision,
                evs[1].kv.value.len()
            ),
            ("p/a", 6, 0)
        );

        let created: Reply =
            stream_result("e", "w", br#"{"result":{"header":{},"created":true}}"#).unwrap();
        assert!(
            created.created && created.events.is_empty() && created.check_canceled("e").is_ok()
        );
        let compacted = br#"{"result":{"header":{},"canceled":true,"compact_revision":"5"}}"#;
        let c: Reply = stream_result("e", "w", compacted).unwrap();
        assert!(c
            .check_canceled("e")
            .unwrap_err()
            .to_string()
            .contains("before 5 are compacted"));

        let e = stream_result("e", "w", br#"{"error":{"grpc_code":1,"message":"boom"}}"#);
        assert_eq!(e.unwrap_err().to_string(), "etcd e: w: boom");
        assert!(stream_result("e", "w", b"{}").is_err());
        assert!(stream_result("e", "w", b"{\"result\":").is_err());
        let odd: Reply =
            stream_result("e", "w", br#"{"result":{"events":[{"type":"X","kv":{}}]}}"#).unwrap();
        assert!(odd
            .events
            .into_iter()
            .next()
            .unwrap()
            .into_event("e")
            .is_err());
    }

    #[test]
    fn rejections() {
        assert!(check_status("e", 200, b"").is_ok());
        let body = br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        let e = check_status("e", 404, body).unwrap_err();
        assert_eq!(
            e.to_string(),
            "etcd e: HTTP 404: etcdserver: requested lease not found"
        );
        assert_eq!(
            check_status("e", 502, b"bad gateway\n")
                .unwrap_err()
                .to_string(),
            "etcd e: HTTP 502: bad gateway"
        );
    }
}
