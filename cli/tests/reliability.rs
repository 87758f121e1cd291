//! The `vlmc` binary facing hostile or careless paths and arguments: non-regular files as inputs
//! (a FIFO must never hang a command), outputs that are inputs (never overwritten), outputs
//! through symlinks and onto device nodes, unknown inputs and dimensions, malformed `--dims`
//! and `--set` values, and a fake CUDA driver library. Each case must end with a clear error
//! (exit status 1, never a panic's 101) within seconds.

mod common;

use common::{command, mkfifo, npy_bytes, s, tmp};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SMALL: &str = r#"
use std.nn.{Linear, LayerNorm}

model Small(dim: int = 4) {
  proj = Linear(dim, 3)
  norm = LayerNorm(3)
  fn forward(x: f32[B, dim]) -> f32[B, 3] {
    return norm(proj(x))
  }
}
"#;

const LM: &str = "tests/fixtures/train/tiny_lm.vlm";

/// Runs vlmc (from the repository root) and kills it after 60 s: a hang fails the test
/// instead of blocking the suite.
fn vlmc_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = command(args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("vlmc starts");
    let t0 = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "vlmc {args:?} hung (killed after 60 s); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vlmc(args: &[&str]) -> Output {
    vlmc_env(args, &[])
}

/// The stderr of a run that must fail cleanly (exit status 1, or 2 for an argument the
/// command line parser refuses; never a panic).
fn fails(args: &[&str]) -> String {
    let out = vlmc(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "vlmc {args:?}: {:?} {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "vlmc {args:?}: {err}");
    err
}

fn succeeds(args: &[&str]) -> String {
    let out = vlmc(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "vlmc {args:?}: {err}");
    err
}

/// A float32 .npy array.
fn npy(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    npy_bytes(
        &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"),
        &data,
    )
}

/// A folder with the small model, its weights (from `vlmc init`) and an input `x`.
struct Setup {
    dir: PathBuf,
    model: PathBuf,
    weights: PathBuf,
    x: PathBuf,
}

fn setup(name: &str) -> Setup {
    let dir = tmp(name);
    let model = dir.join("small.vlm");
    std::fs::write(&model, SMALL).expect("write");
    let weights = dir.join("w.safetensors");
    succeeds(&["init", s(&model), "-o", s(&weights)]);
    let x = dir.join("x.npy");
    std::fs::write(&x, npy(&[2, 4], &[0.5; 8])).expect("write");
    Setup {
        dir,
        model,
        weights,
        x,
    }
}

impl Setup {
    fn input(&self) -> String {
        format!("x={}", self.x.display())
    }

    /// `vlmc run` of the model on the interpreter with `weights` and `input`, into `out` where
    /// given.
    fn run_args<'a>(
        &'a self,
        weights: &'a Path,
        input: &'a str,
        out: Option<&'a Path>,
    ) -> Vec<&'a str> {
        let mut v = vec![
            "run",
            s(&self.model),
            "--interp",
            "--weights",
            s(weights),
            "--input",
            input,
        ];
        if let Some(out) = out {
            v.extend_from_slice(&["-o", s(out)]);
        }
        v
    }
}

#[test]
fn non_regular_files_are_refused_as_inputs_without_blocking() {
    let t = setup("inputs");
    let fifo = t.dir.join("pipe.safetensors");
    mkfifo(&fifo);
    let x = t.input();
    let run = |weights: &Path, input: &str| fails(&t.run_args(weights, input, None));
    let e = run(&fifo, &x);
    assert!(
        e.contains(s(&fifo)) && e.contains("FIFO") && e.contains("not a regular file"),
        "{e}"
    );
    // a folder is read as a Hugging Face model folder: this one has no checkpoint
    let e = run(&t.dir, &x);
    assert!(
        e.contains("is a folder without model.safetensors or model.safetensors.index.json")
            && !e.contains("No such device"),
        "{e}"
    );
    let e = run(Path::new("/dev/zero"), &x);
    assert!(e.contains("character device"), "{e}");
    // A symlink to a FIFO is a FIFO.
    let link = t.dir.join("link.safetensors");
    std::os::unix::fs::symlink(&fifo, &link).expect("symlink");
    let e = run(&link, &x);
    assert!(e.contains("FIFO"), "{e}");

    let npy_fifo = t.dir.join("pipe.npy");
    mkfifo(&npy_fifo);
    let e = run(&t.weights, &format!("x={}", npy_fifo.display()));
    assert!(e.contains("FIFO") && e.contains(s(&npy_fifo)), "{e}");
    let e = run(&t.weights, &format!("x={}", fifo.display()));
    assert!(e.contains("FIFO"), "{e}");

    let vlm_fifo = t.dir.join("pipe.vlm");
    mkfifo(&vlm_fifo);
    let e = fails(&["check", s(&vlm_fifo)]);
    assert!(e.contains("FIFO"), "{e}");

    let data_fifo = t.dir.join("pipe.jsonl");
    mkfifo(&data_fifo);
    let out = t.dir.join("train");
    let train = |data: &str, tokenizer: &str| {
        fails(&[
            "train",
            LM,
            "--trainer",
            "evaluated",
            "--quiet",
            "--interp",
            "--data",
            data,
            "--tokenizer",
            tokenizer,
            "-o",
            s(&out),
        ])
    };
    let e = train(s(&data_fifo), "tests/fixtures/train/colours/tokenizer.json");
    assert!(e.contains("FIFO"), "{e}");
    let e = train("tests/fixtures/train/colours/train.jsonl", s(&fifo));
    assert!(e.contains("FIFO"), "{e}");

    let adapter = t.dir.join("adapter");
    std::fs::create_dir_all(&adapter).expect("adapter dir");
    mkfifo(&adapter.join("adapter_config.json"));
    let e = fails(&[
        "merge",
        s(&t.model),
        "--adapter",
        s(&adapter),
        "--weights",
        s(&t.weights),
        "-o",
        s(&t.dir.join("merged.safetensors")),
    ]);
    assert!(e.contains("FIFO"), "{e}");
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn an_output_that_is_an_input_is_refused_and_the_input_kept() {
    let t = setup("same");
    let before = std::fs::read(&t.weights).expect("weights");
    let x = t.input();
    let run_to = |out: &Path| fails(&t.run_args(&t.weights, &x, Some(out)));
    let e = run_to(&t.weights);
    assert!(
        e.contains("refusing to write") && e.contains("weights"),
        "{e}"
    );
    // Another spelling of the same file, a symlink to it and a hard link to it.
    let spelled = t.dir.join(".").join("w.safetensors");
    let e = run_to(&spelled);
    assert!(e.contains("refusing to write"), "{e}");
    let link = t.dir.join("link.safetensors");
    std::os::unix::fs::symlink(&t.weights, &link).expect("symlink");
    assert!(run_to(&link).contains("refusing to write"));
    let hard = t.dir.join("hard.safetensors");
    std::fs::hard_link(&t.weights, &hard).expect("hard link");
    assert!(run_to(&hard).contains("refusing to write"));
    // The input file.
    let e = run_to(&t.x);
    assert!(
        e.contains("refusing to write") && e.contains("input `x`"),
        "{e}"
    );
    assert_eq!(std::fs::read(&t.weights).expect("weights"), before);

    let src = std::fs::read(&t.model).expect("model");
    let e = fails(&["init", s(&t.model), "-o", s(&t.model)]);
    assert!(e.contains("the model file"), "{e}");
    assert_eq!(std::fs::read(&t.model).expect("model"), src);

    let e = fails(&[
        "merge",
        s(&t.model),
        "--adapter",
        s(&t.dir.join("adapter")),
        "--weights",
        s(&t.weights),
        "-o",
        s(&t.weights),
    ]);
    assert!(e.contains("the base weights"), "{e}");
    assert_eq!(std::fs::read(&t.weights).expect("weights"), before);

    // Training's final weights onto its starting weights.
    let out = t.dir.join("trained");
    std::fs::create_dir_all(&out).expect("dir");
    let start = out.join("model.safetensors");
    std::fs::write(&start, b"starting weights").expect("write");
    let e = fails(&[
        "train",
        LM,
        "--trainer",
        "evaluated",
        "--quiet",
        "--data",
        "tests/fixtures/train/colours/train.jsonl",
        "--weights",
        s(&start),
        "-o",
        s(&out),
    ]);
    assert!(
        e.contains("refusing to write") && e.contains("--weights"),
        "{e}"
    );
    assert_eq!(std::fs::read(&start).expect("kept"), b"starting weights");

    // `build -o` into the model's own folder, where an artefact would replace the source.
    let ir = t.dir.join("Small.ir");
    std::fs::copy(&t.model, &ir).expect("copy");
    let e = fails(&["build", s(&ir), "-o", s(&t.dir)]);
    assert!(
        e.contains("refusing to write") && e.contains("model file"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn outputs_go_through_symlinks_and_never_replace_devices_or_fifos() {
    let t = setup("outputs");
    let x = t.input();
    let run_to = |out: &Path| -> Output { vlmc(&t.run_args(&t.weights, &x, Some(out))) };
    // A symlink: the target is written, the link stays a link.
    let target = t.dir.join("real.safetensors");
    std::fs::write(&target, b"old").expect("write");
    let link = t.dir.join("out.safetensors");
    std::os::unix::fs::symlink("real.safetensors", &link).expect("symlink");
    let o = run_to(&link);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(&link)
        .expect("link")
        .file_type()
        .is_symlink());
    let f = vlmc_runtime::weights::WeightFile::open(&target).expect("outputs in the target");
    assert_eq!(f.names(), vec!["output".to_string()]);
    // A dangling symlink: its target is created.
    let dangling = t.dir.join("dangling.safetensors");
    std::os::unix::fs::symlink("new.safetensors", &dangling).expect("symlink");
    assert!(run_to(&dangling).status.success());
    assert!(t.dir.join("new.safetensors").is_file());
    // /dev/null is written to, and stays /dev/null.
    let o = run_to(Path::new("/dev/null"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!std::fs::metadata("/dev/null").expect("null").is_file());
    // A FIFO, a directory, another device: refused before anything runs.
    let fifo = t.dir.join("pipe");
    mkfifo(&fifo);
    for (out, what) in [
        (fifo.as_path(), "FIFO"),
        (t.dir.as_path(), "directory"),
        (Path::new("/dev/zero"), "character device"),
    ] {
        let o = run_to(out);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains(what) && e.contains("cannot write"), "{e}");
    }
    let meta = std::fs::symlink_metadata(&fifo).expect("fifo");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
    // No temporary file is left behind.
    let left: Vec<String> = std::fs::read_dir(&t.dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn unknown_inputs_and_dimensions_and_bad_sizes_are_errors() {
    let t = setup("names");
    let x = t.input();
    let base = ["run", s(&t.model), "--interp", "--weights", s(&t.weights)];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        fails(&a)
    };
    let e = with(&["--input", &x, "--input", "y=whatever.npy"]);
    assert!(
        e.contains("no input `y`") && e.contains("`x`"),
        "unknown input names are listed with the model's inputs: {e}"
    );
    let e = with(&["--input", &x, "--input", &x]);
    assert!(e.contains("given twice"), "{e}");
    let e = with(&["--input", "text=hello", "--input", &x]);
    assert!(
        e.contains("needs a `preprocess ... = text(...)`") && e.contains("`x`"),
        "{e}"
    );

    let m = s(&t.model);
    for (dims, want) in [
        ("B=-3", "dimension B = -3: a size cannot be negative"),
        ("B=99999999999999", "is too large"),
        ("B=999999999999999999999999", "is too large"),
        ("B=abc", "dimension B: `abc` is not a size"),
        ("B=", "dimension B has no size"),
        ("=3", "is not a dimension name"),
        ("B", "expected NAME=SIZE"),
    ] {
        let e = fails(&["build", m, "--emit", "report", "--dims", dims]);
        assert!(e.contains(want), "--dims {dims}: {e}");
    }
    // A dimension the model does not have is ignored with a warning that lists its dims (one
    // set of sizes serves several models); one given twice is an error.
    let out = t.dir.join("dims-out");
    let e = succeeds(&[
        "build",
        m,
        "--emit",
        "report",
        "--dims",
        "B=2,Q=3",
        "-o",
        s(&out),
    ]);
    assert!(
        e.contains("warning: --dims Q=...: the model has no dimension Q (ignored)")
            && e.contains("its dimensions are: B"),
        "{e}"
    );
    let e = fails(&["bench", m, "--dims", "B=2,B=3"]);
    assert!(e.contains("gives dimension B twice"), "{e}");

    for (set, want) in [
        ("dim=", "parameter dim has no value"),
        ("=4", "is not a parameter name"),
        ("dim", "expected NAME=VALUE"),
        ("dim=99999999999999999999999", "out of range"),
        ("dim=1e999", "not a finite number"),
        ("dim=12abc", "not a number"),
        ("dim=\"open", "unterminated string"),
    ] {
        let e = fails(&["init", m, "--set", set, "-o", "/dev/null"]);
        assert!(e.contains(want), "--set {set}: {e}");
    }
    // A good --set still works, and T=0 is a size.
    succeeds(&["init", m, "--set", "dim=5", "-o", "/dev/null"]);
    succeeds(&["build", m, "--emit", "ir", "--dims", "B=0", "-o", s(&t.dir)]);
    let _ = std::fs::remove_dir_all(&t.dir);
}

/// A shared library standing in for libcuda.so, built with the C compiler (the test is skipped
/// without one); `source` is its C code.
fn fake_library(dir: &Path, name: &str, source: &str) -> Option<PathBuf> {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).expect("write");
    let lib = dir.join(name);
    match Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&c)
        .status()
    {
        Ok(st) if st.success() => Some(lib),
        _ => {
            eprintln!("no C compiler: skipping the fake libcuda.so test");
            None
        }
    }
}

#[test]
fn a_fake_cuda_driver_library_gives_a_clean_error() {
    let t = setup("cuda");
    let x = t.input();
    // Every function vlmc needs, each failing with CUDA_ERROR_NO_DEVICE (100): a driver
    // installed on a machine without a GPU.
    let mut complete = String::from(
        "static const char *msg = \"no CUDA-capable device is detected\";\n\
         int cuGetErrorString(int e, const char **s) { (void)e; *s = msg; return 0; }\n\
         int cuGetErrorName(int e, const char **s) { (void)e; *s = msg; return 0; }\n",
    );
    for name in vlmc_runtime::cuda::DRIVER_SYMBOLS {
        if !name.starts_with("cuGetError") {
            complete.push_str(&format!("int {name}(void) {{ return 100; }}\n"));
        }
    }
    let lacks = "no usable CUDA driver: libcuda.so was found but lacks";
    for (case, source, want) in [
        ("empty", "int vlmc_not_cuda(void) { return 0; }\n", lacks),
        (
            "partial",
            "int cuInit(unsigned flags) { (void)flags; return 0; }\n",
            lacks,
        ),
        (
            "complete",
            complete.as_str(),
            "no CUDA-capable device is detected",
        ),
    ] {
        let libdir = t.dir.join(case);
        std::fs::create_dir_all(&libdir).expect("dir");
        if fake_library(&libdir, "libcuda.so", source).is_none() {
            return;
        }
        let out = vlmc_env(
            &[
                "run",
                s(&t.model),
                "--target",
                "cuda",
                "--weights",
                s(&t.weights),
                "--input",
                &x,
                "-o",
                s(&t.dir.join("out.safetensors")),
            ],
            &[("LD_LIBRARY_PATH", s(&libdir))],
        );
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{case}: {e}");
        assert!(!e.contains("panicked"), "{case}: {e}");
        assert!(e.contains(want), "{case}: {e}");
    }
    let _ = std::fs::remove_dir_all(&t.dir);
}
