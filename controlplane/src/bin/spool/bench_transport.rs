//! `spool bench transport`: one link streaming bytes one way through Spool's `tcp`
//! transport, and through `rdma` on a named device, vs iperf3 over TCP on loopback, in
//! one run; throughput and CPU seconds per GiB (both ends are in this process, so the
//! CPU figure covers sender and receiver, as iperf3's host + remote figure does).

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mio::{Events, Interest, Poll, Token};
use serde_json::Value;
use spool_controlplane::config::size::ByteSize;
use spool_dataplane::net::rdma::{Rdma, RdmaOptions};
use spool_dataplane::net::transport::{Link, Tcp, Transport};

use crate::bench::{process_cpu_secs, Row};

#[derive(Debug, clap::Args)]
pub struct TransportBench {
    /// Bytes streamed per round.
    #[arg(long, default_value = "1GiB")]
    pub bytes: ByteSize,
    /// Rounds per row (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Bytes per write call.
    #[arg(long, default_value = "1MiB")]
    pub write_size: ByteSize,
    /// RDMA device for the rdma row (e.g. mlx5_0, or rxe0 for soft-RoCE; see
    /// `rdma link`). Without it only tcp and iperf3 run.
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// Its GID index (default: the first RoCE v2 GID with an IPv4 address).
    #[arg(long)]
    pub rdma_gid_index: Option<u8>,
    /// Address to listen on (the rdma device must reach it).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Write the table as CSV here too.
    #[arg(long)]
    pub csv: Option<std::path::PathBuf>,
}

/// A stall this long with no event is a hang, not a slow link.
const STALL_MAX: Duration = Duration::from_secs(30);

pub fn run(b: &TransportBench) -> Result<()> {
    let bytes = b.bytes.bytes();
    if bytes == 0 || b.rounds == 0 || b.write_size.bytes() == 0 {
        bail!("--bytes, --rounds and --write-size must be above zero");
    }
    let mut transports: Vec<Arc<dyn Transport>> = vec![Arc::new(Tcp)];
    if let Some(dev) = &b.rdma_device {
        let rdma = Rdma::open(dev, b.rdma_gid_index, RdmaOptions::default())
            .with_context(|| format!("--rdma-device {dev}"))?;
        transports.push(Arc::new(rdma));
    }
    let mut rows = Vec::new();
    for t in &transports {
        let mut runs = Vec::new();
        for round in 0..b.rounds {
            eprintln!("{} link, round {} of {} ...", t.name(), round + 1, b.rounds);
            runs.push(stream(
                &**t,
                b.listen,
                bytes,
                b.write_size.bytes() as usize,
            )?);
        }
        rows.push(median(format!("spool {} link", t.name()), runs));
    }
    let mut runs = Vec::new();
    for round in 0..b.rounds {
        eprintln!(
            "iperf3 over loopback, round {} of {} ...",
            round + 1,
            b.rounds
        );
        runs.push(iperf3(b.listen.ip(), bytes)?);
    }
    let limit = median("iperf3 tcp (loopback)".into(), runs);
    print_table(&rows, &limit, b.csv.as_deref())
}

fn median(what: String, mut runs: Vec<Row>) -> Row {
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let mut m = runs.swap_remove(runs.len() / 2);
    m.what = what;
    m
}

/// Streams `bytes` from a dialed link to the accepted one (in a thread).
fn stream(t: &dyn Transport, listen: SocketAddr, bytes: u64, write_size: usize) -> Result<Row> {
    let mut listener = t.listen(listen).context("listen")?;
    let addr = listener.local_addr()?;
    let cpu0 = process_cpu_secs();
    let t0 = Instant::now();
    let receiver = std::thread::spawn(move || -> Result<u64> {
        let mut poll = Poll::new()?;
        poll.registry()
            .register(&mut *listener, Token(0), Interest::READABLE)?;
        let mut events = Events::with_capacity(16);
        let mut link = loop {
            match listener.accept() {
                Ok(l) => break l,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    poll.poll(&mut events, Some(STALL_MAX))?;
                    if events.is_empty() {
                        bail!("no connection within {STALL_MAX:?}");
                    }
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        poll.registry().register(
            &mut *link,
            Token(1),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            match link.read(&mut buf) {
                Ok(0) => bail!("end of stream after {got} of {bytes} bytes"),
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => wait(&mut poll, &mut events)?,
                Err(e) => return Err(e).context("receive"),
            }
        }
        Ok(got)
    });
    let sent = send(t, addr, bytes, write_size);
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    sent?;
    let secs = t0.elapsed().as_secs_f64();
    if got != bytes {
        bail!("received {got} of {bytes} bytes");
    }
    Ok(Row {
        what: String::new(),
        bytes,
        secs,
        cpu_secs: cpu0.zip(process_cpu_secs()).map(|(a, b)| b - a),
    })
}

fn send(t: &dyn Transport, addr: SocketAddr, bytes: u64, write_size: usize) -> Result<()> {
    let mut poll = Poll::new()?;
    let mut link: Box<dyn Link> = t.dial(addr).context("dial")?;
    poll.registry().register(
        &mut *link,
        Token(1),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    let mut events = Events::with_capacity(16);
    let data: Vec<u8> = (0..write_size).map(|i| (i * 31) as u8).collect();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(write_size as u64) as usize;
        match link.write(&data[..n]) {
            Ok(0) => bail!("link closed after {sent} bytes"),
            Ok(k) => sent += k as u64,
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait(&mut poll, &mut events)?,
            Err(e) => return Err(e).context("send"),
        }
    }
    // Keep the link open until the receiver has everything and closes its end: an
    // rdma link closed early would flush writes not yet acknowledged.
    let mut sink = [0u8; 1];
    loop {
        match link.read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => bail!("the receiver sent bytes"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait(&mut poll, &mut events)?,
            Err(_) => return Ok(()),
        }
    }
}

fn wait(poll: &mut Poll, events: &mut Events) -> Result<()> {
    poll.poll(events, Some(STALL_MAX))?;
    if events.is_empty() {
        bail!("the link stalled: no event within {STALL_MAX:?}");
    }
    Ok(())
}

/// iperf3 sending `bytes` over TCP to a server on `ip` (one stream, like one link).
fn iperf3(ip: std::net::IpAddr, bytes: u64) -> Result<Row> {
    let port = {
        let l = std::net::TcpListener::bind((ip, 0))?;
        l.local_addr()?.port().to_string()
    };
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-p", &port, "-B", &ip.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("iperf3")
        .args([
            "-c",
            &ip.to_string(),
            "-p",
            &port,
            "-n",
            &bytes.to_string(),
            "-J",
        ])
        .output()
        .context("iperf3 client")?;
    let _ = server.kill();
    let _ = server.wait();
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let end = &v["end"];
    let secs = end["sum_received"]["seconds"]
        .as_f64()
        .context("iperf3 seconds")?;
    let got = end["sum_received"]["bytes"]
        .as_f64()
        .context("iperf3 bytes")?;
    let cpu = &end["cpu_utilization_percent"];
    let cpu_secs = cpu["host_total"]
        .as_f64()
        .zip(cpu["remote_total"].as_f64())
        .map(|(h, r)| (h + r) / 100.0 * secs);
    Ok(Row {
        what: String::new(),
        bytes: got as u64,
        secs,
        cpu_secs,
    })
}

fn print_table(rows: &[Row], limit: &Row, csv: Option<&std::path::Path>) -> Result<()> {
    let host = crate::bench::host_name();
    println!(
        "{:<26} {:>14} {:>9} {:>14} {:>10}",
        "scenario", "bytes", "GB/s", "cpu_s_per_GiB", "vs_iperf3"
    );
    let mut out = String::from("scenario,bytes,gb_per_s,cpu_s_per_gib,ratio_vs_iperf3,host\n");
    for r in rows.iter().chain(std::iter::once(limit)) {
        let cpu = r.cpu_per_gib().map_or("-".into(), |c| format!("{c:.3}"));
        let ratio = r.gbps() / limit.gbps();
        println!(
            "{:<26} {:>14} {:>9.3} {:>14} {:>9.2}x",
            r.what,
            r.bytes,
            r.gbps(),
            cpu,
            ratio
        );
        out.push_str(&format!(
            "{},{},{:.4},{},{:.3},{host}\n",
            r.what,
            r.bytes,
            r.gbps(),
            cpu,
            ratio
        ));
    }
    if let Some(p) = csv {
        std::fs::write(p, out).with_context(|| format!("--csv {}", p.display()))?;
    }
    Ok(())
}
