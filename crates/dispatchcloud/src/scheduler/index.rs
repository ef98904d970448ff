//! Instance index for one scheduling pass. Instances of each type sit in scan order (pending
//! creates first, then real instances), and within a type in *buckets* keyed by how many
//! containers they hold, whether they are ready, and a class of free VCPUs. Each bucket is a
//! segment tree summarising what its instances could still take (component-wise maximum of
//! free resources). "The first instance after position p that fits this container and holds
//! more than c containers (or is ready)" then visits only the matching buckets, each in about
//! O(log M), instead of scanning every instance: a pass is near O((N + M) log M).
//!
//! The choice of the best instance reproduces Go's scan exactly (see `InstanceIndex::best`).

use std::cmp::Ordering;
use std::sync::Arc;

use arvados::InstanceType;

use super::plan::{PoolSnapshot, SchedConfig};
use crate::fasthash::FastMap;
use crate::node_size::InstanceResources;
use crate::worker_state::{IdleBehavior, WorkerState};

/// What a leaf (one instance) offers, or what a node's subtree offers at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Offer {
    ram: i64,
    scratch: i64,
    gpu_vram: i64,
    /// Free VCPUs usable by a container: -1 if none, one less once 0-VCPU containers share one.
    vcpus: i32,
    gpus: i32,
    /// Containers on the instance (running plus placed in this pass).
    count: i32,
    ready: bool,
}

/// Clamp to the compact fields of [`Offer`] (VCPU, GPU and container counts never come
/// near 2^31).
fn small(v: i64) -> i32 {
    v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

impl Offer {
    /// Offers nothing: an unusable instance, or an empty subtree.
    pub(crate) const NONE: Offer = Offer {
        vcpus: i32::MIN,
        ram: i64::MIN,
        scratch: i64::MIN,
        gpus: i32::MIN,
        gpu_vram: i64::MIN,
        count: -1,
        ready: false,
    };

    /// A usable instance with `free` resources left, `count` containers, `ready` or not.
    pub(crate) fn usable(free: &InstanceResources, count: i64, ready: bool) -> Offer {
        let vcpus = if free.vcpus < 1 {
            -1
        } else {
            free.vcpus - i64::from(free.shared_vcpu_used)
        };
        Offer {
            vcpus: small(vcpus),
            ram: free.ram,
            scratch: free.scratch,
            gpus: small(free.gpus),
            gpu_vram: free.gpu_vram,
            count: small(count),
            ready,
        }
    }

    fn merge(a: &Offer, b: &Offer) -> Offer {
        Offer {
            vcpus: a.vcpus.max(b.vcpus),
            ram: a.ram.max(b.ram),
            scratch: a.scratch.max(b.scratch),
            gpus: a.gpus.max(b.gpus),
            gpu_vram: a.gpu_vram.max(b.gpu_vram),
            count: a.count.max(b.count),
            ready: a.ready || b.ready,
        }
    }
}

/// What a search asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want {
    pub need: InstanceResources,
    /// Only instances with more containers than this.
    pub more_than: Option<i64>,
    /// Only ready (idle or running) instances.
    pub ready: bool,
}

impl Want {
    /// Whether a subtree offering `o` might hold a match (exact for a leaf; equivalent to
    /// `InstanceResources::accommodates` plus the count and readiness conditions).
    fn may(&self, o: &Offer) -> bool {
        i64::from(o.vcpus) >= self.need.vcpus
            && o.ram >= self.need.ram
            && o.scratch >= self.need.scratch
            && i64::from(o.gpus) >= self.need.gpus
            && o.gpu_vram >= self.need.gpu_vram
            && self.more_than.is_none_or(|c| i64::from(o.count) > c)
            && (!self.ready || o.ready)
    }
}

/// A segment tree of offers over slots `0..len`, growable at the end.
#[derive(Debug, Clone)]
pub(crate) struct OfferTree {
    size: usize,
    len: usize,
    nodes: Vec<Offer>,
}

impl OfferTree {
    pub(crate) fn with_leaves(leaves: &[Offer]) -> OfferTree {
        let size = leaves.len().next_power_of_two().max(1);
        let mut nodes = vec![Offer::NONE; 2 * size];
        nodes[size..size + leaves.len()].copy_from_slice(leaves);
        for i in (1..size).rev() {
            nodes[i] = Offer::merge(&nodes[2 * i], &nodes[2 * i + 1]);
        }
        OfferTree {
            size,
            len: leaves.len(),
            nodes,
        }
    }

    /// Set a leaf, growing the tree if `slot` is past the end.
    pub(crate) fn set(&mut self, slot: usize, offer: Offer) {
        if slot >= self.size {
            let mut leaves: Vec<Offer> = self.nodes[self.size..self.size + self.len].to_vec();
            leaves.resize((slot + 1).next_power_of_two(), Offer::NONE);
            let len = self.len;
            *self = OfferTree::with_leaves(&leaves);
            self.len = len;
        }
        self.len = self.len.max(slot + 1);
        let mut i = self.size + slot;
        self.nodes[i] = offer;
        while i > 1 {
            i /= 2;
            self.nodes[i] = Offer::merge(&self.nodes[2 * i], &self.nodes[2 * i + 1]);
        }
    }

    /// The first slot at or after `from` whose offer satisfies `want`.
    pub(crate) fn find_first(&self, from: usize, want: &Want) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        self.find(1, 0, self.size, from, want)
    }

    fn find(&self, node: usize, lo: usize, hi: usize, from: usize, want: &Want) -> Option<usize> {
        if hi <= from || !want.may(&self.nodes[node]) {
            return None;
        }
        if hi - lo == 1 {
            return Some(lo);
        }
        let mid = (lo + hi) / 2;
        self.find(2 * node, lo, mid, from, want)
            .or_else(|| self.find(2 * node + 1, mid, hi, from, want))
    }
}

/// Which bucket an instance is in: a class of its container count, readiness, and a class of
/// its free VCPUs. Leaves keep exact values, so classes only decide which trees to look in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BucketKey {
    /// `min(count, COUNT_CLASSES - 1)`.
    count: u8,
    ready: bool,
    /// 0: no VCPU (−1); 1: only shared (0); k ≥ 2: 2^(k−2) ≤ VCPUs < 2^(k−1).
    vcpus: u8,
}

const COUNT_CLASSES: u8 = 16;

impl BucketKey {
    fn of(o: &Offer) -> BucketKey {
        let vcpus = match o.vcpus {
            v if v < 0 => 0,
            0 => 1,
            v => 2 + (63 - v.leading_zeros()) as u8,
        };
        BucketKey {
            count: o.count.clamp(0, i32::from(COUNT_CLASSES - 1)) as u8,
            ready: o.ready,
            vcpus,
        }
    }

    /// Whether instances in this bucket might satisfy `want`.
    fn may(&self, want: &Want) -> bool {
        let max_vcpus: i64 = match self.vcpus {
            0 => -1,
            1 => 0,
            k => (1i64 << (k - 1)) - 1,
        };
        max_vcpus >= want.need.vcpus
            && want
                .more_than
                .is_none_or(|c| i64::from(self.count) > c || self.count == COUNT_CLASSES - 1)
            && (!want.ready || self.ready)
    }
}

/// Pending creates, or real instances, of one type: slots in scan order, bucketed.
#[derive(Default)]
struct Section {
    /// Instances by slot.
    insts: Vec<usize>,
    /// Their scan positions (ascending), for finding "after position p" without touching
    /// the instances themselves.
    positions: Vec<u64>,
    buckets: Vec<(BucketKey, OfferTree)>,
}

impl Section {
    fn first(&self, from: usize, want: &Want) -> Option<usize> {
        self.buckets
            .iter()
            .filter(|(k, _)| k.may(want))
            .filter_map(|(_, t)| t.find_first(from, want))
            .min()
    }

    /// Put `offer` at `slot` in its bucket; returns the bucket.
    fn insert(&mut self, slot: usize, offer: Offer) -> usize {
        let key = BucketKey::of(&offer);
        let b = match self.buckets.iter().position(|(k, _)| *k == key) {
            Some(b) => b,
            None => {
                self.buckets.push((key, OfferTree::with_leaves(&[])));
                self.buckets.len() - 1
            }
        };
        self.buckets[b].1.set(slot, offer);
        b
    }
}

/// What [`InstanceIndex::push`] needs to know about a new instance.
struct NewInst {
    view: Option<usize>,
    ready: bool,
    usable: bool,
    count: i64,
    free: InstanceResources,
}

/// One instance during a pass.
pub(crate) struct Inst {
    /// Index of the pool's view of this instance, if it has a cloud id (pending creates have
    /// none).
    pub view: Option<usize>,
    pub ty: usize,
    /// Position in scan order: type rank, then pending before real, then sequence.
    pos: u64,
    pending: bool,
    slot: usize,
    pub ready: bool,
    usable: bool,
    pub count: i64,
    free: InstanceResources,
    bucket: Option<usize>,
}

pub(crate) struct TypeSlots {
    it: Arc<InstanceType>,
    pub name: Arc<str>,
    rank: u64,
    pending: Section,
    real: Section,
}

fn pos(rank: u64, pending: bool, seq: u64) -> u64 {
    (rank << 40) | (u64::from(!pending) << 39) | seq
}

/// All instances of a pass, by type, in scan order.
pub(crate) struct InstanceIndex {
    pub insts: Vec<Inst>,
    pub types: Vec<TypeSlots>,
    by_name: FastMap<String, usize>,
    /// Type lookups by the `Arc` a queue entry holds (a handful: one per configured type),
    /// filled from `by_name`.
    by_ptr: Vec<(usize, Option<usize>)>,
    limit_per_instance: i64,
    next_pending_seq: u64,
}

/// Scan-order key of a type: cheapest first, then roomiest.
fn type_key_cmp(a: &InstanceType, b: &InstanceType) -> Ordering {
    a.price
        .total_cmp(&b.price)
        .then(b.vcpus.cmp(&a.vcpus))
        .then(b.ram.cmp(&a.ram))
        .then(b.scratch.cmp(&a.scratch))
}

impl InstanceIndex {
    /// Index the pool's instances. `needs` gives the resources of containers on instances;
    /// an instance running a container not in it is taken as full.
    pub fn build(
        cfg: &SchedConfig,
        pool: &PoolSnapshot,
        needs: &FastMap<&str, InstanceResources>,
    ) -> InstanceIndex {
        let mut sorted: Vec<&Arc<InstanceType>> = cfg.types.values().collect();
        sorted.sort_by(|a, b| type_key_cmp(a, b).then_with(|| a.name.cmp(&b.name)));
        let mut types = Vec::with_capacity(sorted.len());
        let mut by_name = FastMap::default();
        let mut rank = 0u64;
        for (k, it) in sorted.iter().enumerate() {
            if k > 0 && type_key_cmp(sorted[k - 1], it) != Ordering::Equal {
                rank += 1;
            }
            by_name.insert(it.name.clone(), k);
            types.push(TypeSlots {
                it: (*it).clone(),
                name: Arc::from(it.name.as_str()),
                rank,
                pending: Section::default(),
                real: Section::default(),
            });
        }
        let mut index = InstanceIndex {
            insts: Vec::with_capacity(
                pool.instances.len() + pool.create_budget.unwrap_or(64).min(1 << 16),
            ),
            types,
            by_name,
            by_ptr: Vec::new(),
            limit_per_instance: cfg.max_running_containers_per_instance as i64,
            next_pending_seq: 0,
        };

        // Scan order: type rank, then instance id (pending creates have none: first).
        let mut order: Vec<(usize, usize)> = pool
            .instances
            .iter()
            .enumerate()
            .filter_map(|(v, view)| {
                index
                    .by_name
                    .get(&view.arvados_instance_type)
                    .map(|&t| (v, t))
            })
            .collect();
        let ids_sorted = pool
            .instances
            .windows(2)
            .all(|w| w[0].instance <= w[1].instance);
        if ids_sorted {
            // Already in id order (as pools usually list them): a stable sort by type keeps it.
            order.sort_by_key(|&(_, t)| index.types[t].rank);
        } else {
            order.sort_by(|&(va, ta), &(vb, tb)| {
                index.types[ta]
                    .rank
                    .cmp(&index.types[tb].rank)
                    .then_with(|| {
                        pool.instances[va]
                            .instance
                            .cmp(&pool.instances[vb].instance)
                    })
            });
        }
        for (v, t) in order {
            let view = &pool.instances[v];
            let mut free = InstanceResources::of_type(&index.types[t].it);
            for uuid in &view.running_container_uuids {
                match needs.get(uuid.as_str()) {
                    Some(need) => free.sub(need),
                    None => {
                        // Size unknown: take the instance as full.
                        free = InstanceResources {
                            shared_vcpu_used: free.shared_vcpu_used,
                            ..Default::default()
                        };
                        break;
                    }
                }
            }
            let count = view.running_container_uuids.len() as i64;
            let limit = index.limit_per_instance;
            let usable = view.worker_state != WorkerState::Shutdown
                && view.idle_behavior == IdleBehavior::Run
                && (limit == 0 || count < limit);
            let new = NewInst {
                view: (!view.instance.is_empty()).then_some(v),
                ready: view.worker_state.is_ready(),
                usable,
                count,
                free,
            };
            index.push(t, new, false);
        }
        // Build each bucket's tree in one go rather than leaf by leaf.
        for t in 0..index.types.len() {
            for pending in [true, false] {
                index.file_section(t, pending);
            }
        }
        index
    }

    /// Put every instance of a section into its bucket (the section has no buckets yet).
    fn file_section(&mut self, t: usize, pending: bool) {
        let ts = &mut self.types[t];
        let section = if pending {
            &mut ts.pending
        } else {
            &mut ts.real
        };
        let len = section.insts.len();
        let mut leaves: Vec<(BucketKey, Vec<Offer>)> = Vec::new();
        for (slot, &i) in section.insts.iter().enumerate() {
            let inst = &mut self.insts[i];
            if !inst.usable {
                continue;
            }
            let offer = Offer::usable(&inst.free, inst.count, inst.ready);
            let key = BucketKey::of(&offer);
            let b = match leaves.iter().position(|(k, _)| *k == key) {
                Some(b) => b,
                None => {
                    leaves.push((key, vec![Offer::NONE; len]));
                    leaves.len() - 1
                }
            };
            leaves[b].1[slot] = offer;
            inst.bucket = Some(b);
        }
        section.buckets = leaves
            .into_iter()
            .map(|(k, l)| (k, OfferTree::with_leaves(&l)))
            .collect();
    }

    /// Add an instance of type `t` (its scan position and slot filled in here); `file` puts
    /// it in its bucket at once (the initial build files whole sections instead).
    fn push(&mut self, t: usize, new: NewInst, file: bool) -> usize {
        let NewInst {
            view,
            ready,
            usable,
            count,
            free,
        } = new;
        let pending = view.is_none();
        let seq = self.next_pending_seq;
        self.next_pending_seq += 1;
        let i = self.insts.len();
        let ts = &mut self.types[t];
        let section = if pending {
            &mut ts.pending
        } else {
            &mut ts.real
        };
        let slot = section.insts.len();
        section.insts.push(i);
        section.positions.push(pos(ts.rank, pending, seq));
        self.insts.push(Inst {
            view,
            ty: t,
            pos: pos(ts.rank, pending, seq),
            pending,
            slot,
            ready,
            usable,
            count,
            free,
            bucket: None,
        });
        if file {
            self.refile(i);
        }
        i
    }

    /// Move instance `i` to the bucket matching its current state.
    fn refile(&mut self, i: usize) {
        let inst = &self.insts[i];
        let ts = &mut self.types[inst.ty];
        let section = if inst.pending {
            &mut ts.pending
        } else {
            &mut ts.real
        };
        let offer = inst
            .usable
            .then(|| Offer::usable(&inst.free, inst.count, inst.ready));
        let new_key = offer.as_ref().map(BucketKey::of);
        if let Some(b) = inst.bucket {
            if Some(section.buckets[b].0) == new_key {
                if let Some(o) = offer {
                    section.buckets[b].1.set(inst.slot, o);
                }
                return;
            }
            section.buckets[b].1.set(inst.slot, Offer::NONE);
        }
        let bucket = offer.map(|o| section.insert(inst.slot, o));
        self.insts[i].bucket = bucket;
    }

    /// The index of a queue entry's instance type, if configured.
    pub fn type_of(&mut self, it: &Arc<InstanceType>) -> Option<usize> {
        let key = Arc::as_ptr(it) as usize;
        if let Some((_, t)) = self.by_ptr.iter().find(|(p, _)| *p == key) {
            return *t;
        }
        let t = self.by_name.get(&it.name).copied();
        if self.by_ptr.len() < 256 {
            self.by_ptr.push((key, t));
        }
        t
    }

    /// The indexes of a queue entry's configured instance types, into `out` (cleared first):
    /// what [`Self::best`] takes.
    pub fn types_of(&mut self, types: &[Arc<InstanceType>], out: &mut Vec<usize>) {
        out.clear();
        out.extend(types.iter().filter_map(|it| self.type_of(it)));
    }

    /// First instance of type `t` strictly after position `after` (or from the start) that
    /// satisfies `want`.
    fn first_in_type(&self, t: usize, after: Option<u64>, want: &Want) -> Option<usize> {
        let ts = &self.types[t];
        let (pending_from, real_from) = match after {
            None => (0, 0),
            Some(p) => match (p >> 40).cmp(&ts.rank) {
                Ordering::Greater => return None,
                Ordering::Less => (0, 0),
                Ordering::Equal => (
                    ts.pending.positions.partition_point(|&q| q <= p),
                    ts.real.positions.partition_point(|&q| q <= p),
                ),
            },
        };
        if let Some(s) = ts.pending.first(pending_from, want) {
            return Some(ts.pending.insts[s]);
        }
        ts.real.first(real_from, want).map(|s| ts.real.insts[s])
    }

    fn first(&self, types: &[usize], after: Option<u64>, want: &Want) -> Option<usize> {
        types
            .iter()
            .filter_map(|&t| self.first_in_type(t, after, want))
            .min_by_key(|&i| self.insts[i].pos)
    }

    /// Go's choice among the acceptable instances of the eligible `types`, in scan order: the
    /// first; replaced by a later one holding more containers, or else by a later ready one
    /// while the best is not ready. Each replacement is found with one search instead of a
    /// scan, and there are at most about twice as many as distinct container counts.
    pub fn best(&self, types: &[usize], need: &InstanceResources) -> Option<usize> {
        let any = Want {
            need: *need,
            more_than: None,
            ready: false,
        };
        let mut best = self.first(types, None, &any)?;
        loop {
            let b = &self.insts[best];
            let busier = self.first(
                types,
                Some(b.pos),
                &Want {
                    more_than: Some(b.count),
                    ..any
                },
            );
            let readier = if b.ready {
                None
            } else {
                self.first(types, Some(b.pos), &Want { ready: true, ..any })
            };
            let next = match (busier, readier) {
                (Some(x), Some(y)) => Some(if self.insts[x].pos <= self.insts[y].pos {
                    x
                } else {
                    y
                }),
                (x, y) => x.or(y),
            };
            match next {
                Some(n) => best = n,
                None => return Some(best),
            }
        }
    }

    /// Put a container on instance `i`.
    pub fn place(&mut self, i: usize, need: &InstanceResources) {
        let limit = self.limit_per_instance;
        let inst = &mut self.insts[i];
        inst.free.sub(need);
        inst.count += 1;
        if limit > 0 && inst.count >= limit {
            inst.usable = false;
        }
        self.refile(i);
    }

    /// A new pending instance of type `t` with one container on it.
    pub fn add_pending(&mut self, t: usize, need: &InstanceResources) -> usize {
        let mut free = InstanceResources::of_type(&self.types[t].it);
        free.sub(need);
        let limit = self.limit_per_instance;
        let usable = limit == 0 || 1 < limit;
        self.push(
            t,
            NewInst {
                view: None,
                ready: false,
                usable,
                count: 1,
                free,
            },
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(vcpus: i64, ram: i64) -> InstanceResources {
        InstanceResources {
            vcpus,
            ram,
            ..Default::default()
        }
    }

    /// The tree answers exactly what a linear scan answers, on random sets of instances and
    /// wants (proptest: a fixed seed, and a failure shrinks its choices towards 0), including
    /// after updates and appends.
    #[test]
    fn find_first_matches_linear_scan() {
        crate::scheduler::choices::check(64, 5000, find_first_case);
    }

    /// One case of [`find_first_matches_linear_scan`].
    fn find_first_case(choices: &mut crate::scheduler::choices::Choices<'_>) {
        let mut next = |n: i64| choices.below(n as u64) as i64;
        let mut leaves: Vec<Offer> = (0..37)
            .map(|_| {
                if next(5) == 0 {
                    Offer::NONE
                } else {
                    let mut r = res(next(9), next(64));
                    r.shared_vcpu_used = next(3) == 0;
                    Offer::usable(&r, next(4), next(2) == 0)
                }
            })
            .collect();
        let mut tree = OfferTree::with_leaves(&leaves);
        for round in 0..400 {
            if round % 7 == 0 {
                let o = Offer::usable(&res(next(9), next(64)), next(4), next(2) == 0);
                leaves.push(o);
                tree.set(leaves.len() - 1, o);
            }
            if round % 3 == 0 {
                let slot = next(leaves.len() as i64) as usize;
                let o = Offer::usable(&res(next(9), next(64)), next(4), next(2) == 0);
                leaves[slot] = o;
                tree.set(slot, o);
            }
            let want = Want {
                need: res(next(6), next(40)),
                more_than: if next(2) == 0 { Some(next(3)) } else { None },
                ready: next(2) == 0,
            };
            let from = next(leaves.len() as i64 + 2) as usize;
            let linear = (from..leaves.len()).find(|&i| want.may(&leaves[i]));
            assert_eq!(tree.find_first(from, &want), linear, "round {round}");
        }
    }

    #[test]
    fn offer_matches_accommodates_including_shared_vcpu() {
        for vcpus in 0..4 {
            for shared in [false, true] {
                for need_vcpus in 0..4 {
                    let mut free = res(vcpus, 10);
                    free.shared_vcpu_used = shared;
                    let need = res(need_vcpus, 5);
                    let want = Want {
                        need,
                        more_than: None,
                        ready: false,
                    };
                    assert_eq!(
                        want.may(&Offer::usable(&free, 0, true)),
                        free.accommodates(&need),
                        "free {vcpus} shared {shared} need {need_vcpus}"
                    );
                }
            }
        }
    }
}
