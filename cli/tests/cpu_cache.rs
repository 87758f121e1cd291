//! The disk cache of compiled CPU kernels through the binary: `vlmc build --emit clif` twice
//! with one `VLMC_CACHE_DIR` takes every function from the cache the second time; `--no-cache`
//! and `VLMC_NO_CACHE=1` write nothing; an unusable cache folder or a missing home only costs
//! one warning, never the build.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-cli-cpu-cache-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp");
    d
}

/// `vlmc build models/llava_tiny.vlm --emit clif` into `out`, with a clean cache environment
/// and then `env` applied.
fn build(out: &Path, extra: &[&str], env: &[(&str, Option<&OsStr>)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vlmc"));
    c.args(["build", "models/llava_tiny.vlm", "--emit", "clif", "--dims"])
        .arg("B=1,T=8")
        .arg("-o")
        .arg(out)
        .args(extra)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    for k in [
        "VLMC_CACHE_DIR",
        "VLMC_CACHE",
        "VLMC_NO_CACHE",
        "XDG_CACHE_HOME",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let o = c.output().expect("vlmc runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// (functions, from the cache, compiled) from `compiled N functions in X ms (H from the disk
/// cache, M compiled)`, or None for `(no disk cache)`.
fn summary(o: &Output) -> Option<(usize, usize, usize)> {
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("compiled ") && l.contains(" functions in "))
        .unwrap_or_else(|| panic!("no summary in:\n{err}"));
    let num = |s: &str| -> usize { s.trim().parse().unwrap_or_else(|_| panic!("{line}")) };
    let functions = num(line["compiled ".len()..]
        .split(" functions")
        .next()
        .expect("n"));
    if line.ends_with("(no disk cache)") {
        return None;
    }
    let inner = line.split('(').nth(1).expect("(").trim_end_matches(')');
    let hits = num(inner.split(" from the disk cache").next().expect("hits"));
    let misses = num(inner
        .split(", ")
        .nth(1)
        .expect("misses")
        .trim_end_matches(" compiled"));
    Some((functions, hits, misses))
}

fn files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

fn warnings(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_second_build_takes_every_kernel_from_the_cache() {
    let dir = tmp("twice");
    let cache = dir.join("cache");
    let first = build(
        &dir.join("a"),
        &[],
        &[("VLMC_CACHE_DIR", Some(cache.as_os_str()))],
    );
    let (n, hits, misses) = summary(&first).expect("cached");
    assert!(n > 20, "{n} functions");
    assert_eq!(hits + misses, n);
    assert_eq!(
        files(&cache.join("cpu")),
        misses,
        "one file per distinct function"
    );
    let second = build(
        &dir.join("b"),
        &[],
        &[("VLMC_CACHE_DIR", Some(cache.as_os_str()))],
    );
    assert_eq!(summary(&second), Some((n, n, 0)));
    let clif = |d: &str| std::fs::read_to_string(dir.join(d).join("LlavaTiny.clif")).expect("clif");
    assert_eq!(clif("a"), clif("b"));
    assert!(warnings(&first).is_empty() && warnings(&second).is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn no_cache_flag_and_env_write_nothing() {
    let dir = tmp("off");
    let cache = dir.join("cache");
    let o = build(
        &dir.join("a"),
        &["--no-cache"],
        &[("VLMC_CACHE_DIR", Some(cache.as_os_str()))],
    );
    assert_eq!(summary(&o), None);
    let o = build(
        &dir.join("b"),
        &[],
        &[
            ("VLMC_CACHE_DIR", Some(cache.as_os_str())),
            ("VLMC_NO_CACHE", Some(OsStr::new("1"))),
        ],
    );
    assert_eq!(summary(&o), None);
    assert!(!cache.exists(), "nothing written");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_unusable_cache_folder_costs_one_warning_not_the_build() {
    let dir = tmp("unusable");
    // A regular file where the cache folder should be: no folder can be created under it.
    let file = dir.join("not-a-folder");
    std::fs::write(&file, b"").expect("file");
    let o = build(
        &dir.join("a"),
        &[],
        &[("VLMC_CACHE_DIR", Some(file.as_os_str()))],
    );
    let (n, hits, misses) = summary(&o).expect("the cache was tried");
    assert_eq!((hits, misses), (0, n));
    let w = warnings(&o);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("cannot write the kernel cache"), "{}", w[0]);
    assert!(w[0].contains("compiling CPU kernels without the disk cache"));

    // No home and no cache variable: no cache, one warning.
    let o = build(&dir.join("b"), &[], &[("HOME", None)]);
    assert_eq!(summary(&o), None);
    let w = warnings(&o);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("no folder for the kernel cache"), "{}", w[0]);
    std::fs::remove_dir_all(&dir).ok();
}
