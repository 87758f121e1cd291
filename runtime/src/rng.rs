//! Counter-based random numbers: element `i` of a stream with seed `s` is a pure function of
//! `(s, i)`, so any backend (and any order of evaluation) reproduces the same values.

/// A uniform number in `[0, 1)` from splitmix64 of `(seed, counter)`.
pub fn uniform01(seed: u64, counter: u64) -> f64 {
    let mut z = seed
        .wrapping_mul(1 << 32)
        .wrapping_add(counter)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A standard normal number from two uniforms (Box–Muller).
pub fn normal01(seed: u64, counter: u64) -> f64 {
    let a = uniform01(seed, 2 * counter).max(f64::MIN_POSITIVE);
    let b = uniform01(seed, 2 * counter + 1);
    (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
}

/// FNV-1a of a string: a stable 64-bit hash (parameter paths seed their own streams).
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
