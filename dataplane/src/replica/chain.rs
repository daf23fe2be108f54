//! The chain table: which nodes hold which chunks, in what order, in what state.
//!
//! A chunk maps to a chain by a stable hash; a chain is an ordered list of targets.
//! Writes enter at the head (the first serving target) and flow through every serving
//! and syncing target in order; reads are served by serving targets. Every change to
//! a chain bumps that chain's version, and requests carry it, so a node acting on an
//! old table is refused instead of writing to the wrong replicas.
//!
//! `next_table` is the leader's whole policy, a pure function so it is unit-tested
//! and shared by the deterministic simulation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::store::ChunkId;

/// A target's public state (as in 3FS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Holds every committed write; serves reads and writes.
    Serving,
    /// Receives new writes while its predecessor copies what it missed; no reads.
    Syncing,
    /// Alive but no serving target exists to copy from.
    Waiting,
    /// Was the last serving target when it went down: it holds the newest data, so
    /// the chain waits for it.
    Lastsrv,
    /// Down.
    Offline,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub node: u32,
    pub state: TargetState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub id: u32,
    pub version: u64,
    pub targets: Vec<Target>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Transport address, "ip:port".
    pub addr: String,
    /// Random per process start. A node serves only once the table carries its
    /// current incarnation: a restarted node may have lost writes it had not yet
    /// passed on, so the leader treats a new incarnation as a return and resyncs it.
    #[serde(default)]
    pub incarnation: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainTable {
    /// Bumped on every published change.
    pub version: u64,
    pub replication: u8,
    pub nodes: BTreeMap<u32, NodeInfo>,
    pub chains: Vec<Chain>,
}

/// A chain's members that take writes, in order: serving, then syncing.
fn writable(t: &Target) -> bool {
    matches!(t.state, TargetState::Serving | TargetState::Syncing)
}

impl Chain {
    pub fn head(&self) -> Option<u32> {
        self.targets
            .first()
            .filter(|t| t.state == TargetState::Serving)
            .map(|t| t.node)
    }
    /// The last serving target: it has every committed write (CRAQ's tail for reads).
    pub fn read_tail(&self) -> Option<u32> {
        self.targets
            .iter()
            .rev()
            .find(|t| t.state == TargetState::Serving)
            .map(|t| t.node)
    }
    pub fn state_of(&self, node: u32) -> Option<TargetState> {
        self.targets
            .iter()
            .find(|t| t.node == node)
            .map(|t| t.state)
    }
    /// The next target after `node` that takes writes.
    pub fn successor(&self, node: u32) -> Option<u32> {
        let i = self.targets.iter().position(|t| t.node == node)?;
        self.targets[i + 1..]
            .iter()
            .find(|t| writable(t))
            .map(|t| t.node)
    }
    pub fn serving(&self) -> impl Iterator<Item = u32> + '_ {
        self.targets
            .iter()
            .filter(|t| t.state == TargetState::Serving)
            .map(|t| t.node)
    }
}

impl ChainTable {
    /// The chain of a chunk. A different mix from the shard hash, so a node's chunks of
    /// one chain still spread over all its shards.
    pub fn chain_of(&self, chunk: &ChunkId) -> u32 {
        chain_of(chunk, self.chains.len() as u32)
    }
    pub fn chain(&self, id: u32) -> Option<&Chain> {
        self.chains.get(id as usize)
    }
}

/// Chunks of inodes with this bit set hold the namespace (its root block, log and
/// checkpoints): they all map to one chain, so a single head orders every namespace
/// write and a chain version fences them all (see `fuse-shim`'s cluster namespace).
pub const NAMESPACE_INODE_BIT: u64 = 1 << 63;

pub fn chain_of(chunk: &ChunkId, chains: u32) -> u32 {
    if chains == 0 {
        return 0;
    }
    let (inode, index) = match chunk.inode & NAMESPACE_INODE_BIT {
        0 => (chunk.inode, chunk.index),
        _ => (NAMESPACE_INODE_BIT, 0),
    };
    let mut h = inode.wrapping_mul(0xd6e8_feb8_6659_fd93) ^ u64::from(index);
    h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 32;
    (h % u64::from(chains)) as u32
}

/// The first table for `nodes` (ids and addresses) with replication `r`: every
/// unordered R-subset of nodes, rotated so each member heads one chain, up to
/// `chains_max`. A lost node's chains then have their other members spread over
/// every peer, so its refill and its share of reads spread too.
pub fn initial_table(nodes: &BTreeMap<u32, NodeInfo>, r: u8, chains_max: usize) -> ChainTable {
    let ids: Vec<u32> = nodes.keys().copied().collect();
    let r = (r as usize).clamp(1, ids.len().max(1));
    let mut sets: Vec<Vec<u32>> = Vec::new();
    combinations(&ids, r, &mut Vec::new(), 0, &mut sets);
    let mut chains = Vec::new();
    'outer: for rot in 0..r {
        for s in &sets {
            if chains.len() >= chains_max {
                break 'outer;
            }
            let mut t = s.clone();
            t.rotate_left(rot);
            chains.push(Chain {
                id: chains.len() as u32,
                version: 1,
                targets: t
                    .into_iter()
                    .map(|node| Target {
                        node,
                        state: TargetState::Serving,
                    })
                    .collect(),
            });
        }
    }
    ChainTable {
        version: 1,
        replication: r as u8,
        nodes: nodes.clone(),
        chains,
    }
}

fn combinations(ids: &[u32], r: usize, cur: &mut Vec<u32>, from: usize, out: &mut Vec<Vec<u32>>) {
    if cur.len() == r {
        out.push(cur.clone());
        return;
    }
    for i in from..ids.len() {
        cur.push(ids[i]);
        combinations(ids, r, cur, i + 1, out);
        cur.pop();
    }
}

/// What the leader knows when it recomputes the table.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Nodes holding a live lease, with their addresses.
    pub alive: BTreeMap<u32, NodeInfo>,
    /// Nodes gone longer than `node_lost_after_s`: their targets are replaced.
    pub lost: BTreeSet<u32>,
    /// (chain, node, chain version) a predecessor reported fully synced.
    pub synced: Vec<(u32, u32, u64)>,
}

/// The leader's policy: the table that follows `prev` given `h`, or `None` when
/// nothing changes. Per chain: dead targets go offline and to the end (the last
/// serving one becomes lastsrv instead: it has the newest data); returning targets
/// sync from a serving one, or wait when there is none (or serve again, if they were
/// lastsrv); synced targets serve; lost targets are replaced by the least-loaded
/// alive node outside the chain, which then syncs (refill).
pub fn next_table(prev: &ChainTable, h: &Health) -> Option<ChainTable> {
    use TargetState::*;
    let mut t = prev.clone();
    // A node back with a new incarnation restarted, perhaps before its lease ran
    // out: it counts as having died and returned.
    let restarted: BTreeSet<u32> = h
        .alive
        .iter()
        .filter(|(id, info)| {
            prev.nodes
                .get(id)
                .is_some_and(|p| p.incarnation != info.incarnation)
        })
        .map(|(id, _)| *id)
        .collect();
    for (id, info) in &h.alive {
        t.nodes.insert(*id, info.clone());
    }
    let mut load: BTreeMap<u32, usize> = h.alive.keys().map(|n| (*n, 0)).collect();
    for c in &t.chains {
        for x in &c.targets {
            if let Some(l) = load.get_mut(&x.node) {
                *l += 1;
            }
        }
    }
    for c in &mut t.chains {
        let before = c.targets.clone();
        let alive = |n: u32| h.alive.contains_key(&n);
        // Syncs that finished at this chain version, first: a synced target holds
        // every committed write, so it counts as serving when deaths are judged below
        // (judged the other way round, a dead serving target would be kept as
        // lastsrv although writes go on without it; found by tests/chain_sim.rs).
        for x in &mut c.targets {
            if x.state == Syncing && h.synced.contains(&(c.id, x.node, c.version)) {
                x.state = Serving;
            }
        }
        // Deaths (and restarts, which hide one).
        let up = |n: u32| alive(n) && !restarted.contains(&n);
        let serving_up = c
            .targets
            .iter()
            .filter(|x| x.state == Serving && up(x.node))
            .count();
        for x in &mut c.targets {
            if !up(x.node) {
                x.state = match x.state {
                    Serving if serving_up == 0 => Lastsrv,
                    Lastsrv if serving_up == 0 => Lastsrv,
                    _ => Offline,
                };
            }
        }
        // A lastsrv that is back serves again, but only one: several may return
        // together (a whole-cluster restart) and they can differ in writes that were
        // never acknowledged; the others resync from it.
        if let Some(first) = c
            .targets
            .iter()
            .position(|x| x.state == Lastsrv && alive(x.node))
        {
            for (k, x) in c.targets.iter_mut().enumerate() {
                if x.state == Lastsrv {
                    x.state = if k == first { Serving } else { Offline };
                }
            }
        }
        let has_serving = c.targets.iter().any(|x| x.state == Serving);
        // Returns.
        for x in &mut c.targets {
            if alive(x.node) && matches!(x.state, Offline | Waiting) {
                x.state = if has_serving { Syncing } else { Waiting };
            }
        }
        // Losses: drop targets of lost nodes, refill up to R from the least loaded.
        c.targets
            .retain(|x| !h.lost.contains(&x.node) || x.state == Lastsrv);
        while c.targets.len() < t.replication as usize {
            let cand = load
                .iter()
                .filter(|(n, _)| !c.targets.iter().any(|x| x.node == **n) && !h.lost.contains(n))
                .min_by_key(|(n, l)| (**l, **n))
                .map(|(n, _)| *n);
            let Some(n) = cand else { break };
            *load.get_mut(&n).expect("candidate") += 1;
            c.targets.push(Target {
                node: n,
                state: if has_serving { Syncing } else { Waiting },
            });
        }
        // Order: serving, syncing, waiting/lastsrv, offline (stable within a class).
        c.targets.sort_by_key(|x| match x.state {
            Serving => 0,
            Syncing => 1,
            Waiting | Lastsrv => 2,
            Offline => 3,
        });
        // A restarted member lost its in-flight state: requests stamped with the old
        // chain version must be refused even when the targets look the same.
        if c.targets != before || c.targets.iter().any(|x| restarted.contains(&x.node)) {
            c.version += 1;
        }
    }
    if t.chains == prev.chains && t.nodes == prev.nodes {
        return None;
    }
    t.version = prev.version + 1;
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use TargetState::*;

    fn nodes(n: u32) -> BTreeMap<u32, NodeInfo> {
        (1..=n)
            .map(|i| {
                (
                    i,
                    NodeInfo {
                        addr: format!("10.0.0.{i}:7420"),
                        incarnation: 0,
                    },
                )
            })
            .collect()
    }

    fn health(alive: &[u32]) -> Health {
        Health {
            alive: nodes(5)
                .into_iter()
                .filter(|(k, _)| alive.contains(k))
                .collect(),
            ..Health::default()
        }
    }

    #[test]
    fn initial_chains_balance_heads_and_peers() {
        let t = initial_table(&nodes(5), 3, 256);
        assert_eq!(t.chains.len(), 30); // C(5,3) x 3 rotations
        let mut heads = BTreeMap::new();
        for c in &t.chains {
            *heads.entry(c.head().unwrap()).or_insert(0) += 1;
            assert_eq!(c.targets.len(), 3);
        }
        assert!(heads.values().all(|&h| h == 6), "{heads:?}");
        // Node 1's chains include every other node.
        let peers: BTreeSet<u32> = t
            .chains
            .iter()
            .filter(|c| c.state_of(1).is_some())
            .flat_map(|c| c.targets.iter().map(|x| x.node))
            .collect();
        assert_eq!(peers.len(), 5);
    }

    #[test]
    fn death_moves_to_end_and_return_syncs_then_serves() {
        let t0 = initial_table(&nodes(3), 2, 64);
        let t1 = next_table(&t0, &health(&[2, 3])).unwrap();
        for (a, b) in t0.chains.iter().zip(&t1.chains) {
            if a.state_of(1).is_some() {
                assert_eq!(b.version, a.version + 1);
                assert_eq!(
                    b.targets.last().unwrap(),
                    &Target {
                        node: 1,
                        state: Offline
                    }
                );
                assert_eq!(b.head().map(|h| h != 1), Some(true));
            } else {
                assert_eq!(a, b, "untouched chains keep their version");
            }
        }
        assert_eq!(next_table(&t1, &health(&[2, 3])), None, "stable");
        let t2 = next_table(&t1, &health(&[1, 2, 3])).unwrap();
        let c = t2.chains.iter().find(|c| c.state_of(1).is_some()).unwrap();
        assert_eq!(c.state_of(1), Some(Syncing));
        assert_eq!(
            c.targets.last().unwrap().node,
            1,
            "syncing target enters as tail"
        );
        let mut h = health(&[1, 2, 3]);
        h.synced = t2
            .chains
            .iter()
            .filter(|c| c.state_of(1) == Some(Syncing))
            .map(|c| (c.id, 1, c.version))
            .collect();
        let t3 = next_table(&t2, &h).unwrap();
        assert!(t3
            .chains
            .iter()
            .all(|c| c.targets.iter().all(|x| x.state == Serving)));
        // A report for an older chain version is ignored.
        let mut h = health(&[1, 2, 3]);
        h.synced = vec![(c.id, 1, c.version - 1)];
        assert!(next_table(&t2, &h).is_none());
    }

    #[test]
    fn last_serving_target_is_waited_for() {
        let t0 = initial_table(&nodes(2), 2, 64);
        let t1 = next_table(&t0, &health(&[2])).unwrap();
        let t2 = next_table(&t1, &health(&[])).unwrap();
        for c in &t2.chains {
            assert_eq!(c.state_of(2), Some(Lastsrv), "{c:?}");
            assert_eq!(c.head(), None);
        }
        // Node 1 (stale) returns first: it waits, it does not serve.
        let t3 = next_table(&t2, &health(&[1])).unwrap();
        for c in &t3.chains {
            assert_eq!(c.state_of(1), Some(Waiting));
            assert_eq!(c.head(), None);
        }
        let t4 = next_table(&t3, &health(&[1, 2])).unwrap();
        for c in &t4.chains {
            assert_eq!((c.head(), c.state_of(1)), (Some(2), Some(Syncing)));
        }
    }

    #[test]
    fn lost_node_is_replaced_and_refilled_from_spread_peers() {
        let t0 = initial_table(&nodes(5), 2, 256);
        let t1 = next_table(&t0, &health(&[2, 3, 4, 5])).unwrap();
        let mut h = health(&[2, 3, 4, 5]);
        h.lost.insert(1);
        let t2 = next_table(&t1, &h).unwrap();
        let mut new_members = BTreeMap::new();
        for (a, b) in t1.chains.iter().zip(&t2.chains) {
            assert!(b.state_of(1).is_none());
            assert_eq!(b.targets.len(), 2);
            if a.state_of(1).is_some() {
                let n = b.targets.iter().find(|x| x.state == Syncing).unwrap().node;
                *new_members.entry(n).or_insert(0) += 1;
            }
        }
        assert!(new_members.len() >= 3, "refill spreads: {new_members:?}");
    }

    #[test]
    fn a_quick_restart_is_a_return_and_resyncs() {
        let t0 = initial_table(&nodes(3), 3, 64);
        let mut h = health(&[1, 2, 3]);
        h.alive.get_mut(&2).unwrap().incarnation = 7;
        let t1 = next_table(&t0, &h).unwrap();
        assert_eq!(t1.nodes[&2].incarnation, 7);
        for c in &t1.chains {
            assert_eq!(c.state_of(2), Some(Syncing), "{c:?}");
            assert_ne!(c.head(), Some(2));
        }
        assert_eq!(next_table(&t1, &h), None, "stable once recorded");
        // Alone in its chains, a restarted node has the newest data: it serves.
        let t0 = initial_table(&nodes(1), 1, 8);
        let mut h = health(&[1]);
        h.alive.get_mut(&1).unwrap().incarnation = 9;
        let t1 = next_table(&t0, &h).unwrap();
        assert!(t1.chains.iter().all(|c| c.state_of(1) == Some(Serving)));
    }

    #[test]
    fn of_several_members_restarted_together_only_one_serves() {
        let t0 = initial_table(&nodes(3), 3, 64);
        let mut h = health(&[1, 2, 3]);
        for n in [1, 2, 3] {
            h.alive.get_mut(&n).unwrap().incarnation = 5;
        }
        let t1 = next_table(&t0, &h).unwrap();
        for (a, c) in t0.chains.iter().zip(&t1.chains) {
            assert_eq!(c.serving().count(), 1, "{c:?}");
            assert!(
                c.targets
                    .iter()
                    .all(|x| matches!(x.state, Serving | Syncing)),
                "{c:?}"
            );
            assert!(c.version > a.version);
        }
        // Two lastsrv back in one step: one serves, the other syncs.
        let t0 = initial_table(&nodes(2), 2, 64);
        let t1 = next_table(&t0, &health(&[])).unwrap();
        assert!(t1
            .chains
            .iter()
            .all(|c| c.targets.iter().all(|x| x.state == Lastsrv)));
        let t2 = next_table(&t1, &health(&[1, 2])).unwrap();
        for c in &t2.chains {
            assert_eq!(c.serving().count(), 1, "{c:?}");
            assert_eq!(
                c.targets.iter().filter(|x| x.state == Syncing).count(),
                1,
                "{c:?}"
            );
        }
    }

    #[test]
    fn chain_of_spreads_chunks() {
        let mut counts = vec![0; 20];
        for inode in 0..200 {
            for index in 0..10 {
                counts[chain_of(&ChunkId { inode, index }, 20) as usize] += 1;
            }
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }
}
