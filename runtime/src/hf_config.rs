//! The transformers side of each zoo architecture: the `config.json` that `save_pretrained`
//! would write for a model with the spec's compile-time parameters, and how parameter paths
//! become checkpoint names. Fields a spec does not determine (token ids, dropout, a vision
//! tower's unused projection size) keep transformers' defaults; docs/training.md lists them.

use serde_json::{json, Value};
use vlmc::elab::{ModelParams, Setting};

/// What export needs to know about one architecture.
pub struct HfLayout {
    /// The transformers class (`LlavaForConditionalGeneration`).
    pub architecture: &'static str,
    /// The full `config.json`.
    pub config: Value,
    /// Parameter-path prefixes renamed in the checkpoint (`lm.model.` -> `model.`), first match.
    pub renames: Vec<(&'static str, &'static str)>,
}

impl HfLayout {
    /// The checkpoint name of parameter `path`.
    pub fn hf_name(&self, path: &str) -> String {
        for (from, to) in &self.renames {
            if let Some(rest) = path.strip_prefix(from) {
                return format!("{to}{rest}");
            }
        }
        path.to_string()
    }
}

/// The zoo declarations with no transformers class, and why.
const NO_HF_CLASS: &[(&str, &str)] = &[
    (
        "ClipCap",
        "ClipCap (a CLIP encoder, a mapping network and GPT-2) has no transformers class",
    ),
    (
        "ClipTiny",
        "ClipTiny is the zoo's small CLIP-like example, not a transformers architecture",
    ),
    (
        "LlavaTiny",
        "LlavaTiny is the zoo's small LLaVA-like example, not a transformers architecture",
    ),
];

/// The declarations [`layout`] exports, with their transformers class.
pub const EXPORTABLE: &[(&str, &str)] = &[
    ("Llava", "LlavaForConditionalGeneration"),
    ("Blip2", "Blip2ForConditionalGeneration"),
    ("InstructBlip", "InstructBlipForConditionalGeneration"),
    ("Clip", "CLIPModel"),
    ("Siglip", "SiglipModel"),
    ("Fuyu", "FuyuForCausalLM"),
    ("Chameleon", "ChameleonForConditionalGeneration"),
    ("Flamingo", "IdeficsForVisionText2Text"),
    ("Lxmert", "LxmertModel"),
    ("VisualBert", "VisualBertModel"),
    ("SmolLM2", "LlamaForCausalLM"),
    ("MiniLM", "BertModel"),
];

/// The compile-time parameters, read with errors that name the model and the parameter.
struct Params<'a>(&'a ModelParams);

impl Params<'_> {
    fn get(&self, name: &str) -> Result<&Setting, String> {
        self.0.get(name).ok_or_else(|| {
            format!(
                "model `{}` has no compile-time parameter `{name}` (export reads it)",
                self.0.block
            )
        })
    }
    fn int(&self, name: &str) -> Result<i64, String> {
        match self.get(name)? {
            Setting::Int(i) => Ok(*i),
            other => Err(format!("parameter `{name}` is {other:?}, not an int")),
        }
    }
    fn float(&self, name: &str) -> Result<f64, String> {
        match self.get(name)? {
            Setting::Int(i) => Ok(*i as f64),
            Setting::Float(f) => Ok(*f),
            other => Err(format!("parameter `{name}` is {other:?}, not a number")),
        }
    }
    fn bool(&self, name: &str) -> Result<bool, String> {
        match self.get(name)? {
            Setting::Bool(b) => Ok(*b),
            other => Err(format!("parameter `{name}` is {other:?}, not a bool")),
        }
    }
    fn symbol(&self, name: &str) -> Result<&str, String> {
        match self.get(name)? {
            Setting::Symbol(s) => Ok(s),
            other => Err(format!("parameter `{name}` is {other:?}, not a name")),
        }
    }
    /// An activation parameter (`act: fn = gelu_tanh`) as transformers' `hidden_act`.
    fn act(&self, name: &str) -> Result<&'static str, String> {
        let f = self.symbol(name)?;
        hf_activation(f).ok_or_else(|| {
            format!(
                "parameter `{name}` is the function `{f}`, which has no transformers activation \
                 name (gelu, gelu_tanh, quick_gelu, silu, relu, relu2)"
            )
        })
    }
}

/// transformers' `hidden_act` for a std activation.
fn hf_activation(f: &str) -> Option<&'static str> {
    Some(match f {
        "gelu" => "gelu",
        "gelu_tanh" => "gelu_pytorch_tanh",
        "quick_gelu" => "quick_gelu",
        "silu" => "silu",
        "relu" => "relu",
        "relu2" => "relu2",
        _ => return None,
    })
}

/// The transformers layout of a model instantiating declaration `params.block`; an error for
/// a declaration with no transformers class (saying so) or one vlmc does not know.
pub fn layout(params: &ModelParams) -> Result<HfLayout, String> {
    let p = Params(params);
    let block = params.block.as_str();
    if let Some((_, why)) = NO_HF_CLASS.iter().find(|(b, _)| *b == block) {
        return Err(format!("{why}: it cannot be exported to transformers"));
    }
    let Some(&(_, architecture)) = EXPORTABLE.iter().find(|(b, _)| *b == block) else {
        let known: Vec<&str> = EXPORTABLE.iter().map(|(b, _)| *b).collect();
        return Err(format!(
            "`{block}` is not an architecture vlmc exports to transformers (it exports the zoo's \
             {})",
            known.join(", ")
        ));
    };
    let mut renames = Vec::new();
    let mut config = match block {
        "Llava" => llava(&p)?,
        "Blip2" => blip2(&p)?,
        "InstructBlip" => instructblip(&p)?,
        "Clip" => clip(&p)?,
        "Siglip" => siglip(&p)?,
        "Fuyu" => fuyu(&p)?,
        "Chameleon" => chameleon(&p)?,
        "Flamingo" => idefics(&p)?,
        "Lxmert" => lxmert(&p)?,
        "VisualBert" => visual_bert(&p)?,
        "SmolLM2" => {
            renames = vec![("lm.model.", "model."), ("lm.lm_head.", "lm_head.")];
            smollm2(&p)?
        }
        _ => minilm(&p)?,
    };
    config["architectures"] = json!([architecture]);
    Ok(HfLayout {
        architecture,
        config,
        renames,
    })
}

/// A `rope_parameters` object (transformers 5) for a plain RoPE.
fn rope(theta: f64) -> Value {
    json!({"rope_theta": theta, "rope_type": "default"})
}

/// A Llama text config (`LlamaConfig`).
struct LlamaSizes {
    vocab: i64,
    dim: i64,
    depth: i64,
    heads: i64,
    kv_heads: i64,
    ffn: i64,
    eps: f64,
    rope_theta: f64,
    max_pos: i64,
    tie: bool,
}

fn llama_config(s: &LlamaSizes) -> Value {
    json!({
        "model_type": "llama",
        "vocab_size": s.vocab,
        "hidden_size": s.dim,
        "num_hidden_layers": s.depth,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.dim / s.heads.max(1),
        "intermediate_size": s.ffn,
        "hidden_act": "silu",
        "rms_norm_eps": s.eps,
        "rope_parameters": rope(s.rope_theta),
        "rope_theta": s.rope_theta,
        "max_position_embeddings": s.max_pos,
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": s.tie,
    })
}

/// A CLIP-style vision tower config (`CLIPVisionConfig` and the ones modelled on it).
fn vision_tower(p: &Params, model_type: &str, eps: f64, act: &str) -> Result<Value, String> {
    Ok(json!({
        "model_type": model_type,
        "image_size": p.int("image")?,
        "patch_size": p.int("patch")?,
        "num_channels": 3,
        "hidden_size": p.int("vision_dim")?,
        "num_hidden_layers": p.int("vision_depth")?,
        "num_attention_heads": p.int("vision_heads")?,
        "intermediate_size": p.int("vision_ffn")?,
        "layer_norm_eps": eps,
        "hidden_act": act,
    }))
}

fn llava(p: &Params) -> Result<Value, String> {
    let mut vision = vision_tower(p, "clip_vision_model", 1e-5, "quick_gelu")?;
    vision["projection_dim"] = json!(768);
    let strategy = p.symbol("strategy")?;
    let grid = p.int("image")? / p.int("patch")?.max(1);
    Ok(json!({
        "model_type": "llava",
        "vision_config": vision,
        "text_config": llama_config(&LlamaSizes {
            vocab: p.int("vocab")?,
            dim: p.int("dim")?,
            depth: p.int("depth")?,
            heads: p.int("heads")?,
            kv_heads: p.int("kv_heads")?,
            ffn: p.int("ffn")?,
            eps: p.float("eps")?,
            rope_theta: p.float("rope_theta")?,
            max_pos: p.int("max_len")?,
            tie: false,
        }),
        "image_token_index": p.int("image_token")?,
        "image_seq_length": grid * grid + i64::from(strategy == "full"),
        "vision_feature_layer": p.int("feature_layer")?,
        "vision_feature_select_strategy": strategy,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "tie_word_embeddings": false,
    }))
}

/// The BLIP-2 / InstructBLIP vision tower and Q-Former sizes shared by both.
fn blip_vision(p: &Params, model_type: &str) -> Result<Value, String> {
    let mut v = vision_tower(p, model_type, p.float("vision_eps")?, "gelu")?;
    v["qkv_bias"] = json!(true);
    Ok(v)
}

fn qformer(p: &Params, model_type: &str) -> Result<Value, String> {
    Ok(json!({
        "model_type": model_type,
        "hidden_size": p.int("qformer_dim")?,
        "num_hidden_layers": p.int("qformer_depth")?,
        "num_attention_heads": p.int("qformer_heads")?,
        "intermediate_size": p.int("qformer_ffn")?,
        "cross_attention_frequency": p.int("cross_every")?,
        "encoder_hidden_size": p.int("vision_dim")?,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    }))
}

fn blip2(p: &Params) -> Result<Value, String> {
    let tie = p.bool("tie")?;
    let dim = p.int("dim")?;
    let mut q = qformer(p, "blip_2_qformer")?;
    q["use_qformer_text_input"] = json!(false);
    Ok(json!({
        "model_type": "blip-2",
        "vision_config": blip_vision(p, "blip_2_vision_model")?,
        "qformer_config": q,
        "text_config": {
            "model_type": "opt",
            "vocab_size": p.int("vocab")?,
            "max_position_embeddings": p.int("max_pos")?,
            "hidden_size": dim,
            "word_embed_proj_dim": dim,
            "num_hidden_layers": p.int("depth")?,
            "num_attention_heads": p.int("heads")?,
            "ffn_dim": p.int("ffn")?,
            "activation_function": "relu",
            "do_layer_norm_before": true,
            "enable_bias": true,
            "layer_norm_elementwise_affine": true,
            "_remove_final_layer_norm": false,
            "tie_word_embeddings": tie,
        },
        "num_query_tokens": p.int("queries")?,
        "image_token_index": p.int("image_token")?,
        "use_decoder_only_language_model": true,
        "tie_word_embeddings": tie,
    }))
}

fn instructblip(p: &Params) -> Result<Value, String> {
    let mut q = qformer(p, "instructblip_qformer")?;
    q["vocab_size"] = json!(p.int("qformer_vocab")?);
    q["max_position_embeddings"] = json!(p.int("qformer_max_pos")?);
    Ok(json!({
        "model_type": "instructblip",
        "vision_config": blip_vision(p, "instructblip_vision_model")?,
        "qformer_config": q,
        "text_config": llama_config(&LlamaSizes {
            vocab: p.int("vocab")?,
            dim: p.int("dim")?,
            depth: p.int("depth")?,
            heads: p.int("heads")?,
            kv_heads: p.int("kv_heads")?,
            ffn: p.int("ffn")?,
            eps: p.float("eps")?,
            rope_theta: p.float("rope_theta")?,
            max_pos: 2048,
            tie: false,
        }),
        "num_query_tokens": p.int("queries")?,
        "image_token_index": p.int("image_token")?,
        "use_decoder_only_language_model": true,
        "tie_word_embeddings": false,
    }))
}

/// The text tower of CLIP and SigLIP.
fn text_tower(p: &Params, model_type: &str, eps: f64, act: &str) -> Result<Value, String> {
    Ok(json!({
        "model_type": model_type,
        "vocab_size": p.int("vocab")?,
        "max_position_embeddings": p.int("max_pos")?,
        "hidden_size": p.int("text_dim")?,
        "num_hidden_layers": p.int("text_depth")?,
        "num_attention_heads": p.int("text_heads")?,
        "intermediate_size": p.int("text_ffn")?,
        "layer_norm_eps": eps,
        "hidden_act": act,
    }))
}

fn clip(p: &Params) -> Result<Value, String> {
    let (eps, act) = (p.float("eps")?, p.act("act")?);
    let embed = p.int("embed")?;
    let mut text = text_tower(p, "clip_text_model", eps, act)?;
    text["eos_token_id"] = json!(p.int("eos")?);
    text["projection_dim"] = json!(embed);
    let mut vision = vision_tower(p, "clip_vision_model", eps, act)?;
    vision["projection_dim"] = json!(embed);
    Ok(json!({
        "model_type": "clip",
        "text_config": text,
        "vision_config": vision,
        "projection_dim": embed,
        "logit_scale_init_value": 2.6592,
    }))
}

fn siglip(p: &Params) -> Result<Value, String> {
    let (eps, act) = (p.float("eps")?, p.act("act")?);
    let mut text = text_tower(p, "siglip_text_model", eps, act)?;
    text["projection_size"] = json!(p.int("vision_dim")?);
    let mut vision = vision_tower(p, "siglip_vision_model", eps, act)?;
    vision["vision_use_head"] = json!(true);
    Ok(json!({
        "model_type": "siglip",
        "text_config": text,
        "vision_config": vision,
    }))
}

fn fuyu(p: &Params) -> Result<Value, String> {
    let theta = p.float("rope_theta")?;
    let rotary = p.float("rotary")?;
    Ok(json!({
        "model_type": "fuyu",
        "patch_size": p.int("patch")?,
        "num_channels": p.int("channels")?,
        "image_token_id": p.int("image_token")?,
        "text_config": {
            "model_type": "persimmon",
            "vocab_size": p.int("vocab")?,
            "hidden_size": p.int("dim")?,
            "num_hidden_layers": p.int("depth")?,
            "num_attention_heads": p.int("heads")?,
            "intermediate_size": p.int("ffn")?,
            "hidden_act": "relu2",
            "layer_norm_eps": p.float("eps")?,
            "qk_layernorm": true,
            "rope_parameters": {
                "rope_theta": theta,
                "rope_type": "default",
                "partial_rotary_factor": rotary,
            },
            "rope_theta": theta,
            "partial_rotary_factor": rotary,
            "tie_word_embeddings": false,
        },
        "tie_word_embeddings": false,
    }))
}

/// Chameleon's image-code tokens as its `vocabulary_map` names them: code `k` is token
/// `image_start + k`, named `IMGIMG` + the digits of `k` as letters A-J + `Z`
/// (`ChameleonImageVocabularyMapping` reads the codes back from the names). The text tokens of
/// the map come from the tokenizer and are not part of the spec.
fn chameleon_image_tokens(start: i64, codes: i64) -> Value {
    let map: serde_json::Map<String, Value> = (0..codes.max(0))
        .map(|k| {
            let letters: String = k
                .to_string()
                .bytes()
                .map(|d| char::from(b'A' + (d - b'0')))
                .collect();
            (format!("IMGIMG{letters}Z"), json!(start + k))
        })
        .collect();
    Value::Object(map)
}

fn chameleon(p: &Params) -> Result<Value, String> {
    let theta = p.float("rope_theta")?;
    Ok(json!({
        "vocabulary_map": chameleon_image_tokens(p.int("image_start")?, p.int("image_codes")?),
        "model_type": "chameleon",
        "vocab_size": p.int("vocab")?,
        "hidden_size": p.int("dim")?,
        "num_hidden_layers": p.int("depth")?,
        "num_attention_heads": p.int("heads")?,
        "num_key_value_heads": p.int("kv_heads")?,
        "intermediate_size": p.int("ffn")?,
        "hidden_act": "silu",
        "rms_norm_eps": p.float("eps")?,
        "rope_parameters": rope(theta),
        "rope_theta": theta,
        "swin_norm": p.bool("swin_norm")?,
        "max_position_embeddings": p.int("max_len")?,
        "attention_bias": false,
        "mlp_bias": false,
        "vq_config": {"model_type": "chameleon_vqgan", "num_embeddings": p.int("image_codes")?},
        "tie_word_embeddings": false,
    }))
}

fn idefics(p: &Params) -> Result<Value, String> {
    let theta = p.float("rope_theta")?;
    Ok(json!({
        "model_type": "idefics",
        "vocab_size": p.int("vocab")?,
        "additional_vocab_size": p.int("extra")?,
        "hidden_size": p.int("dim")?,
        "num_hidden_layers": p.int("depth")?,
        "num_attention_heads": p.int("heads")?,
        "intermediate_size": p.int("ffn")?,
        "hidden_act": "silu",
        "rms_norm_eps": p.float("eps")?,
        "rope_parameters": rope(theta),
        "rope_theta": theta,
        "max_position_embeddings": p.int("max_len")?,
        "cross_layer_interval": p.int("every")?,
        "qk_layer_norms": p.bool("qk_norms")?,
        "alpha_type": if p.bool("vector_gates")? { "vector" } else { "float" },
        "use_resampler": true,
        "freeze_text_layers": false,
        "freeze_vision_layers": false,
        "freeze_lm_head": false,
        "vision_config": {
            "model_type": "idefics_vision",
            "image_size": p.int("image")?,
            "patch_size": p.int("patch")?,
            "num_channels": 3,
            "embed_dim": p.int("vision_dim")?,
            "num_hidden_layers": p.int("vision_depth")?,
            "num_attention_heads": p.int("vision_heads")?,
            "intermediate_size": p.int("vision_ffn")?,
            "hidden_act": p.act("vision_act")?,
            "layer_norm_eps": p.float("vision_eps")?,
        },
        "perceiver_config": {
            "model_type": "idefics_perciever",
            "use_resampler": true,
            "resampler_depth": p.int("resampler_depth")?,
            "resampler_n_heads": p.int("resampler_heads")?,
            "resampler_head_dim": p.int("resampler_head_dim")?,
            "resampler_n_latents": p.int("n_latents")?,
            "qk_layer_norms_perceiver": p.bool("qk_norms_perceiver")?,
        },
        "tie_word_embeddings": false,
    }))
}

fn lxmert(p: &Params) -> Result<Value, String> {
    let (l, r, x) = (p.int("l_layers")?, p.int("r_layers")?, p.int("x_layers")?);
    Ok(json!({
        "model_type": "lxmert",
        "vocab_size": p.int("vocab")?,
        "max_position_embeddings": p.int("max_pos")?,
        "hidden_size": p.int("dim")?,
        "num_attention_heads": p.int("heads")?,
        "intermediate_size": p.int("ffn")?,
        "hidden_act": "gelu",
        "l_layers": l,
        "r_layers": r,
        "x_layers": x,
        "num_hidden_layers": {"language": l, "vision": r, "cross_encoder": x},
        "visual_feat_dim": p.int("feat_dim")?,
        "visual_pos_dim": p.int("pos_dim")?,
        "type_vocab_size": p.int("type_vocab")?,
    }))
}

fn visual_bert(p: &Params) -> Result<Value, String> {
    Ok(json!({
        "model_type": "visual_bert",
        "vocab_size": p.int("vocab")?,
        "max_position_embeddings": p.int("max_pos")?,
        "hidden_size": p.int("dim")?,
        "num_hidden_layers": p.int("depth")?,
        "num_attention_heads": p.int("heads")?,
        "intermediate_size": p.int("ffn")?,
        "hidden_act": "gelu",
        "layer_norm_eps": p.float("eps")?,
        "visual_embedding_dim": p.int("visual_dim")?,
        "type_vocab_size": p.int("type_vocab")?,
        "bypass_transformer": false,
        "special_visual_initialize": true,
    }))
}

fn smollm2(p: &Params) -> Result<Value, String> {
    let c = llama_config(&LlamaSizes {
        vocab: p.int("vocab")?,
        dim: p.int("dim")?,
        depth: p.int("depth")?,
        heads: p.int("heads")?,
        kv_heads: p.int("kv_heads")?,
        ffn: p.int("ffn")?,
        eps: 1e-5,
        rope_theta: 100000.0,
        max_pos: p.int("context")?,
        tie: true,
    });
    Ok(c)
}

fn minilm(p: &Params) -> Result<Value, String> {
    Ok(json!({
        "model_type": "bert",
        "vocab_size": p.int("vocab")?,
        "max_position_embeddings": p.int("max_pos")?,
        "hidden_size": p.int("dim")?,
        "num_hidden_layers": p.int("depth")?,
        "num_attention_heads": p.int("heads")?,
        "intermediate_size": p.int("ffn")?,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "type_vocab_size": 2,
        "position_embedding_type": "absolute",
    }))
}
