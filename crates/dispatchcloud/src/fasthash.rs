//! Fast, non-cryptographic hashing for maps keyed by container uuids and instance ids inside
//! the dispatcher (never by untrusted input that could be chosen to collide: uuids come from
//! our own API server and cloud). The std SipHash costs ~25 ns per uuid, which is most of a
//! scheduling pass at 100 000 containers; FxHash (the `rustc-hash` crate) costs a few.

use std::collections::{HashMap, HashSet};

/// The hasher builder of [`FastMap`] and [`FastSet`].
pub type FastBuild = rustc_hash::FxBuildHasher;
/// A `HashMap` with [`FastBuild`].
pub type FastMap<K, V> = HashMap<K, V, FastBuild>;
/// A `HashSet` with [`FastBuild`].
pub type FastSet<K> = HashSet<K, FastBuild>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn distinct_uuids_spread_over_buckets() {
        let mut low_bits = HashSet::new();
        for i in 0..4096 {
            let h = FastBuild::default().hash_one(format!("zzzzz-dz642-{i:015}"));
            low_bits.insert(h & 0xfff);
        }
        // 4096 keys into 4096 buckets: a fair hash fills about 63% of them.
        assert!(low_bits.len() > 2300, "{}", low_bits.len());
        let m: FastMap<String, usize> = (0..1000).map(|i| (format!("u{i}"), i)).collect();
        assert_eq!(m["u999"], 999);
    }
}
