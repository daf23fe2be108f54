//! `GET /metrics` over plain HTTP/1.1 for Prometheus.
//!
//! A deliberately small server: one request per connection (`Connection: close`), the
//! request head read within [`HEAD_TIMEOUT`] and at most [`MAX_HEAD_BYTES`], no request
//! body. `GET` and `HEAD` on `/metrics` (any query string) answer 200 with the text
//! from a [`MetricsSource`]; other paths 404, other methods 405, a malformed request
//! 400, an over-long head 431.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::shutdown::{self, ShutdownReceiver};
use crate::Error;

/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 32;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Produces the metrics text (Prometheus text format), e.g.
/// `move || perf.snapshot().to_prometheus("spool")`. Runs on a blocking-task thread.
pub trait MetricsSource: Send + Sync + 'static {
    /// The whole `/metrics` body.
    fn render(&self) -> String;
}

impl<F> MetricsSource for F
where
    F: Fn() -> String + Send + Sync + 'static,
{
    fn render(&self) -> String {
        self()
    }
}

/// The `/metrics` HTTP server. [`MetricsServer::bind`], then [`MetricsServer::run`].
pub struct MetricsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    source: Arc<dyn MetricsSource>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Listens on `addr` (`[metrics] listen`; port 0 picks a free port).
    pub async fn bind(addr: SocketAddr, source: Arc<dyn MetricsSource>) -> Result<Self, Error> {
        let bind_err = |source: io::Error| Error::MetricsBind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        tracing::info!(addr = %local_addr, "metrics listening on http://{local_addr}/metrics");
        Ok(MetricsServer {
            listener,
            local_addr,
            source,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is signalled, then lets requests in progress finish
    /// (up to 5 s).
    pub async fn run(self, mut shutdown: ShutdownReceiver) -> Result<(), Error> {
        let MetricsServer {
            listener, source, ..
        } = self;
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown::requested(&mut shutdown) => break,
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "metrics connection task failed");
                    }
                }
                permit = Arc::clone(&slots).acquire_owned() => {
                    // The semaphore is never closed.
                    let Ok(permit) = permit else { break };
                    let stream = tokio::select! {
                        () = shutdown::requested(&mut shutdown) => break,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(e) => {
                                tracing::warn!(error = %e, "metrics: accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        },
                    };
                    let source = Arc::clone(&source);
                    connections.spawn(async move {
                        if let Err(e) = handle_connection(stream, source).await {
                            tracing::debug!(error = %e, "metrics connection failed");
                        }
                        drop(permit);
                    });
                }
            }
        }
        drop(listener);
        if tokio::time::timeout(DRAIN_TIMEOUT, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            connections.shutdown().await;
        }
        Ok(())
    }
}

/// A parsed request head: what routing needs.
#[derive(Debug, PartialEq, Eq)]
struct RequestHead {
    method: String,
    path: String,
}

/// Why a head was not accepted, as an HTTP status.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// 400
    Malformed(&'static str),
    /// 505
    Version,
}

/// Parses the request line of a complete head (`\r\n` or bare `\n` line ends).
fn parse_head(head: &[u8]) -> Result<RequestHead, HeadError> {
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(HeadError::Malformed("no request line"))?;
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line =
        std::str::from_utf8(line).map_err(|_| HeadError::Malformed("request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed(
            "request line is not METHOD TARGET VERSION",
        ));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HeadError::Malformed("bad method"));
    }
    if !target.starts_with('/') {
        return Err(HeadError::Malformed("request target must be a path"));
    }
    if !version.starts_with("HTTP/") {
        return Err(HeadError::Malformed("bad HTTP version"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HeadError::Version);
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Ok(RequestHead {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

/// What [`read_head`] got.
enum HeadRead {
    /// A whole head, up to and including its empty line.
    Complete(Vec<u8>),
    /// The client closed before sending a whole head.
    Closed,
    /// More than [`MAX_HEAD_BYTES`] without the end of the head.
    TooLarge,
}

/// Reads until the end of the head (an empty line).
async fn read_head(stream: &mut TcpStream) -> io::Result<HeadRead> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(HeadRead::Closed);
        }
        let scan_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        let tail = &head[scan_from..];
        let complete =
            tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n");
        if complete {
            return Ok(HeadRead::Complete(head));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Ok(HeadRead::TooLarge);
        }
    }
}

/// A complete response with `Connection: close`.
fn response(
    status: &str,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

fn plain(status: &str, extra_headers: &str, message: &str) -> Vec<u8> {
    response(
        status,
        "text/plain; charset=utf-8",
        extra_headers,
        format!("{message}\n").as_bytes(),
        false,
    )
}

async fn handle_connection(
    mut stream: TcpStream,
    source: Arc<dyn MetricsSource>,
) -> io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => {
            let reply = plain(
                "408 Request Timeout",
                "",
                "request head not received in time",
            );
            return write_reply(&mut stream, &reply).await;
        }
        Ok(read) => read?,
    };
    let reply = match head {
        HeadRead::Closed => return Ok(()),
        HeadRead::TooLarge => plain(
            "431 Request Header Fields Too Large",
            "",
            &format!("request head larger than {MAX_HEAD_BYTES} bytes"),
        ),
        HeadRead::Complete(head) => match parse_head(&head) {
            Err(HeadError::Malformed(why)) => plain("400 Bad Request", "", why),
            Err(HeadError::Version) => plain(
                "505 HTTP Version Not Supported",
                "",
                "HTTP/1.0 or HTTP/1.1 only",
            ),
            Ok(req) if req.path != "/metrics" => {
                plain("404 Not Found", "", "not found; metrics are at /metrics")
            }
            Ok(req) if req.method != "GET" && req.method != "HEAD" => plain(
                "405 Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                "method not allowed; use GET",
            ),
            Ok(req) => {
                let source = Arc::clone(&source);
                match tokio::task::spawn_blocking(move || source.render()).await {
                    Ok(body) => response(
                        "200 OK",
                        CONTENT_TYPE,
                        "",
                        body.as_bytes(),
                        req.method == "HEAD",
                    ),
                    Err(e) => {
                        tracing::error!(error = %e, "rendering metrics failed");
                        plain("500 Internal Server Error", "", "rendering metrics failed")
                    }
                }
            }
        },
    };
    write_reply(&mut stream, &reply).await
}

async fn write_reply(stream: &mut TcpStream, reply: &[u8]) -> io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(reply).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client does not read the response",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse() {
        let ok = |head: &[u8]| parse_head(head).unwrap();
        assert_eq!(
            ok(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            RequestHead {
                method: "GET".into(),
                path: "/metrics".into()
            }
        );
        assert_eq!(ok(b"HEAD /metrics?x=1 HTTP/1.0\n\n").path, "/metrics");
        assert_eq!(
            parse_head(b"GET /metrics HTTP/2\r\n\r\n"),
            Err(HeadError::Version)
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics FTP/1.1\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
            b"",
        ] {
            assert!(
                matches!(parse_head(bad), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    async fn server(
        body: &'static str,
    ) -> (
        SocketAddr,
        crate::shutdown::ShutdownSender,
        tokio::task::JoinHandle<Result<(), Error>>,
    ) {
        let source: Arc<dyn MetricsSource> = Arc::new(move || body.to_owned());
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), source)
            .await
            .unwrap();
        let addr = server.local_addr();
        let (tx, rx) = crate::shutdown::channel();
        let task = tokio::spawn(server.run(rx));
        (addr, tx, task)
    }

    /// Sends `raw` and returns the whole response (the server closes the connection).
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    fn status_line(response: &str) -> &str {
        response.lines().next().unwrap_or("")
    }

    #[tokio::test]
    async fn serves_metrics_and_rejects_the_rest() {
        let body = "# HELP spool_up Up.\n# TYPE spool_up gauge\nspool_up 1\n";
        let (addr, tx, task) = server(body).await;

        let r = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        )
        .await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
        assert!(
            r.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{r}"
        );
        assert!(
            r.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{r}"
        );
        assert!(r.contains("\r\nConnection: close\r\n"), "{r}");
        assert!(r.ends_with(&format!("\r\n\r\n{body}")), "{r}");

        let r = exchange(addr, b"GET /metrics?name[]=x HTTP/1.0\n\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");

        let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");
        assert!(r.ends_with("\r\n\r\n"), "{r}");

        let r = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 404 Not Found");
        let r = exchange(addr, b"GET /metricsx HTTP/1.1\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 404 Not Found");

        let r = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 405 Method Not Allowed");
        assert!(r.contains("\r\nAllow: GET, HEAD\r\n"), "{r}");

        let r = exchange(addr, b"NONSENSE\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 400 Bad Request");
        let r = exchange(addr, b"GET /metrics HTTP/3\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 505 HTTP Version Not Supported");

        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        let r = exchange(addr, &big).await;
        assert_eq!(
            status_line(&r),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );

        // A client that closes without a request does not disturb the server.
        drop(TcpStream::connect(addr).await.unwrap());
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK");

        tx.send_replace(true);
        task.await.unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn serves_a_perf_snapshot() {
        static SCHEMA: spool_perf::Schema = spool_perf::Schema {
            counters: &[spool_perf::MetricDef::new("write_ops", "Writes.")],
            gauges: &[],
            histograms: &[spool_perf::MetricDef::new(
                "write_latency_ns",
                "Write latency.",
            )],
        };
        let perf = spool_perf::Perf::new(&SCHEMA, 2);
        perf.core(1).add(0, 42);
        perf.core(0).record(0, 1500);
        let source: Arc<dyn MetricsSource> = {
            let perf = Arc::clone(&perf);
            Arc::new(move || perf.snapshot().to_prometheus("spool"))
        };
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), source)
            .await
            .unwrap();
        let addr = server.local_addr();
        let (tx, rx) = crate::shutdown::channel();
        let task = tokio::spawn(server.run(rx));
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.contains("\nspool_write_ops_total 42\n"), "{r}");
        assert!(
            r.contains("\nspool_core_write_ops_total{core=\"1\"} 42\n"),
            "{r}"
        );
        assert!(r.contains("\nspool_write_latency_ns_count 1\n"), "{r}");
        tx.send_replace(true);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let source: Arc<dyn MetricsSource> = Arc::new(String::new);
        let err = MetricsServer::bind(addr, source)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
    }
}
