//! The training data pipeline against exact expected tensors, on zoo models at fixture size:
//! LLaVA's placeholder expanded where it stands (and rows without an image), Fuyu's patch grid
//! with its newline tokens, IDEFICS' several images per row and image mask, InstructBLIP's
//! instruction for the Q-Former, a chat template's assistant turns as targets, and the errors
//! for rows that do not fit the model.

mod common;

use common::{word_tokenizer, zoo_model};
use std::collections::BTreeMap;
use std::path::PathBuf;
use vlmc_runtime::train_data::{parse_rows, Example, LossMask, RowFormat, Tok};
use vlmc_runtime::train_inputs::BatchPlan;
use vlmc_runtime::Tensor;

const WHAT: i32 = 50;
const COLOUR: i32 = 51;
const IS: i32 = 52;
const RED: i32 = 56;
const BLUE: i32 = 58;
const EOS: i32 = 2;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-trainin-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn image() -> String {
    std::fs::canonicalize("tests/fixtures/train/colours/img/train_000.png")
        .expect("image")
        .display()
        .to_string()
}

/// Rows → examples → the batch, for `model` with a tokenizer of `specials`.
struct Pipe {
    model: vlmc::elab::Elaborated,
    tok: Tok,
    plan: BatchPlan,
    format: RowFormat,
    dir: PathBuf,
}

impl Pipe {
    fn new(name: &str, model: vlmc::elab::Elaborated, specials: &[(&str, u32)]) -> Pipe {
        let dir = tmp(name);
        word_tokenizer(&dir.join("tokenizer.json"), specials, WHAT as u32);
        if name == "instructblip" {
            word_tokenizer(
                &dir.join("qformer_tokenizer.json"),
                &[("<pad>", 0), ("<unk>", 1)],
                10,
            );
        }
        let tok = Tok::load(&dir.join("tokenizer.json")).expect("tokenizer");
        let plan = BatchPlan::of(&model, &tok, &dir).expect("plan");
        let format = RowFormat {
            images: plan.image_tokens(&model, &tok).expect("image tokens"),
            ..RowFormat::plain(true, None)
        };
        Pipe {
            model,
            tok,
            plan,
            format,
            dir,
        }
    }

    fn rows(&self, rows: &[serde_json::Value]) -> Result<Vec<Example>, String> {
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        parse_rows(&self.dir.join("data.jsonl"), &text, &self.tok, &self.format)
            .map_err(|e| e.message)
    }

    fn batch(&self, rows: &[serde_json::Value]) -> BTreeMap<String, Tensor> {
        let ex = self.rows(rows).expect("rows");
        let refs: Vec<&Example> = ex.iter().collect();
        self.plan.collate(&refs).expect("batch")
    }
}

fn ids(t: &Tensor) -> Vec<i32> {
    t.to_f64().iter().map(|&x| x as i32).collect()
}

#[test]
fn llava_places_image_tokens_where_the_placeholder_stands() {
    let p = Pipe::new(
        "llava",
        zoo_model("llava", &[]),
        &[("<pad>", 0), ("<unk>", 3), ("</s>", 2), ("<image>", 90)],
    );
    let img = image();
    let b = p.batch(&[
        serde_json::json!({"image": img, "prompt": "what <image> is", "completion": "red"}),
        serde_json::json!({"prompt": "what is", "completion": "blue"}),
    ]);
    // 12-pixel images in 4-pixel patches: 9 image tokens where `<image>` stood
    let mut row0 = vec![WHAT];
    row0.extend([90; 9]);
    row0.extend([IS, RED, EOS]);
    let row1 = [WHAT, IS, BLUE, EOS];
    let t = row0.len();
    let mut want = row0.clone();
    want.extend(row1);
    want.extend(vec![0; t - row1.len()]);
    assert_eq!(b["ids"].shape, vec![2, t]);
    assert_eq!(ids(&b["ids"]), want);
    let mut mask = vec![1; t];
    mask.extend(vec![1; 4]);
    mask.extend(vec![0; t - 4]);
    assert_eq!(ids(&b["mask"]), mask);
    // targets: the completion and EOS only (never an image token)
    let mut loss = vec![0.0; 11];
    loss.extend([1.0, 1.0]);
    loss.extend([0.0, 0.0, 1.0, 1.0]);
    loss.extend(vec![0.0; t - 4]);
    assert_eq!(b["loss_mask"].to_f64(), loss);
    // one image in the batch: the row without one adds none
    assert_eq!(b["pixels"].shape, vec![1, 3, 12, 12]);
    // a batch of text rows only: no image at all
    let b = p.batch(&[serde_json::json!({"prompt": "what is", "completion": "red"})]);
    assert_eq!(b["pixels"].shape, vec![0, 3, 12, 12]);
}

#[test]
fn fuyu_puts_the_patch_grid_with_newlines_before_the_text() {
    let p = Pipe::new(
        "fuyu",
        zoo_model("fuyu", &[("image", "8")]),
        &[
            ("<pad>", 0),
            ("<unk>", 3),
            ("</s>", 2),
            ("|SPEAKER|", 90),
            ("|NEWLINE|", 91),
        ],
    );
    let b = p.batch(&[serde_json::json!({"image": image(), "prompt": "what",
        "completion": "red"})]);
    // 8-pixel image, 4-pixel patches: 2 rows of 2 patches, each row ended by |NEWLINE|
    assert_eq!(ids(&b["ids"]), [90, 90, 91, 90, 90, 91, WHAT, RED, EOS]);
    assert_eq!(
        b["loss_mask"].to_f64(),
        [0., 0., 0., 0., 0., 0., 0., 1., 1.]
    );
    assert_eq!(b["patches"].shape, vec![1, 4, 48]);
    // the patches are the image's pixels, cut as FuyuImageProcessor does
    let pre = p
        .model
        .preprocess
        .iter()
        .find(|x| x.kind == "patches")
        .expect("patches preprocessing");
    let px = vlmc_runtime::inputs::load_images(pre, &[image()]).expect("pixels");
    assert_eq!(
        b["patches"],
        vlmc_runtime::train_inputs::patchify(&px, 4),
        "patches"
    );
}

#[test]
fn idefics_takes_several_images_per_row_and_masks_each_token_to_the_latest() {
    let p = Pipe::new(
        "flamingo",
        zoo_model("flamingo", &[]),
        &[
            ("<pad>", 0),
            ("<unk>", 3),
            ("</s>", 2),
            ("<fake_token_around_image>", 99),
            ("<image>", 100),
        ],
    );
    let img = image();
    let b = p.batch(&[
        serde_json::json!({"images": [img, img], "text": "what <image> red <image> blue"}),
        serde_json::json!({"images": [img], "text": "<image> red"}),
    ]);
    assert_eq!(
        ids(&b["ids"]),
        [WHAT, 100, RED, 100, BLUE, 100, RED, 0, 0, 0]
    );
    // two image slots per row; row 1's second slot is empty (zeros)
    assert_eq!(b["pixels"].shape, vec![4, 3, 20, 20]);
    let px = b["pixels"].to_f64();
    let per = 3 * 20 * 20;
    assert!(px[..3 * per].iter().any(|&v| v != 0.0));
    assert!(px[3 * per..].iter().all(|&v| v == 0.0));
    assert_eq!(b["image_mask"].shape, vec![2, 5, 2]);
    #[rustfmt::skip]
    let want = [
        0, 0,  1, 0,  1, 0,  0, 1,  0, 1, // before the first image: none
        1, 0,  1, 0,  0, 0,  0, 0,  0, 0, // padding sees nothing
    ];
    assert_eq!(ids(&b["image_mask"]), want);
}

#[test]
fn instructblip_gives_the_qformer_the_instruction() {
    let p = Pipe::new(
        "instructblip",
        zoo_model("instructblip", &[]),
        &[("<pad>", 0), ("<unk>", 3), ("</s>", 2), ("<image>", 98)],
    );
    let b = p.batch(&[
        serde_json::json!({"image": image(), "prompt": "what colour is",
        "completion": "red"}),
    ]);
    // the LLM: 6 query placeholders first (InstructBlipProcessor), then the prompt
    let mut want = vec![98; 6];
    want.extend([WHAT, COLOUR, IS, RED, EOS]);
    assert_eq!(ids(&b["ids"]), want);
    // the Q-Former: the instruction in its own tokenizer (words from id 10)
    assert_eq!(ids(&b["qformer_ids"]), [10, 11, 12]);
    assert_eq!(ids(&b["qformer_mask"]), [1, 1, 1]);
}

#[test]
fn a_chat_template_marks_assistant_turns() {
    let model = zoo_model("chameleon", &[]);
    let mut p = Pipe::new(
        "chat",
        model,
        &[
            ("<pad>", 0),
            ("<unk>", 3),
            ("</s>", 2),
            ("<s>", 1),
            ("<|im_start|>", 45),
            ("<|im_end|>", 46),
        ],
    );
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}";
    let cfg = vlmc_runtime::chat::TokenizerConfig {
        chat_template: Some(template.into()),
        ..Default::default()
    };
    let (s, e, user, asst) = (45, 46, 62, 63);
    let chat = serde_json::json!({"messages": [
        {"role": "user", "content": "what colour"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "what is"},
        {"role": "assistant", "content": "blue"},
    ]});
    let all = [
        s, user, WHAT, COLOUR, e, s, asst, RED, e, s, user, WHAT, IS, e, s, asst, BLUE, e,
    ];
    for (mask, targets) in [
        (LossMask::Prompt, vec![16, 17]),
        (LossMask::Assistant, vec![7, 8, 16, 17]),
        (LossMask::None, (0..18).collect()),
    ] {
        p.format.mask = mask;
        p.format.chat = Some((template.into(), cfg.clone()));
        let ex = p.rows(std::slice::from_ref(&chat)).expect("rows");
        assert_eq!(ex[0].ids, all, "{mask:?}");
        let want: Vec<f32> = (0..18)
            .map(|i| if targets.contains(&i) { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(ex[0].mask, want, "{mask:?}");
    }
}

#[test]
fn rows_that_do_not_fit_the_model_are_refused_with_their_line() {
    let p = Pipe::new(
        "errors",
        zoo_model("llava", &[]),
        &[("<pad>", 0), ("<unk>", 3), ("</s>", 2), ("<image>", 90)],
    );
    let img = image();
    let e = p
        .rows(&[
            serde_json::json!({"prompt": "what is", "completion": "red"}),
            serde_json::json!({"image": img, "prompt": "<image> <image>", "completion": "red"}),
        ])
        .unwrap_err();
    assert!(
        e.contains("data.jsonl:2:")
            && e.contains("2 image placeholder(s)")
            && e.contains("1 image(s)"),
        "{e}"
    );
    let mut short = RowFormat {
        max_len: Some(5),
        ..p.format.clone()
    };
    short.mask = LossMask::Prompt;
    let text = format!(
        "{}\n",
        serde_json::json!({"image": img, "prompt": "what is <image>", "completion": "red"})
    );
    let e = parse_rows(&p.dir.join("data.jsonl"), &text, &p.tok, &short)
        .unwrap_err()
        .message;
    assert!(
        e.contains("data.jsonl:1:") && e.contains("lose image tokens"),
        "{e}"
    );
    // one image per row: llava_tiny refuses a row without one, naming it
    let tiny = Pipe::new(
        "tiny",
        common::load("models/llava_tiny.vlm"),
        &[("<pad>", 0), ("<unk>", 3), ("</s>", 2)],
    );
    let ex = tiny
        .rows(&[serde_json::json!({"prompt": "what", "completion": "red"})])
        .expect("rows");
    let e = tiny
        .plan
        .check_row(&ex[0], "data.jsonl:1")
        .unwrap_err()
        .message;
    assert!(
        e.contains("data.jsonl:1: the model takes one image per row"),
        "{e}"
    );
}

#[test]
fn inputs_given_per_row_are_read_and_stacked() {
    // LXMERT's region features come with the row: files (npy / safetensors) per row
    let p = Pipe::new(
        "lxmert",
        zoo_model("lxmert", &[]),
        &[("<pad>", 0), ("<unk>", 3), ("</s>", 2)],
    );
    let io = std::fs::canonicalize("tests/fixtures/zoo/lxmert/io.safetensors").expect("io");
    let feats = vlmc_runtime::weights::WeightFile::open(&io)
        .expect("io")
        .get("visual_feats")
        .expect("visual_feats");
    let pos = vlmc_runtime::weights::WeightFile::open(&io)
        .expect("io")
        .get("visual_pos")
        .expect("visual_pos");
    // one row's [R, D] each, written as npy-free safetensors files
    let (r, d) = (feats.shape[1], feats.shape[2]);
    let one =
        |t: &Tensor, w: usize| Tensor::f32(vec![r, w], t.as_f32().expect("f32")[..r * w].to_vec());
    let mut m = BTreeMap::new();
    m.insert("feats".to_string(), one(&feats, d));
    m.insert("pos".to_string(), one(&pos, pos.shape[2]));
    let file = p.dir.join("region.safetensors");
    vlmc_runtime::weights::save(&file, &m).expect("save");
    let f = file.display().to_string();
    let row = serde_json::json!({"text": "what colour", "visual_feats": format!("{f}:feats"),
        "visual_pos": format!("{f}:pos")});
    let b = p.batch(&[row.clone(), row]);
    assert_eq!(b["visual_feats"].shape, vec![2, r, d]);
    let got = b["visual_feats"].as_f32().expect("f32").to_vec();
    assert_eq!(&got[..r * d], &feats.as_f32().expect("f32")[..r * d]);
    assert_eq!(&got[r * d..], &feats.as_f32().expect("f32")[..r * d]);
    assert_eq!(ids(&b["token_type_ids"]), vec![0; 4]);
    assert_eq!(ids(&b["attention_mask"]), vec![1; 4]);
    // a row without them is refused before the run, naming the input
    let ex = p
        .rows(&[serde_json::json!({"text": "what"})])
        .expect("rows");
    let e = p
        .plan
        .check_row(&ex[0], "data.jsonl:1")
        .unwrap_err()
        .message;
    assert!(
        e.contains(
            "data.jsonl:1: the row does not give the model's input(s) `visual_feats`, `visual_pos`"
        ),
        "{e}"
    );
}
