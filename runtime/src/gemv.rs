//! Products of a few rows (decoding) with a matrix read once, in order, with no packing (the
//! gemm crate packs the right-hand side into panels first: a second pass over 538 MB per
//! SmolLM2 token):
//!
//! - columns contiguous (`x · Wᵀ` against a weight in its `[out, in]` layout, attention's
//!   `q · Kᵀ` against the key cache): each output a dot product of two contiguous rows, the
//!   columns split across cores;
//! - rows contiguous and long (`x · W` against a weight stored `[in, out]`, as generation
//!   stores them): each core streams its range of `W`'s rows into a partial sum of its own,
//!   the partial sums added in order;
//! - rows contiguous and short (attention's `probs · V`): blocks of 16 columns in registers.
//!
//! Each output element is summed in one order fixed by the shapes and the thread count.
//! The parts run on the spinning pool ([`crate::spin`]), so both cores read.

use crate::spin;
use vlmc::kernel::MatMul;

/// Products with more rows than this go to the gemm crate.
pub const MAX_ROWS: usize = 8;

/// Products with fewer multiply-adds than this run on one thread.
const SPLIT_MIN: usize = 1 << 15;

/// Products whose right-hand rows are contiguous and at least this long (a weight stored
/// `[in, out]`) stream it row by row ([`streamed`]).
const STREAM_MIN_COLS: usize = 256;

/// Whether [`matmul`] computes `m`: 1 to [`MAX_ROWS`] rows, both operands contiguous along `k`
/// (or `b`'s rows contiguous), and a CPU with AVX2 and FMA.
pub fn applies(m: &MatMul) -> bool {
    (1..=MAX_ROWS).contains(&m.m)
        && m.k > 0
        && m.a.col == 1
        && (m.b.row == 1 || m.b.col == 1)
        && has_avx2_fma()
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[b] = a[b] · b[b]` for a matmul that [`applies`].
///
/// # Safety
/// `applies(m)` must hold and the pointers must hold the plan's buffers (checked against the
/// matmul by the backend).
pub unsafe fn matmul(m: &MatMul, ptrs: &[*mut u8], threads: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (out, a, b) = (
            ptrs[m.out] as usize,
            ptrs[m.a.buf] as usize,
            ptrs[m.b.buf] as usize,
        );
        if m.b.row != 1 && m.n >= STREAM_MIN_COLS {
            return streamed(m, ptrs, threads);
        }
        let total = m.batch * m.n;
        let work = total * m.m * m.k;
        let parts = if work >= SPLIT_MIN {
            threads.min(total)
        } else {
            1
        };
        let part = |p: usize| {
            let (lo, hi) = (total * p / parts, total * (p + 1) / parts);
            let mut c = lo;
            while c < hi {
                let (bi, j) = (c / m.n, c % m.n);
                let cols = (m.n - j).min(hi - c);
                // SAFETY: batch `bi`, columns `j..j + cols` lie inside the checked operands.
                unsafe {
                    let a = (a as *const f32).add(m.a.offset + bi * m.a.batch);
                    let b = (b as *const f32).add(m.b.offset + bi * m.b.batch + j * m.b.col);
                    let out = (out as *mut f32).add(bi * m.m * m.n + j);
                    let ldb = if m.b.row == 1 { m.b.col } else { m.b.row };
                    let o = x86::Operands {
                        a,
                        lda: m.a.row,
                        b,
                        ldb,
                        out,
                        ldo: m.n,
                        rows: m.m,
                        cols,
                    };
                    if m.b.row == 1 {
                        x86::columns(o, m.k)
                    } else {
                        x86::rows(o, m.k)
                    }
                };
                c += cols;
            }
        };
        spin::run(threads, parts, &part);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, ptrs, threads);
        unreachable!("gemv::applies is false off x86-64");
    }
}

/// `out = a · b` with `b`'s rows contiguous and long (`x · W` for a weight stored `[in, out]`):
/// `k` is split into one range per thread, each streaming its rows of `b` from start to end and
/// summing `a[r, p] · b[p, :]` over its `p` in order into its own partial sum; the partial sums
/// are then added in range order. (Splitting the columns instead would have each core read
/// pieces of every row: many short streams, which this memory system serves far slower.)
///
/// # Safety
/// As for [`matmul`], with `m.b.row != 1`.
#[cfg(target_arch = "x86_64")]
unsafe fn streamed(m: &MatMul, ptrs: &[*mut u8], threads: usize) {
    let (out, a, b) = (
        ptrs[m.out] as usize,
        ptrs[m.a.buf] as usize,
        ptrs[m.b.buf] as usize,
    );
    let size = m.m * m.n;
    let parts = if m.m * m.n * m.k >= SPLIT_MIN {
        threads.min(m.k / 16).max(1)
    } else {
        1
    };
    // Partial sums of ranges 1.. (range 0 sums into the output), in a buffer this thread keeps
    // between calls: a decode step makes ~200 of them. Each range writes its first row's
    // products (no zeroing first).
    PARTIAL.with(|partial| {
        let mut partial = partial.borrow_mut();
        if partial.len() < (parts - 1) * size {
            partial.resize((parts - 1) * size, 0.0);
        }
        let pp = partial.as_mut_ptr() as usize;
        for bi in 0..m.batch {
            let o = out as *mut f32;
            let part = |t: usize| {
                let (p0, p1) = (m.k * t / parts, m.k * (t + 1) / parts);
                let dst = if t == 0 {
                    (out as *mut f32).wrapping_add(bi * size)
                } else {
                    (pp as *mut f32).wrapping_add((t - 1) * size)
                };
                // SAFETY: rows `p0..p1` of batch `bi` lie inside the checked operands; `dst` holds
                // `size` elements that no other part writes.
                unsafe {
                    let o = x86::Operands {
                        a: (a as *const f32).add(m.a.offset + bi * m.a.batch),
                        lda: m.a.row,
                        b: (b as *const f32).add(m.b.offset + bi * m.b.batch),
                        ldb: m.b.row,
                        out: dst,
                        ldo: m.n,
                        rows: m.m,
                        cols: m.n,
                    };
                    x86::axpy_rows(o, p0, p1)
                };
            };
            spin::run(threads, parts, &part);
            let dst = std::slice::from_raw_parts_mut(o.add(bi * size), size);
            for t in 1..parts {
                for (d, s) in dst.iter_mut().zip(&partial[(t - 1) * size..t * size]) {
                    *d += s;
                }
            }
        }
    });
}

thread_local! {
    /// [`streamed`]'s partial sums.
    static PARTIAL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn streamed(_: &MatMul, _: &[*mut u8], _: usize) {
    unreachable!("gemv::applies is false off x86-64");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// One product's operands: `rows` rows of `a` (`lda` apart), the right-hand side `b`
    /// (`ldb` apart between the rows or columns that the kernel reads contiguously), and `cols`
    /// columns of `out` (rows `ldo` apart).
    #[derive(Clone, Copy)]
    pub struct Operands {
        pub a: *const f32,
        pub lda: usize,
        pub b: *const f32,
        pub ldb: usize,
        pub out: *mut f32,
        pub ldo: usize,
        pub rows: usize,
        pub cols: usize,
    }

    /// `out[r, c] = Σ_p a[r·lda + p] · w[c·ldw + p]` for `r < rows`, `c < cols`, `p < k`
    /// (`out[r, c]` at `out + r·ldo + c`). For one or two rows (bound by reading `w`): one
    /// column of `w` at a time, read once from start to end (one sequential stream is what the
    /// memory system serves fastest: 34 GB/s on one core here against 22 for four interleaved
    /// rows). For more, blocks of two columns by up to four rows.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; every address named must be readable (`a`, `w`) or
    /// writable (`out`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn columns(o: Operands, k: usize) {
        let Operands {
            a,
            lda,
            b: w,
            ldb: ldw,
            out,
            ldo,
            rows,
            cols,
        } = o;
        if rows <= 2 {
            for c in 0..cols {
                let (w, o) = (w.add(c * ldw), out.add(c));
                match rows {
                    1 => dots::<1, 4>(a, lda, w, o, ldo, k),
                    _ => dots::<2, 2>(a, lda, w, o, ldo, k),
                }
            }
            return;
        }
        // More rows make the products compute-bound: two columns at a time against up to four
        // rows, so each load of `a` feeds two multiply-adds.
        let mut c = 0;
        while c < cols {
            let pair = cols - c >= 2;
            let mut r = 0;
            while r < rows {
                let mr = (rows - r).min(4);
                let (a, w, o) = (a.add(r * lda), w.add(c * ldw), out.add(r * ldo + c));
                match (mr, pair) {
                    (4, true) => block::<4, 2>(a, lda, w, ldw, o, ldo, k),
                    (3, true) => block::<3, 2>(a, lda, w, ldw, o, ldo, k),
                    (2, true) => block::<2, 2>(a, lda, w, ldw, o, ldo, k),
                    (1, true) => block::<1, 2>(a, lda, w, ldw, o, ldo, k),
                    (4, false) => block::<4, 1>(a, lda, w, ldw, o, ldo, k),
                    (3, false) => block::<3, 1>(a, lda, w, ldw, o, ldo, k),
                    (2, false) => block::<2, 1>(a, lda, w, ldw, o, ldo, k),
                    _ => block::<1, 1>(a, lda, w, ldw, o, ldo, k),
                }
                r += mr;
            }
            c += if pair { 2 } else { 1 };
        }
    }

    /// `MR × NC` dot products of rows of `a` with `NC` rows of `w` (`ldw` apart): one
    /// accumulator of 8 lanes each over `k`, then the lanes and the last `k mod 8` terms.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const MR: usize, const NC: usize>(
        a: *const f32,
        lda: usize,
        w: *const f32,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
        k: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NC]; MR];
        let mut p = 0;
        while p + 8 <= k {
            let mut wv = [_mm256_setzero_ps(); NC];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(w.add(c * ldw + p));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(a.add(r * lda + p));
                for (c, s) in row.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(x, wv[c], *s);
                }
            }
            p += 8;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, s) in row.iter().enumerate() {
                let mut sum = hsum(*s);
                for q in p..k {
                    sum = (*a.add(r * lda + q)).mul_add(*w.add(c * ldw + q), sum);
                }
                *out.add(r * ldo + c) = sum;
            }
        }
    }

    /// `MR` dot products of rows of `a` with one row `w`: `U` accumulators of 8 lanes per row
    /// over `k` in steps of `8·U`, then steps of 8 into the first, the accumulators added
    /// pairwise, the lanes, and the last `k mod 8` terms in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots<const MR: usize, const U: usize>(
        a: *const f32,
        lda: usize,
        w: *const f32,
        out: *mut f32,
        ldo: usize,
        k: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); U]; MR];
        let step = 8 * U;
        let mut p = 0;
        while p + step <= k {
            for u in 0..U {
                let wv = _mm256_loadu_ps(w.add(p + 8 * u));
                for (r, row) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(a.add(r * lda + p + 8 * u));
                    row[u] = _mm256_fmadd_ps(x, wv, row[u]);
                }
            }
            p += step;
        }
        while p + 8 <= k {
            let wv = _mm256_loadu_ps(w.add(p));
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(r * lda + p)), wv, row[0]);
            }
            p += 8;
        }
        for (r, row) in acc.iter().enumerate() {
            let mut v = *row;
            let mut n = U;
            while n > 1 {
                for i in 0..n / 2 {
                    v[i] = _mm256_add_ps(v[2 * i], v[2 * i + 1]);
                }
                n /= 2;
            }
            let mut sum = hsum(v[0]);
            for q in p..k {
                sum = (*a.add(r * lda + q)).mul_add(*w.add(q), sum);
            }
            *out.add(r * ldo) = sum;
        }
    }

    /// `out[r, c] = Σ_p a[r·lda + p] · b[p·ldb + c]` (rows of `b` contiguous, the form of
    /// attention's `probs · V`): blocks of 16 and 8 columns held in registers over all of `k`,
    /// the last columns one at a time; each output summed over `p` in order.
    ///
    /// # Safety
    /// As for [`columns`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows(o: Operands, k: usize) {
        let Operands {
            a,
            lda,
            b,
            ldb,
            out,
            ldo,
            rows,
            cols,
        } = o;
        let mut c = 0;
        while c < cols {
            let nv = if cols - c >= 16 { 2 } else { 1 };
            let mut r = 0;
            while r < rows {
                let mr = (rows - r).min(4);
                let (a, b, o) = (a.add(r * lda), b.add(c), out.add(r * ldo + c));
                if cols - c < 8 {
                    for i in 0..mr {
                        for j in 0..cols - c {
                            let mut sum = 0f32;
                            for p in 0..k {
                                sum = (*a.add(i * lda + p)).mul_add(*b.add(p * ldb + j), sum);
                            }
                            *o.add(i * ldo + j) = sum;
                        }
                    }
                } else {
                    match (mr, nv) {
                        (1, 2) => row_tile::<1, 2>(a, lda, b, ldb, o, ldo, k),
                        (2, 2) => row_tile::<2, 2>(a, lda, b, ldb, o, ldo, k),
                        (3, 2) => row_tile::<3, 2>(a, lda, b, ldb, o, ldo, k),
                        (4, 2) => row_tile::<4, 2>(a, lda, b, ldb, o, ldo, k),
                        (1, _) => row_tile::<1, 1>(a, lda, b, ldb, o, ldo, k),
                        (2, _) => row_tile::<2, 1>(a, lda, b, ldb, o, ldo, k),
                        (3, _) => row_tile::<3, 1>(a, lda, b, ldb, o, ldo, k),
                        _ => row_tile::<4, 1>(a, lda, b, ldb, o, ldo, k),
                    }
                }
                r += mr;
            }
            c += if cols - c < 8 { cols - c } else { 8 * nv };
        }
    }

    /// One block of `MR` rows × `8·NV` columns of [`rows`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_tile<const MR: usize, const NV: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        k: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        for p in 0..k {
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(b.add(p * ldb + 8 * v));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r * lda + p));
                for (v, s) in row.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(x, bv[v], *s);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, s) in row.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * ldo + 8 * v), *s);
            }
        }
    }

    /// `out[r, :cols] = Σ_{p0 ≤ p < p1} a[r·lda + p] · b[p·ldb + :cols]` for `r < rows`, summed
    /// in order of `p` (`p1 > p0`; `out` is written, not read, at `p0`): each row of `b` read
    /// once, start to end.
    ///
    /// # Safety
    /// As for [`columns`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_rows(o: Operands, p0: usize, p1: usize) {
        let Operands {
            a,
            lda,
            b,
            ldb,
            out,
            ldo,
            rows,
            cols,
        } = o;
        let c8 = cols & !7;
        for p in p0..p1 {
            let bp = b.add(p * ldb);
            let mut j = 0;
            while j < c8 {
                let bv = _mm256_loadu_ps(bp.add(j));
                for r in 0..rows {
                    let x = _mm256_broadcast_ss(&*a.add(r * lda + p));
                    let o = out.add(r * ldo + j);
                    // (the first row's product is what an FMA into zero would round to)
                    let v = if p == p0 {
                        _mm256_mul_ps(x, bv)
                    } else {
                        _mm256_fmadd_ps(x, bv, _mm256_loadu_ps(o))
                    };
                    _mm256_storeu_ps(o, v);
                }
                j += 8;
            }
            for j in c8..cols {
                for r in 0..rows {
                    let o = out.add(r * ldo + j);
                    let x = *a.add(r * lda + p);
                    *o = if p == p0 {
                        x * *bp.add(j)
                    } else {
                        x.mul_add(*bp.add(j), *o)
                    };
                }
            }
        }
    }

    /// The sum of the 8 lanes, pairwise.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmc::kernel::Strided;

    /// Every row count up to MAX_ROWS, odd widths and depths, batches, strided rows and
    /// columns, one and two threads: against a plain f64 sum.
    #[test]
    fn matches_a_plain_sum() {
        if !has_avx2_fma() {
            return;
        }
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (batch, m, n, k) in [
            (1, 1, 1, 1),
            (1, 1, 7, 13),
            (2, 3, 9, 8),
            (3, 5, 17, 31),
            (1, 8, 33, 64),
            (1, 2, 300, 200),
            (3, 3, 64, 256),
            (1, 1, 300, 77),
            (2, 5, 263, 40),
            (2, 4, 41, 19),
            (9, 1, 70, 64),
        ] {
            // A: rows padded to k + 3; B: a square of side max(n, k) + 5 per batch, 2 apart
            let (lda, ldb) = (k + 3, n.max(k) + 5);
            let bstride = ldb * ldb + 2;
            let a: Vec<f32> = (0..batch * m * lda + 1).map(|_| next()).collect();
            let b: Vec<f32> = (0..batch * bstride + 1).map(|_| next()).collect();
            for (threads, by_rows) in [(1, false), (2, false), (1, true), (2, true)] {
                // B's columns contiguous (`x · Wᵀ`) or, read the other way, its rows (`probs · V`)
                let bs = if by_rows {
                    Strided {
                        buf: 1,
                        offset: 1,
                        batch: bstride,
                        row: ldb,
                        col: 1,
                    }
                } else {
                    Strided {
                        buf: 1,
                        offset: 1,
                        batch: bstride,
                        row: 1,
                        col: ldb,
                    }
                };
                let mm = MatMul {
                    a: Strided {
                        buf: 0,
                        offset: 1,
                        batch: m * lda,
                        row: lda,
                        col: 1,
                    },
                    b: bs,
                    out: 2,
                    batch,
                    m,
                    n,
                    k,
                };
                assert!(applies(&mm));
                // no rows: left to gemm (which writes nothing)
                assert!(!applies(&MatMul { m: 0, ..mm.clone() }));
                let mut out = vec![f32::NAN; batch * m * n];
                let ptrs = [
                    a.as_ptr() as *mut u8,
                    b.as_ptr() as *mut u8,
                    out.as_mut_ptr() as *mut u8,
                ];
                unsafe { matmul(&mm, &ptrs, threads) };
                for bi in 0..batch {
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|p| {
                                    let (row, col) = if by_rows { (p, j) } else { (j, p) };
                                    a[1 + bi * m * lda + i * lda + p] as f64
                                        * b[1 + bi * bstride + row * ldb + col] as f64
                                })
                                .sum();
                            let got = out[bi * m * n + i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{batch}x{m}x{n}x{k} threads {threads}: [{bi},{i},{j}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
