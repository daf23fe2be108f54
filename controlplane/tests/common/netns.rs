//! Network-namespace harness for multi-node tests: every node is a network namespace
//! with its own address, joined by a veth pair to one Linux bridge in the root
//! namespace, so daemons run as real processes on a real (virtual) L2 network. A nemesis
//! can partition nodes (nftables inside the nodes' namespaces), take links down and
//! throttle a node's egress (tc tbf).
//!
//! Layout of slot `k` (0..200), allocated atomically by creating the bridge:
//!
//! ```text
//! root ns:  spbr{k}  10.231.{k}.1/24   (the "host": etcd etc. bind here)
//!             ├── sp{k}v0 ── veth ── [ns sp{k}n0] eth0 10.231.{k}.10/24
//!             ├── sp{k}v1 ── veth ── [ns sp{k}n1] eth0 10.231.{k}.11/24
//!             └── ...
//! ```
//!
//! Nodes only have the connected /24 route (no default route), so nothing leaves the
//! test subnet. The owner of a slot is recorded in `/run/spool-netns/{k}.pid` (pid and
//! process start time); `cleanup_stale` removes the slots of processes that are gone,
//! e.g. a test run killed with SIGKILL. Allocation, teardown and cleanup hold an flock on
//! `/run/spool-netns/lock`, so a cleanup never races with a half-allocated or
//! half-removed slot of another process.
//!
//! Needs root, iproute2 (`ip`, `tc`), nftables (`nft`) and util-linux (`flock`). Plain
//! std and no FFI of its own (the `spool` binary includes this file too, and only
//! ffi/ and hugepages/ may talk to C).
//! Test support: failures panic with the command, its stderr and a hint; `Drop` never
//! panics.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Number of slots (bridges / subnets) that can exist at the same time.
pub const SLOTS: usize = 200;
/// Where slot owners are recorded.
pub const STATE_DIR: &str = "/run/spool-netns";
/// The nftables table the nemesis owns inside every node namespace.
pub const NFT_TABLE: &str = "spool_nemesis";

const HINT: &str = "the netns harness needs root, iproute2 (ip, tc), nftables (nft) and flock; \
leftovers of killed runs are removed by netns::cleanup_stale() (inspect with \
`ip netns list` and `ip -br link show type bridge`)";

/// A bridge plus `nodes` network namespaces attached to it. Dropping it removes them;
/// kill the processes started in them (and host processes bound to `host_ip`) first.
#[derive(Debug)]
pub struct Net {
    slot: usize,
    bridge: String,
    /// Namespace of node i.
    ns: Vec<String>,
    /// Host-side veth of node i (a port of the bridge).
    veth: Vec<String>,
    /// No namespaces: every node on its own loopback address (`Net::loopback`).
    loopback: bool,
}

impl Net {
    /// Creates a bridge in the root namespace with address .1/24, and `nodes` namespaces,
    /// each with lo up and a veth to the bridge with address .(10+i)/24.
    pub fn new(nodes: usize) -> Net {
        assert!(
            (1..=200).contains(&nodes),
            "Net::new({nodes}): between 1 and 200 nodes"
        );
        cleanup_stale();
        disable_bridge_netfilter();

        let slot = {
            let _lock = StateLock::acquire();
            allocate_slot()
        };
        // From here on a panic unwinds through Net's Drop, which removes what exists.
        let net = Net {
            slot,
            bridge: bridge_name(slot),
            ns: (0..nodes).map(|i| ns_name(slot, i)).collect(),
            veth: (0..nodes).map(|i| veth_name(slot, i)).collect(),
            loopback: false,
        };
        net.setup();
        net
    }

    /// No namespaces, no bridge: node i is 127.0.0.(10+i), the host 127.0.0.1, and
    /// programs run in the test's own namespaces. For where namespaces cannot be used
    /// (soft-RoCE on Debian 12's kernel routes only in the initial one); one such Net
    /// at a time, and no partitions.
    pub fn loopback(nodes: usize) -> Net {
        assert!((1..=200).contains(&nodes), "Net::loopback({nodes})");
        Net {
            slot: 0,
            bridge: String::new(),
            ns: vec![String::new(); nodes],
            veth: vec![String::new(); nodes],
            loopback: true,
        }
    }

    fn setup(&self) {
        let k = self.slot;
        let br = self.bridge.as_str();
        let host = format!("{}/24", self.host_ip());
        // No IPv6 link-local addresses: no DAD, no router solicitations, no noise.
        run(ip(["link", "set", br, "addrgenmode", "none"]));
        run(ip(["addr", "add", &host, "dev", br]));
        run(ip(["link", "set", br, "up"]));

        for i in 0..self.nodes() {
            let ns = self.ns[i].as_str();
            let veth = self.veth[i].as_str();
            let host_mac = format!("02:53:70:{k:02x}:00:{i:02x}");
            let node_mac = format!("02:53:70:{k:02x}:01:{i:02x}");
            let addr = format!("{}/24", self.node_ip(i));
            run(ip(["netns", "add", ns]));
            // The peer is created directly inside the namespace under its final name.
            run(ip([
                "link", "add", veth, "address", &host_mac, "type", "veth", "peer", "name", "eth0",
                "address", &node_mac, "netns", ns,
            ]));
            run(ip(["link", "set", veth, "addrgenmode", "none"]));
            run(ip(["link", "set", veth, "master", br]));
            run(ip(["link", "set", veth, "up"]));
            run(ip(["-n", ns, "link", "set", "lo", "up"]));
            run(ip(["-n", ns, "link", "set", "eth0", "addrgenmode", "none"]));
            run(ip(["-n", ns, "addr", "add", &addr, "dev", "eth0"]));
            run(ip(["-n", ns, "link", "set", "eth0", "up"]));
        }
        self.wait_forwarding(0..self.nodes());
    }

    /// Waits until the bridge is up, the ports of `nodes` are forwarding and their eth0
    /// is operationally up (immediate with STP off, but carrier and operstate changes
    /// go through the kernel's asynchronous linkwatch).
    fn wait_forwarding(&self, nodes: impl Iterator<Item = usize> + Clone) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let br_up = read_trim(format!("/sys/class/net/{}/operstate", self.bridge))
                .is_some_and(|s| s == "up");
            let ports = nodes.clone().all(|i| {
                let v = &self.veth[i];
                // 3 = BR_STATE_FORWARDING
                read_trim(format!("/sys/class/net/{v}/brport/state")).is_some_and(|s| s == "3")
                    && read_trim(format!("/sys/class/net/{v}/operstate")).is_some_and(|s| s == "up")
                    && ip(["-n", &self.ns[i], "-o", "link", "show", "dev", "eth0"])
                        .output()
                        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" state UP "))
            });
            if br_up && ports {
                return;
            }
            if Instant::now() > deadline {
                let links = ip(["-d", "link", "show", "master", &self.bridge]).output();
                panic!(
                    "netns: bridge {} or its ports did not come up within 5 s (bridge up: \
                     {br_up}, ports forwarding: {ports})\n{}\nhint: {HINT}",
                    self.bridge,
                    links
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The slot number k (subnet 10.231.k.0/24).
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The bridge's name in the root namespace (`spbr{k}`).
    pub fn bridge_name(&self) -> &str {
        &self.bridge
    }

    /// The bridge's address (root namespace): where host services (etcd) bind.
    pub fn host_ip(&self) -> Ipv4Addr {
        if self.loopback {
            return Ipv4Addr::LOCALHOST;
        }
        Ipv4Addr::new(10, 231, self.slot as u8, 1)
    }

    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.check(i);
        if self.loopback {
            return Ipv4Addr::new(127, 0, 0, 10 + i as u8);
        }
        Ipv4Addr::new(10, 231, self.slot as u8, 10 + i as u8)
    }

    pub fn ns_name(&self, i: usize) -> &str {
        self.check(i);
        assert!(!self.loopback, "a loopback Net has no namespaces");
        &self.ns[i]
    }

    /// The host-side veth of node i (`sp{k}v{i}`, a port of the bridge).
    pub fn veth_name(&self, i: usize) -> &str {
        self.check(i);
        &self.veth[i]
    }

    pub fn nodes(&self) -> usize {
        self.ns.len()
    }

    /// `ip netns exec NS program`, ready for args.
    pub fn command(&self, i: usize, program: impl AsRef<OsStr>) -> Command {
        if self.loopback {
            self.check(i);
            return Command::new(program);
        }
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns_name(i)]).arg(program);
        c
    }

    /// Like `command`, but entering only node i's network namespace: the program
    /// shares the caller's mount namespace, so a FUSE mount it makes is visible to the
    /// test (`ip netns exec` gives every program a mount namespace of its own).
    pub fn command_net_only(&self, i: usize, program: impl AsRef<OsStr>) -> Command {
        if self.loopback {
            self.check(i);
            return Command::new(program);
        }
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns_name(i)))
            .arg("--")
            .arg(program);
        c
    }

    /// Prefix usable by other launchers: `["ip", "netns", "exec", NS]`.
    pub fn wrapper(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", self.ns_name(i)]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Drops all packets between nodes a and b, both directions: in each node's
    /// namespace, packets to the other are dropped on output and from the other on input.
    /// What the sender sees: a TCP connect hangs (the SYN is retransmitted until the
    /// connect times out), while a UDP `send` fails at once with EPERM (an output drop is
    /// reported to local senders). ARP is not filtered.
    pub fn partition(&self, a: usize, b: usize) {
        assert_ne!(
            a, b,
            "partition({a}, {b}): a node cannot be cut from itself"
        );
        let (ia, ib) = (self.node_ip(a), self.node_ip(b));
        self.nft(
            a,
            &[
                format!("output ip daddr {ib} drop"),
                format!("input ip saddr {ib} drop"),
            ],
        );
        self.nft(
            b,
            &[
                format!("output ip daddr {ia} drop"),
                format!("input ip saddr {ia} drop"),
            ],
        );
    }

    /// Drops packets sent from `from` to `to` only; `to` -> `from` still flows. Note what
    /// that means for TCP: neither side can *connect* (from -> to loses the SYN,
    /// to -> from loses the SYN-ACK); one-way datagrams (UDP) from `to` still arrive.
    pub fn partition_one_way(&self, from: usize, to: usize) {
        assert_ne!(from, to, "partition_one_way({from}, {to}): same node");
        let (ifrom, ito) = (self.node_ip(from), self.node_ip(to));
        self.nft(from, &[format!("output ip daddr {ito} drop")]);
        self.nft(to, &[format!("input ip saddr {ifrom} drop")]);
    }

    /// Drops the TCP segments that carry data from node `from`'s port `port` to node
    /// `to`, and lets everything else through (bare ACKs, resets, and `from`'s own
    /// dialed links). Replies `from` sends on links `to` dialed are lost while `to`'s
    /// data is still acknowledged: `from`'s kernel gives such a link up after
    /// `TCP_USER_TIMEOUT` without telling `to`, which holds nothing unacknowledged and
    /// so still sees it open (one end of a link gone, as a partition or a stalled host
    /// can leave it). Undone by `heal`.
    pub fn drop_data_from_port(&self, from: usize, to: usize, port: u16) {
        assert_ne!(from, to, "drop_data_from_port({from}, {to}): same node");
        let ito = self.node_ip(to);
        self.nft(
            from,
            &[format!(
                "output ip daddr {ito} tcp sport {port} ip length > 64 drop"
            )],
        );
    }

    /// Isolates node i from everyone, including the host: everything in or out of its
    /// eth0 is dropped (its loopback keeps working). Undone by `heal`.
    pub fn isolate(&self, i: usize) {
        self.nft(
            i,
            &[
                "output oifname \"eth0\" drop".to_string(),
                "input iifname \"eth0\" drop".to_string(),
            ],
        );
    }

    /// Pulls node i's cable: its bridge port (the host-side veth) goes down, so the
    /// node's eth0 loses carrier and packets are silently dropped both ways. The node
    /// keeps its address and routes (binding to node_ip still works).
    pub fn link_down(&self, i: usize) {
        run(ip(["link", "set", self.veth_name(i), "down"]));
    }

    /// Plugs node i's cable back in, waits until its port forwards again and forgets
    /// the ARP state about node i (see `flush_neighbours`).
    pub fn link_up(&self, i: usize) {
        run(ip(["link", "set", self.veth_name(i), "up"]));
        run(ip(["-n", self.ns_name(i), "link", "set", "eth0", "up"]));
        self.wait_forwarding(i..i + 1);
        self.flush_neighbours(i);
    }

    /// Forgets ARP entries involving node i: all of node i's, and the host's and other
    /// nodes' entries for node i. Needed after a link-down: entries left INCOMPLETE
    /// (their probes were lost while the link was down) turn FAILED up to a few seconds
    /// later, and that drops the packets queued on them with an ICMP host-unreachable,
    /// which aborts a fresh TCP connect with EHOSTUNREACH although the link is back.
    fn flush_neighbours(&self, i: usize) {
        let node_ip = self.node_ip(i).to_string();
        run(ip(["-n", self.ns_name(i), "neigh", "flush", "dev", "eth0"]));
        run(ip(["neigh", "flush", "dev", &self.bridge, "to", &node_ip]));
        for j in (0..self.nodes()).filter(|&j| j != i) {
            run(ip([
                "-n",
                self.ns_name(j),
                "neigh",
                "flush",
                "to",
                &node_ip,
            ]));
        }
    }

    /// Token-bucket limit on node i's egress (tc tbf on eth0 inside its namespace).
    /// Replaces an earlier throttle of the same node.
    pub fn throttle(&self, i: usize, rate_mbit: u32) {
        assert!(rate_mbit > 0, "throttle({i}, 0): use link_down or isolate");
        // The bucket must hold a full GSO super-packet (veth does TSO, up to 64 KiB),
        // and at high rates ~10 ms of traffic so the timer granularity does not bite.
        let burst = (u64::from(rate_mbit) * 1_000_000 / 8 / 100).max(64 * 1024);
        run(ip([
            "netns",
            "exec",
            self.ns_name(i),
            "tc",
            "qdisc",
            "replace",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            &format!("{rate_mbit}mbit"),
            "burst",
            &burst.to_string(),
            "latency",
            "50ms",
        ]));
    }

    /// Removes every partition, isolation, throttle and link-down, and flushes the ARP
    /// caches of the host and the nodes (see `flush_neighbours`).
    pub fn heal(&self) {
        for i in 0..self.nodes() {
            let ns = self.ns_name(i);
            // `add` then `delete` is idempotent (nft 1.0.6 has no `destroy`).
            run_nft(
                ns,
                &format!("add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"),
            );
            let qdisc = run(ip([
                "netns", "exec", ns, "tc", "qdisc", "show", "dev", "eth0",
            ]));
            // A veth's default root qdisc is noqueue; anything else is a throttle.
            let throttled = qdisc
                .lines()
                .any(|l| l.contains(" root ") && !l.starts_with("qdisc noqueue"));
            if throttled {
                run(ip([
                    "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root",
                ]));
            }
            run(ip(["link", "set", self.veth_name(i), "up"]));
            run(ip(["-n", ns, "link", "set", "eth0", "up"]));
        }
        self.wait_forwarding(0..self.nodes());
        // Fresh ARP state everywhere (see flush_neighbours).
        run(ip(["neigh", "flush", "dev", &self.bridge]));
        for ns in &self.ns {
            run(ip(["-n", ns, "neigh", "flush", "dev", "eth0"]));
        }
    }

    /// Adds `rules` ("output ..." / "input ...") to the nemesis table of node i, creating
    /// the table and its chains if needed.
    fn nft(&self, i: usize, rules: &[String]) {
        let mut script = format!(
            "add table inet {t}\n\
             add chain inet {t} input {{ type filter hook input priority 0; policy accept; }}\n\
             add chain inet {t} output {{ type filter hook output priority 0; policy accept; }}\n",
            t = NFT_TABLE
        );
        for r in rules {
            script.push_str(&format!("add rule inet {NFT_TABLE} {r}\n"));
        }
        run_nft(self.ns_name(i), &script);
    }

    fn check(&self, i: usize) {
        assert!(
            i < self.nodes(),
            "node {i} out of range: this Net has {} nodes",
            self.nodes()
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if self.loopback {
            return;
        }
        let _lock = StateLock::acquire_quiet();
        let errs = teardown_slot(self.slot, &self.ns, &self.veth);
        for e in errs {
            eprintln!("netns: teardown of slot {}: {e}", self.slot);
        }
    }
}

/// Removes every slot (`spbr{k}` bridge, `sp{k}n{i}` namespaces, `sp{k}v{i}` veths and
/// the pid file) whose recorded owner process is gone, or that has no owner record at
/// all. Slots of live processes are left alone. Never panics; problems go to stderr.
pub fn cleanup_stale() {
    let _lock = StateLock::acquire_quiet();
    let mut links = Vec::new();
    match ip(["-o", "link", "show"]).output() {
        Ok(o) if o.status.success() => {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                // "7: sp3v0@if2: <BROADCAST,..." -> "sp3v0"
                if let Some(name) = line.split(": ").nth(1) {
                    links.push(name.split('@').next().unwrap_or(name).to_string());
                }
            }
        }
        other => {
            eprintln!("netns: cleanup_stale: `ip -o link show` failed: {other:?}");
            return;
        }
    }
    let mut namespaces = Vec::new();
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            namespaces.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    let mut pid_slots = Vec::new();
    if let Ok(dir) = fs::read_dir(STATE_DIR) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(k) = name
                .strip_suffix(".pid")
                .and_then(|s| s.parse::<usize>().ok())
            {
                pid_slots.push(k);
            }
        }
    }

    let mut slots: Vec<usize> = pid_slots;
    slots.extend(links.iter().filter_map(|l| parse_bridge(l)));
    slots.extend(
        links
            .iter()
            .filter_map(|l| parse_node_name(l, 'v').map(|(k, _)| k)),
    );
    slots.extend(
        namespaces
            .iter()
            .filter_map(|n| parse_node_name(n, 'n').map(|(k, _)| k)),
    );
    slots.sort_unstable();
    slots.dedup();

    for k in slots {
        if owner_alive(k) {
            continue;
        }
        let ns: Vec<String> = namespaces
            .iter()
            .filter(|n| parse_node_name(n, 'n').is_some_and(|(s, _)| s == k))
            .cloned()
            .collect();
        let veths: Vec<String> = links
            .iter()
            .filter(|l| parse_node_name(l, 'v').is_some_and(|(s, _)| s == k))
            .cloned()
            .collect();
        eprintln!(
            "netns: removing stale slot {k} (bridge {}, namespaces {ns:?}, veths {veths:?})",
            bridge_name(k)
        );
        for e in teardown_slot(k, &ns, &veths) {
            eprintln!("netns: cleanup_stale, slot {k}: {e}");
        }
    }
}

pub fn bridge_name(k: usize) -> String {
    format!("spbr{k}")
}

pub fn ns_name(k: usize, i: usize) -> String {
    format!("sp{k}n{i}")
}

pub fn veth_name(k: usize, i: usize) -> String {
    format!("sp{k}v{i}")
}

pub fn pid_file(k: usize) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{k}.pid"))
}

/// `spbr{k}` -> k
fn parse_bridge(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("spbr")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `sp{k}{sep}{i}` -> (k, i), digits only (so `spbr3` or `spare0` never match).
fn parse_node_name(name: &str, sep: char) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("sp")?;
    let (k, i) = rest.split_once(sep)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(k) || !digits(i) {
        return None;
    }
    Some((k.parse().ok()?, i.parse().ok()?))
}

/// Tries `ip link add spbr{k} type bridge` for every k in 0..SLOTS; the first success is
/// ours ("File exists" means taken). Records the owner before the state lock is released.
///
/// The search starts at a point that moves with the pid and with every allocation, so a
/// slot just freed is rarely handed out again at once: a host process of the previous
/// owner still bound to the old host_ip would come back to life when the address is
/// re-added.
fn allocate_slot() -> usize {
    static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
    fs::create_dir_all(STATE_DIR)
        .unwrap_or_else(|e| panic!("netns: create {STATE_DIR}: {e}\nhint: {HINT}"));
    let n = ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    let start = (std::process::id() as usize * 7 + n * 13) % SLOTS;
    for k in (0..SLOTS).map(|j| (start + j) % SLOTS) {
        let br = bridge_name(k);
        // A fixed MAC: a bridge otherwise takes the lowest port MAC, which changes as
        // ports come and go and leaves stale ARP entries in the nodes.
        let mac = format!("02:53:70:{k:02x}:ff:ff");
        let mut cmd = ip([
            "link",
            "add",
            &br,
            "address",
            &mac,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ]);
        let out = output(&mut cmd);
        if out.status.success() {
            let me = std::process::id();
            let start = start_time(me).unwrap_or_default();
            if let Err(e) = fs::write(pid_file(k), format!("{me} {start}\n")) {
                let _ = ip(["link", "del", &br]).output();
                panic!("netns: write {}: {e}\nhint: {HINT}", pid_file(k).display());
            }
            return k;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("File exists") {
            fail(&cmd, &out);
        }
    }
    panic!(
        "netns: all {SLOTS} slots (spbr0..spbr{}) are taken\nhint: {HINT}",
        SLOTS - 1
    );
}

/// Deletes a slot's veths, namespaces, bridge and pid file, in that order (veths first:
/// a namespace with processes still in it outlives `ip netns del`, its eth0 with it).
/// Missing pieces are fine; other failures are returned.
fn teardown_slot(k: usize, ns: &[String], veths: &[String]) -> Vec<String> {
    let mut errs = Vec::new();
    for v in veths {
        quiet(ip(["link", "del", v]), &mut errs);
    }
    for n in ns {
        quiet(ip(["netns", "del", n]), &mut errs);
    }
    quiet(ip(["link", "del", &bridge_name(k)]), &mut errs);
    if let Err(e) = fs::remove_file(pid_file(k)) {
        if e.kind() != std::io::ErrorKind::NotFound {
            errs.push(format!("remove {}: {e}", pid_file(k).display()));
        }
    }
    errs
}

/// Runs a teardown command; "does not exist" errors are not errors.
fn quiet(mut cmd: Command, errs: &mut Vec<String>) {
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            let missing = [
                "Cannot find device",
                "No such file or directory",
                "does not exist",
            ];
            if !missing.iter().any(|m| stderr.contains(m)) {
                errs.push(format!("{cmd:?} failed ({}): {}", o.status, stderr.trim()));
            }
        }
        Err(e) => errs.push(format!("{cmd:?}: {e}")),
    }
}

/// Is the process recorded as the owner of slot k still running (same pid *and* start
/// time, so a recycled pid does not keep a stale slot alive)?
fn owner_alive(k: usize) -> bool {
    let Some(text) = read_trim(pid_file(k)) else {
        return false;
    };
    let mut it = text.split_whitespace();
    let Some(pid) = it.next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    let recorded_start = it.next().and_then(|s| s.parse::<u64>().ok());
    match (start_time(pid), recorded_start) {
        (None, _) => false,
        (Some(now), Some(rec)) => now == rec,
        (Some(_), None) => true,
    }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot); None if the
/// process does not exist or is a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field 22 is fields[19].
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// br_netfilter (loaded here, e.g. by Docker or Kubernetes setups) sends *bridged* IPv4
/// frames through the root namespace's iptables/nftables FORWARD hooks, where a
/// `policy drop` (Docker's default) silently kills node-to-node traffic. Turn the
/// `bridge-nf-call-*` knobs off where they exist (a per-bridge option cannot override
/// the global one). Host-to-node traffic is not bridged and is not affected by this.
fn disable_bridge_netfilter() {
    for knob in [
        "bridge-nf-call-iptables",
        "bridge-nf-call-ip6tables",
        "bridge-nf-call-arptables",
    ] {
        let path = format!("/proc/sys/net/bridge/{knob}");
        if read_trim(&path).is_some_and(|v| v != "0") {
            if let Err(e) = fs::write(&path, "0") {
                eprintln!(
                    "netns: could not turn off {path}: {e} (bridged traffic may be filtered)"
                );
            }
        }
    }
}

/// An exclusive flock on STATE_DIR/lock, released on drop or when this process dies.
///
/// Held by a `flock(1)` child (`flock LOCK sh -c 'echo locked; exec cat'`) rather than
/// by flock(2) here: this file is also compiled into the `spool` binary, which makes
/// no system calls of its own outside ffi/. The child keeps the lock until its stdin (our pipe) closes, which also
/// happens if we are SIGKILLed.
struct StateLock(Option<Child>);

impl StateLock {
    fn acquire() -> StateLock {
        match Self::try_acquire() {
            Ok(l) => l,
            Err(e) => panic!("netns: {e}\nhint: {HINT}"),
        }
    }

    /// For Drop and cleanup: never panics; proceeds unlocked if the lock is unavailable.
    fn acquire_quiet() -> StateLock {
        Self::try_acquire().unwrap_or_else(|e| {
            eprintln!("netns: {e} (continuing without the lock)");
            StateLock(None)
        })
    }

    fn try_acquire() -> Result<StateLock, String> {
        fs::create_dir_all(STATE_DIR).map_err(|e| format!("create {STATE_DIR}: {e}"))?;
        let path = Path::new(STATE_DIR).join("lock");
        let mut cmd = Command::new("flock");
        cmd.arg("--exclusive")
            .arg(&path)
            .args(["sh", "-c", "echo locked; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("run {cmd:?}: {e}"))?;
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() == "locked" {
            return Ok(StateLock(Some(child)));
        }
        drop(child.stdin.take());
        let out = child.wait_with_output();
        Err(format!("{cmd:?} did not take the lock: {out:?}"))
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            drop(child.stdin.take()); // EOF: cat exits, flock releases the lock
            let _ = child.wait();
        }
    }
}

impl std::fmt::Debug for StateLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateLock")
    }
}

fn read_trim(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn ip<const N: usize>(args: [&str; N]) -> Command {
    let mut c = Command::new("ip");
    c.args(args);
    c
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("netns: could not run {cmd:?}: {e}\nhint: {HINT}"))
}

fn fail(cmd: &Command, out: &Output) -> ! {
    panic!(
        "netns: {cmd:?} failed ({}):\n{}{}\nhint: {HINT}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
    );
}

/// Runs `cmd`, panics with the command, its stderr and a hint on failure; returns stdout.
fn run(mut cmd: Command) -> String {
    let out = output(&mut cmd);
    if !out.status.success() {
        fail(&cmd, &out);
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip netns exec NS nft -f -` with `script` on stdin.
fn run_nft(ns: &str, script: &str) {
    let mut cmd = ip(["netns", "exec", ns, "nft", "-f", "-"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("netns: could not run {cmd:?}: {e}\nhint: {HINT}"));
    let write = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes());
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("netns: wait for {cmd:?}: {e}\nhint: {HINT}"));
    if !out.status.success() || write.is_err() {
        panic!(
            "netns: {cmd:?} failed ({}, stdin write: {write:?}) with script:\n{script}\nstderr:\n{}\nhint: {HINT}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
        );
    }
}
