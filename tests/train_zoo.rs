//! Every trainer declared in `models/*.vlm` trains, at the sizes of its zoo fixture
//! (`tests/fixtures/zoo/<model>/fixture.vlm`, from the fixture's transformers weights), on a
//! synthetic task made from the colour images of `tests/fixtures/train/colours/`: the data
//! pipeline fills every input its forward reads (masks, image placeholders expanded where they
//! stand, several images per row, Fuyu's patch grid, InstructBLIP's instruction, IDEFICS' image
//! mask). Each trainer keeps its objective, what trains, its adapter and optimiser; the batch,
//! the steps, the warm-up and the learning rate are the test's (the declared ones are sized for
//! GPUs). Checked: two compiled steps equal two interpreted ones (loss and gradient norm of
//! each, relative 1e-4: the second step's loss is that of the parameters after the first), and
//! over a short compiled run the loss falls. (Parameters are not compared element by element:
//! Adam normalises the gradient of a bias that has none in exact arithmetic, such as a key
//! projection's, so its rounding noise on either side moves it by about ±lr.)

mod common;

use common::{fixture_sets, word_tokenizer as tokenizer, zoo_model};
use std::path::{Path, PathBuf};
use vlmc::elab::{Elaborated, Setting};
use vlmc_runtime::train::Backend;
use vlmc_runtime::train_loop::{train, TrainOptions};
use vlmc_runtime::weights::WeightFile;

const COLOURS: &str = "tests/fixtures/train/colours";
const STEPS: u64 = 10;
const BLIP2_QFORMER: &[(&str, &str)] = &[
    ("image", "32"),
    ("patch", "8"),
    ("vision_dim", "32"),
    ("vision_depth", "2"),
    ("vision_heads", "4"),
    ("vision_ffn", "64"),
    ("qformer_vocab", "11"),
    ("qformer_max_pos", "16"),
    ("qformer_dim", "32"),
    ("qformer_depth", "2"),
    ("qformer_heads", "4"),
    ("qformer_ffn", "64"),
    ("queries", "4"),
    ("embed", "16"),
    ("dec_token", "10"),
    ("max_len", "8"),
];

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-trainzoo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// The colour images and their colours.
fn images() -> Vec<(String, String)> {
    let dir = std::fs::canonicalize(COLOURS).expect("colours");
    let text = std::fs::read_to_string(dir.join("train.jsonl")).expect("colours data");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("row");
            (
                dir.join(v["image"].as_str().expect("image"))
                    .display()
                    .to_string(),
                v["completion"].as_str().expect("colour").to_string(),
            )
        })
        .collect()
}

/// How a model's rows look.
#[derive(Clone, Copy, PartialEq)]
enum Rows {
    /// image + "what colour is the square ?" → colour
    Caption,
    /// LLaVA: the `<image>` placeholder inside the prompt; some rows without an image
    Placeholder,
    /// IDEFICS: interleaved text with one or two images
    Interleaved,
    /// image + its colour as text (contrastive and matching objectives)
    Pairs,
    /// text only: the prompt names a colour, the completion repeats it
    Text,
    /// LXMERT: text with region features and boxes per row (two kinds of regions), matched
    /// (label 1) for one kind only
    Regions,
    /// a committed data file with its own tokenizer beside it
    Fixture(&'static str),
}

/// Two region files (`feats` `[3, feat_dim]`, `pos` `[3, 4]`) in `work`, of two kinds.
fn regions(work: &Path, feat_dim: usize) -> [String; 2] {
    let mut names = [String::new(), String::new()];
    for (k, name) in names.iter_mut().enumerate() {
        let feats: Vec<f32> = (0..3 * feat_dim)
            .map(|i| ((i * 7 + k * 5) % 11) as f32 / 11.0 - 0.5 + k as f32 * 0.3)
            .collect();
        let pos: Vec<f32> = (0..12).map(|i| (i + k) as f32 / 16.0).collect();
        let mut m = std::collections::BTreeMap::new();
        m.insert(
            "feats".to_string(),
            vlmc_runtime::Tensor::f32(vec![3, feat_dim], feats),
        );
        m.insert(
            "pos".to_string(),
            vlmc_runtime::Tensor::f32(vec![3, 4], pos),
        );
        let p = work.join(format!("regions{k}.safetensors"));
        vlmc_runtime::weights::save(&p, &m).expect("regions");
        *name = p.display().to_string();
    }
    names
}

/// The rows of the synthetic task (files they name are written into `work`).
fn rows(kind: Rows, work: &Path, feat_dim: usize) -> String {
    let imgs = images();
    let regions = match kind {
        Rows::Regions => regions(work, feat_dim),
        _ => Default::default(),
    };
    let mut out = String::new();
    for (i, (img, c)) in imgs.iter().enumerate().take(48) {
        let row = match kind {
            Rows::Caption => serde_json::json!({"image": img,
                "prompt": "what colour is the square ?", "completion": c}),
            Rows::Placeholder if i % 4 == 3 => serde_json::json!({
                "prompt": format!("what colour is {c} ?"), "completion": c}),
            Rows::Placeholder => serde_json::json!({"image": img,
                "prompt": "what colour <image> is the square ?", "completion": c}),
            Rows::Interleaved if i % 3 == 2 => serde_json::json!({"images": [img],
                "text": format!("<image> {c} </s>")}),
            Rows::Interleaved => {
                let (img2, c2) = &imgs[(i + 7) % imgs.len()];
                serde_json::json!({"images": [img, img2],
                    "text": format!("<image> {c} <image> {c2} </s>")})
            }
            Rows::Pairs => serde_json::json!({"image": img, "text": format!("{c} </s>")}),
            Rows::Text => serde_json::json!({"prompt": format!("what colour is {c} ?"),
                "completion": c}),
            Rows::Regions => {
                let f = &regions[i % 2];
                serde_json::json!({"text": format!("what colour is {c}"),
                    "visual_feats": format!("{f}:feats"), "visual_pos": format!("{f}:pos"),
                    "matched_label": i % 2})
            }
            Rows::Fixture(_) => unreachable!("a fixture's rows are its file"),
        };
        out.push_str(&format!("{row}\n"));
    }
    out
}

/// A zoo model: its file, its rows, its tokenizer's special tokens and first word id.
struct Case {
    file: &'static str,
    rows: Rows,
    specials: &'static [(&'static str, u32)],
    start: u32,
}

const BASE: &[(&str, u32)] = &[("<pad>", 0), ("<unk>", 3), ("</s>", 2)];

fn cases() -> Vec<Case> {
    vec![
        Case {
            file: "llava",
            rows: Rows::Placeholder,
            specials: &[("<pad>", 0), ("<unk>", 3), ("</s>", 2), ("<image>", 90)],
            start: 50,
        },
        Case {
            file: "blip2",
            rows: Rows::Caption,
            specials: &[("<pad>", 1), ("<unk>", 3), ("</s>", 2), ("<image>", 98)],
            start: 50,
        },
        Case {
            file: "instructblip",
            rows: Rows::Caption,
            specials: &[("<pad>", 0), ("<unk>", 3), ("</s>", 2), ("<image>", 98)],
            start: 50,
        },
        Case {
            file: "fuyu",
            rows: Rows::Caption,
            specials: &[
                ("<pad>", 0),
                ("<unk>", 3),
                ("</s>", 2),
                ("|SPEAKER|", 90),
                ("|NEWLINE|", 91),
            ],
            start: 50,
        },
        Case {
            file: "clipcap",
            rows: Rows::Caption,
            specials: BASE,
            start: 50,
        },
        Case {
            file: "flamingo",
            rows: Rows::Interleaved,
            specials: &[
                ("<pad>", 0),
                ("<unk>", 3),
                ("</s>", 2),
                ("<fake_token_around_image>", 99),
                ("<image>", 100),
            ],
            start: 50,
        },
        Case {
            file: "chameleon",
            rows: Rows::Text,
            specials: BASE,
            start: 50,
        },
        Case {
            file: "clip",
            rows: Rows::Pairs,
            specials: &[("<pad>", 0), ("<unk>", 3), ("</s>", 98)],
            start: 50,
        },
        Case {
            file: "siglip",
            rows: Rows::Pairs,
            specials: BASE,
            start: 50,
        },
        Case {
            file: "blip2_qformer",
            rows: Rows::Fixture("tests/fixtures/blip2_stage1/captions/train.jsonl"),
            specials: BASE,
            start: 0,
        },
        Case {
            file: "lxmert_pretraining",
            rows: Rows::Regions,
            specials: &[("<pad>", 0), ("<unk>", 3), ("[SEP]", 2)],
            start: 50,
        },
        Case {
            file: "llava_tiny",
            rows: Rows::Caption,
            specials: BASE,
            start: 10,
        },
        Case {
            file: "clip_tiny",
            rows: Rows::Pairs,
            specials: BASE,
            start: 10,
        },
    ]
}

/// The trainer with the test's batch, steps, warm-up and learning rate (everything else as
/// declared).
fn sized(m: &mut Elaborated, trainer: &str) {
    let t = m
        .trainers
        .iter_mut()
        .find(|t| t.name == trainer)
        .expect("trainer");
    t.settings.retain(|(k, _)| {
        !matches!(
            k.as_str(),
            "batch" | "steps" | "epochs" | "save_every" | "grad_accum" | "lr" | "max_len"
        )
    });
    for (k, v) in t.settings.iter_mut() {
        if let (true, Setting::Call(_, args)) = (k == "schedule" || k == "optimizer", &mut *v) {
            args.retain(|(a, _)| !a.starts_with("warmup") && a != "lr");
            if k == "optimizer" {
                args.push(("lr".into(), Setting::Float(2e-3)));
            }
        }
    }
    t.settings.push(("batch".into(), Setting::Int(4)));
}

/// (loss, grad_norm) of each step of a run's log.jsonl.
fn logged(out: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
    text.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v.get("loss")?.as_f64()?, v.get("grad_norm")?.as_f64()?))
        })
        .collect()
}

#[test]
fn every_zoo_trainer_trains_at_fixture_size() {
    let mut report = Vec::new();
    let mut ran = 0;
    // VLMC_TRAIN_ZOO=llava,fuyu runs only those (while debugging one)
    let only = std::env::var("VLMC_TRAIN_ZOO").ok();
    for case in cases() {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|x| x == case.file))
        {
            continue;
        }
        let fixture = PathBuf::from(format!("tests/fixtures/zoo/{}", case.file));
        let extra: Vec<(String, String)> = match case.file {
            // a 4 x 4 grid of the fixture's 4-pixel patches
            "fuyu" => vec![("image".into(), "16".into())],
            // LxmertForPreTraining at the sizes of LxmertModel's fixture
            "lxmert_pretraining" => fixture_sets(Path::new("tests/fixtures/zoo/lxmert")),
            // the sizes of tests/fixtures/blip2_stage1 (its tokenizer has 11 tokens)
            "blip2_qformer" => BLIP2_QFORMER
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _ => Vec::new(),
        };
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let model = zoo_model(case.file, &extra);
        let feat_dim = extra
            .iter()
            .find(|(k, _)| *k == "feat_dim")
            .map_or(8, |(_, v)| v.parse().expect("feat_dim"));
        let weights = fixture.join("model.safetensors");
        let start = weights.is_file().then(|| {
            let wf = WeightFile::open(&weights).expect("fixture weights");
            vlmc_runtime::weights::bind(&model.graph, &wf, &model.checkpoint)
                .expect("binds")
                .params
        });
        let work = tmp(case.file);
        tokenizer(&work.join("tokenizer.json"), case.specials, case.start);
        if case.file == "instructblip" {
            // the Q-Former's own tokenizer (vocabulary of 50)
            tokenizer(&work.join("qformer_tokenizer.json"), BASE, 10);
        }
        let data = match case.rows {
            Rows::Fixture(f) => std::fs::canonicalize(f).expect("fixture data"),
            kind => {
                let d = work.join("data.jsonl");
                std::fs::write(&d, rows(kind, &work, feat_dim)).expect("data");
                d
            }
        };
        for trainer in model.trainers.iter().map(|t| t.name.clone()) {
            let mut m = model.clone();
            sized(&mut m, &trainer);
            let run = |out: &str, steps: u64, backend: Backend| {
                let out = work.join(format!("{trainer}-{out}"));
                let o = TrainOptions {
                    model: &m,
                    trainer: &trainer,
                    data: &data,
                    tokenizer: None,
                    weights: start.clone(),
                    weights_dir: None,
                    out: &out,
                    resume: None,
                    steps: Some(steps),
                    stop_after: None,
                    eval_data: None,
                    skip_finished: false,
                    overwrite: false,
                    restart_unfinished: false,
                    backend,
                    tensorboard: false,
                    base_name: None,
                };
                let s = train(&o, &mut |_| {})
                    .unwrap_or_else(|e| panic!("{} `{trainer}`: {}", case.file, e.message));
                (s, out)
            };
            // two steps, compiled and interpreted
            let (_, cdir) = run("cpu2", 2, Backend::default());
            let (_, idir) = run("interp2", 2, Backend::Interp);
            let (c, i) = (logged(&cdir), logged(&idir));
            assert_eq!((c.len(), i.len()), (2, 2));
            let mut worst = 0f64;
            for ((cl, cg), (il, ig)) in c.iter().zip(&i) {
                for (a, b, what) in [(cl, il, "loss"), (cg, ig, "gradient norm")] {
                    let e = (a - b).abs() / b.abs().max(1e-12);
                    assert!(
                        e <= 1e-4,
                        "{} `{trainer}`: {what} {a} compiled vs {b} interpreted",
                        case.file
                    );
                    worst = worst.max(e);
                }
            }
            // a short run: the loss falls
            let (s, _) = run("cpu", STEPS, Backend::default());
            let k = 3;
            let first: f64 = s.losses[..k].iter().sum::<f64>() / k as f64;
            let last: f64 = s.losses[s.losses.len() - k..].iter().sum::<f64>() / k as f64;
            assert!(
                last < first,
                "{} `{trainer}`: the loss does not fall: {:?}",
                case.file,
                s.losses
            );
            report.push(format!(
                "{} `{trainer}`: steps 1-2 loss {:.4}, {:.4} (interpreter within {worst:.1e}); loss {first:.3} -> {last:.3}",
                case.file, c[0].0, c[1].0
            ));
            ran += 1;
        }
        let _ = std::fs::remove_dir_all(&work);
    }
    eprintln!("{}", report.join("\n"));
    if only.is_none() {
        // every zoo spec that declares a trainer is a case above
        let covered: Vec<&str> = cases().iter().map(|c| c.file).collect();
        for f in common::vlm_files("models") {
            let text = std::fs::read_to_string(&f).expect("spec");
            let stem = f
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("name")
                .to_string();
            if text.lines().any(|l| l.starts_with("trainer ")) {
                assert!(
                    covered.contains(&stem.as_str()),
                    "{stem} declares trainers but is not tested here"
                );
            }
        }
        assert!(ran >= 15, "only {ran} trainers ran");
    }
}
