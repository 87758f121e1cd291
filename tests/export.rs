//! `vlmc export` against the zoo fixtures (tests/fixtures/zoo/<arch>/, written by transformers'
//! `save_pretrained`): every fixture's model.safetensors, exported with its fixture.vlm, gives
//! (a) bit-identical tensors (names, dtypes, shapes, bytes; tensors the spec's checkpoint rules
//! ignore are the only ones left out) and (b) a config.json whose architecture-defining fields
//! equal the fixture's. tests/fixtures/export/check.py (by hand, needs torch) loads the same
//! exports with `from_pretrained` and compares outputs.

use serde_json::Value;
use std::path::{Path, PathBuf};
use vlmc_runtime::export::export;
use vlmc_runtime::weight_set::WeightSet;
use vlmc_runtime::weights::map_name;

/// A fresh temporary folder for one test.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlmc-export-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn elaborate(dir: &Path) -> vlmc::elab::Elaborated {
    let checked = vlmc::elab::check_file(&dir.join("fixture.vlm"));
    let text = checked.render();
    checked
        .result
        .unwrap_or_else(|_| panic!("{text}"))
        .pop()
        .expect("a model")
}

/// The config fields compared per architecture: those that fix the architecture and its sizes.
/// Left out everywhere: token ids (bos/eos/pad, from the tokenizer, not the spec), dropout and
/// initialisation settings, and `transformers_version`. Left out where named: fields the spec
/// does not determine, which the fixture's make.py set to values of its own.
fn compared_fields(arch: &str) -> Vec<&'static str> {
    let vision = [
        "model_type",
        "image_size",
        "patch_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "layer_norm_eps",
        "hidden_act",
    ];
    let llama = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "hidden_act",
        "rms_norm_eps",
        "rope_parameters",
        "attention_bias",
        "mlp_bias",
        "tie_word_embeddings",
    ];
    let qformer = [
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "cross_attention_frequency",
        "encoder_hidden_size",
        "hidden_act",
        "layer_norm_eps",
    ];
    let text_tower = [
        "model_type",
        "vocab_size",
        "max_position_embeddings",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "layer_norm_eps",
        "hidden_act",
    ];
    let under = |prefix: &'static str, keys: &[&'static str]| -> Vec<&'static str> {
        keys.iter()
            .map(|k| &*Box::leak(format!("{prefix}.{k}").into_boxed_str()))
            .collect()
    };
    let mut f: Vec<&'static str> = vec!["model_type", "architectures"];
    match arch {
        // not compared: image_seq_length (a processor field; the fixture keeps the class default
        // 576), vision_config.projection_dim (LLaVA has no projection weights)
        "llava" => {
            f.extend([
                "image_token_index",
                "vision_feature_layer",
                "vision_feature_select_strategy",
                "projector_hidden_act",
                "multimodal_projector_bias",
                "tie_word_embeddings",
                "vision_config.num_channels",
                "text_config.max_position_embeddings",
            ]);
            f.extend(under("vision_config", &vision));
            f.extend(under("text_config", &llama));
        }
        // not compared: qformer vocab_size and max_position_embeddings (BLIP-2's Q-Former has
        // no text embeddings: no weights depend on them)
        "blip2" => {
            f.extend([
                "num_query_tokens",
                "image_token_index",
                "use_decoder_only_language_model",
                "vision_config.qkv_bias",
                "qformer_config.use_qformer_text_input",
            ]);
            f.extend(under("vision_config", &vision));
            f.extend(under("qformer_config", &qformer));
            f.extend(under(
                "text_config",
                &[
                    "model_type",
                    "vocab_size",
                    "max_position_embeddings",
                    "hidden_size",
                    "word_embed_proj_dim",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "ffn_dim",
                    "activation_function",
                    "do_layer_norm_before",
                    "enable_bias",
                    "layer_norm_elementwise_affine",
                    "_remove_final_layer_norm",
                    "tie_word_embeddings",
                ],
            ));
        }
        // not compared: text_config.max_position_embeddings (the spec's Llama has no length
        // limit; the export writes LlamaConfig's default)
        "instructblip" => {
            f.extend([
                "num_query_tokens",
                "image_token_index",
                "use_decoder_only_language_model",
                "vision_config.qkv_bias",
                "qformer_config.vocab_size",
                "qformer_config.max_position_embeddings",
            ]);
            f.extend(under("vision_config", &vision));
            f.extend(under("qformer_config", &qformer));
            f.extend(under("text_config", &llama));
        }
        // not compared: the sub-configs' projection_dim (CLIPModel reads the top-level one),
        // logit_scale_init_value (initialisation only)
        "clip" => {
            f.extend([
                "projection_dim",
                "text_config.eos_token_id",
                "vision_config.num_channels",
            ]);
            f.extend(under("vision_config", &vision));
            f.extend(under("text_config", &text_tower));
        }
        "siglip" => {
            f.extend([
                "text_config.projection_size",
                "vision_config.vision_use_head",
                "vision_config.num_channels",
            ]);
            f.extend(under("vision_config", &vision));
            f.extend(under("text_config", &text_tower));
        }
        // not compared: image_size (Fuyu reads images of any size), text max_position_embeddings
        "fuyu" => {
            f.extend([
                "patch_size",
                "num_channels",
                "image_token_id",
                "tie_word_embeddings",
            ]);
            f.extend(under(
                "text_config",
                &[
                    "model_type",
                    "vocab_size",
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "intermediate_size",
                    "hidden_act",
                    "layer_norm_eps",
                    "qk_layernorm",
                    "rope_parameters",
                    "tie_word_embeddings",
                ],
            ));
        }
        // not compared: the rest of vq_config (the VQ-GAN is not part of the spec) and the text
        // tokens of vocabulary_map (the tokenizer's); its image-code tokens are, below
        "chameleon" => f.extend([
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "hidden_act",
            "rms_norm_eps",
            "rope_parameters",
            "swin_norm",
            "max_position_embeddings",
            "attention_bias",
            "mlp_bias",
            "tie_word_embeddings",
            "vq_config.num_embeddings",
        ]),
        "flamingo" => {
            f.extend([
                "vocab_size",
                "additional_vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "hidden_act",
                "rms_norm_eps",
                "rope_parameters",
                "max_position_embeddings",
                "cross_layer_interval",
                "qk_layer_norms",
                "alpha_type",
                "use_resampler",
                "tie_word_embeddings",
                "vision_config.model_type",
                "vision_config.image_size",
                "vision_config.patch_size",
                "vision_config.num_channels",
                "vision_config.embed_dim",
                "vision_config.num_hidden_layers",
                "vision_config.num_attention_heads",
                "vision_config.intermediate_size",
                "vision_config.hidden_act",
                "vision_config.layer_norm_eps",
            ]);
            f.extend(under(
                "perceiver_config",
                &[
                    "model_type",
                    "use_resampler",
                    "resampler_depth",
                    "resampler_n_heads",
                    "resampler_head_dim",
                    "resampler_n_latents",
                    "qk_layer_norms_perceiver",
                ],
            ));
        }
        "lxmert" => f.extend([
            "vocab_size",
            "max_position_embeddings",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "hidden_act",
            "l_layers",
            "r_layers",
            "x_layers",
            "num_hidden_layers",
            "visual_feat_dim",
            "visual_pos_dim",
            "type_vocab_size",
        ]),
        "visualbert" => f.extend([
            "vocab_size",
            "max_position_embeddings",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_act",
            "layer_norm_eps",
            "visual_embedding_dim",
            "type_vocab_size",
            "bypass_transformer",
            "special_visual_initialize",
        ]),
        other => panic!("no compared fields for fixture `{other}`: add them"),
    }
    f
}

/// The value at a dotted path.
fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// JSON equality with numbers compared as f64 (1e-05 == 1e-5, 40 == 40).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read json")).expect("json")
}

/// Exports one fixture with a tiny shard size; returns the problems found.
fn check_fixture(dir: &Path, out: &Path) -> Vec<String> {
    let arch = dir.file_name().unwrap_or_default().to_string_lossy();
    let m = elaborate(dir);
    let weights = WeightSet::open(&[dir.to_path_buf()]).expect("open fixture");
    let hf = out.join(&*arch);
    let done = match export(&m, &weights, &hf, 64 * 1024) {
        Ok(d) => d,
        Err(e) => return vec![format!("{arch}: {e}")],
    };
    let mut problems = Vec::new();
    // (a) tensors
    let exported = WeightSet::open(std::slice::from_ref(&hf)).expect("open export");
    let want: Vec<String> = weights
        .names()
        .into_iter()
        .filter(|n| map_name(n, &m.checkpoint).is_some())
        .collect();
    if exported.names() != want {
        problems.push(format!(
            "{arch}: exported names differ: {:?} vs the fixture's {:?}",
            exported.names(),
            want
        ));
    }
    for name in &want {
        let (Ok(a), Ok(b)) = (exported.raw(name), weights.raw(name)) else {
            continue;
        };
        if a != b {
            problems.push(format!(
                "{arch}: tensor `{name}` differs: {:?}{:?} vs {:?}{:?} ({} vs {} bytes)",
                a.0,
                a.1,
                b.0,
                b.1,
                a.2.len(),
                b.2.len()
            ));
        }
    }
    let shards = done.files.len();
    if shards < 2 || !hf.join("model.safetensors.index.json").is_file() {
        problems.push(format!(
            "{arch}: a 64 KiB shard size gave {shards} file(s) and no index"
        ));
    }
    // (b) config
    let got = read_json(&hf.join("config.json"));
    let fixture = read_json(&dir.join("config.json"));
    for field in compared_fields(&arch) {
        match (at(&got, field), at(&fixture, field)) {
            (Some(g), Some(f)) if same(g, f) => {}
            (g, f) => problems.push(format!(
                "{arch}: config `{field}` is {g:?}, the fixture's is {f:?}"
            )),
        }
    }
    if arch == "chameleon" {
        let image_tokens = |v: &Value| -> Vec<(String, Value)> {
            let mut e: Vec<(String, Value)> = at(v, "vocabulary_map")
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| k.starts_with("IMGIMG"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            e.sort_by(|a, b| a.0.cmp(&b.0));
            e
        };
        let (g, f) = (image_tokens(&got), image_tokens(&fixture));
        if g.is_empty() || g != f {
            problems.push(format!(
                "{arch}: vocabulary_map image tokens: {} exported, {} in the fixture, equal: {}",
                g.len(),
                f.len(),
                g == f
            ));
        }
    }
    println!(
        "{arch}: {} tensors bit-identical in {shards} shards, {} config fields equal",
        want.len(),
        compared_fields(&arch).len()
    );
    problems
}

#[test]
fn every_zoo_fixture_exports_as_transformers_saved_it() {
    let out = scratch("zoo");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/zoo")
        .expect("tests/fixtures/zoo")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    let mut problems = Vec::new();
    let mut exported = 0;
    for dir in &dirs {
        let config = read_json(&dir.join("config.json"));
        // ClipCap's fixture is a torch state_dict of its own modules: no transformers class
        if config.get("architectures").is_none() {
            let m = elaborate(dir);
            let w = WeightSet::open(&[dir.to_path_buf()]).expect("open");
            match export(&m, &w, &out.join("none"), u64::MAX) {
                Ok(_) => problems.push(format!("{}: exported", dir.display())),
                Err(e) => assert!(
                    e.message.contains("has no transformers class"),
                    "{}",
                    e.message
                ),
            }
            assert!(!out.join("none").exists());
            continue;
        }
        problems.extend(check_fixture(dir, &out));
        exported += 1;
    }
    let _ = std::fs::remove_dir_all(&out);
    assert_eq!(exported, 10, "fixtures with a transformers class");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
