//! Allocations whose size comes from the user: parameters, inputs, activations, the compiled
//! plans' buffers, the interpreter's values and constants.
//!
//! Every such allocation goes through this module. Its size is computed with checked
//! arithmetic (a product that overflows is an error, never a wrapped or saturated number),
//! compared with the memory this machine has left, and made with a fallible allocation
//! ([`Vec::try_reserve_exact`]), so that a model too large for the machine ends in an error
//! that names the tensor and its size —
//! ``parameter `w` [100000, 100000] f32 needs 40.0 GB; this machine has 21.3 GB available`` —
//! instead of Rust's "memory allocation failed" abort or the kernel's OOM killer.
//!
//! What "available" means ([`available`]):
//! - `VLMC_MEMORY_LIMIT` (bytes, or a number with a unit: `512M`, `2GB`, `1.5GiB`) when set;
//! - on Linux, `MemAvailable + SwapFree` from `/proc/meminfo`, lowered to the room left under
//!   the process's cgroup memory limit when there is one;
//! - elsewhere a conservative 8 GiB.
//!
//! Allocations under [`UNCHECKED_BYTES`] skip the comparison (reading `/proc/meminfo` costs more
//! than they do) unless `VLMC_MEMORY_LIMIT` is set; they are still fallible.

use std::fmt;

/// An allocation that cannot be made: larger than what this machine has, a size that
/// overflows, or one the allocator refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct AllocError {
    pub message: String,
}

/// Allocations below this many bytes are not compared with the available memory (unless
/// `VLMC_MEMORY_LIMIT` is set).
pub const UNCHECKED_BYTES: u128 = 64 << 20;

/// Where the available figure comes from when nothing better is known (not Linux).
const FALLBACK_BYTES: u64 = 8 << 30;

/// The memory this process may still use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    /// Whether the figure is `VLMC_MEMORY_LIMIT`'s rather than the machine's.
    pub from_env: bool,
}

impl fmt::Display for Available {
    /// `this machine has 21.3 GB available` (or `VLMC_MEMORY_LIMIT allows 1.0 MB`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.from_env {
            write!(
                f,
                "VLMC_MEMORY_LIMIT allows {}",
                human_bytes(self.bytes.into())
            )
        } else {
            write!(
                f,
                "this machine has {} available",
                human_bytes(self.bytes.into())
            )
        }
    }
}

/// A byte count in decimal units: `512 B`, `40.0 GB`, `1.2 TB`.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 8] = ["kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut x = bytes as f64;
    for unit in UNITS {
        x /= 1000.0;
        // Rounded to one decimal, 999.95 would print as 1000.0: move on to the next unit.
        if x < 999.95 {
            return format!("{x:.1} {unit}");
        }
    }
    format!("{:.1e} B", bytes as f64)
}

/// Parses a `VLMC_MEMORY_LIMIT` value: bytes, or a number with a unit (`k`, `M`, `G`, `T`,
/// optionally followed by `B`, powers of 1000; `KiB`, `MiB`, `GiB`, `TiB`, powers of 1024).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => return None,
    };
    let bytes = num * scale;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// `VLMC_MEMORY_LIMIT`, when set to a valid size.
fn env_limit() -> Option<u64> {
    std::env::var("VLMC_MEMORY_LIMIT")
        .ok()
        .and_then(|v| parse_bytes(&v))
}

/// A field of `/proc/meminfo` in bytes (`MemAvailable:  22743448 kB`).
fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let rest = line[key.len()..].trim_start_matches(':').trim();
    let mut parts = rest.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    Some(match parts.next() {
        Some("kB") => n.saturating_mul(1024),
        _ => n,
    })
}

/// The room left under this process's cgroup memory limit (v2, then v1), if it has one.
fn cgroup_room() -> Option<u64> {
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let (limit, used) = match read("/sys/fs/cgroup/memory.max") {
        Some(l) => (l, read("/sys/fs/cgroup/memory.current")?),
        None => (
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?,
            read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?,
        ),
    };
    // "No limit" is written as `max` (v2, which does not parse) or a huge number (v1).
    (limit < 1 << 60).then(|| limit.saturating_sub(used))
}

/// The memory this process may still use: `VLMC_MEMORY_LIMIT`, else what the machine has.
pub fn available() -> Available {
    if let Some(bytes) = env_limit() {
        return Available {
            bytes,
            from_env: true,
        };
    }
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let avail = meminfo_field(&t, "MemAvailable")?;
            Some(avail.saturating_add(meminfo_field(&t, "SwapFree").unwrap_or(0)))
        })
        .unwrap_or(FALLBACK_BYTES);
    let bytes = cgroup_room().map_or(machine, |room| machine.min(room));
    Available {
        bytes,
        from_env: false,
    }
}

/// The number of elements of a shape: 0 when any dimension is 0, else the product, or `None`
/// when it overflows `usize`.
pub fn numel(shape: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The bytes of `shape` at `elem` bytes per element (`None` on overflow of `u128`).
pub fn shape_bytes(shape: &[usize], elem: usize) -> Option<u128> {
    let n = numel(shape)?;
    (n as u128).checked_mul(elem as u128)
}

/// Checks that `bytes` (`None`: a size that overflowed) fit in the memory available;
/// `what` describes the allocation (``parameter `w` [100000, 100000] f32``).
pub fn ensure(bytes: Option<u128>, what: impl FnOnce() -> String) -> Result<(), AllocError> {
    let Some(bytes) = bytes else {
        return Err(AllocError {
            message: format!(
                "{} is too large: its size in bytes overflows a 64-bit integer",
                what()
            ),
        });
    };
    let env = env_limit();
    if bytes < UNCHECKED_BYTES && env.is_none() {
        return Ok(());
    }
    let avail = available();
    if bytes > u128::from(avail.bytes) {
        return Err(AllocError {
            message: format!("{} needs {}; {avail}", what(), human_bytes(bytes)),
        });
    }
    Ok(())
}

/// [`ensure`] for the elements of `shape`, `elem` bytes each.
pub fn ensure_shape(
    shape: &[usize],
    elem: usize,
    what: impl FnOnce() -> String,
) -> Result<(), AllocError> {
    ensure(shape_bytes(shape, elem), what)
}

/// An empty vector with room for exactly `n` elements: checked against the memory available,
/// then reserved fallibly.
pub fn with_capacity<T>(n: usize, what: impl Fn() -> String) -> Result<Vec<T>, AllocError> {
    let bytes = (n as u128).checked_mul(std::mem::size_of::<T>() as u128);
    ensure(bytes, &what)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| AllocError {
        message: format!(
            "{} needs {}, and allocating it failed ({e}); {}",
            what(),
            human_bytes(bytes.unwrap_or(u128::MAX)),
            available()
        ),
    })?;
    Ok(v)
}

/// `vec![value; n]`, checked and allocated fallibly.
pub fn checked_vec<T: Clone>(
    n: usize,
    value: T,
    what: impl Fn() -> String,
) -> Result<Vec<T>, AllocError> {
    let mut v = with_capacity(n, what)?;
    v.resize(n, value);
    Ok(v)
}

/// The `n` items of `items` collected into a vector allocated once, checked and fallibly
/// (an iterator that yields more than `n` grows the vector as `extend` does).
pub fn collect<T>(
    n: usize,
    items: impl IntoIterator<Item = T>,
    what: impl Fn() -> String,
) -> Result<Vec<T>, AllocError> {
    let mut v = with_capacity(n, what)?;
    v.extend(items);
    Ok(v)
}

// Every error type of the runtime takes an allocation error as it is.
macro_rules! from_alloc {
    ($($t:ty),*) => {$(
        impl From<AllocError> for $t {
            fn from(e: AllocError) -> $t {
                Self { message: e.message }
            }
        }
    )*};
}
from_alloc!(
    crate::interp::RunError,
    crate::init::InitError,
    crate::weights::WeightError,
    crate::inputs::InputError
);

/// `[2, 3] f32`: a shape and an element type, as allocation errors name them.
pub fn describe(shape: &[usize], dtype: impl fmt::Display) -> String {
    format!("{shape:?} {dtype}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_decimal_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1000), "1.0 kB");
        assert_eq!(human_bytes(40_000_000_000), "40.0 GB");
        assert_eq!(human_bytes(999_960_000), "1.0 GB");
        assert_eq!(human_bytes(21_300_000_000), "21.3 GB");
        assert_eq!(human_bytes(4 * 10u128.pow(20)), "400.0 EB");
        assert_eq!(human_bytes(u128::MAX), "3.4e38 B");
    }

    #[test]
    fn limits_parse_with_units() {
        assert_eq!(parse_bytes("1234"), Some(1234));
        assert_eq!(parse_bytes("512M"), Some(512_000_000));
        assert_eq!(parse_bytes("2GB"), Some(2_000_000_000));
        assert_eq!(parse_bytes("1.5 GiB"), Some(1_610_612_736));
        assert_eq!(parse_bytes("1kib"), Some(1024));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("3 parsecs"), None);
        assert_eq!(parse_bytes(""), None);
    }

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text = "MemTotal:       24683584 kB\nMemAvailable:   22743448 kB\nSwapFree: 0 kB\n";
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(22743448 * 1024));
        assert_eq!(meminfo_field(text, "SwapFree"), Some(0));
        assert_eq!(meminfo_field(text, "Nope"), None);
    }

    #[test]
    fn element_counts_are_checked() {
        assert_eq!(numel(&[]), Some(1));
        assert_eq!(numel(&[2, 3]), Some(6));
        assert_eq!(numel(&[usize::MAX, 2]), None);
        // A zero anywhere makes the product zero, even after an overflowing prefix.
        assert_eq!(numel(&[usize::MAX, 2, 0]), Some(0));
        assert_eq!(
            shape_bytes(&[usize::MAX, 1], 4),
            Some(usize::MAX as u128 * 4)
        );
        assert_eq!(shape_bytes(&[usize::MAX, 2], 4), None);
    }

    #[test]
    fn an_impossible_allocation_is_an_error_not_an_abort() {
        // More than any machine has: refused before the allocator is asked.
        let err = checked_vec(usize::MAX / 8, 0f64, || "the test tensor".to_string())
            .unwrap_err()
            .message;
        assert!(err.starts_with("the test tensor needs 18.4 EB; "), "{err}");
        let err = with_capacity::<f32>(usize::MAX, || "x".into())
            .unwrap_err()
            .message;
        assert!(err.starts_with("x needs 73.8 EB; "), "{err}");
        let err = ensure(None, || "y".into()).unwrap_err().message;
        assert_eq!(
            err,
            "y is too large: its size in bytes overflows a 64-bit integer"
        );
        // Small ones are made.
        assert_eq!(checked_vec(3, 1u8, || "z".into()).unwrap(), vec![1, 1, 1]);
        assert_eq!(
            collect(2, [4, 5], || "w".into()).unwrap().capacity(),
            2,
            "allocated once"
        );
    }
}
