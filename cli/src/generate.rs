//! `vlmc generate`: text from a model with a compiled key/value-cache decoder (see
//! `vlmc_runtime::generate`), for one prompt (streamed), a chat, or a JSONL file of prompts.

use crate::cuda::Target;
use serde_json::{json, Value as Json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vlmc::elab::{Preprocess, Setting};
use vlmc_runtime::chat::{self, TokenizerConfig};
use vlmc_runtime::generate::{Control, Generated, Generator, Options, Prompt, Runner, Stats};
use vlmc_runtime::sample::Sampling;

/// `vlmc generate` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// The .vlm file.
    pub file: PathBuf,
    /// Which model of the file (default: the last one).
    #[arg(long)]
    pub model: Option<String>,
    /// Set a compile-time parameter of the model: NAME=VALUE (repeatable).
    #[arg(long = "set", value_parser = crate::parse_set)]
    pub sets: Vec<(String, String)>,
    /// Weights: safetensors files (repeat the flag or separate with commas), a sharded
    /// checkpoint's index or a Hugging Face model folder; the tokenizer, chat template and
    /// end-of-sequence token are read from the same folder (the first file's).
    #[arg(long, required = true, value_delimiter = ',')]
    pub weights: Vec<PathBuf>,
    /// A LoRA adapter in the PEFT layout to generate with, unmerged (as `vlmc run --adapter`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Apply --adapter even to weights other than the base it records (vlmc_base.json).
    #[arg(long)]
    pub allow_other_base: bool,
    /// The tokenizer.json (default: the model's `preprocess ... = text(tokenizer: ...)` or
    /// tokenizer.json next to the weights).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The prompt text (tokenized with the tokenizer's special tokens).
    #[arg(long, conflicts_with_all = ["chat", "data"])]
    pub prompt: Option<String>,
    /// A chat: a JSON file with a list of {"role", "content"} messages, rendered with the
    /// tokenizer's chat template and a generation prompt.
    #[arg(long, conflicts_with = "data")]
    pub chat: Option<PathBuf>,
    /// A JSONL file of prompts ({"prompt": ...} or {"messages": [...]}, optional "images"),
    /// generated in batches; results go to --out as JSONL, in input order.
    #[arg(long, requires = "out")]
    pub data: Option<PathBuf>,
    /// Where --data's results go (JSONL).
    #[arg(short, long)]
    pub out: Option<PathBuf>,
    /// An image for the prompt (repeatable, where the model takes several).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// The most tokens to generate per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample from the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample from the most likely tokens whose probabilities sum to P (nucleus).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f64,
    /// Penalise tokens already in the sequence (1: none), as transformers does.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f64,
    /// The sampling seed (a row's samples depend on it and on the row's place in the input).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop a sequence when its text contains this string (repeatable; not included).
    #[arg(long = "stop")]
    pub stops: Vec<String>,
    /// Print one JSON object: text, tokens, log-probabilities, stop reason, timings.
    #[arg(long)]
    pub json: bool,
    /// Prompts per batch with --data.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Run the reference interpreter instead of compiled code.
    #[arg(long)]
    pub interp: bool,
    /// Where to run: cpu, or cuda (an NVIDIA GPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub target: Target,
    /// Do not use the disk cache of compiled CPU kernels (also: VLMC_NO_CACHE=1).
    #[arg(long)]
    pub no_cache: bool,
}

fn fail(msg: impl std::fmt::Display) -> u8 {
    eprintln!("error: {msg}");
    1
}

/// Everything needed to turn prompts into tokens and tokens into text.
struct Session {
    gen: Generator,
    tok: vlmc_runtime::tokenizers::Tokenizer,
    cfg: TokenizerConfig,
    eos: Vec<i32>,
    image_pre: Option<Preprocess>,
    /// The placeholder that stands for one image in a prompt, and how many tokens it becomes.
    image_token: Option<(String, usize)>,
    opts: Options,
}

/// One prompt as given: text or chat messages, and image paths.
struct RawPrompt {
    text: Option<String>,
    messages: Option<Json>,
    images: Vec<PathBuf>,
}

/// `vlmc generate`.
pub fn generate(a: &GenerateArgs) -> Result<(), u8> {
    let sampling = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    sampling.check().map_err(fail)?;
    if a.prompt.is_none() && a.chat.is_none() && a.data.is_none() {
        return Err(fail(
            "give a --prompt TEXT, a --chat MESSAGES.json or --data PROMPTS.jsonl",
        ));
    }
    if a.batch == 0 {
        return Err(fail("--batch must be at least 1"));
    }
    if a.interp && a.target == Target::Cuda {
        return Err(fail(
            "--interp runs the interpreter on the CPU: drop --target cuda",
        ));
    }
    if let Some(out) = &a.out {
        let weight_files = vlmc_runtime::weight_set::files_of(&a.weights);
        let mut inputs: Vec<(&str, &Path)> = weight_files
            .iter()
            .map(|w| ("the weights (--weights)", w.as_path()))
            .collect();
        if let Some(d) = &a.data {
            inputs.push(("the prompts (--data)", d));
        }
        inputs.push(("the model file", &a.file));
        crate::check_output(out, &inputs)?;
        crate::adapter::check_output(out, a.adapter.as_deref()).map_err(fail)?;
    }
    let t0 = Instant::now();
    let mut g =
        vlmc::elab::generation_graphs(&a.file, a.model.as_deref(), &a.sets).map_err(|e| {
            eprint!("{e}");
            if !e.ends_with('\n') {
                eprintln!();
            }
            1u8
        })?;
    let dir = vlmc_runtime::weight_set::tokenizer_dir(&a.weights);
    let text_pre = g
        .prefill
        .preprocess
        .iter()
        .find(|p| p.kind == "text")
        .cloned();
    let image_pre = g
        .prefill
        .preprocess
        .iter()
        .find(|p| p.kind == "image")
        .cloned();
    let tok_path = match (&a.tokenizer, &text_pre) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => match p.arg("tokenizer") {
            Some(Setting::Str(s)) => dir.join(s),
            _ => dir.join("tokenizer.json"),
        },
        (None, None) => dir.join("tokenizer.json"),
    };
    let tok = vlmc_runtime::inputs::load_tokenizer(&tok_path).map_err(|e| fail(e.message))?;
    let cfg = TokenizerConfig::read(&dir).map_err(fail)?;
    let eos = chat::eos_ids(&dir, &cfg, &tok).map_err(fail)?;
    let context = text_pre.as_ref().and_then(|p| match p.arg("max_len") {
        Some(Setting::Int(i)) if *i > 0 => Some(*i as usize),
        _ => None,
    });
    let mut bound = crate::adapter::bind_for_run(
        &a.file,
        &mut g.prefill,
        &a.weights,
        a.adapter.as_deref(),
        a.allow_other_base,
    )
    .map_err(fail)?;
    if let Some(d) = &a.adapter {
        // The decoding step reads the same layers: the same adapter, the same tensors.
        let peft =
            crate::adapter::load(&g.step, d, &bound.params, &a.weights, true).map_err(fail)?;
        let mut step_params = std::collections::BTreeMap::new();
        vlmc_runtime::adapter::attach(&mut g.step.graph, &mut step_params, &peft)
            .map_err(|e| fail(format!("{}: {}", d.display(), e.message)))?;
        bound.params.extend(step_params);
    }
    if !bound.unused.is_empty() {
        eprintln!(
            "warning: {} tensor(s) in {} are not used",
            bound.unused.len(),
            crate::adapter::shown(&a.weights)
        );
    }
    let runner = |m: &vlmc::elab::Elaborated| -> Result<Runner, u8> {
        match (a.interp, a.target) {
            (true, _) => Ok(Runner::interp(m)),
            (false, Target::Cpu) => Runner::cpu(m, crate::cpu_options(a.no_cache)).map_err(fail),
            (false, Target::Cuda) => {
                Runner::cuda(m, vlmc_runtime::cuda::CudaOptions::default()).map_err(fail)
            }
        }
    };
    let gen = Generator::new(runner(&g.prefill)?, runner(&g.step)?, bound.params).map_err(fail)?;
    eprintln!(
        "loaded {} ({} prefill ops, {} step ops, {} key/value caches) in {:.0} ms",
        g.prefill.model,
        g.prefill.graph.len(),
        g.step.graph.len(),
        g.step
            .graph
            .inputs()
            .iter()
            .filter(|(_, n, _)| n.starts_with("past:"))
            .count(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let session = Session {
        gen,
        tok,
        cfg,
        eos: eos.clone(),
        image_pre,
        image_token: text_pre.as_ref().and_then(|p| {
            match (p.arg("image_token"), p.arg("image_tokens")) {
                (Some(Setting::Str(t)), Some(Setting::Int(n))) if !t.is_empty() && *n > 0 => {
                    Some((t.clone(), *n as usize))
                }
                _ => None,
            }
        }),
        opts: Options {
            max_new_tokens: a.max_new_tokens,
            sampling,
            eos,
            pad: 0,
            context,
            keep_logits: false,
            min_capacity: 0,
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // a second Ctrl-C ends the process at once
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    match &a.data {
        Some(data) => run_data(a, &session, data, &stop),
        None => {
            let raw = RawPrompt {
                text: a.prompt.clone(),
                messages: match &a.chat {
                    Some(p) => Some(chat::read_json(p).map_err(fail)?),
                    None => None,
                },
                images: a.images.clone(),
            };
            run_one(a, &session, raw, &stop)
        }
    }
}

impl Session {
    /// A prompt's tokens and inputs.
    fn prompt(&self, raw: &RawPrompt, base: &Path) -> Result<Prompt, String> {
        let (text, special) = match (&raw.text, &raw.messages) {
            (Some(t), _) => (t.clone(), true),
            (None, Some(m)) => {
                let Some(tmpl) = &self.cfg.chat_template else {
                    return Err(
                        "the tokenizer has no chat template (tokenizer_config.json's \
                         \"chat_template\"): give a --prompt instead"
                            .into(),
                    );
                };
                (chat::render(tmpl, m, true, &self.cfg)?, false)
            }
            (None, None) => return Err("a prompt needs \"prompt\" text or \"messages\"".into()),
        };
        let text = self.expand_images(text, raw.images.len())?;
        let enc = self
            .tok
            .encode(text.as_str(), special)
            .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
        let ids: Vec<i32> = enc.get_ids().iter().map(|&x| x as i32).collect();
        if ids.is_empty() {
            return Err("the prompt has no tokens".into());
        }
        let mut extra = std::collections::BTreeMap::new();
        let wants: Vec<&str> = self
            .gen
            .extra_inputs
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        if !raw.images.is_empty() {
            let Some(p) = &self.image_pre else {
                return Err(format!(
                    "this model takes no images (it has no `preprocess ... = image(...)`); \
                     its prompt inputs: {}",
                    if wants.is_empty() {
                        "token ids only".to_string()
                    } else {
                        wants.join(", ")
                    }
                ));
            };
            let paths: Vec<String> = raw
                .images
                .iter()
                .map(|i| base.join(i).to_string_lossy().into_owned())
                .collect();
            let t = vlmc_runtime::inputs::load_images(p, &paths).map_err(|e| e.message)?;
            if let Some(name) = p.inputs.first() {
                extra.insert(name.clone(), t);
            }
        }
        for w in &wants {
            if !extra.contains_key(*w) {
                return Err(match &self.image_pre {
                    Some(p) if p.inputs.iter().any(|n| n == w) => {
                        format!("this model needs an image for its input `{w}`: give --image FILE")
                    }
                    _ => format!(
                        "this model's prompt needs the input `{w}`, which generate cannot make"
                    ),
                });
            }
        }
        Ok(Prompt { ids, extra })
    }
}

impl Session {
    /// Each image placeholder of the prompt (`<image>`) becomes as many placeholder tokens as
    /// the model's features of one image replace; their count must be the number of images.
    fn expand_images(&self, text: String, images: usize) -> Result<String, String> {
        let Some((tok, n)) = &self.image_token else {
            return Ok(text);
        };
        let found = text.matches(tok.as_str()).count();
        if found != images {
            return Err(format!(
                "the prompt has {found} image placeholder(s) `{tok}` but {images} image(s) are \
                 given: put one `{tok}` where each image goes"
            ));
        }
        Ok(text.replace(tok.as_str(), &tok.repeat(*n)))
    }
}

/// Incremental detokenisation: the text of a row's tokens so far, printed only up to what can
/// no longer change (never half a UTF-8 character, never the start of a stop string).
struct Detok {
    tokens: Vec<u32>,
    printed: usize,
    text: String,
}

impl Detok {
    fn new() -> Detok {
        Detok {
            tokens: Vec::new(),
            printed: 0,
            text: String::new(),
        }
    }

    /// Adds a token; returns the new printable text and whether a stop string was reached.
    fn push(
        &mut self,
        tok: &vlmc_runtime::tokenizers::Tokenizer,
        id: u32,
        stops: &[String],
        eos: bool,
    ) -> (String, bool) {
        if !eos {
            self.tokens.push(id);
        }
        self.text = tok.decode(&self.tokens, true).unwrap_or_default();
        if let Some(at) = stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            return (self.flush(), true);
        }
        if self.text.ends_with('\u{FFFD}') {
            return (String::new(), false);
        }
        let hold = stops
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut end = self.text.len().saturating_sub(hold).max(self.printed);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let out = self.text.get(self.printed..end).unwrap_or("").to_string();
        self.printed = end.max(self.printed);
        (out, false)
    }

    /// The rest of the text.
    fn flush(&mut self) -> String {
        let out = self.text.get(self.printed..).unwrap_or("").to_string();
        self.printed = self.text.len();
        out
    }
}

/// What the engine does after a token: everything stops on Ctrl-C, the row on a stop string.
fn control(stop: &AtomicBool, hit_stop_string: bool) -> Control {
    if stop.load(Ordering::SeqCst) {
        Control::StopAll
    } else if hit_stop_string {
        Control::StopRow
    } else {
        Control::Continue
    }
}

/// Decode steps per second (0 when there were none).
fn decode_rate(stats: &Stats) -> f64 {
    if stats.decode_s > 0.0 {
        stats.decode_steps as f64 / stats.decode_s
    } else {
        0.0
    }
}

fn result_json(g: &Generated, text: &str, prompt_tokens: usize) -> Json {
    json!({
        "text": text,
        "tokens": g.tokens,
        "logprobs": g.logprobs,
        "stop_reason": g.stop.as_str(),
        "prompt_tokens": prompt_tokens,
    })
}

fn run_one(a: &GenerateArgs, s: &Session, raw: RawPrompt, stop: &AtomicBool) -> Result<(), u8> {
    let prompt = s.prompt(&raw, Path::new("")).map_err(fail)?;
    let n_prompt = prompt.ids.len();
    let mut detok = Detok::new();
    let mut stdout = std::io::stdout();
    let mut stats = Stats::default();
    let t0 = Instant::now();
    let mut first_token: Option<f64> = None;
    let out = s
        .gen
        .generate(
            std::slice::from_ref(&prompt),
            &[0],
            &s.opts,
            &mut |_, tok, _| {
                first_token.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                let (piece, hit) = detok.push(&s.tok, tok as u32, &a.stops, s.eos.contains(&tok));
                if !a.json {
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                }
                control(stop, hit)
            },
            &mut stats,
        )
        .map_err(fail)?;
    let g = &out[0];
    let rest = detok.flush();
    let ttft = first_token.unwrap_or(0.0);
    let rate = decode_rate(&stats);
    if a.json {
        let mut j = result_json(g, &detok.text, n_prompt);
        j["timing"] = json!({
            "first_token_s": ttft,
            "compile_s": stats.compile_s,
            "decode_tokens_per_s": rate,
            "cache_bytes": stats.cache_bytes,
            "capacity": stats.capacity,
        });
        println!("{j}");
    } else {
        let _ = stdout.write_all(rest.as_bytes());
        println!();
    }
    eprintln!(
        "{} prompt tokens, {} new ({}); first token after {:.0} ms (plans {:.0} ms), then {:.1} \
         tokens/s; cache {} slots, {:.1} MB",
        n_prompt,
        g.tokens.len(),
        g.stop.as_str(),
        ttft * 1e3,
        stats.compile_s * 1e3,
        rate,
        stats.capacity,
        stats.cache_bytes as f64 / 1e6
    );
    if stop.load(Ordering::SeqCst) {
        eprintln!("stopped (Ctrl-C)");
        return Err(130);
    }
    Ok(())
}

/// One line of a --data file.
fn parse_line(line: &str, n: usize, file: &Path) -> Result<RawPrompt, String> {
    let at = |msg: String| format!("{}:{n}: {msg}", file.display());
    let j: Json = serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
    let text = match j.get("prompt") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(_) => return Err(at("\"prompt\" must be a string".into())),
        None => None,
    };
    let messages = j.get("messages").cloned();
    if text.is_none() && messages.is_none() {
        return Err(at(
            "each line needs \"prompt\" (text) or \"messages\" (a chat)".into(),
        ));
    }
    if let Some(m) = &messages {
        chat::check_messages(m).map_err(at)?;
    }
    let images = match j.get("images").or(j.get("image")) {
        None => Vec::new(),
        Some(Json::String(s)) => vec![PathBuf::from(s)],
        Some(Json::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(PathBuf::from)
                    .ok_or_else(|| at("\"images\" holds paths".into()))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(at("\"images\" is a path or a list of paths".into())),
    };
    Ok(RawPrompt {
        text,
        messages,
        images,
    })
}

fn run_data(a: &GenerateArgs, s: &Session, data: &Path, stop: &AtomicBool) -> Result<(), u8> {
    let out_path = a
        .out
        .as_ref()
        .ok_or_else(|| fail("--data needs -o OUT.jsonl"))?;
    let text =
        vlmc::files::read_to_string(data).map_err(|e| fail(format!("{}: {e}", data.display())))?;
    let base = data.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let raw = parse_line(line, i + 1, data).map_err(fail)?;
        let p = s
            .prompt(&raw, &base)
            .map_err(|e| fail(format!("{}:{}: {e}", data.display(), i + 1)))?;
        prompts.push(p);
    }
    if prompts.is_empty() {
        return Err(fail(format!("{} has no prompts", data.display())));
    }
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} prompts, {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut lines = Vec::new();
    let mut new_tokens = 0usize;
    let t0 = Instant::now();
    // batches of nearby lengths waste less padding; results return to input order
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].ids.len());
    let mut results: Vec<Option<Json>> = vec![None; prompts.len()];
    for chunk in order.chunks(a.batch) {
        let batch: Vec<Prompt> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let rows: Vec<u64> = chunk.iter().map(|&i| i as u64).collect();
        let mut detoks: Vec<Detok> = chunk.iter().map(|_| Detok::new()).collect();
        let mut stats = Stats::default();
        let out = s
            .gen
            .generate(
                &batch,
                &rows,
                &s.opts,
                &mut |r, tok, _| {
                    let (_, hit) =
                        detoks[r].push(&s.tok, tok as u32, &a.stops, s.eos.contains(&tok));
                    control(stop, hit)
                },
                &mut stats,
            )
            .map_err(fail)?;
        if stop.load(Ordering::SeqCst) {
            bar.abandon();
            eprintln!(
                "stopped (Ctrl-C): nothing written to {}",
                out_path.display()
            );
            return Err(130);
        }
        for ((&i, g), d) in chunk.iter().zip(&out).zip(&detoks) {
            new_tokens += g.tokens.len();
            let mut j = result_json(g, &d.text, prompts[i].ids.len());
            j["index"] = json!(i);
            // the batch's figures (a later batch of the same sizes finds its plans ready)
            j["timing"] = json!({
                "first_token_s": stats.prefill_s,
                "compile_s": stats.compile_s,
                "decode_tokens_per_s": decode_rate(&stats),
                "batch": chunk.len(),
            });
            results[i] = Some(j);
        }
        bar.inc(chunk.len() as u64);
        bar.set_message(format!(
            "{:.1} tokens/s",
            new_tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9)
        ));
    }
    bar.finish();
    for r in results.into_iter().flatten() {
        lines.push(r.to_string());
    }
    let mut body = lines.join("\n");
    body.push('\n');
    vlmc::files::write_atomic(out_path, body.as_bytes())
        .map_err(|e| fail(format!("{}: {e}", out_path.display())))?;
    eprintln!(
        "wrote {} ({} prompts, {} new tokens, {:.1} tokens/s)",
        out_path.display(),
        prompts.len(),
        new_tokens,
        new_tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9)
    );
    Ok(())
}
