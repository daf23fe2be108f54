//! The admin socket: JSON lines over a Unix socket (mode 0600), like Ceph's
//! `ceph daemon ... perf dump`.
//!
//! A request is one line holding a JSON object with a `cmd` field:
//! `{"cmd":"status"}`, `{"cmd":"perf dump"}`, `{"cmd":"config show"}`,
//! `{"cmd":"log level","level":"debug"}`. Each gets one line back:
//! `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`. A connection may carry
//! any number of requests. A malformed request (not UTF-8, not JSON, not an object,
//! unknown command) gets an error reply and the connection stays usable; a line longer
//! than [`MAX_REQUEST_BYTES`] gets an error reply and the connection is closed.
//!
//! The daemon implements [`AdminTarget`]; [`AdminServer`] serves it; [`request`] and
//! [`request_blocking`] are the client side used by the CLI.

use std::fs::DirBuilder;
use std::io::{self, BufRead as _, Read as _, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::shutdown::{self, ShutdownReceiver};
use crate::Error;

/// Longest request line accepted, in bytes (without the newline).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest reply line the clients accept (a perf dump of many cores is large).
pub const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// How long the clients wait for a reply by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A reply the client does not read within this long closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After shutdown is signalled, connections get this long to finish their request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Probing an existing socket file: a daemon that does not accept within this long
/// is taken as alive (its backlog is full).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// `sun_path` holds 108 bytes including the terminating NUL.
const SOCKET_PATH_MAX_BYTES: usize = 107;

const COMMANDS: &str =
    "status, perf dump, config show, log level, mount, umount, flush, blob status, warmup, warmup status";

/// What the admin socket serves. Implemented by the daemon. The methods run on a
/// blocking-task thread, so they may take locks or do short I/O.
pub trait AdminTarget: Send + Sync + 'static {
    /// `{"cmd":"status"}`: node, uptime, devices, cores, ...
    fn status(&self) -> Value;
    /// `{"cmd":"perf dump"}`: the merged perf counters (a `spool_perf::Snapshot`).
    fn perf_dump(&self) -> Value;
    /// `{"cmd":"config show"}`: the configuration in force.
    fn config_show(&self) -> Value;
    /// `{"cmd":"log level","level":L}`: changes the log filter; the error is shown to
    /// the operator.
    fn set_log_level(&self, level: &str) -> Result<(), String>;
    /// `{"cmd":"mount","path":P}`: mounts the namespace at `P`.
    fn mount(&self, path: &str) -> Result<Value, String>;
    /// `{"cmd":"umount"}`: unmounts it (dirty data flushed first).
    fn umount(&self) -> Result<Value, String>;
    /// `{"cmd":"flush","path":P}`: files under `P` (a path in the mount; all when
    /// absent) upload to the blob store now; returns what is left to upload.
    fn flush(&self, path: Option<&str>) -> Result<Value, String>;
    /// `{"cmd":"blob status","path":P}`: what is left to upload under `P`.
    fn blob_status(&self, path: Option<&str>) -> Result<Value, String>;
    /// `{"cmd":"warmup","path":P}`: starts loading the blobs under `P` (all when
    /// absent) into the cache; returns its progress.
    fn warmup(&self, path: Option<&str>) -> Result<Value, String>;
    /// `{"cmd":"warmup status"}`: the progress of the last warmup.
    fn warmup_status(&self) -> Result<Value, String>;
}

/// A parsed admin request (public for the fuzz target and its corpus test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    PerfDump,
    ConfigShow,
    LogLevel(String),
    Mount(String),
    Umount,
    Flush(Option<String>),
    BlobStatus(Option<String>),
    Warmup(Option<String>),
    WarmupStatus,
}

/// The fuzz target's body (dataplane/fuzz `admin_request`, and the corpus replay in
/// controlplane/tests/admin_request_corpus.rs): any bytes parse to a request, nothing,
/// or an error with a message, and never panic.
pub fn fuzz_parse_request(data: &[u8]) {
    match parse_request(data) {
        Ok(Some(req)) => {
            // What parses re-encodes canonically and parses back to the same request.
            let canonical = match &req {
                Request::Status => serde_json::json!({"cmd": "status"}),
                Request::PerfDump => serde_json::json!({"cmd": "perf dump"}),
                Request::ConfigShow => serde_json::json!({"cmd": "config show"}),
                Request::LogLevel(level) => serde_json::json!({"cmd": "log level", "level": level}),
                Request::Mount(path) => serde_json::json!({"cmd": "mount", "path": path}),
                Request::Umount => serde_json::json!({"cmd": "umount"}),
                Request::Flush(p) => serde_json::json!({"cmd": "flush", "path": p}),
                Request::BlobStatus(p) => serde_json::json!({"cmd": "blob status", "path": p}),
                Request::Warmup(p) => serde_json::json!({"cmd": "warmup", "path": p}),
                Request::WarmupStatus => serde_json::json!({"cmd": "warmup status"}),
            };
            let again = parse_request(canonical.to_string().as_bytes());
            assert_eq!(again, Ok(Some(req)), "canonical form of a parsed request");
        }
        Ok(None) => assert!(
            std::str::from_utf8(data.strip_suffix(b"\r").unwrap_or(data))
                .is_ok_and(|t| t.trim().is_empty()),
            "only a blank line parses to nothing"
        ),
        Err(msg) => assert!(!msg.is_empty(), "an error reply says what is wrong"),
    }
}

/// Parses one request line (without its newline). `Ok(None)` for a blank line.
pub fn parse_request(line: &[u8]) -> Result<Option<Request>, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "request is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("malformed JSON request: {e}"))?;
    let Some(obj) = value.as_object() else {
        return Err(r#"a request must be a JSON object such as {"cmd":"status"}"#.to_owned());
    };
    let cmd = match obj.get("cmd") {
        Some(Value::String(cmd)) => cmd.as_str(),
        Some(_) => return Err("\"cmd\" must be a string".to_owned()),
        None => {
            return Err(format!(
                r#"missing "cmd" field, e.g. {{"cmd":"status"}}; commands: {COMMANDS}"#
            ))
        }
    };
    let request = match cmd {
        "status" => Request::Status,
        "perf dump" => Request::PerfDump,
        "config show" => Request::ConfigShow,
        "log level" => match obj.get("level") {
            Some(Value::String(level)) => Request::LogLevel(level.clone()),
            _ => {
                return Err(
                    r#"log level: missing string field "level", e.g. {"cmd":"log level","level":"debug"}"#
                        .to_owned(),
                )
            }
        },
        "mount" => match obj.get("path") {
            Some(Value::String(path)) if !path.is_empty() => Request::Mount(path.clone()),
            _ => {
                return Err(
                    r#"mount: missing string field "path", e.g. {"cmd":"mount","path":"/mnt/spool"}"#
                        .to_owned(),
                )
            }
        },
        "umount" => Request::Umount,
        "flush" => Request::Flush(optional_path(obj, "flush")?),
        "blob status" => Request::BlobStatus(optional_path(obj, "blob status")?),
        "warmup" => Request::Warmup(optional_path(obj, "warmup")?),
        "warmup status" => Request::WarmupStatus,
        other => return Err(format!("unknown command {other:?}; commands: {COMMANDS}")),
    };
    Ok(Some(request))
}

/// An optional string field "path" (null or absent: none).
fn optional_path(
    obj: &serde_json::Map<String, Value>,
    cmd: &str,
) -> Result<Option<String>, String> {
    match obj.get("path") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(p)) => Ok(Some(p.clone())),
        Some(_) => Err(format!(
            r#"{cmd}: "path" must be a string, e.g. {{"cmd":"{cmd}","path":"/mnt/spool/ckpt"}}"#
        )),
    }
}

fn ok_reply(result: Value) -> Vec<u8> {
    reply_line(&json!({ "ok": true, "result": result }))
}

fn error_reply(error: &str) -> Vec<u8> {
    reply_line(&json!({ "ok": false, "error": error }))
}

fn reply_line(v: &Value) -> Vec<u8> {
    // Serializing a `Value` cannot fail (its map keys are strings).
    let mut line = serde_json::to_vec(v).unwrap_or_else(|_| {
        br#"{"ok":false,"error":"internal error: reply not serializable"}"#.to_vec()
    });
    line.push(b'\n');
    line
}

/// Runs one request against the target on a blocking-task thread; a panic in the
/// target becomes an error reply.
async fn execute(target: &Arc<dyn AdminTarget>, request: Request) -> Vec<u8> {
    let target = Arc::clone(target);
    let name = match &request {
        Request::Status => "status",
        Request::PerfDump => "perf dump",
        Request::ConfigShow => "config show",
        Request::LogLevel(_) => "log level",
        Request::Mount(_) => "mount",
        Request::Umount => "umount",
        Request::Flush(_) => "flush",
        Request::BlobStatus(_) => "blob status",
        Request::Warmup(_) => "warmup",
        Request::WarmupStatus => "warmup status",
    };
    tracing::debug!(cmd = name, "admin request");
    let outcome = tokio::task::spawn_blocking(move || match request {
        Request::Status => Ok(target.status()),
        Request::PerfDump => Ok(target.perf_dump()),
        Request::ConfigShow => Ok(target.config_show()),
        Request::LogLevel(level) => target
            .set_log_level(&level)
            .map(|()| json!({ "level": level })),
        Request::Mount(path) => target.mount(&path),
        Request::Umount => target.umount(),
        Request::Flush(p) => target.flush(p.as_deref()),
        Request::BlobStatus(p) => target.blob_status(p.as_deref()),
        Request::Warmup(p) => target.warmup(p.as_deref()),
        Request::WarmupStatus => target.warmup_status(),
    })
    .await;
    match outcome {
        Ok(Ok(result)) => ok_reply(result),
        Ok(Err(message)) => error_reply(&message),
        Err(join_error) => {
            tracing::error!(cmd = name, error = %join_error, "admin command failed");
            error_reply(&format!("internal error while running {name:?}"))
        }
    }
}

/// What [`read_line_capped`] found.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A line (or the last bytes before end of stream) is in the buffer.
    Line,
    /// The line is longer than the cap; the stream is left mid-line.
    TooLong,
    /// End of stream, nothing buffered.
    Eof,
}

/// Reads one `\n`-terminated line into `buf` (without the newline), at most `cap`
/// bytes, never buffering more than that.
async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<LineRead> {
    buf.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                if buf.len() + pos > cap {
                    return Ok(LineRead::TooLong);
                }
                buf.extend_from_slice(&available[..pos]);
                reader.consume(pos + 1);
                return Ok(LineRead::Line);
            }
            None => {
                let n = available.len();
                if buf.len() + n > cap {
                    return Ok(LineRead::TooLong);
                }
                buf.extend_from_slice(available);
                reader.consume(n);
            }
        }
    }
}

/// The admin socket server. [`AdminServer::bind`] creates the socket, then
/// [`AdminServer::run`] answers until shutdown.
pub struct AdminServer {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, to remove only our own.
    identity: (u64, u64),
    target: Arc<dyn AdminTarget>,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Makes names of temporary bind directories unique within the process.
static BIND_SEQ: AtomicU64 = AtomicU64::new(0);

impl AdminServer {
    /// Creates the admin socket at `path`, mode 0600. Must run inside a tokio runtime.
    ///
    /// - Missing parent directories are created (mode 0700).
    /// - An existing socket file nobody listens on (left by a crashed daemon) is
    ///   replaced.
    /// - If a daemon answers on it: [`Error::AlreadyRunning`].
    /// - Anything else at that path (a regular file, a directory) is left alone and is
    ///   an error.
    ///
    /// The socket is bound in a private 0700 directory, set to 0600, and then linked
    /// to `path`, so it is never reachable with wider permissions, and two daemons
    /// starting together cannot replace each other's socket.
    pub async fn bind(path: &Path, target: Arc<dyn AdminTarget>) -> Result<AdminServer, Error> {
        let sock_err = |what: &'static str| {
            let path = path.to_owned();
            move |source: io::Error| Error::AdminSocket { path, what, source }
        };
        if path.as_os_str().len() > SOCKET_PATH_MAX_BYTES {
            return Err(sock_err("path too long")(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a Unix socket path must be at most {SOCKET_PATH_MAX_BYTES} bytes"),
            )));
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(sock_err("create the parent directory"))?;

        for attempt in 0..2 {
            clear_stale_socket(path).await?;
            match bind_private(path, &parent) {
                Ok(listener) => {
                    let meta = std::fs::symlink_metadata(path)
                        .map_err(sock_err("inspect the new socket"))?;
                    let listener = UnixListener::from_std(listener)
                        .map_err(sock_err("register the socket with the runtime"))?;
                    tracing::info!(socket = %path.display(), "admin socket listening");
                    return Ok(AdminServer {
                        listener,
                        path: path.to_owned(),
                        identity: (meta.dev(), meta.ino()),
                        target,
                    });
                }
                // Another process created the socket between our check and our link:
                // check again (it is either alive -> AlreadyRunning, or stale).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt == 0 => continue,
                Err(e) => return Err(sock_err("bind")(e)),
            }
        }
        Err(sock_err("bind")(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path keeps being re-created by another process",
        )))
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until `shutdown` is signalled (see [`crate::shutdown`]);
    /// then stops accepting, lets connections finish the request in progress (up to
    /// 5 s), and removes the socket file if it is still the one it created.
    pub async fn run(self, mut shutdown: ShutdownReceiver) -> Result<(), Error> {
        let AdminServer {
            listener,
            path,
            identity,
            target,
        } = self;
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown::requested(&mut shutdown) => break,
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "admin connection task failed");
                    }
                }
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // EMFILE and the like: log, back off, keep serving.
                            tracing::warn!(error = %e, "admin socket: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        connections.spawn(refuse_busy(stream));
                        continue;
                    };
                    let target = Arc::clone(&target);
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        handle_connection(stream, target, shutdown).await;
                        drop(permit);
                    });
                }
            }
        }

        drop(listener);
        remove_own_socket(&path, identity);
        if tokio::time::timeout(DRAIN_TIMEOUT, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!("admin socket: connections still busy after shutdown; closing them");
            connections.shutdown().await;
        }
        tracing::info!(socket = %path.display(), "admin socket closed");
        Ok(())
    }
}

/// Removes the socket file at `path` if it is still the one we created.
fn remove_own_socket(path: &Path, identity: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == identity => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "cannot remove the admin socket");
            }
        }
        // Replaced by someone else, or gone: not ours to remove.
        _ => {}
    }
}

/// Checks what is at `path`: nothing (fine), a live daemon ([`Error::AlreadyRunning`]),
/// a stale socket (removed), or something that is not a socket (an error).
async fn clear_stale_socket(path: &Path) -> Result<(), Error> {
    let err = |what: &'static str| {
        let path = path.to_owned();
        move |source: io::Error| Error::AdminSocket { path, what, source }
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err("inspect the existing path")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(err("refusing to replace it")(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        )));
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(_)) | Err(_) => Err(Error::AlreadyRunning {
            path: path.to_owned(),
        }),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::warn!(socket = %path.display(), "removing a stale admin socket (nothing listens on it)");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(err("remove the stale socket")(e)),
            }
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(err("probe the existing socket")(e)),
    }
}

/// Binds a listener whose file appears at `path` with mode 0600 and never with wider
/// permissions. Fails with `AlreadyExists` if `path` exists.
fn bind_private(path: &Path, parent: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let seq = BIND_SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = parent.join(format!(".spool-{}-{seq}", std::process::id()));
    let tmp = dir.join("s");
    if tmp.as_os_str().len() > SOCKET_PATH_MAX_BYTES {
        // The private name would be too long for sun_path: bind in place and narrow
        // the mode right after (the parent directory is 0700 when we created it).
        return bind_in_place(path);
    }
    DirBuilder::new().mode(0o700).create(&dir)?;
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&tmp, path)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    result
}

fn bind_in_place(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Answers a connection over the limit with an error and closes it.
async fn refuse_busy(mut stream: UnixStream) {
    let reply = error_reply(&format!(
        "too many admin connections (at most {MAX_CONNECTIONS}); try again"
    ));
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&reply)).await;
}

/// Serves one connection: request lines in, reply lines out.
async fn handle_connection(
    stream: UnixStream,
    target: Arc<dyn AdminTarget>,
    mut shutdown: ShutdownReceiver,
) {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::with_capacity(16 * 1024, read_half);
    let mut line = Vec::new();
    loop {
        let read = tokio::select! {
            () = shutdown::requested(&mut shutdown) => return,
            read = tokio::time::timeout(
                IDLE_TIMEOUT,
                read_line_capped(&mut reader, &mut line, MAX_REQUEST_BYTES),
            ) => read,
        };
        let reply = match read {
            Err(_idle) => {
                tracing::debug!("admin connection idle; closing");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "admin connection read failed");
                return;
            }
            Ok(Ok(LineRead::Eof)) => return,
            Ok(Ok(LineRead::TooLong)) => {
                tracing::debug!("admin request too long; closing the connection");
                let reply = error_reply(&format!(
                    "request line longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
                ));
                let _ = tokio::time::timeout(WRITE_TIMEOUT, write_half.write_all(&reply)).await;
                return;
            }
            Ok(Ok(LineRead::Line)) => match parse_request(&line) {
                Ok(None) => continue,
                Ok(Some(request)) => execute(&target, request).await,
                Err(message) => {
                    tracing::debug!(error = %message, "bad admin request");
                    error_reply(&message)
                }
            },
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write_half.write_all(&reply)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "admin reply not delivered");
                return;
            }
            Err(_) => {
                tracing::debug!("admin client does not read its reply; closing");
                return;
            }
        }
    }
}

/// Turns a reply line into the request's result, or the daemon's error.
fn parse_reply(socket: &Path, line: &[u8]) -> Result<Value, Error> {
    let protocol = |reason: String| Error::AdminProtocol {
        path: socket.to_owned(),
        reason,
    };
    if line.is_empty() {
        return Err(protocol(
            "the daemon closed the connection without answering".to_owned(),
        ));
    }
    let reply: Value =
        serde_json::from_slice(line).map_err(|e| protocol(format!("not JSON: {e}")))?;
    match reply.get("ok") {
        Some(Value::Bool(true)) => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        Some(Value::Bool(false)) => Err(Error::Remote(match reply.get("error") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => "unspecified error".to_owned(),
        })),
        _ => Err(protocol(r#"no boolean "ok" field"#.to_owned())),
    }
}

/// The error for a failed connect, worded for the operator.
fn connect_error(socket: &Path, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::NotRunning {
            path: socket.to_owned(),
            reason: "no such socket (check [admin] socket in the config)".to_owned(),
        },
        io::ErrorKind::ConnectionRefused => Error::NotRunning {
            path: socket.to_owned(),
            reason: "connection refused (a stale socket: no daemon listens on it)".to_owned(),
        },
        io::ErrorKind::PermissionDenied => Error::AdminSocket {
            path: socket.to_owned(),
            what: "connect (the socket is mode 0600: run as the daemon's user, usually root)",
            source: e,
        },
        _ => Error::NotRunning {
            path: socket.to_owned(),
            reason: e.to_string(),
        },
    }
}

fn no_answer(socket: &Path, timeout: Duration) -> Error {
    Error::NotRunning {
        path: socket.to_owned(),
        reason: format!("no answer within {:.1}s", timeout.as_secs_f64()),
    }
}

fn request_line(req: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(req).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Sends one request and returns its `result` (or [`Error::Remote`] with the daemon's
/// error), waiting at most [`DEFAULT_REQUEST_TIMEOUT`].
pub async fn request(socket: &Path, req: &Value) -> Result<Value, Error> {
    request_with_timeout(socket, req, DEFAULT_REQUEST_TIMEOUT).await
}

/// [`request`] with its own time limit for connecting, sending and the reply.
pub async fn request_with_timeout(
    socket: &Path,
    req: &Value,
    timeout: Duration,
) -> Result<Value, Error> {
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| connect_error(socket, e))?;
        let (read_half, mut write_half) = stream.into_split();
        let lost = |e: io::Error| Error::NotRunning {
            path: socket.to_owned(),
            reason: format!("connection lost: {e}"),
        };
        write_half
            .write_all(&request_line(req))
            .await
            .map_err(lost)?;
        let mut reader = BufReader::new(read_half);
        let mut line = Vec::new();
        match read_line_capped(&mut reader, &mut line, MAX_REPLY_BYTES)
            .await
            .map_err(lost)?
        {
            LineRead::TooLong => Err(Error::AdminProtocol {
                path: socket.to_owned(),
                reason: format!("reply longer than {MAX_REPLY_BYTES} bytes"),
            }),
            LineRead::Line | LineRead::Eof => parse_reply(socket, &line),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| no_answer(socket, timeout))?
}

/// [`request`] for synchronous callers (the CLI), with std's blocking `UnixStream`.
pub fn request_blocking(socket: &Path, req: &Value) -> Result<Value, Error> {
    request_blocking_with_timeout(socket, req, DEFAULT_REQUEST_TIMEOUT)
}

/// [`request_blocking`] with its own time limit for sending and for the reply.
pub fn request_blocking_with_timeout(
    socket: &Path,
    req: &Value,
    timeout: Duration,
) -> Result<Value, Error> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| connect_error(socket, e))?;
    let lost = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => no_answer(socket, timeout),
        _ => Error::NotRunning {
            path: socket.to_owned(),
            reason: format!("connection lost: {e}"),
        },
    };
    // A zero timeout would mean "block forever" to std: use the smallest one instead.
    let timeout_io = timeout.max(Duration::from_millis(1));
    stream.set_read_timeout(Some(timeout_io)).map_err(lost)?;
    stream.set_write_timeout(Some(timeout_io)).map_err(lost)?;
    stream.write_all(&request_line(req)).map_err(lost)?;
    let mut reader = io::BufReader::new(stream).take(MAX_REPLY_BYTES as u64 + 1);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).map_err(lost)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REPLY_BYTES {
        return Err(Error::AdminProtocol {
            path: socket.to_owned(),
            reason: format!("reply longer than {MAX_REPLY_BYTES} bytes"),
        });
    }
    parse_reply(socket, &line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_request(br#"{"cmd":"status"}"#),
            Ok(Some(Request::Status))
        );
        assert_eq!(
            parse_request(b"{\"cmd\":\"perf dump\"}\r"),
            Ok(Some(Request::PerfDump))
        );
        assert_eq!(
            parse_request(br#" {"cmd":"config show","extra":1} "#),
            Ok(Some(Request::ConfigShow))
        );
        assert_eq!(
            parse_request(br#"{"cmd":"log level","level":"debug"}"#),
            Ok(Some(Request::LogLevel("debug".into())))
        );
        assert_eq!(parse_request(b""), Ok(None));
        assert_eq!(parse_request(b"  \r"), Ok(None));
    }

    #[test]
    fn bad_requests_are_explained() {
        for (line, expected) in [
            (&b"{\"cmd\":"[..], "malformed JSON"),
            (b"[1,2]", "must be a JSON object"),
            (b"\"status\"", "must be a JSON object"),
            (b"{}", "missing \"cmd\""),
            (b"{\"cmd\":5}", "\"cmd\" must be a string"),
            (
                b"{\"cmd\":\"reboot\"}",
                "unknown command \"reboot\"; commands: status",
            ),
            (b"{\"cmd\":\"log level\"}", "missing string field \"level\""),
            (
                b"{\"cmd\":\"log level\",\"level\":3}",
                "missing string field \"level\"",
            ),
            (b"\xff\xfe{}", "not valid UTF-8"),
        ] {
            let err = parse_request(line).unwrap_err();
            assert!(
                err.contains(expected),
                "{:?}: {err}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn replies_parse() {
        let p = Path::new("/x");
        assert_eq!(
            parse_reply(p, br#"{"ok":true,"result":{"a":1}}"#).unwrap(),
            json!({"a":1})
        );
        assert_eq!(parse_reply(p, br#"{"ok":true}"#).unwrap(), Value::Null);
        match parse_reply(p, br#"{"ok":false,"error":"nope"}"#) {
            Err(Error::Remote(m)) => assert_eq!(m, "nope"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_reply(p, b"garbage"),
            Err(Error::AdminProtocol { .. })
        ));
        assert!(matches!(
            parse_reply(p, b"{}"),
            Err(Error::AdminProtocol { .. })
        ));
        assert!(matches!(
            parse_reply(p, b""),
            Err(Error::AdminProtocol { .. })
        ));
    }

    #[tokio::test]
    async fn line_reader_caps_and_splits() {
        let data: &[u8] = b"one\ntwo\r\nthree";
        let mut r = BufReader::with_capacity(4, data);
        let mut line = Vec::new();
        assert_eq!(
            read_line_capped(&mut r, &mut line, 16).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(line, b"one");
        assert_eq!(
            read_line_capped(&mut r, &mut line, 16).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(line, b"two\r");
        assert_eq!(
            read_line_capped(&mut r, &mut line, 16).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(line, b"three");
        assert_eq!(
            read_line_capped(&mut r, &mut line, 16).await.unwrap(),
            LineRead::Eof
        );

        let long = [b'a'; 17];
        let mut r = BufReader::with_capacity(4, &long[..]);
        assert_eq!(
            read_line_capped(&mut r, &mut line, 16).await.unwrap(),
            LineRead::TooLong
        );
        let exact = b"aaaaaaaaaaaaaaaa\n";
        let mut r = BufReader::with_capacity(4, &exact[..]);
        assert_eq!(
            read_line_capped(&mut r, &mut line, 16).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(line.len(), 16);
    }
}
