//! Figures at huge sizes: `vlmc build --emit report` and the memory plan compute exactly in
//! 128-bit integers (a product past `i64` or `u64` is right, not wrapped, saturated or 0), and
//! a figure that does not fit even there is an error that names it.

use std::collections::HashMap;
use vlmc::elab::Elaborated;
use vlmc::passes::{compile, CompileOptions};

/// A projection and a `[B, T, T]` product: FLOPs `2·B·T·64·64 + 2·B·T·T·64`.
const MODEL: &str = "model Big {
  param w: [64, 64] init zeros
  fn forward(x: f32[B, T, 64]) -> f32[B, T, T] {
    let y = x @ w
    return y @ y.T
  }
}
";

/// The model, elaborated from text (no file: parallel tests shared one and saw it removed).
fn elaborate() -> Elaborated {
    let checked = vlmc::elab::check_text(std::path::Path::new("big.vlm"), MODEL.to_string());
    let text = checked.render();
    checked
        .result
        .unwrap_or_else(|_| panic!("{text}"))
        .remove(0)
}

fn dims(b: i64, t: i64) -> HashMap<String, i64> {
    HashMap::from([("B".to_string(), b), ("T".to_string(), t)])
}

#[test]
fn the_report_at_huge_dims_has_exact_figures() {
    let m = elaborate();
    let c = compile(&m, &CompileOptions::default()).expect("compiles");
    // B·T·T = 10^21 elements: past i64 (the dimension itself) and, in bytes, past u64.
    let (b, t) = (10_000_000u128, 10_000_000u128);
    let at = dims(b as i64, t as i64);
    let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &at);
    let r = vlmc::report::report(&c.graph, &c.fusion, &mem, None, &at).expect("report");
    assert_eq!(r.params_trainable, 4096);
    assert_eq!(r.flops, 2 * b * t * 64 * 64 + 2 * b * t * t * 64);
    assert_eq!(r.flops, 128_000_819_200_000_000_000_000);
    // The values written for other kernels or returned: y (B·T·64) and the result (B·T·T),
    // live together.
    let values = 4 * (b * t * 64 + b * t * t);
    assert_eq!((r.peak_bytes, r.naive_bytes), (values, values));
    assert!(
        !mem.fits(),
        "4 * 10^21 bytes do not fit a 64-bit address space"
    );
    let text = r.text("Big", &at);
    assert!(
        text.contains("FLOPs per forward: 128.00 Z (128000819200000000000000)"),
        "{text}"
    );
    assert!(
        text.contains("planned peak 4.00 Z (4000025600000000000000) B"),
        "{text}"
    );

    // At B = T = 10^18 the element count passes even 128 bits: an error naming the figure.
    let at = dims(1_000_000_000_000_000_000, 1_000_000_000_000_000_000);
    let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &at);
    assert_eq!((mem.peak, mem.naive), (None, None));
    let err = vlmc::report::report(&c.graph, &c.fusion, &mem, None, &at).unwrap_err();
    assert!(
        err.message.starts_with("the FLOP count (at matmul ")
            && err.message.ends_with(
                "overflows 128-bit arithmetic at B=1000000000000000000, T=1000000000000000000"
            ),
        "{}",
        err.message
    );
}

#[test]
fn the_cpu_runtime_refuses_a_plan_larger_than_memory_before_lowering() {
    let m = elaborate();
    let c = compile(&m, &CompileOptions::default()).expect("compiles");
    let at = dims(100_000, 100_000);
    let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &at);
    let err = vlmc_runtime::cpu::check_plan_memory(&c.graph, &mem, &at).unwrap_err();
    // 4·B·T·64 + 4·B·T·T = 4.0256e15 bytes of activations, the 4e15-byte result copied out.
    assert!(
        err.message.starts_with(
            "the compiled plan of `Big` at B=100000,T=100000 (activations 4.0 PB, outputs \
             4.0 PB) needs 8.0 PB; "
        ),
        "{}",
        err.message
    );
    // A size that fits passes.
    let at = dims(2, 3);
    let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &at);
    vlmc_runtime::cpu::check_plan_memory(&c.graph, &mem, &at).expect("fits");
}
