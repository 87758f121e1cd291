//! The disk cache of compiled CPU functions: a second compilation with the same cache folder
//! takes every function from the cache and computes bit for bit what an uncached compilation
//! computes (and what the interpreter computes, within 1e-4); corrupted, truncated and
//! misplaced entries are detected and recompiled; other code generation options never reuse
//! entries wrongly. Every test uses its own folder under the temporary directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use vlmc::backend::cpu::{CacheStats, CpuOptions};
use vlmc_runtime::cpu::CpuPlan;
use vlmc_runtime::Tensor;

/// A fresh, empty cache folder for one test.
fn cache_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-cpu-cache-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A model with its parameters, inputs, interpreter outputs and lowered plan.
struct Case {
    compiled: vlmc::passes::Compiled,
    params: BTreeMap<String, Tensor>,
    inputs: BTreeMap<String, Tensor>,
    want: BTreeMap<String, Tensor>,
    plan: vlmc::kernel::Plan,
}

fn case(path: &str) -> Case {
    let checked = vlmc::elab::check_file(Path::new(path));
    let text = checked.render();
    let m = checked
        .result
        .unwrap_or_else(|_| panic!("{text}"))
        .remove(0);
    let dims: HashMap<String, i64> = [("B", 2), ("T", 5), ("N", 3), ("S", 4)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let mut inputs = BTreeMap::new();
    for (k, (_, name, ty)) in m.graph.inputs().into_iter().enumerate() {
        let shape: Vec<usize> = ty
            .shape
            .0
            .iter()
            .map(|d| d.eval(&|s| dims.get(s).copied()).expect("size") as usize)
            .collect();
        let n: usize = shape.iter().product();
        let t = match ty.dtype {
            vlmc::ir::DType::Bool => Tensor::bool(shape, (0..n).map(|i| i % 3 != 0).collect()),
            vlmc::ir::DType::I32 => Tensor::i32(
                shape,
                (0..n).map(|i| ((i * 7 + k) % 7) as i32 + 1).collect(),
            ),
            _ => Tensor::f32(
                shape,
                (0..n)
                    .map(|i| (((i * 7919 + k * 31) % 1000) as f32 / 500.0) - 1.0)
                    .collect(),
            ),
        };
        inputs.insert(name.to_string(), t);
    }
    let params = vlmc_runtime::init::init_params(&m.graph, 3).expect("init");
    let want = vlmc_runtime::run(&m.graph, &inputs, &params).expect("interpreter");
    let compiled =
        vlmc::passes::compile(&m, &vlmc::passes::CompileOptions::default()).expect("compiles");
    let mem = vlmc::passes::memory::plan(&compiled.graph, &compiled.fusion, &dims);
    let plan = vlmc::kernel::lower(&compiled.graph, &compiled.fusion, &mem, &dims).expect("lowers");
    Case {
        compiled,
        params,
        inputs,
        want,
        plan,
    }
}

impl Case {
    /// Compiles the plan with `opts` and runs it: the outputs and what the cache did.
    fn run(&self, opts: &CpuOptions) -> (BTreeMap<String, Tensor>, CacheStats, usize) {
        let p = CpuPlan::new(self.plan.clone(), &self.compiled.graph, &self.params, opts)
            .expect("compiles to machine code");
        let out = p.run(&self.inputs, &self.params).expect("runs");
        (out, p.program.cache, p.program.functions)
    }
}

fn with_cache(dir: &Path) -> CpuOptions {
    CpuOptions {
        cache_dir: Some(dir.to_path_buf()),
        ..CpuOptions::default()
    }
}

/// Outputs equal bit for bit (NaNs included).
fn assert_bit_identical(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.shape, y.shape, "`{name}`");
        let bits = |t: &Tensor| -> Vec<u64> { t.to_f64().iter().map(|v| v.to_bits()).collect() };
        assert!(bits(x) == bits(y), "`{name}` differs");
    }
}

/// max |got - want| / max |want| over every output.
fn rel_err(got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) -> f64 {
    let mut worst = 0f64;
    for (name, w) in want {
        let (a, b) = (got[name].to_f64(), w.to_f64());
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
        let e = a
            .iter()
            .zip(&b)
            .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
            .fold(0f64, f64::max)
            / scale;
        worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
    }
    worst
}

#[test]
fn a_second_compilation_takes_every_function_from_the_cache() {
    for path in ["models/llava_tiny.vlm", "models/clip_tiny.vlm"] {
        let c = case(path);
        let dir = cache_dir(path.trim_start_matches("models/").trim_end_matches(".vlm"));
        let (plain, none, functions) = c.run(&CpuOptions::default());
        assert_eq!(none, CacheStats::default(), "{path}: no cache, no counts");
        assert!(functions > 20, "{path}: only {functions} functions");
        assert!(rel_err(&plain, &c.want) <= 1e-4, "{path}: vs interpreter");

        let (cold, s1, _) = c.run(&with_cache(&dir));
        assert_eq!(
            s1,
            CacheStats {
                hits: 0,
                misses: functions,
                rejected: 0
            },
            "{path}"
        );
        // One file per distinct function (the same IR twice in one plan is one entry).
        let stored = entries(&dir).len();
        assert!(
            stored <= functions && stored > functions / 2,
            "{path}: {stored} entries"
        );
        assert!(entries(&dir)
            .iter()
            .all(|p| p.extension().is_some_and(|e| e == "fn")));
        assert_bit_identical(&cold, &plain);

        let (warm, s2, _) = c.run(&with_cache(&dir));
        assert_eq!(
            s2,
            CacheStats {
                hits: functions,
                misses: 0,
                rejected: 0
            },
            "{path}"
        );
        assert_eq!(entries(&dir).len(), stored, "{path}: nothing new stored");
        assert_bit_identical(&warm, &plain);
        assert!(rel_err(&warm, &c.want) <= 1e-4, "{path}: vs interpreter");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn corrupted_truncated_and_misplaced_entries_are_recompiled() {
    let c = case("models/llava_tiny.vlm");
    let dir = cache_dir("corrupt");
    let (plain, _, functions) = c.run(&CpuOptions::default());
    let (_, s1, _) = c.run(&with_cache(&dir));
    let files = entries(&dir);
    assert_eq!(files.len(), s1.misses);
    assert!(files.len() >= 6);
    let damaged = [&files[0], &files[1], &files[2], &files[3]];
    // Truncated (a write cut short), one code byte flipped, empty, and another entry's
    // (valid) file under this key's name.
    let bytes = std::fs::read(damaged[0]).expect("read");
    std::fs::write(damaged[0], &bytes[..bytes.len() / 2]).expect("truncate");
    let mut bytes = std::fs::read(damaged[1]).expect("read");
    let mid = bytes.len() - 40;
    bytes[mid] ^= 0x01;
    std::fs::write(damaged[1], &bytes).expect("flip");
    std::fs::write(damaged[2], b"").expect("empty");
    std::fs::copy(&files[4], damaged[3]).expect("copy");

    let (out, s2, _) = c.run(&with_cache(&dir));
    assert_eq!(s2.rejected, 4, "{s2:?}");
    assert_eq!(s2.misses, 4, "{s2:?}");
    assert_eq!(s2.hits, functions - 4, "{s2:?}");
    assert_bit_identical(&out, &plain);
    assert!(rel_err(&out, &c.want) <= 1e-4);

    // The damaged entries were rewritten whole.
    let (out, s3, _) = c.run(&with_cache(&dir));
    assert_eq!(s3.hits, functions, "{s3:?}");
    assert_eq!(s3.rejected, 0);
    assert_bit_identical(&out, &plain);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn other_code_generation_options_do_not_reuse_entries_wrongly() {
    let c = case("models/llava_tiny.vlm");
    let dir = cache_dir("options");
    let (_, s, functions) = c.run(&with_cache(&dir));
    assert_eq!(s.hits + s.misses, functions);
    let vectorised = entries(&dir).len();
    for (vectorize, merge) in [(false, true), (true, false), (false, false)] {
        let opts = CpuOptions {
            vectorize,
            merge,
            ..CpuOptions::default()
        };
        let (plain, _, n) = c.run(&opts);
        let cached_opts = CpuOptions {
            cache_dir: Some(dir.clone()),
            ..opts.clone()
        };
        let before = entries(&dir).len();
        let (first, s1, _) = c.run(&cached_opts);
        // Scalar code differs from vectorised code: new entries (loop nests without a
        // vectorisable inner axis are the same function either way, and may hit).
        assert!(s1.misses > 0, "vectorize={vectorize} merge={merge}: {s1:?}");
        assert_eq!(s1.rejected, 0);
        assert_eq!(entries(&dir).len(), before + s1.misses);
        assert_bit_identical(&first, &plain);
        let (second, s2, _) = c.run(&cached_opts);
        assert_eq!(s2.hits, n, "vectorize={vectorize} merge={merge}");
        assert_bit_identical(&second, &plain);
        assert!(rel_err(&second, &c.want) <= 1e-4);
    }
    assert!(entries(&dir).len() > vectorised);
    std::fs::remove_dir_all(&dir).ok();
}
