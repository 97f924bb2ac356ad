//! Scores of one request shape on every busy node, kept current from the pool's change log, with
//! the best node of each model group at hand.
//!
//! A decision used to scan every busy node (reusing the scores of those that had not changed), so
//! it cost O(busy nodes): about 100 µs at 100,000 nodes a quarter full, and more as the pool
//! filled. Here each shape keeps, per model group, a tournament tree over the group's nodes whose
//! root is the best (highest score, then earliest in tie order) feasible busy node. A decision
//! reads the nodes changed since the shape was last placed from [`Cluster::changes_since`],
//! re-scores those alone and fixes their paths to the root (O(changed × log n)), then takes each
//! group's root. Conditions a shape's scores leave out (node memory, the allowed models) are
//! checked on the way down: a rejected best costs O(log n) more.
//!
//! Idle nodes are not in the trees: identical idle nodes score the same, and the engine looks at
//! the first of each hardware class.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand_chacha::ChaCha8Rng;

use crate::cluster::{Cluster, NodeId};
use crate::policy::{DevicePick, PlacementPolicy, Resolved, Scored};

/// No node (an empty leaf, or a subtree with no feasible busy node).
const NONE: u32 = u32::MAX;

/// A node's score for one shape at one version of the node (flat, so that it takes 16 bytes).
#[derive(Clone, Copy)]
struct Entry {
    score: i64,
    /// Node version + 1; 0 marks an empty entry.
    version: u32,
    /// `None` when the shape does not fit the node.
    pick: Option<DevicePick>,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 16);

impl Entry {
    fn scored(&self) -> Option<Scored> {
        self.pick.map(|pick| Scored {
            score: self.score,
            pick,
        })
    }
}

/// One slot of a tree: the best node below it, and the most free memory of any node below it
/// (in whole MiB, rounded down), so that a search for a request's memory skips whole subtrees.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Slot {
    node: u32,
    memory_mib: u32,
}

const EMPTY: Slot = Slot {
    node: NONE,
    memory_mib: 0,
};

/// Memory one cached shape takes per node of the pool: its entry and its two tree slots.
pub(crate) const BYTES_PER_NODE: usize =
    std::mem::size_of::<Entry>() + 2 * std::mem::size_of::<Slot>();

/// One request shape's scores.
pub(crate) struct ShapeScores {
    entries: Vec<Entry>,
    /// Per model group of `m` nodes: a tree of `2m` slots, `tree[m + pos]` the leaf of the
    /// group's node at `pos`, `tree[k]` (k < m) the better of `tree[2k]` and `tree[2k + 1]`, so
    /// `tree[1]` covers the group.
    trees: Vec<Vec<Slot>>,
    /// Change-log position absorbed so far; `None` before the first build.
    synced: Option<u64>,
    /// When this shape was last used, for evicting the least recently used one.
    pub last_used: u64,
}

/// What scoring needs: the policy, the shape as it is scored, and the policy's randomness.
pub(crate) struct Scorer<'a> {
    pub policy: &'a dyn PlacementPolicy,
    pub shape: &'a Resolved<'a>,
    pub rng: &'a mut ChaCha8Rng,
}

impl ShapeScores {
    pub fn new(cluster: &Cluster) -> Self {
        ShapeScores {
            entries: vec![
                Entry {
                    score: 0,
                    version: 0,
                    pick: None
                };
                cluster.len()
            ],
            trees: cluster
                .model_groups()
                .iter()
                .map(|g| vec![EMPTY; 2 * g.nodes.len()])
                .collect(),
            synced: None,
            last_used: 0,
        }
    }

    /// Node `i`'s score for this shape as the node is now (scored afresh only if it changed).
    pub fn scored(&mut self, cluster: &Cluster, i: u32, scorer: &mut Scorer) -> Option<Scored> {
        let node = &cluster.nodes()[i as usize];
        let entry = &mut self.entries[i as usize];
        let version = node.version.wrapping_add(1);
        if entry.version != version {
            let scored = crate::place::evaluate(scorer.policy, node, scorer.shape, scorer.rng);
            *entry = Entry {
                score: scored.map_or(0, |s| s.score),
                version,
                pick: scored.map(|s| s.pick),
            };
        }
        entry.scored()
    }

    /// Brings the trees up to the pool as it is: the changed nodes only, or every busy node when
    /// this shape is new, further behind than the log reaches, or behind by more changes than
    /// rebuilding costs (a policy's view of a model moved: all its nodes changed at once).
    pub fn sync(&mut self, cluster: &Cluster, scorer: &mut Scorer) {
        let changed = self.synced.and_then(|at| cluster.changes_since(at));
        match changed {
            Some(changed) if changed.len() <= cluster.touched().len().max(64) / 4 => {
                for &i in changed {
                    let leaf = self.leaf(cluster, i, scorer);
                    let (g, pos) = cluster.group_of(i);
                    self.set(cluster, g as usize, pos as usize, leaf);
                }
            }
            _ => self.rebuild(cluster, scorer),
        }
        self.synced = Some(cluster.change_head());
    }

    /// Fills every tree afresh from the busy nodes (idle ones are never in a tree).
    fn rebuild(&mut self, cluster: &Cluster, scorer: &mut Scorer) {
        for tree in &mut self.trees {
            tree.fill(EMPTY);
        }
        for &i in cluster.touched() {
            let leaf = self.leaf(cluster, i, scorer);
            let (g, pos) = cluster.group_of(i);
            let tree = &mut self.trees[g as usize];
            let size = tree.len() / 2;
            tree[size + pos as usize] = leaf;
        }
        for g in 0..self.trees.len() {
            let size = self.trees[g].len() / 2;
            for k in (1..size).rev() {
                self.trees[g][k] = self.better(cluster, g, 2 * k, 2 * k + 1);
            }
        }
    }

    /// The best node of group `g` with `memory` bytes free that `accept` takes, by score and
    /// then tie order.
    pub fn best(
        &self,
        cluster: &Cluster,
        g: usize,
        memory: u64,
        accept: impl Fn(u32) -> bool,
    ) -> Option<u32> {
        let tree = &self.trees[g];
        let size = tree.len() / 2;
        // A node with `memory` free has at least this many whole MiB free.
        let need = mib(memory);
        let root = *tree.get(1)?;
        if root.node == NONE || root.memory_mib < need {
            return None;
        }
        if accept(root.node) {
            return Some(root.node);
        }
        // Subtrees in order of their best node; a subtree whose best is refused is split, and
        // one without the memory is never entered.
        let key = |i: u32| (self.score(i), Reverse(cluster.tie_rank(NodeId(i))));
        let mut heap = BinaryHeap::new();
        heap.push((key(root.node), 1usize));
        while let Some((_, k)) = heap.pop() {
            let i = tree[k].node;
            if k != 1 && accept(i) {
                return Some(i);
            }
            if k < size {
                for child in [2 * k, 2 * k + 1] {
                    let slot = tree[child];
                    if slot.node != NONE && slot.memory_mib >= need {
                        heap.push((key(slot.node), child));
                    }
                }
            }
        }
        None
    }

    /// The tree leaf for node `i`: the node when it is busy and the shape fits it, else empty.
    fn leaf(&mut self, cluster: &Cluster, i: u32, scorer: &mut Scorer) -> Slot {
        if !cluster.is_touched(i) || !crate::place::quick_fit(cluster, i, scorer.shape) {
            return EMPTY;
        }
        match self.scored(cluster, i, scorer) {
            Some(_) => Slot {
                node: i,
                memory_mib: mib(cluster.summary(NodeId(i)).memory_free),
            },
            None => EMPTY,
        }
    }

    /// Sets one leaf and fixes its path to the root.
    fn set(&mut self, cluster: &Cluster, g: usize, pos: usize, leaf: Slot) {
        let size = self.trees[g].len() / 2;
        let mut k = size + pos;
        self.trees[g][k] = leaf;
        while k > 1 {
            k /= 2;
            // No early stop when a slot keeps its node: that node's score may have moved.
            self.trees[g][k] = self.better(cluster, g, 2 * k, 2 * k + 1);
        }
    }

    /// Two slots combined: the better node (higher score, then earlier in tie order) and the
    /// more memory.
    fn better(&self, cluster: &Cluster, g: usize, a: usize, b: usize) -> Slot {
        let (a, b) = (self.trees[g][a], self.trees[g][b]);
        let memory_mib = a.memory_mib.max(b.memory_mib);
        let node = if a.node == NONE {
            b.node
        } else if b.node == NONE {
            a.node
        } else {
            let (sa, sb) = (self.score(a.node), self.score(b.node));
            let earlier = cluster.tie_rank(NodeId(a.node)) < cluster.tie_rank(NodeId(b.node));
            if sa > sb || (sa == sb && earlier) {
                a.node
            } else {
                b.node
            }
        };
        Slot { node, memory_mib }
    }

    /// The cached score of a node in a tree (every node in a tree has one).
    fn score(&self, i: u32) -> i64 {
        self.entries[i as usize].score
    }
}

/// Whole MiB in `bytes`, rounded down (and capped: 4 PiB is more than any node has).
fn mib(bytes: u64) -> u32 {
    u32::try_from(bytes >> 20).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::cluster::{Allocation, Cluster, NodeId};
    use crate::model::{DeviceSpec, GIB, NodeSpec};
    use crate::place::{Placer, evaluate};
    use crate::policy::{PolicyKind, Resolved};
    use crate::request::{GpuRequest, ResourceRequest};
    use crate::shapes::ShapeDistribution;

    /// A node of 0-4 devices of model A, B, or both (half each), with its CPU and memory.
    fn node_strategy() -> impl Strategy<Value = NodeSpec> {
        (
            prop::sample::select(vec![4u64, 8, 16]),
            prop::sample::select(vec![6u64, 8, 12, 32]),
            0usize..=4,
            0u8..3,
        )
            .prop_map(|(cpus, mem, devices, kind)| {
                let device = |model: &str| DeviceSpec {
                    class: Default::default(),
                    model: model.into(),
                    memory_bytes: 40 * GIB,
                };
                let mut spec = NodeSpec::with_devices("n", cpus * 1000, mem * GIB, 0, device("A"));
                spec.devices = (0..devices)
                    .map(|d| match kind {
                        0 => device("A"),
                        1 => device("B"),
                        _ => device(if d % 2 == 0 { "A" } else { "B" }),
                    })
                    .collect();
                spec
            })
    }

    fn request_strategy() -> impl Strategy<Value = ResourceRequest> {
        (
            prop_oneof![
                Just(GpuRequest::None),
                prop::sample::select(vec![250u32, 500, 700])
                    .prop_map(|milli| GpuRequest::Share { milli }),
                (1u32..=2).prop_map(|devices| GpuRequest::Whole { devices }),
            ],
            1u64..=6,
            prop::sample::select(vec![1u64, 2, 6, 20]),
            prop::sample::select(vec![vec![], vec!["A"], vec!["B"], vec!["A", "B"]]),
        )
            .prop_map(|(gpu, cpus, mem, models)| ResourceRequest {
                device_models: if gpu == GpuRequest::None {
                    Vec::new()
                } else {
                    models.into_iter().map(str::to_owned).collect()
                },
                gpu,
                cpu_milli: cpus * 1000,
                memory_bytes: mem * GIB,
                ..Default::default()
            })
    }

    /// The node every node's fresh score picks: the highest score, then the earliest in tie
    /// order. No cache, no tree, no idle classes.
    fn best_by_scoring_every_node(placer: &mut Placer, request: &ResourceRequest) -> Option<u32> {
        let (cluster, policy, rng) = placer.parts();
        let resolved = Resolved::new(request, cluster);
        let mut best: Option<(i64, u32, u32)> = None;
        for node in cluster.nodes() {
            if let Some(s) = evaluate(policy, node, &resolved, rng) {
                let rank = cluster.tie_rank(node.id);
                if best.is_none_or(|(bs, br, _)| s.score > bs || (s.score == bs && rank < br)) {
                    best = Some((s.score, rank, node.id.0));
                }
            }
        }
        best.map(|(_, _, i)| i)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever was placed and released before, on pools of single- and mixed-model nodes,
        /// with pinned, memory-bound and CPU-only requests, the cached scores and their trees
        /// choose the node that scoring every node afresh chooses, for every cacheable policy.
        #[test]
        fn the_cache_chooses_what_scoring_every_node_chooses(
            mut nodes in prop::collection::vec(node_strategy(), 1..10),
            ops in prop::collection::vec((request_strategy(), any::<bool>(), any::<prop::sample::Index>()), 1..120),
            policy in prop::sample::select(PolicyKind::ALL.iter().copied().filter(|p| *p != PolicyKind::Random).collect::<Vec<_>>()),
            tie in any::<u64>(),
        ) {
            for (i, n) in nodes.iter_mut().enumerate() {
                n.name = format!("n{i}");
            }
            let mut cluster = Cluster::new(nodes).unwrap();
            let n = cluster.len() as u64;
            let order: Vec<NodeId> = (0..n).map(|i| NodeId(((i + tie) % n) as u32)).collect();
            cluster.set_tie_order(&order).unwrap();
            let history = ShapeDistribution::typical(ops.iter().map(|(r, _, _)| r), 1.0);
            let built = policy.build(&history, &cluster);
            let mut placer = Placer::new(cluster, built, 7);
            let mut live: Vec<Allocation> = Vec::new();
            for (request, release, which) in &ops {
                if *release && !live.is_empty() {
                    let alloc = live.swap_remove(which.index(live.len()));
                    placer.release(&alloc).unwrap();
                    continue;
                }
                let chosen = placer.choose_for_test(request);
                let expected = best_by_scoring_every_node(&mut placer, request);
                prop_assert_eq!(chosen, expected, "{:?}", request);
                if let Some(alloc) = placer.place_replica(request) {
                    live.push(alloc);
                }
            }
        }
    }
}
