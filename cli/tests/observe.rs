//! Seeing a run: the progress lines of `vlmc train` when stderr is not a terminal, its
//! TensorBoard event files (`--report-to tensorboard`: byte-identical to what the
//! `tensorboard` Python package writes, equal to log.jsonl, no step twice after a resume), and
//! `vlmc plot`'s SVG curves.

mod common;

use common::{s, stderr, text_data, tmp, train_args, vlmc, ROOT, TINY_LM, TOKENIZER};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc_runtime::tensorboard::{self, Event, What};

/// `vlmc train` of TinyLm's `trainer` on `data` into `out`, without `--quiet`.
fn train(trainer: &str, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    // train_args' own `--quiet` (the first; `extra` may give another)
    let mut args = train_args(trainer, data, out, extra);
    if let Some(i) = args.iter().position(|a| *a == "--quiet") {
        args.remove(i);
    }
    let o = vlmc(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// The steps of the progress lines (`[3s] step 4/7: loss ... eta ...`), each checked for
/// its fields.
fn progress_steps(err: &str) -> Vec<u64> {
    let mut steps = Vec::new();
    for line in err.lines().filter(|l| l.starts_with('[')) {
        let (_, rest) = line.split_once("] step ").expect("a progress line");
        let (frac, msg) = rest.split_once(": ").expect("step k/n: ...");
        let (k, _) = frac.split_once('/').expect("k/n");
        for field in ["loss ", " lr ", " |g| ", " ex/s ", " eta "] {
            assert!(msg.contains(field), "`{field}` missing from: {line}");
        }
        steps.push(k.parse().expect("a step number"));
    }
    steps
}

#[test]
fn progress_lines_come_every_log_every_steps_when_stderr_is_not_a_terminal() {
    let work = tmp("lines");
    let data = text_data(&work);
    // stderr is a pipe here: lines, not a bar. `logged` sets `log_every 3` (7 steps).
    let t0 = std::time::Instant::now();
    let a = train("logged", &data, &work.join("a"), &[]);
    let b = train("logged", &data, &work.join("b"), &["--log-every", "2"]);
    let quick = t0.elapsed() < line_interval();
    let (sa, sb) = (progress_steps(&stderr(&a)), progress_steps(&stderr(&b)));
    eprintln!("log_every 3: lines at {sa:?}; --log-every 2: {sb:?}");
    // The first step, every 3rd (2nd), the last; lines also come every 5 s, which the runs
    // only reach on a very slow machine.
    for want in [1, 3, 6, 7] {
        assert!(sa.contains(&want), "step {want} in {sa:?}");
    }
    for want in [1, 2, 4, 6, 7] {
        assert!(sb.contains(&want), "step {want} in {sb:?}");
    }
    if quick {
        assert_eq!(sa, [1, 3, 6, 7]);
        assert_eq!(sb, [1, 2, 4, 6, 7]);
    }
    // --quiet: one line per step, as before.
    let q = train("logged", &data, &work.join("q"), &["--quiet"]);
    let lines = stderr(&q);
    let per_step: Vec<&str> = lines.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(per_step.len(), 7, "{lines}");
    assert!(per_step.iter().all(|l| l.contains(" eta ")), "{lines}");
    let _ = std::fs::remove_dir_all(&work);
}

/// The time between progress lines when `log_every` steps take longer.
fn line_interval() -> std::time::Duration {
    vlmc_cli::progress::LINE_INTERVAL
}

/// Scalars by tag: [(step, value)] in the order read.
type Scalars = BTreeMap<String, Vec<(i64, f32)>>;

/// Every scalar of a folder's event files, in file order.
fn scalars(runs: &Path) -> (Vec<PathBuf>, Scalars) {
    let files = tensorboard::event_files(runs);
    let mut out = Scalars::new();
    for f in &files {
        let events = tensorboard::read_events(f).expect("an event file");
        assert_eq!(
            events[0].what,
            What::FileVersion("brain.Event:2".into()),
            "{} starts with its file_version",
            f.display()
        );
        for e in &events[1..] {
            let What::Scalars(v) = &e.what else {
                panic!("{}: not a scalar: {e:?}", f.display());
            };
            for (tag, x) in v {
                out.entry(tag.clone()).or_default().push((e.step, *x));
            }
        }
    }
    (files, out)
}

/// log.jsonl as the event files should hold it: tag → [(step, value as f32)], in order.
fn log_scalars(dir: &Path) -> Scalars {
    let mut out = Scalars::new();
    let text = std::fs::read_to_string(dir.join("log.jsonl")).expect("log.jsonl");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let step = v["step"].as_i64().expect("step");
        let mut put = |tag: &str, key: &str| {
            if let Some(x) = v.get(key).and_then(|x| x.as_f64()) {
                out.entry(tag.into()).or_default().push((step, x as f32));
            }
        };
        put("train/loss", "loss");
        put("train/learning_rate", "lr");
        put("train/grad_norm", "grad_norm");
        put("eval/loss", "eval_loss");
    }
    out
}

#[test]
fn the_event_writer_is_byte_identical_to_tensorboards() {
    // tests/fixtures/tensorboard/make.py wrote both with the `tensorboard` Python package.
    let dir = Path::new(ROOT).join("tests/fixtures/tensorboard");
    let reference = std::fs::read(dir.join("reference.tfevents")).expect("reference");
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scalars.json")).expect("json"))
            .expect("scalars.json");
    let mut events = vec![Event {
        wall_time: spec["file_version_wall_time"].as_f64().expect("a time"),
        step: 0,
        what: What::FileVersion(tensorboard::FILE_VERSION.into()),
    }];
    for v in spec["scalars"].as_array().expect("rows") {
        events.push(Event {
            wall_time: v["wall_time"].as_f64().expect("wall_time"),
            step: v["step"].as_i64().expect("step"),
            what: What::Scalars(vec![(
                v["tag"].as_str().expect("tag").into(),
                v["value"].as_f64().expect("value") as f32,
            )]),
        });
    }
    let ours: Vec<u8> = events
        .iter()
        .flat_map(|e| tensorboard::frame(&tensorboard::encode(e)))
        .collect();
    assert_eq!(ours.len(), reference.len());
    assert!(ours == reference, "the records differ from tensorboard's");
    // And the reader reads the reference back to the same events.
    let (recs, why) = tensorboard::records(&reference);
    assert!(why.is_none(), "{why:?}");
    let read: Vec<Event> = recs
        .iter()
        .map(|(d, _)| tensorboard::decode(d).expect("an event"))
        .collect();
    assert_eq!(read, events);
    // The writer itself: a new file whose first record is the file_version, then one event
    // per scalar.
    let work = tmp("writer");
    let mut w = tensorboard::EventWriter::create(&work).expect("a writer");
    w.scalars(3, &[("train/loss", 0.5), ("eval/loss", 0.25)])
        .expect("written");
    let name = w
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let back = tensorboard::read_events(w.path()).expect("read");
    assert_eq!(back.len(), 3);
    assert_eq!(back[1].step, 3);
    assert_eq!(
        back[1].what,
        What::Scalars(vec![("train/loss".into(), 0.5)])
    );
    assert_eq!(
        back[2].what,
        What::Scalars(vec![("eval/loss".into(), 0.25)])
    );
    // A second writer in the folder names its file after the first (readers go in name
    // order).
    let w2 = tensorboard::EventWriter::create(&work).expect("a second writer");
    assert!(w2.path() > w.path());
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_run_reports_to_tensorboard_and_a_resumed_one_logs_no_step_twice() {
    let work = tmp("tensorboard");
    let data = text_data(&work);
    let out = work.join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--eval-data", s(&data), "--steps", "8", "--quiet"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend(["--report-to", "tensorboard"].map(String::from));
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        train("evaluated", &data, &out, &refs)
    };
    let o = run(&["--stop-after", "4"]);
    assert!(stderr(&o).contains("runs"), "{}", stderr(&o));
    let runs = out.join("runs");
    let (files, first) = scalars(&runs);
    assert_eq!(files.len(), 1);
    assert_eq!(
        first,
        log_scalars(&out),
        "the events are log.jsonl's numbers"
    );
    assert_eq!(first["train/loss"].len(), 4);
    assert_eq!(first["eval/loss"].len(), 4, "eval_every 1");

    // What a run killed after step 6 leaves (its checkpoint is at step 4): events and log
    // lines of steps 5 and 6, and a torn record.
    let mut debris = Vec::new();
    for step in [5, 6] {
        for tag in [
            "train/loss",
            "train/learning_rate",
            "train/grad_norm",
            "eval/loss",
        ] {
            debris.extend(tensorboard::frame(&tensorboard::encode(&Event {
                wall_time: 1.0,
                step,
                what: What::Scalars(vec![(tag.into(), 99.0)]),
            })));
        }
    }
    debris.extend_from_slice(&[0x20, 0, 0]);
    let old = files[0].clone();
    let mut bytes = std::fs::read(&old).expect("events");
    bytes.extend_from_slice(&debris);
    std::fs::write(&old, bytes).expect("write");
    let mut log = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
    log.push_str("{\"step\":5,\"loss\":99.0,\"lr\":0.01,\"grad_norm\":99.0}\n");
    std::fs::write(out.join("log.jsonl"), log).expect("write");

    run(&["--resume", s(&out)]);
    let (files, all) = scalars(&runs);
    assert_eq!(
        files.len(),
        2,
        "the resumed run writes a new file: {files:?}"
    );
    assert_eq!(files[0], old, "the earlier file sorts first");
    // The earlier file is cut back to the checkpoint's step; the new one holds the rest.
    let steps_of = |f: &Path| -> Vec<i64> {
        tensorboard::read_events(f)
            .expect("events")
            .iter()
            .skip(1)
            .map(|e| e.step)
            .collect()
    };
    assert!(steps_of(&files[0]).iter().all(|&k| k <= 4));
    assert!(steps_of(&files[1]).iter().all(|&k| k > 4));
    // Every step once per tag, the numbers of log.jsonl.
    assert_eq!(all, log_scalars(&out));
    for (tag, v) in &all {
        let steps: Vec<i64> = v.iter().map(|(k, _)| *k).collect();
        assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "{tag}");
    }
    assert!(!all["train/loss"].iter().any(|(_, x)| *x == 99.0));

    // --overwrite deletes the event files (and nothing else in runs/); a folder holding only
    // event files is an earlier run.
    std::fs::write(runs.join("notes.txt"), "mine").expect("write");
    run(&["--overwrite"]);
    let (files, _) = scalars(&runs);
    assert_eq!(files.len(), 1);
    assert!(runs.join("notes.txt").is_file());
    let lone = work.join("lone");
    std::fs::create_dir_all(lone.join("runs")).expect("mkdir");
    std::fs::copy(
        &files[0],
        lone.join("runs").join(files[0].file_name().expect("name")),
    )
    .expect("copy");
    let mut a = vec![
        "train",
        TINY_LM,
        "--trainer",
        "evaluated",
        "--data",
        s(&data),
    ];
    a.extend(["--tokenizer", TOKENIZER, "--steps", "2", "-o", s(&lone)]);
    let refused = vlmc(&a);
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("runs/"), "{err}");
    let _ = std::fs::remove_dir_all(&work);
}

/// The `points` of each `<polyline>` drawn in `colour`, counted.
fn polylines(doc: &roxmltree::Document, colour: &str) -> Vec<usize> {
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(colour))
        .map(|n| {
            n.attribute("points")
                .unwrap_or("")
                .split_whitespace()
                .count()
        })
        .collect()
}

fn texts(doc: &roxmltree::Document) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect()
}

#[test]
fn plot_draws_every_logged_step() {
    let work = tmp("plot");
    let data = text_data(&work);
    let out = work.join("run");
    train(
        "evaluated",
        &data,
        &out,
        &["--eval-data", s(&data), "--steps", "9", "--quiet"],
    );
    let svg = work.join("curves.svg");
    let o = vlmc(&["plot", s(&out), "-o", s(&svg)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&svg).expect("svg");
    let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    // Loss, learning rate and gradient norm of the 9 steps in the first colour; the 9
    // evaluations in red, with a dot each (and one in the legend).
    assert_eq!(polylines(&doc, "#1F77B4"), [9, 9, 9]);
    assert_eq!(polylines(&doc, "#D62728"), [9]);
    let dots = doc
        .descendants()
        .filter(|n| n.has_tag_name("circle") && n.attribute("fill") == Some("#D62728"))
        .count();
    assert_eq!(dots, 10);
    let t = texts(&doc);
    for want in [
        "loss",
        "learning rate",
        "gradient norm (before clipping)",
        "step",
        "train loss",
        "eval loss",
    ] {
        assert!(t.iter().any(|x| x == want), "no text `{want}` in {t:?}");
    }
    let names: Vec<String> = std::fs::read_dir(&work)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");

    // Never over its input: a .svg name that is the log (a symlink to it) is refused.
    #[cfg(unix)]
    {
        let before = std::fs::read(out.join("log.jsonl")).expect("log");
        let link = work.join("log.svg");
        std::os::unix::fs::symlink(out.join("log.jsonl"), &link).expect("symlink");
        let o = vlmc(&["plot", s(&out), "-o", s(&link)]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("refusing to write") && err.contains("log"),
            "{err}"
        );
        assert_eq!(std::fs::read(out.join("log.jsonl")).expect("log"), before);
    }
    let o = vlmc(&["plot", s(&out), "-o", s(&out.join("log.jsonl"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(".svg"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn plot_draws_a_chain_stage_after_stage() {
    let work = tmp("plot-chain");
    let chain = work.join("chain");
    let o = vlmc(&[
        "train",
        "models/llava_tiny.vlm",
        "--trainer",
        "instruct",
        "--data",
        "tests/fixtures/train/colours/train.jsonl",
        "--steps",
        "3",
        "--quiet",
        "--report-to",
        "tensorboard",
        "-o",
        s(&chain),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Each stage has its own event file, equal to its log.
    for stage in ["align", "instruct"] {
        let dir = chain.join(stage);
        assert_eq!(scalars(&dir.join("runs")).1, log_scalars(&dir), "{stage}");
    }
    // `instruct` was written last: make `align`'s log the newer one, so that the order comes
    // from the checkpoints (`instruct` starts `from align`), not from the times.
    let align_log = chain.join("align/log.jsonl");
    let bytes = std::fs::read(&align_log).expect("log");
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&align_log, bytes).expect("touch");
    let svg = work.join("chain.svg");
    let o = vlmc(&["plot", s(&chain), "-o", s(&svg)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&svg).expect("svg");
    let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
    // Stage 1 in the first colour, stage 2 in the second, three panels each.
    assert_eq!(polylines(&doc, "#1F77B4"), [3, 3, 3]);
    assert_eq!(polylines(&doc, "#FF7F0E"), [3, 3, 3]);
    let t = texts(&doc);
    assert!(t.iter().any(|x| x == "align: train loss"), "{t:?}");
    assert!(t.iter().any(|x| x == "instruct: train loss"), "{t:?}");
    // `instruct`'s points come after `align`'s along the step axis.
    let xs = |colour: &str| -> Vec<f64> {
        let n = doc
            .descendants()
            .find(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(colour))
            .expect("a series");
        n.attribute("points")
            .expect("points")
            .split_whitespace()
            .map(|p| p.split(',').next().expect("x").parse().expect("a number"))
            .collect()
    };
    let (a, b) = (xs("#1F77B4"), xs("#FF7F0E"));
    assert!(
        a.iter().all(|x| b.iter().all(|y| x < y)),
        "{a:?} then {b:?}"
    );
    let _ = std::fs::remove_dir_all(&work);
}
