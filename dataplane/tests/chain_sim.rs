//! A deterministic simulation of the leader's chain policy (`next_table`) against a
//! model of what each replica holds. Random sequences of kills, restarts (new
//! incarnations), writes, finished resyncs, losses and leader steps; after every step:
//! **every serving target holds every committed write** (so a read from any serving
//! replica, and a head numbering the next version, never works from stale data), a
//! chain with a head has a holder, and the table's shape stays sane.
//!
//! The model: a write to a chain commits only if every target that takes writes
//! (serving and syncing) is alive, as in CRAQ, where the tail's ack needs them all;
//! afterwards only those targets that already held everything still do (a syncing
//! target receives the write but still misses older ones). A resync of a syncing target
//! from a serving predecessor makes it a holder and reports it for the chain version.
//! Disks survive kills: a restarted node still holds what it held.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use spool_dataplane::replica::chain::{initial_table, next_table, Health, NodeInfo};
use spool_dataplane::replica::{ChainTable, TargetState};

#[derive(Clone, Debug)]
enum Step {
    Kill(u32),
    Start(u32),
    Write(u32),
    Sync(u32),
    Lose(u32),
    Leader,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1..=5u32).prop_map(Step::Kill),
        (1..=5u32).prop_map(Step::Start),
        (0..64u32).prop_map(Step::Write),
        (0..64u32).prop_map(Step::Sync),
        (1..=5u32).prop_map(Step::Lose),
        Just(Step::Leader),
        Just(Step::Leader),
    ]
}

struct Sim {
    t: ChainTable,
    alive: BTreeSet<u32>,
    incarnation: BTreeMap<u32, u64>,
    lost: BTreeSet<u32>,
    synced: Vec<(u32, u32, u64)>,
    /// Per chain: the nodes that hold every committed write.
    holders: Vec<BTreeSet<u32>>,
    commits: usize,
}

impl Sim {
    fn new(nodes: u32, r: u8) -> Sim {
        let infos: BTreeMap<u32, NodeInfo> = (1..=nodes)
            .map(|i| {
                (
                    i,
                    NodeInfo {
                        addr: format!("n{i}"),
                        incarnation: 1,
                    },
                )
            })
            .collect();
        let t = initial_table(&infos, r, 64);
        let holders = t
            .chains
            .iter()
            .map(|c| c.targets.iter().map(|x| x.node).collect())
            .collect();
        Sim {
            t,
            alive: (1..=nodes).collect(),
            incarnation: (1..=nodes).map(|i| (i, 1)).collect(),
            lost: BTreeSet::new(),
            synced: Vec::new(),
            holders,
            commits: 0,
        }
    }

    fn health(&self) -> Health {
        Health {
            alive: self
                .alive
                .iter()
                .map(|&i| {
                    (
                        i,
                        NodeInfo {
                            addr: format!("n{i}"),
                            incarnation: self.incarnation[&i],
                        },
                    )
                })
                .collect(),
            lost: self.lost.clone(),
            synced: self.synced.clone(),
        }
    }

    fn apply(&mut self, s: &Step) {
        match *s {
            Step::Kill(n) => {
                self.alive.remove(&n);
            }
            Step::Start(n) if !self.lost.contains(&n) && !self.alive.contains(&n) => {
                self.alive.insert(n);
                *self.incarnation.get_mut(&n).unwrap() += 1;
            }
            Step::Start(_) => {}
            Step::Write(c) => {
                let Some(chain) = self.t.chains.get(c as usize % self.t.chains.len()) else {
                    return;
                };
                let Some(head) = chain.head() else { return };
                let writable: Vec<u32> = chain
                    .targets
                    .iter()
                    .filter(|x| matches!(x.state, TargetState::Serving | TargetState::Syncing))
                    .map(|x| x.node)
                    .collect();
                // The head numbers it, every writable target must store it; a dead
                // one (the table not yet changed) blocks the ack: no commit.
                if !self.alive.contains(&head) || !writable.iter().all(|n| self.alive.contains(n)) {
                    return;
                }
                let h = &mut self.holders[chain.id as usize];
                h.retain(|n| writable.contains(n));
                self.commits += 1;
            }
            Step::Sync(c) => {
                let Some(chain) = self.t.chains.get(c as usize % self.t.chains.len()) else {
                    return;
                };
                // The first syncing target copies from its serving predecessor.
                let Some(pos) = chain
                    .targets
                    .iter()
                    .position(|x| x.state == TargetState::Syncing)
                else {
                    return;
                };
                let target = chain.targets[pos].node;
                let Some(pred) = chain.targets[..pos]
                    .iter()
                    .rev()
                    .find(|x| x.state == TargetState::Serving)
                else {
                    return;
                };
                if !self.alive.contains(&pred.node) || !self.alive.contains(&target) {
                    return;
                }
                if self.holders[chain.id as usize].contains(&pred.node) {
                    self.holders[chain.id as usize].insert(target);
                    self.synced.push((chain.id, target, chain.version));
                }
            }
            Step::Lose(n) if !self.alive.contains(&n) => {
                self.lost.insert(n);
            }
            Step::Lose(_) => {}
            Step::Leader => {
                if let Some(next) = next_table(&self.t, &self.health()) {
                    assert!(next.version > self.t.version);
                    for (a, b) in self.t.chains.iter().zip(&next.chains) {
                        assert!(b.version >= a.version);
                        assert!(
                            a.targets == b.targets || b.version > a.version,
                            "chain {} changed without a version bump",
                            a.id
                        );
                    }
                    self.t = next;
                }
            }
        }
    }

    fn check(&self) {
        let r = self.t.replication as usize;
        for c in &self.t.chains {
            let h = &self.holders[c.id as usize];
            for n in c.serving() {
                assert!(
                    h.contains(&n),
                    "chain {} v{}: node {n} serves without every committed write (holders {h:?}, targets {:?})",
                    c.id,
                    c.version,
                    c.targets
                );
            }
            let nodes: BTreeSet<u32> = c.targets.iter().map(|x| x.node).collect();
            assert_eq!(
                nodes.len(),
                c.targets.len(),
                "a node twice in chain {}",
                c.id
            );
            assert!(
                c.targets.len() <= r.max(1) + 1,
                "chain {} grew: {:?}",
                c.id,
                c.targets
            );
            // Order: serving, syncing, then the rest.
            let rank = |s: TargetState| match s {
                TargetState::Serving => 0,
                TargetState::Syncing => 1,
                _ => 2,
            };
            assert!(
                c.targets
                    .windows(2)
                    .all(|w| rank(w[0].state) <= rank(w[1].state)),
                "{:?}",
                c.targets
            );
            // A chain waits for its lastsrv targets (several when they died in one
            // step): each must hold everything, since it will serve when it returns.
            for x in c.targets.iter().filter(|x| x.state == TargetState::Lastsrv) {
                assert!(
                    h.contains(&x.node),
                    "chain {}: lastsrv {} lacks writes ({h:?})",
                    c.id,
                    x.node
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn serving_targets_always_hold_every_committed_write(
        nodes in 3..=5u32,
        r in 1..=3u8,
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let mut sim = Sim::new(nodes, r);
        for s in &steps {
            let s = match s {
                Step::Kill(n) | Step::Start(n) | Step::Lose(n) if *n > nodes => continue,
                s => s,
            };
            sim.apply(s);
            sim.check();
        }
    }
}

/// Eventually, with every node back and every sync finishing, every chain serves
/// with R targets again (liveness of the policy, not only safety).
#[test]
fn after_any_storm_everything_serves_again() {
    use rand::{Rng, SeedableRng};
    for seed in 0..200u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut sim = Sim::new(5, 2);
        for _ in 0..60 {
            let s = match rng.gen_range(0..4) {
                0 => Step::Kill(rng.gen_range(1..=5)),
                1 => Step::Start(rng.gen_range(1..=5)),
                2 => Step::Write(rng.gen_range(0..64)),
                _ => Step::Leader,
            };
            sim.apply(&s);
            sim.check();
        }
        for n in 1..=5 {
            sim.apply(&Step::Start(n));
        }
        for _ in 0..20 {
            sim.apply(&Step::Leader);
            for c in 0..sim.t.chains.len() as u32 {
                sim.apply(&Step::Sync(c));
            }
            sim.check();
        }
        for c in &sim.t.chains {
            assert!(
                c.targets.iter().all(|x| x.state == TargetState::Serving),
                "seed {seed}: chain {} stuck: {:?}",
                c.id,
                c.targets
            );
        }
    }
}
