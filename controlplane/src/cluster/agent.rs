//! A node's membership agent: it registers the node in etcd under a lease, keeps the
//! lease alive (and fences the node when it cannot), runs for leader, and, while
//! leader, turns node health into the chain table; every node watches the table and
//! hands it to its replication service.
//!
//! etcd layout under `/spool/<cluster name>/`:
//! ```text
//! nodes/<id>             {"addr": "ip:port"}         with the node's lease
//! leader                 "<id>"                      with the leader's lease
//! table                  the chain table (JSON)      written by compare-and-swap
//! synced/<chain>/<node>  {"chain_version": v}        a finished resync, by its source
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use spool_dataplane::replica::chain::{initial_table, next_table, Health, NodeInfo};
use spool_dataplane::replica::{ChainTable, Replica};

use super::etcd::{Etcd, EventKind};
use crate::config::ClusterConfig;
use crate::Error;

/// What `spool status` shows about membership.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentStatus {
    /// This node's id.
    pub node_id: u32,
    /// The leader's id, when known.
    pub leader: Option<u32>,
    /// Whether this node leads.
    pub is_leader: bool,
    /// Registered under a live lease.
    pub registered: bool,
    /// The node refuses client requests: its lease may have expired in etcd.
    pub fenced: bool,
    /// Milliseconds since the last keep-alive etcd confirmed.
    pub lease_confirmed_ms_ago: Option<u64>,
    /// The installed chain table's version.
    pub table_version: u64,
    /// The latest etcd error, if any since the last success.
    pub last_error: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Synced {
    chain_version: u64,
}

/// The running agent.
#[derive(Debug, Clone)]
pub struct Agent {
    status: Arc<Mutex<AgentStatus>>,
    etcd: Etcd,
    prefix: String,
    lease: Arc<Mutex<Option<i64>>>,
}

impl Agent {
    /// Starts the agent's tasks on the current tokio runtime.
    pub fn start(cfg: &ClusterConfig, replica: Arc<Replica>) -> Result<Agent, Error> {
        let ttl = Duration::from_secs(u64::from(cfg.lease_ttl_s));
        // A request must finish well inside a lease period, or a slow etcd would let
        // the lease lapse while we still wait.
        let etcd = Etcd::new(&cfg.etcd, (ttl / 3).max(Duration::from_millis(300)))?;
        let agent = Agent {
            status: Arc::new(Mutex::new(AgentStatus {
                node_id: cfg.node_id,
                fenced: true,
                ..AgentStatus::default()
            })),
            etcd,
            prefix: format!("/spool/{}/", cfg.name),
            lease: Arc::new(Mutex::new(None)),
        };
        replica.set_fenced(true);
        let last_ok: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        tokio::spawn(agent.clone().membership(
            cfg.clone(),
            Arc::clone(&replica),
            Arc::clone(&last_ok),
        ));
        tokio::spawn(
            agent
                .clone()
                .fence(cfg.clone(), Arc::clone(&replica), last_ok),
        );
        tokio::spawn(agent.clone().election(cfg.clone()));
        tokio::spawn(agent.clone().watch_table(Arc::clone(&replica)));
        tokio::spawn(agent.clone().report_synced(replica));
        Ok(agent)
    }

    pub fn status(&self) -> AgentStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Leaves the cluster at once (revokes the lease) instead of waiting for it to expire.
    pub async fn leave(&self) {
        let lease = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lease {
            let _ = self.etcd.revoke(l).await;
        }
    }

    fn set(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn error(&self, e: &Error) {
        let msg = e.to_string();
        tracing::warn!(error = %msg, "cluster agent");
        self.set(|s| s.last_error = Some(msg));
    }

    /// Register under a lease and keep it alive; re-register when it is lost.
    ///
    /// Every registration is a new incarnation: a node whose lease lapsed may have
    /// been declared down and its chains moved on while it still held an older table,
    /// so it takes no client request until the leader has seen it return (and resynced
    /// it) and a table carrying the new incarnation is installed.
    async fn membership(
        self,
        cfg: ClusterConfig,
        replica: Arc<Replica>,
        last_ok: Arc<Mutex<Option<Instant>>>,
    ) {
        let ttl_s = i64::from(cfg.lease_ttl_s);
        let beat = Duration::from_millis(u64::from(cfg.lease_ttl_s) * 1000 / 3);
        let key = format!("{}nodes/{}", self.prefix, cfg.node_id);
        loop {
            let incarnation = rand::random::<u64>() | 1;
            replica.set_incarnation(incarnation);
            let info = serde_json::to_vec(&NodeInfo {
                addr: cfg.listen.to_string(),
                incarnation,
            })
            .expect("NodeInfo serializes");
            let sent = Instant::now();
            let lease = match self.etcd.grant(ttl_s).await {
                Ok(l) => l,
                Err(e) => {
                    self.error(&e);
                    tokio::time::sleep(beat).await;
                    continue;
                }
            };
            if let Err(e) = self.etcd.put(&key, &info, Some(lease)).await {
                self.error(&e);
                tokio::time::sleep(beat).await;
                continue;
            }
            *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
            *last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Some(sent);
            self.set(|s| {
                s.registered = true;
                s.last_error = None;
            });
            tracing::info!(node = cfg.node_id, lease, "registered in etcd");
            loop {
                tokio::time::sleep(beat).await;
                let sent = Instant::now();
                match self.etcd.keep_alive(lease).await {
                    Ok(left) if left > 0 => {
                        *last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Some(sent);
                    }
                    Ok(_) => {
                        tracing::warn!(lease, "lease expired: registering again");
                        break;
                    }
                    Err(e) => {
                        self.error(&e);
                        let age = last_ok
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .map(|t| t.elapsed());
                        if age.is_none_or(|a| a > Duration::from_secs(cfg.lease_ttl_s.into())) {
                            break; // The lease is gone by now: start over.
                        }
                    }
                }
            }
            self.set(|s| s.registered = false);
            *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Fences the node (no client requests) once half a lease period passes without a
    /// confirmed keep-alive: etcd counts the lease from when it received the last one,
    /// which is after we sent it, so the node stops before the leader can declare it
    /// down and move its chains; a reader can never get data older than a write
    /// acknowledged by the new chain.
    async fn fence(
        self,
        cfg: ClusterConfig,
        replica: Arc<Replica>,
        last_ok: Arc<Mutex<Option<Instant>>>,
    ) {
        let half = Duration::from_millis(u64::from(cfg.lease_ttl_s) * 500);
        loop {
            let age = last_ok
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map(|t| t.elapsed());
            let fenced = age.is_none_or(|a| a > half);
            replica.set_fenced(fenced);
            self.set(|s| {
                if s.fenced != fenced {
                    tracing::warn!(fenced, "fence changed");
                }
                s.fenced = fenced;
                s.lease_confirmed_ms_ago = age.map(|a| a.as_millis() as u64);
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Run for leader under our lease; while leader, keep the table in step with health.
    async fn election(self, cfg: ClusterConfig) {
        let key = format!("{}leader", self.prefix);
        let me = cfg.node_id.to_string();
        let mut down_since: BTreeMap<u32, Instant> = BTreeMap::new();
        let mut leading = false;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let lease = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
            let Some(lease) = lease else {
                leading = false;
                self.set(|s| s.is_leader = false);
                continue;
            };
            let current = match self.etcd.get(&key).await {
                Ok(kv) => kv,
                Err(e) => {
                    self.error(&e);
                    continue;
                }
            };
            let holder = match current {
                Some(kv) => String::from_utf8_lossy(&kv.value).parse::<u32>().ok(),
                None => match self
                    .etcd
                    .create_if_absent(&key, me.as_bytes(), Some(lease))
                    .await
                {
                    Ok(true) => Some(cfg.node_id),
                    Ok(false) => None,
                    Err(e) => {
                        self.error(&e);
                        None
                    }
                },
            };
            let now_leading = holder == Some(cfg.node_id);
            if now_leading != leading {
                tracing::info!(
                    node = cfg.node_id,
                    leading = now_leading,
                    "leadership changed"
                );
                // A new leader starts its down-timers afresh (conservative for "lost").
                down_since.clear();
            }
            leading = now_leading;
            self.set(|s| {
                s.leader = holder;
                s.is_leader = leading;
            });
            if leading {
                if let Err(e) = self.lead(&cfg, &mut down_since).await {
                    self.error(&e);
                }
            }
        }
    }

    /// One leader step: read health, compute the next table, publish it by CAS.
    async fn lead(
        &self,
        cfg: &ClusterConfig,
        down_since: &mut BTreeMap<u32, Instant>,
    ) -> Result<(), Error> {
        let nodes_prefix = format!("{}nodes/", self.prefix);
        let (kvs, _) = self.etcd.get_prefix(&nodes_prefix).await?;
        let mut alive = BTreeMap::new();
        for kv in kvs {
            let Some(id) = kv.key[nodes_prefix.len()..].parse::<u32>().ok() else {
                continue;
            };
            match serde_json::from_slice::<NodeInfo>(&kv.value) {
                Ok(info) => {
                    alive.insert(id, info);
                }
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "bad node record ignored"),
            }
        }
        let table_key = format!("{}table", self.prefix);
        let Some(kv) = self.etcd.get(&table_key).await? else {
            if alive.len() >= cfg.initial_nodes as usize {
                let t = initial_table(&alive, cfg.replication, cfg.chains_max as usize);
                let v = serde_json::to_vec(&t).expect("table serializes");
                if self.etcd.put_if_mod_revision(&table_key, &v, 0).await? {
                    tracing::info!(
                        nodes = alive.len(),
                        chains = t.chains.len(),
                        "first chain table published"
                    );
                }
            }
            return Ok(());
        };
        let prev: ChainTable = serde_json::from_slice(&kv.value).map_err(|e| Error::Etcd {
            endpoint: table_key.clone(),
            reason: format!("chain table does not parse: {e}"),
        })?;
        let now = Instant::now();
        let mut lost = BTreeSet::new();
        for id in prev.nodes.keys() {
            if alive.contains_key(id) {
                down_since.remove(id);
            } else {
                let t = *down_since.entry(*id).or_insert(now);
                if now.duration_since(t) >= Duration::from_secs(cfg.node_lost_after_s.into()) {
                    lost.insert(*id);
                }
            }
        }
        let synced_prefix = format!("{}synced/", self.prefix);
        let (kvs, _) = self.etcd.get_prefix(&synced_prefix).await?;
        let mut synced = Vec::new();
        for kv in kvs {
            let mut parts = kv.key[synced_prefix.len()..].split('/');
            let (Some(Ok(chain)), Some(Ok(node))) = (
                parts.next().map(str::parse::<u32>),
                parts.next().map(str::parse::<u32>),
            ) else {
                continue;
            };
            if let Ok(s) = serde_json::from_slice::<Synced>(&kv.value) {
                synced.push((chain, node, s.chain_version));
            }
        }
        let h = Health {
            alive,
            lost,
            synced,
        };
        if let Some(next) = next_table(&prev, &h) {
            let v = serde_json::to_vec(&next).expect("table serializes");
            if self
                .etcd
                .put_if_mod_revision(&table_key, &v, kv.mod_revision)
                .await?
            {
                tracing::info!(version = next.version, "chain table published");
            }
        }
        Ok(())
    }

    /// Follow the table: a watch, with a periodic read in case a watch silently stalls.
    async fn watch_table(self, replica: Arc<Replica>) {
        let key = format!("{}table", self.prefix);
        loop {
            let rev = match self.etcd.get(&key).await {
                Ok(Some(kv)) => {
                    self.install(&replica, &kv.value);
                    kv.mod_revision + 1
                }
                Ok(None) => 0,
                Err(e) => {
                    self.error(&e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut w = match self.etcd.watch_prefix(&key, rev).await {
                Ok(w) => w,
                Err(e) => {
                    self.error(&e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
                    Ok(Ok(events)) => {
                        for ev in events {
                            if ev.kind == EventKind::Put && ev.kv.key == key {
                                self.install(&replica, &ev.kv.value);
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        self.error(&e);
                        break;
                    }
                    Err(_) => break, // quiet for 5 s: re-read and re-watch
                }
            }
        }
    }

    fn install(&self, replica: &Replica, value: &[u8]) {
        match serde_json::from_slice::<ChainTable>(value) {
            Ok(t) => {
                let v = t.version;
                replica.set_table(Arc::new(t));
                self.set(|s| s.table_version = s.table_version.max(v));
            }
            Err(e) => {
                tracing::error!(error = %e, "chain table in etcd does not parse; keeping ours")
            }
        }
    }

    /// Publishes finished resyncs for the leader.
    async fn report_synced(self, replica: Arc<Replica>) {
        let mut pending: Vec<(u32, u32, u64)> = Vec::new();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            pending.extend(replica.take_synced());
            let mut keep = Vec::new();
            for (chain, node, v) in pending.drain(..) {
                let key = format!("{}synced/{chain}/{node}", self.prefix);
                let val = serde_json::to_vec(&Synced { chain_version: v }).expect("serializes");
                if let Err(e) = self.etcd.put(&key, &val, None).await {
                    self.error(&e);
                    keep.push((chain, node, v));
                }
            }
            pending = keep;
        }
    }
}
