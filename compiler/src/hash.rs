//! FNV-1a over 128 bits: the content keys of the kernel caches and the identities in a
//! training run's fingerprint. Stable across Rust versions and machines (unlike
//! `DefaultHasher`); it tells contents apart, it does not defend against forgery.

/// An FNV-1a hash fed piece by piece.
#[derive(Clone, Copy, Debug)]
pub struct Fnv128(u128);

impl Default for Fnv128 {
    fn default() -> Self {
        Fnv128(0x6c62272e07bb014262b821756295c58d)
    }
}

impl Fnv128 {
    /// Adds `bytes`.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u128::from(b);
            self.0 = self.0.wrapping_mul(0x0000000001000000000000000000013B);
        }
    }

    pub fn finish(&self) -> u128 {
        self.0
    }
}

/// The hash of `bytes`.
pub fn fnv128(bytes: &[u8]) -> u128 {
    let mut h = Fnv128::default();
    h.write(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hash_as_their_concatenation() {
        let mut h = Fnv128::default();
        h.write(b"ab");
        h.write(b"c");
        assert_eq!(h.finish(), fnv128(b"abc"));
        assert_ne!(fnv128(b"abc"), fnv128(b"abd"));
        // The FNV-1a offset basis: the hash of nothing.
        assert_eq!(fnv128(b""), 0x6c62272e07bb014262b821756295c58d);
    }
}
