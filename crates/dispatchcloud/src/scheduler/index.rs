//! Instance index for one scheduling pass: for each instance type, the instances of that type
//! in the pass's scan order, in segment trees summarising what the instances below each node
//! could still take (component-wise maximum of free resources, the most containers on one
//! instance, whether any is ready). "The first instance after position p that fits this
//! container and has more than c containers (or is ready)" then costs about O(log M) instead
//! of a scan over every instance, which is what makes a pass near O((N + M) log M).

use crate::node_size::InstanceResources;

/// What a leaf (one instance) offers, or what a node's subtree offers at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Offer {
    /// Free VCPUs usable by a container: -1 if none, one less once 0-VCPU containers share one.
    vcpus: i64,
    ram: i64,
    scratch: i64,
    gpus: i64,
    gpu_vram: i64,
    /// Containers on the instance (running plus placed in this pass).
    count: i64,
    ready: bool,
}

impl Offer {
    /// Offers nothing: an unusable instance, or an empty subtree.
    pub(crate) const NONE: Offer = Offer {
        vcpus: i64::MIN,
        ram: i64::MIN,
        scratch: i64::MIN,
        gpus: i64::MIN,
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
            vcpus,
            ram: free.ram,
            scratch: free.scratch,
            gpus: free.gpus,
            gpu_vram: free.gpu_vram,
            count,
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
        o.vcpus >= self.need.vcpus
            && o.ram >= self.need.ram
            && o.scratch >= self.need.scratch
            && o.gpus >= self.need.gpus
            && o.gpu_vram >= self.need.gpu_vram
            && self.more_than.is_none_or(|c| o.count > c)
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

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn set(&mut self, slot: usize, offer: Offer) {
        let mut i = self.size + slot;
        self.nodes[i] = offer;
        while i > 1 {
            i /= 2;
            self.nodes[i] = Offer::merge(&self.nodes[2 * i], &self.nodes[2 * i + 1]);
        }
    }

    /// Append a leaf; returns its slot.
    pub(crate) fn push(&mut self, offer: Offer) -> usize {
        if self.len == self.size {
            // Full: rebuild at twice the size.
            let mut leaves: Vec<Offer> = self.nodes[self.size..self.size + self.len].to_vec();
            leaves.reserve(self.size);
            let len = leaves.len();
            leaves.resize(self.size * 2, Offer::NONE);
            *self = OfferTree::with_leaves(&leaves);
            self.len = len;
        }
        let slot = self.len;
        self.len += 1;
        self.set(slot, offer);
        slot
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

    /// The tree answers exactly what a linear scan answers, on a deterministic pseudo-random
    /// set of instances and wants, including after updates and appends.
    #[test]
    fn find_first_matches_linear_scan() {
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let mut next = move |n: i64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as i64
        };
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
                assert_eq!(tree.push(o), leaves.len() - 1);
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
