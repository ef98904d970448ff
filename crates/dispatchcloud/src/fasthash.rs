//! A small, fast, non-cryptographic hasher for maps keyed by container uuids and instance ids
//! inside the dispatcher (never by untrusted input that could be chosen to collide: uuids come
//! from our own API server and cloud). The std SipHash costs ~25 ns per uuid, which is most of
//! a scheduling pass at 100 000 containers; this multiply-rotate hash costs a few.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Multiply-rotate hashing of 8-byte words (the scheme of Firefox's and rustc's FxHash).
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in chunks.by_ref() {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // Final avalanche, so low bits (bucket index) and high bits (hashbrown's tag) both
        // depend on every input bit.
        let mut h = self.hash;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

pub type FastBuild = BuildHasherDefault<FastHasher>;
pub type FastMap<K, V> = HashMap<K, V, FastBuild>;
pub type FastSet<K> = HashSet<K, FastBuild>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_uuids_spread_over_buckets() {
        let mut low_bits = HashSet::new();
        for i in 0..4096 {
            let mut h = FastHasher::default();
            h.write(format!("zzzzz-dz642-{i:015}").as_bytes());
            low_bits.insert(h.finish() & 0xfff);
        }
        // 4096 keys into 4096 buckets: a fair hash fills about 63% of them.
        assert!(low_bits.len() > 2300, "{}", low_bits.len());
        let m: FastMap<String, usize> = (0..1000).map(|i| (format!("u{i}"), i)).collect();
        assert_eq!(m["u999"], 999);
    }
}
