//! The `vlmc` binary on specs nested past the front end's limits and up to them: a clean error
//! with exit status 1 past them (never a stack overflow, exit 134), every command working at
//! them; `--emit ast` prints deep trees in one pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vlmc(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlmc"))
        .args(args)
        .current_dir(dir)
        .env("VLMC_CACHE_DIR", dir.join("cache"))
        .output()
        .expect("vlmc runs")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-limits-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn model(body: &str) -> String {
    format!("model M {{\n  fn forward(x: f32[B, 4]) -> f32[B, 4] {{\n    {body}\n  }}\n}}\n")
}

#[test]
fn nesting_past_the_limits_is_an_error_not_a_crash() {
    let dir = scratch("past");
    let cases = [
        (
            "parens",
            model(&format!("return {}x{}", "(".repeat(3000), ")".repeat(3000))),
            "nesting too deep",
        ),
        (
            "chain",
            model(&format!("return {}", vec!["x"; 8000].join(" + "))),
            "expression nested too deep",
        ),
        (
            "negations",
            model(&format!("return {}x", "-".repeat(50_000))),
            "expression nested too deep",
        ),
        (
            "else_if",
            model(&format!(
                "let y = x\n if false {{ y = x }}{}\n return y",
                " else if false { y = x }".repeat(3000)
            )),
            "nesting too deep",
        ),
    ];
    for (name, text, message) in cases {
        let file = format!("{name}.vlm");
        std::fs::write(dir.join(&file), text).expect("write");
        for args in [
            vec!["check", &file],
            vec!["build", &file, "--emit", "ast,ir"],
        ] {
            let out = vlmc(&dir, &args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{name} {args:?}: {stderr}");
            assert!(stderr.contains(message), "{name}: {stderr}");
            assert!(
                stderr.contains(&format!("{file}:")),
                "{name}: no location: {stderr}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_command_works_at_the_limits() {
    let dir = scratch("at");
    let depth = vlmc_grammar::MAX_EXPR_DEPTH;
    // 1999 negations of x (2000 levels with x), and a sum of 2000 terms.
    std::fs::write(
        dir.join("neg.vlm"),
        model(&format!("return {}x", "-".repeat(depth - 1))),
    )
    .expect("write");
    std::fs::write(
        dir.join("sum.vlm"),
        model(&format!("return {}", vec!["x"; depth].join(" + "))),
    )
    .expect("write");
    for file in ["neg.vlm", "sum.vlm"] {
        let out = vlmc(
            &dir,
            &[
                "build",
                file,
                "--emit",
                "ast,ir,opt,kernels",
                "--dims",
                "B=2",
                "-o",
                "out",
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file}: {stderr}");
        let ast = std::fs::read_to_string(dir.join("out/M.ast")).expect("ast");
        assert!(ast.starts_with("File {\n    items: [\n"), "{}", &ast[..80]);
        let init = vlmc(&dir, &["init", file, "-o", "w.safetensors"]);
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    // The sum runs compiled: 2000·x.
    let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 1.0).collect();
    let data: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let npy = common::npy_bytes(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }",
        &data,
    );
    std::fs::write(dir.join("x.npy"), npy).expect("npy");
    let out = vlmc(
        &dir,
        &[
            "run",
            "sum.vlm",
            "--weights",
            "w.safetensors",
            "--input",
            "x=x.npy",
            "-o",
            "y.safetensors",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("f32[2, 4] [-2000.000000, -1000.000000, 0.000000"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
