//! The admin socket end to end: a server over a fake `AdminTarget`, real Unix sockets.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use spool_controlplane::admin::{self, AdminServer, AdminTarget, MAX_REQUEST_BYTES};
use spool_controlplane::config::Config;
use spool_controlplane::shutdown::{self, ShutdownSender};
use spool_controlplane::Error;
use spool_perf::{MetricDef, Perf, Schema};

static SCHEMA: Schema = Schema {
    counters: &[MetricDef::new("write_ops", "Writes.")],
    gauges: &[MetricDef::new("in_flight", "In flight.")],
    histograms: &[MetricDef::new("write_latency_ns", "Write latency.")],
};

struct FakeDaemon {
    perf: Arc<Perf>,
    config: Config,
    levels: Mutex<Vec<String>>,
}

impl AdminTarget for FakeDaemon {
    fn status(&self) -> Value {
        json!({ "node": self.config.node.name, "state": "serving", "cores": self.perf.cores() })
    }
    fn perf_dump(&self) -> Value {
        serde_json::to_value(self.perf.snapshot()).unwrap_or(Value::Null)
    }
    fn config_show(&self) -> Value {
        serde_json::to_value(&self.config).unwrap_or(Value::Null)
    }
    fn set_log_level(&self, level: &str) -> Result<(), String> {
        if level == "panic" {
            panic!("the fake target panics on request");
        }
        spool_controlplane::logging::parse_level(level)?;
        self.levels.lock().unwrap().push(level.to_owned());
        Ok(())
    }
    fn mount(&self, path: &str) -> Result<Value, String> {
        Err(format!("the fake daemon cannot mount {path}"))
    }
    fn umount(&self) -> Result<Value, String> {
        Err("nothing is mounted".to_owned())
    }
    fn flush(&self, _path: Option<&str>) -> Result<Value, String> {
        Err("no [blob] store is configured".to_owned())
    }
    fn blob_status(&self, _path: Option<&str>) -> Result<Value, String> {
        Err("no [blob] store is configured".to_owned())
    }
    fn warmup(&self, _path: Option<&str>) -> Result<Value, String> {
        Err("no [blob] store is configured".to_owned())
    }
    fn warmup_status(&self) -> Result<Value, String> {
        Err("no warmup has run".to_owned())
    }
}

fn fake() -> Arc<FakeDaemon> {
    let perf = Perf::new(&SCHEMA, 2);
    perf.core(0).add(0, 3);
    perf.core(1).add(0, 4);
    perf.core(1).record(0, 2000);
    let config = Config::from_toml_str(
        "[node]\nname = \"test-node\"\n[device]\nbackend = \"mem\"\nsize = \"64MiB\"\n",
    )
    .unwrap();
    Arc::new(FakeDaemon {
        perf,
        config,
        levels: Mutex::new(Vec::new()),
    })
}

struct Running {
    path: PathBuf,
    stop: ShutdownSender,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Running {
    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

async fn start(path: &Path, target: Arc<FakeDaemon>) -> Running {
    let server = AdminServer::bind(path, target).await.unwrap();
    assert_eq!(server.path(), path);
    let (stop, rx) = shutdown::channel();
    Running {
        path: path.to_owned(),
        stop,
        task: tokio::spawn(server.run(rx)),
    }
}

/// A raw client on std's blocking socket, for byte-level requests.
struct Raw {
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = StdUnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// One reply line as JSON; None at end of stream.
    fn reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap()),
            // The server may reset a connection it closed with unread input.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read: {e}"),
        }
    }

    fn ask(&mut self, bytes: &[u8]) -> Value {
        self.send(bytes);
        self.reply().expect("a reply")
    }
}

fn assert_error(reply: &Value, contains: &str) {
    assert_eq!(reply["ok"], false, "{reply}");
    let msg = reply["error"].as_str().expect("error string");
    assert!(msg.contains(contains), "{contains:?} not in {msg:?}");
}

/// The blocking client runs on a blocking-task thread, off the runtime workers.
async fn blocking(path: &Path, req: Value) -> Result<Value, Error> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || admin::request_blocking(&path, &req))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_0600_in_a_created_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/spool/admin.sock");
    let server = start(&path, fake()).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        dir_mode & 0o777,
        0o700,
        "created directory mode {dir_mode:o}"
    );
    // No temporary files are left beside it.
    let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("admin.sock")]);
    server.stop().await;
    assert!(!path.exists(), "socket removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let target = fake();
    let server = start(&path, Arc::clone(&target)).await;

    let status = admin::request(&path, &json!({"cmd": "status"}))
        .await
        .unwrap();
    assert_eq!(
        status,
        json!({"node": "test-node", "state": "serving", "cores": 2})
    );

    let perf = admin::request(&path, &json!({"cmd": "perf dump"}))
        .await
        .unwrap();
    let snap: spool_perf::Snapshot = serde_json::from_value(perf).unwrap();
    assert_eq!(snap.counters["write_ops"], 7);
    assert_eq!(snap.per_core["write_ops"], vec![3, 4]);
    assert_eq!(snap.histograms["write_latency_ns"].count, 1);

    let config = blocking(&path, json!({"cmd": "config show"}))
        .await
        .unwrap();
    assert_eq!(config["node"]["name"], "test-node");
    assert_eq!(config["device"]["backend"], "mem");
    assert_eq!(config["device"]["size"], "64MiB");

    let set = admin::request(&path, &json!({"cmd": "log level", "level": "debug"}))
        .await
        .unwrap();
    assert_eq!(set, json!({"level": "debug"}));
    assert_eq!(*target.levels.lock().unwrap(), vec!["debug".to_owned()]);

    // The target's refusal comes back as the daemon's error.
    match admin::request(&path, &json!({"cmd": "log level", "level": "warning"})).await {
        Err(Error::Remote(msg)) => assert!(msg.contains("not a level"), "{msg}"),
        other => panic!("{other:?}"),
    }
    match blocking(&path, json!({"cmd": "reboot"})).await {
        Err(Error::Remote(msg)) => assert!(msg.contains("unknown command \"reboot\""), "{msg}"),
        other => panic!("{other:?}"),
    }

    // Several requests on one connection.
    let mut raw = Raw::connect(&path);
    for _ in 0..3 {
        let r = raw.ask(b"{\"cmd\":\"status\"}\n");
        assert_eq!(r["ok"], true);
        assert_eq!(r["result"]["node"], "test-node");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let server = start(&path, fake()).await;

    let mut first = Raw::connect(&path);
    assert_error(&first.ask(b"{\"cmd\": \n"), "malformed JSON");
    assert_error(&first.ask(b"not json at all\n"), "malformed JSON");
    assert_error(&first.ask(b"[\"status\"]\n"), "must be a JSON object");
    assert_error(&first.ask(b"{\"command\":\"status\"}\n"), "missing \"cmd\"");
    assert_error(
        &first.ask(b"{\"cmd\":\"frobnicate\"}\n"),
        "unknown command \"frobnicate\"",
    );
    assert_error(
        &first.ask(b"{\"cmd\":\"log level\"}\n"),
        "missing string field \"level\"",
    );
    assert_error(&first.ask(b"{\"cmd\":\"st\xffatus\"}\n"), "not valid UTF-8");
    // A panicking target is an error reply, not a dead server.
    assert_error(
        &first.ask(b"{\"cmd\":\"log level\",\"level\":\"panic\"}\n"),
        "internal error",
    );
    // Blank lines are ignored; the same connection still works.
    first.send(b"\n\r\n");
    assert_eq!(first.ask(b"{\"cmd\":\"status\"}\r\n")["ok"], true);

    // A second client is served while the first is still open.
    let mut second = Raw::connect(&path);
    assert_eq!(second.ask(b"{\"cmd\":\"status\"}\n")["ok"], true);
    assert_eq!(first.ask(b"{\"cmd\":\"status\"}\n")["ok"], true);

    // A request without a trailing newline is answered when the client closes its side.
    let mut third = Raw::connect(&path);
    third.send(b"{\"cmd\":\"status\"}");
    third.writer.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(third.reply().expect("reply")["ok"], true);
    assert!(third.reply().is_none());

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_line_is_refused_and_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let server = start(&path, fake()).await;

    // A line of exactly the limit is accepted.
    let mut at_limit = Raw::connect(&path);
    let mut line = vec![b' '; MAX_REQUEST_BYTES - 16];
    line.extend_from_slice(b"{\"cmd\":\"status\"}");
    assert_eq!(line.len(), MAX_REQUEST_BYTES);
    line.push(b'\n');
    assert_eq!(at_limit.ask(&line)["ok"], true);

    let other = Raw::connect(&path);
    let mut big = Raw::connect(&path);
    let flood = vec![b'x'; MAX_REQUEST_BYTES + 1];
    // The server may stop reading once the cap is passed: write from another thread.
    let mut writer = big.writer.try_clone().unwrap();
    let flooder = std::thread::spawn(move || {
        let _ = writer.write_all(&flood);
        let _ = writer.write_all(b"\n");
    });
    let reply = tokio::task::spawn_blocking(move || {
        let r = big.reply();
        let after = big.reply();
        (r, after)
    })
    .await
    .unwrap();
    flooder.join().unwrap();
    assert_error(&reply.0.expect("an error reply"), "longer than 65536 bytes");
    assert!(reply.1.is_none(), "connection closed after the error");

    // Other connections, old and new, are still served.
    let mut other = other;
    assert_eq!(other.ask(b"{\"cmd\":\"status\"}\n")["ok"], true);
    assert_eq!(
        admin::request(&path, &json!({"cmd":"status"}))
            .await
            .unwrap()["node"],
        "test-node"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    // A socket file nobody listens on, as a killed daemon leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    match admin::request(&path, &json!({"cmd":"status"})).await {
        Err(e @ Error::NotRunning { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("is spool serve running?"), "{msg}");
            assert!(msg.contains("connection refused"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    let server = start(&path, fake()).await;
    assert_eq!(
        admin::request(&path, &json!({"cmd":"status"}))
            .await
            .unwrap()["cores"],
        2
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_start_beside_a_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let server = start(&path, fake()).await;
    match AdminServer::bind(&path, fake()).await {
        Err(e @ Error::AlreadyRunning { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("another spool daemon is already listening"),
                "{msg}"
            );
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    // The first daemon is untouched.
    assert_eq!(
        admin::request(&path, &json!({"cmd":"status"}))
            .await
            .unwrap()["cores"],
        2
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_replace_a_file_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = AdminServer::bind(&path, fake())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_say_whether_the_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    for result in [
        admin::request(&missing, &json!({"cmd":"status"})).await,
        blocking(&missing, json!({"cmd":"status"})).await,
    ] {
        let msg = result.unwrap_err().to_string();
        assert!(msg.starts_with("is spool serve running? socket "), "{msg}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("no such socket"), "{msg}");
    }

    // Something listens but never answers.
    let mute_path = dir.path().join("mute.sock");
    let mute = std::os::unix::net::UnixListener::bind(&mute_path).unwrap();
    let short = Duration::from_millis(200);
    let msg = admin::request_with_timeout(&mute_path, &json!({"cmd":"status"}), short)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("is spool serve running?") && msg.contains("no answer within 0.2s"),
        "{msg}"
    );
    let p = mute_path.clone();
    let msg = tokio::task::spawn_blocking(move || {
        admin::request_blocking_with_timeout(&p, &json!({"cmd":"status"}), short)
    })
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(msg.contains("no answer within 0.2s"), "{msg}");
    drop(mute);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let server = start(&path, fake()).await;
    let mut idle = Raw::connect(&path);
    assert_eq!(idle.ask(b"{\"cmd\":\"status\"}\n")["ok"], true);
    let path_copy = server.path.clone();
    server.stop().await;
    assert!(!path_copy.exists());
    let eof = tokio::task::spawn_blocking(move || idle.reply())
        .await
        .unwrap();
    assert!(eof.is_none(), "idle connection closed by shutdown");
    // And the path can be bound again.
    let again = start(&path, fake()).await;
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_socket_is_not_removed_by_the_old_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let server = start(&path, fake()).await;
    // An operator moves the old socket away and something else takes the path.
    std::fs::rename(&path, dir.path().join("old.sock")).unwrap();
    std::fs::write(&path, b"new owner").unwrap();
    server.stop().await;
    assert_eq!(std::fs::read(&path).unwrap(), b"new owner");
}
