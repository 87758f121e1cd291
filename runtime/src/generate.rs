//! The generation engine: a prefill over the prompt, then one cached step per new token.
//!
//! The model is elaborated twice for generation (see `vlmc::elab::gen`): the prefill is its
//! `forward` (images and all), the step its `fn step(ids)` (or `forward` when that takes only
//! token ids). Both read the key/value cache (`past:` inputs, `[B, heads, CACHE, d]`, allocated
//! here once per batch) and return the current tokens' keys and values (`present:` outputs),
//! which are copied into the cache at the next free slots: in place, never a copy of the cache.
//!
//! State the step needs from the prefill (Flamingo's image keys and values) goes the same way
//! by name: each `keep:` output of the prefill (`keep(x, name)`) is given to every step as its
//! input of the same name (`kept(name, shape)`).
//!
//! Rows are left-padded to a common length (a multiple of [`PREFILL_BUCKET`], so prompts of
//! nearby lengths share one compiled prefill); padding is masked out of every attention and
//! skipped by the positions, so a row's tokens do not depend on its batch. The cache's capacity
//! is rounded up to a multiple of [`CAPACITY_STEP`]: the step compiles once per (batch size,
//! capacity). The prefill starts from an empty cache, so it runs at a capacity of 0 and
//! compiles once per (batch size, bucket).

use crate::cpu::CpuModel;
use crate::interp::{self, Bindings, RunError};
use crate::sample::{self, Sampling};
use crate::tensor::{Data, Tensor};
use std::collections::BTreeMap;
use vlmc::backend::cpu::CpuOptions;
use vlmc::elab::gen::{CAPACITY, KEEP, PAST, PAST_VALID, POSITIONS, PRESENT, TRANSPOSED, VALID};
use vlmc::elab::Elaborated;
use vlmc::ir::{DType, Graph};

type R<T> = Result<T, RunError>;

fn fail<T>(message: impl Into<String>) -> R<T> {
    Err(RunError {
        message: message.into(),
    })
}

/// Prompts are left-padded to a multiple of this many tokens.
pub const PREFILL_BUCKET: usize = 16;
/// The cache's capacity is a multiple of this many slots.
pub const CAPACITY_STEP: usize = 64;

/// One of the two generation graphs, ready to run.
pub enum Runner {
    Interp(Box<Graph>),
    Cpu(Box<CpuModel>),
    /// On the GPU: one loaded model per input shape. (The cache goes to the device with every
    /// step's inputs: a device-resident cache is the next step.)
    Cuda(Box<CudaRunner>),
}

/// The GPU models of one graph, per set of input shapes.
pub struct CudaRunner {
    model: Elaborated,
    opts: crate::cuda::CudaOptions,
    loaded: std::sync::Mutex<std::collections::HashMap<Vec<Vec<usize>>, crate::cuda::GpuModel>>,
}

impl Runner {
    /// The graph run by the reference interpreter.
    pub fn interp(m: &Elaborated) -> Runner {
        Runner::Interp(Box::new(m.graph.clone()))
    }

    /// The graph optimised and compiled to machine code (per size, on first use).
    pub fn cpu(m: &Elaborated, opts: CpuOptions) -> R<Runner> {
        // Weights read only transposed become parameters of their own in that layout
        // (`path:T`), which `Generator::new` makes once from the originals.
        let mut graph = m.graph.clone();
        vlmc::elab::gen::transposed_weights(&mut graph);
        let m = with_graph(m, graph);
        let c =
            vlmc::passes::compile(&m, &vlmc::passes::CompileOptions::default()).map_err(|e| {
                RunError {
                    message: e.to_string(),
                }
            })?;
        let mut m = CpuModel::new(c, BTreeMap::new(), opts);
        // No row-major copy per plan: the weights the graph reads transposed are parameters of
        // their own, made once (`transposed_weights`); the rest (a tied embedding read as the
        // language head) are read in their own layout. One copy of the weights however many
        // plans (sizes) there are. (Copies per plan: SmolLM2's peak memory 2.45 GB, not 0.9.)
        m.lower.row_major_weights = false;
        Ok(Runner::Cpu(Box::new(m)))
    }

    /// The graph compiled for the GPU (fails cleanly without a driver).
    pub fn cuda(m: &Elaborated, opts: crate::cuda::CudaOptions) -> R<Runner> {
        crate::cuda::check_driver()?;
        Ok(Runner::Cuda(Box::new(CudaRunner {
            model: with_graph(m, m.graph.clone()),
            opts,
            loaded: Default::default(),
        })))
    }

    pub fn graph(&self) -> &Graph {
        match self {
            Runner::Interp(g) => g,
            Runner::Cpu(m) => &m.compiled.graph,
            Runner::Cuda(c) => &c.model.graph,
        }
    }

    fn run(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
    ) -> R<BTreeMap<String, Tensor>> {
        match self {
            Runner::Interp(g) => interp::run(g, inputs, params),
            Runner::Cpu(m) => m.plan_with(inputs, params)?.run(inputs, params),
            Runner::Cuda(c) => {
                let key: Vec<Vec<usize>> = inputs.values().map(|t| t.shape.clone()).collect();
                let mut loaded = c.loaded.lock().map_err(|_| RunError {
                    message: "a previous GPU run panicked".into(),
                })?;
                if !loaded.contains_key(&key) {
                    let gpu = crate::cuda::load_model(&c.model, inputs, params, &c.opts)?;
                    loaded.insert(key.clone(), gpu);
                }
                match loaded.get_mut(&key) {
                    Some(gpu) => gpu.run(inputs),
                    None => fail("the GPU model was not loaded"),
                }
            }
        }
    }

    /// Compiles the plan for these inputs now (the interpreter and the GPU prepare on first
    /// use).
    fn prepare(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
    ) -> R<()> {
        if let Runner::Cpu(m) = self {
            m.plan_with(inputs, params)?;
        }
        Ok(())
    }

    /// How many plans have been compiled so far.
    pub fn compiled_plans(&self) -> usize {
        match self {
            Runner::Interp(_) => 0,
            Runner::Cpu(m) => m.plans(),
            Runner::Cuda(c) => c.loaded.lock().map_or(0, |l| l.len()),
        }
    }
}

/// `m` with `graph` in place of its own (generation needs no adapters or trainers).
fn with_graph(m: &Elaborated, graph: Graph) -> Elaborated {
    Elaborated {
        model: m.model.clone(),
        graph,
        adapters: Vec::new(),
        trainers: Vec::new(),
        checkpoint: m.checkpoint.clone(),
        preprocess: m.preprocess.clone(),
        params: m.params.clone(),
    }
}

/// A cache of one layer: its name (`language_model.model.layers.0.self_attn.k`) and the sizes
/// of its heads and features.
#[derive(Clone, Debug)]
struct CacheSpec {
    name: String,
    heads: usize,
    features: usize,
}

/// A model ready to generate: the prefill and step graphs and the weights they share.
pub struct Generator {
    pub prefill: Runner,
    pub step: Runner,
    pub params: BTreeMap<String, Tensor>,
    caches: Vec<CacheSpec>,
    prefill_logits: String,
    step_logits: String,
    /// The prefill's inputs besides `ids`, `mask` and the engine's (images, ...).
    pub extra_inputs: Vec<(String, vlmc::ir::TensorType)>,
    /// The prefill's `keep:` outputs that the step reads.
    kept: Vec<String>,
}

/// One prompt: its token ids and, per extra input of the prefill (`pixels`), this row's part
/// (concatenated over the batch along axis 0). An extra input whose axis 1 is the ids' token
/// axis (Flamingo's `image_mask: i32[B, T, N]`) has one entry per prompt token there; it is
/// left-padded with zeros like the ids.
#[derive(Clone, Debug, Default)]
pub struct Prompt {
    pub ids: Vec<i32>,
    pub extra: BTreeMap<String, Tensor>,
}

/// Why a row stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token.
    Eos,
    /// `--max-new-tokens` reached.
    Length,
    /// The caller stopped it (a stop string, Ctrl-C).
    Stop,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::Length => "length",
            StopReason::Stop => "stop",
        }
    }
}

/// What the caller says after each token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// This row is done.
    StopRow,
    /// Every row is done (Ctrl-C).
    StopAll,
}

/// A row's result.
#[derive(Clone, Debug)]
pub struct Generated {
    pub tokens: Vec<i32>,
    /// The model's log-probability of each token (log softmax of the raw logits).
    pub logprobs: Vec<f64>,
    pub stop: StopReason,
    /// The raw logits each token was chosen from (only with `Options::keep_logits`).
    pub logits: Vec<Vec<f32>>,
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct Options {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Token ids that end a row (the EOS token is produced, then the row stops).
    pub eos: Vec<i32>,
    /// The id padding is filled with (masked out; any valid id).
    pub pad: i32,
    /// The largest number of positions the model supports (its context), if known.
    pub context: Option<usize>,
    /// Keep every step's logits in the results (for checks).
    pub keep_logits: bool,
    /// The cache has at least this many slots (rounded up to [`CAPACITY_STEP`]; 0: as many as
    /// the prompt and the new tokens need).
    pub min_capacity: usize,
}

/// The figures of one `generate` call.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Time to the first token: compiling (or fetching from the disk cache) the prefill's and
    /// the step's plans, and running the prefill.
    pub prefill_s: f64,
    /// Of which compiling the plans.
    pub compile_s: f64,
    pub decode_s: f64,
    pub decode_steps: usize,
    pub batch: usize,
    pub prompt_len: usize,
    pub capacity: usize,
    /// Bytes of the key/value cache.
    pub cache_bytes: usize,
}

impl Generator {
    /// A generator from the prefill and step graphs (elaborated with `generating`).
    pub fn new(
        prefill: Runner,
        step: Runner,
        mut params: BTreeMap<String, Tensor>,
    ) -> R<Generator> {
        // the transposed weights the compiled graphs read (`path:T`), made once; originals that
        // neither graph reads any more are dropped: one copy of each weight
        let mut read = std::collections::BTreeSet::new();
        for g in [prefill.graph(), step.graph()] {
            read.extend(
                g.params()
                    .into_iter()
                    .map(|(_, path, _, _)| path.to_string()),
            );
        }
        for p in &read {
            let Some(base) = p.strip_suffix(TRANSPOSED) else {
                continue;
            };
            if params.contains_key(p) {
                continue;
            }
            let t = params.get(base).ok_or_else(|| RunError {
                message: format!("missing parameter `{base}`"),
            })?;
            let tt = crate::plan::transpose_last_two(t).ok_or_else(|| RunError {
                message: format!(
                    "`{base}` {} cannot be stored transposed (an f32 matrix that fits in memory)",
                    t.shape_text()
                ),
            })?;
            // an original no graph reads goes at once, so the peak holds one extra matrix
            if !read.contains(base) {
                params.remove(base);
            }
            params.insert(p.clone(), tt);
        }
        let caches = caches_of(prefill.graph())?;
        let step_caches = caches_of(step.graph())?;
        let names = |c: &[CacheSpec]| c.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        if names(&caches) != names(&step_caches) {
            return fail(
                "the prefill (`forward`) and the step (`fn step`) use different key/value caches: \
                 the step must run the same decoder",
            );
        }
        let prefill_logits = logits_output(prefill.graph())?;
        let step_logits = logits_output(step.graph())?;
        let mut kept = Vec::new();
        for (_, name, ty) in step.graph().inputs() {
            if name.starts_with(KEEP) {
                match prefill.graph().outputs.iter().find(|(n, _)| n == name) {
                    Some(&(_, id)) if prefill.graph().node(id).ty.dtype == ty.dtype => {}
                    Some(&(_, id)) => {
                        return fail(format!(
                            "the step reads `{name}` as {ty}, but the prefill keeps it as {}",
                            prefill.graph().node(id).ty
                        ))
                    }
                    None => {
                        return fail(format!(
                            "the step reads `{name}` ({ty}), but the prefill (`forward`) keeps \
                             no `{name}`: call `keep(x, name)` in the same block when \
                             `generating()`"
                        ))
                    }
                }
                kept.push(name.to_string());
                continue;
            }
            if !is_engine_input(name) && name != "ids" && name != "mask" {
                return fail(format!(
                    "the step takes an input `{name}` ({ty}); a step takes only `ids` (and \
                     `mask`): images and other prompt inputs belong to `forward`"
                ));
            }
        }
        if prefill.graph().input("ids").is_none() || step.graph().input("ids").is_none() {
            return fail("generation needs the token ids as an input named `ids`");
        }
        let extra_inputs = prefill
            .graph()
            .inputs()
            .into_iter()
            .filter(|(_, n, _)| !is_engine_input(n) && *n != "ids" && *n != "mask")
            .map(|(_, n, t)| (n.to_string(), t.clone()))
            .collect();
        Ok(Generator {
            prefill,
            step,
            params,
            caches,
            prefill_logits,
            step_logits,
            extra_inputs,
            kept,
        })
    }

    /// Generates for every prompt (one batch). `on_token(row, token, logprob)` is called for
    /// each new token in order; its answer can stop the row or the batch.
    pub fn generate(
        &self,
        prompts: &[Prompt],
        rows: &[u64],
        opts: &Options,
        on_token: &mut dyn FnMut(usize, i32, f64) -> Control,
        stats: &mut Stats,
    ) -> R<Vec<Generated>> {
        let b = prompts.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        if longest == 0 {
            return fail("a prompt has no tokens");
        }
        let t = longest.div_ceil(PREFILL_BUCKET) * PREFILL_BUCKET;
        // ids, left-padded; the mask marks real tokens
        let mut ids = vec![opts.pad; b * t];
        let mut mask = vec![0i32; b * t];
        for (r, p) in prompts.iter().enumerate() {
            let off = t - p.ids.len();
            ids[r * t + off..(r + 1) * t].copy_from_slice(&p.ids);
            mask[r * t + off..(r + 1) * t].fill(1);
        }
        let mut inputs = BTreeMap::new();
        inputs.insert("ids".to_string(), Tensor::i32(vec![b, t], ids));
        if self.prefill.graph().input("mask").is_some() {
            inputs.insert("mask".to_string(), Tensor::i32(vec![b, t], mask.clone()));
        }
        for (name, _) in &self.extra_inputs {
            let parts: Vec<&Tensor> = prompts.iter().filter_map(|p| p.extra.get(name)).collect();
            if parts.len() != b {
                return fail(format!(
                    "every prompt of a batch needs the input `{name}` (a prompt without it: \
                     this model's prompts all carry one)"
                ));
            }
            let tokens_axis = self.token_axis(name);
            let padded: Vec<Tensor>;
            let parts = if tokens_axis {
                padded = prompts
                    .iter()
                    .zip(&parts)
                    .map(|(p, x)| left_pad1(x, p.ids.len(), t, name))
                    .collect::<R<_>>()?;
                padded.iter().collect()
            } else {
                parts
            };
            inputs.insert(name.clone(), concat0(&parts)?);
        }
        // the decoder's length at the prefill: the ids are its last `t` positions
        let mut dims = self.bind_model_dims(&inputs)?;
        let pos_ty = self
            .prefill
            .graph()
            .inputs()
            .into_iter()
            .find(|(_, n, _)| *n == POSITIONS)
            .map(|(_, _, t)| t.clone())
            .ok_or_else(|| RunError {
                message: "the prefill has no positions input".into(),
            })?;
        dims.insert(CAPACITY.to_string(), 0);
        let l = interp::concrete(&pos_ty.shape.0[1..2], &dims)?[0];
        if l < t {
            return fail(format!(
                "the decoder sees {l} positions but the prompt has {t} tokens"
            ));
        }
        let needed = l + opts.max_new_tokens;
        if let Some(ctx) = opts.context {
            let real = l - t + longest;
            if real + opts.max_new_tokens > ctx {
                return fail(format!(
                    "the prompt ({real} positions) and --max-new-tokens {} need {} positions, \
                     {} more than the model's context of {ctx}",
                    opts.max_new_tokens,
                    real + opts.max_new_tokens,
                    real + opts.max_new_tokens - ctx
                ));
            }
        }
        let cap = needed.max(opts.min_capacity).max(1).div_ceil(CAPACITY_STEP) * CAPACITY_STEP;
        // validity and positions of the prefill's positions: the prefix before the ids is real
        let mut valid = vec![1i32; b * l];
        let mut positions = vec![0i32; b * l];
        let mut count = vec![0i32; b];
        for r in 0..b {
            for j in 0..l {
                let v = if j < l - t {
                    1
                } else {
                    mask[r * t + j - (l - t)]
                };
                valid[r * l + j] = v;
                positions[r * l + j] = if v == 1 { count[r] } else { 1 };
                count[r] += v;
            }
        }
        stats.capacity = cap;
        stats.batch = b;
        stats.prompt_len = l;
        let mut past_valid = vec![0i32; b * cap];
        inputs.insert(POSITIONS.into(), Tensor::i32(vec![b, l], positions));
        inputs.insert(VALID.into(), Tensor::i32(vec![b, l], valid.clone()));
        // The prefill starts from an empty cache: it runs with a capacity of 0 (its attention
        // sees the prompt alone, and it compiles once per batch and bucket, whatever the
        // capacity); its keys and values then fill the first slots of the real cache.
        for c in &self.caches {
            inputs.insert(
                format!("{PAST}{}", c.name),
                Tensor::f32(vec![b, c.heads, 0, c.features], Vec::new()),
            );
        }
        inputs.insert(PAST_VALID.into(), Tensor::i32(vec![b, 0], Vec::new()));
        // the caches, allocated once at their capacity, and the step's other inputs
        let mut step_inputs = BTreeMap::new();
        let mut cache_bytes = 0usize;
        for c in &self.caches {
            let n = b * c.heads * cap * c.features;
            let what = || format!("the key/value cache `{}`", c.name);
            let v = crate::alloc::checked_vec(n, 0f32, what)?;
            cache_bytes += n * 4;
            step_inputs.insert(
                format!("{PAST}{}", c.name),
                Tensor::f32(vec![b, c.heads, cap, c.features], v),
            );
        }
        stats.cache_bytes = cache_bytes;
        let mut step_ids = vec![0i32; b];
        step_inputs.insert("ids".into(), Tensor::i32(vec![b, 1], step_ids.clone()));
        if self.step.graph().input("mask").is_some() {
            step_inputs.insert("mask".into(), Tensor::i32(vec![b, 1], vec![1; b]));
        }
        step_inputs.insert(VALID.into(), Tensor::i32(vec![b, 1], vec![1; b]));
        step_inputs.insert(POSITIONS.into(), Tensor::i32(vec![b, 1], vec![0; b]));
        // the prompt fills the first `l` slots
        for r in 0..b {
            past_valid[r * cap..r * cap + l].copy_from_slice(&valid[r * l..(r + 1) * l]);
        }
        step_inputs.insert(PAST_VALID.into(), Tensor::i32(vec![b, cap], past_valid));
        // Both plans are made before the prefill runs (no kernel is compiled after the first
        // token), on two threads: each is mostly one thread's work (the disk cache's lookups,
        // the load-time values). The step's plan needs the shapes of the kept values, which
        // the prefill's output types give; zeros of those shapes stand in until it has run.
        let t0 = std::time::Instant::now();
        let early = self.kept_placeholders(&inputs)?;
        let prepared_early = early.is_some();
        if let Some(placeholders) = early {
            step_inputs.extend(placeholders);
            let (prefill, step) = std::thread::scope(|s| {
                let step = s.spawn(|| self.step.prepare(&step_inputs, &self.params));
                let prefill = self.prefill.prepare(&inputs, &self.params);
                (prefill, step.join())
            });
            prefill?;
            step.map_err(|_| RunError {
                message: "preparing the step's plan panicked".into(),
            })??;
        } else {
            self.prefill.prepare(&inputs, &self.params)?;
        }
        stats.compile_s = t0.elapsed().as_secs_f64();
        let mut out = self.prefill.run(&inputs, &self.params)?;
        drop(inputs);
        let mut used = 0usize;
        self.store(&mut step_inputs, &out, used, l)?;
        used += l;
        for name in &self.kept {
            let x = out.get(name).ok_or_else(|| RunError {
                message: format!("the prefill did not return `{name}`"),
            })?;
            if x.shape.first() != Some(&b) {
                return fail(format!(
                    "`{name}` has shape {}; a kept value's axis 0 is the batch ({b} prompts)",
                    x.shape_text()
                ));
            }
            step_inputs.insert(name.clone(), x.clone());
        }
        if !prepared_early {
            let tc = std::time::Instant::now();
            self.step.prepare(&step_inputs, &self.params)?;
            stats.compile_s += tc.elapsed().as_secs_f64();
        }
        stats.prefill_s = t0.elapsed().as_secs_f64();
        let mut logits = take_last(&out, &self.prefill_logits, b)?;
        out.clear();
        let mut seen: Vec<Vec<i32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let mut results: Vec<Generated> = (0..b)
            .map(|_| Generated {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                stop: StopReason::Length,
                logits: Vec::new(),
            })
            .collect();
        let mut done = vec![false; b];
        let t1 = std::time::Instant::now();
        let mut step_no = 0u64;
        loop {
            // choose each live row's token
            let v = logits.len() / b;
            let mut stop_all = false;
            for r in 0..b {
                if done[r] {
                    continue;
                }
                let row = &logits[r * v..(r + 1) * v];
                let tok = sample::choose(row, &seen[r], &opts.sampling, rows[r], step_no);
                let lp = sample::log_prob(row, tok);
                let tok = tok as i32;
                results[r].tokens.push(tok);
                results[r].logprobs.push(lp);
                if opts.keep_logits {
                    results[r].logits.push(row.to_vec());
                }
                seen[r].push(tok);
                step_ids[r] = tok;
                match on_token(r, tok, lp) {
                    Control::StopAll => {
                        stop_all = true;
                        done[r] = true;
                        results[r].stop = StopReason::Stop;
                    }
                    Control::StopRow => {
                        done[r] = true;
                        results[r].stop = StopReason::Stop;
                    }
                    Control::Continue => {
                        if opts.eos.contains(&tok) {
                            done[r] = true;
                            results[r].stop = StopReason::Eos;
                        } else if results[r].tokens.len() >= opts.max_new_tokens {
                            done[r] = true;
                            results[r].stop = StopReason::Length;
                        }
                    }
                }
            }
            if stop_all {
                for (r, d) in done.iter_mut().enumerate() {
                    if !*d {
                        *d = true;
                        results[r].stop = StopReason::Stop;
                    }
                }
            }
            if done.iter().all(|d| *d) || used >= cap {
                break;
            }
            // one step: every row feeds its last token (finished rows too; ignored)
            for r in 0..b {
                set_i32(&mut step_inputs, "ids", r, step_ids[r]);
                set_i32(&mut step_inputs, POSITIONS, r, count[r]);
                count[r] += 1;
            }
            let out = self.step.run(&step_inputs, &self.params)?;
            self.store(&mut step_inputs, &out, used, 1)?;
            for r in 0..b {
                set_i32(&mut step_inputs, PAST_VALID, r * cap + used, 1);
            }
            used += 1;
            logits = take_last(&out, &self.step_logits, b)?;
            step_no += 1;
        }
        stats.decode_s = t1.elapsed().as_secs_f64();
        stats.decode_steps = step_no as usize;
        Ok(results)
    }

    /// Zero tensors of the shapes of the prefill's kept values for these prefill inputs (which
    /// the step's plan needs before the prefill has run), or `None` when an output type has a
    /// size the inputs do not fix.
    fn kept_placeholders(
        &self,
        inputs: &BTreeMap<String, Tensor>,
    ) -> R<Option<Vec<(String, Tensor)>>> {
        if self.kept.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let g = self.prefill.graph();
        let Ok(dims) = interp::bind_dims(g, inputs) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for name in &self.kept {
            let Some(&(_, id)) = g.outputs.iter().find(|(n, _)| n == name) else {
                return Ok(None);
            };
            let ty = &g.node(id).ty;
            let Ok(shape) = interp::concrete(&ty.shape.0, &dims) else {
                return Ok(None);
            };
            let n: usize = shape.iter().product();
            let what = || format!("the kept value `{name}`");
            let t = match ty.dtype {
                DType::I32 => Tensor::i32(shape, crate::alloc::checked_vec(n, 0i32, what)?),
                DType::Bool => Tensor {
                    shape,
                    data: Data::Bool(crate::alloc::checked_vec(n, false, what)?),
                },
                _ => Tensor::f32(shape, crate::alloc::checked_vec(n, 0f32, what)?),
            };
            out.push((name.clone(), t));
        }
        Ok(Some(out))
    }

    /// Copies every `present:` output (`[b, heads, n, d]`) into its cache at slot `at`.
    fn store(
        &self,
        inputs: &mut BTreeMap<String, Tensor>,
        out: &BTreeMap<String, Tensor>,
        at: usize,
        n: usize,
    ) -> R<()> {
        for c in &self.caches {
            let new = out
                .get(&format!("{PRESENT}{}", c.name))
                .ok_or_else(|| RunError {
                    message: format!("the step did not return `{PRESENT}{}`", c.name),
                })?;
            let cache = inputs
                .get_mut(&format!("{PAST}{}", c.name))
                .ok_or_else(|| RunError {
                    message: format!("no cache `{}`", c.name),
                })?;
            let (Data::F32(dst), Data::F32(src)) = (&mut cache.data, &new.data) else {
                return fail("the key/value cache holds f32");
            };
            let cap = cache.shape[2];
            let d = c.features;
            if new.shape.len() != 4 || new.shape[2] != n || new.shape[3] != d || at + n > cap {
                return fail(format!(
                    "`{PRESENT}{}` has shape {:?}; expected [_, {}, {n}, {d}] at slot {at} of {cap}",
                    c.name, new.shape, c.heads
                ));
            }
            let rows = new.shape[0] * new.shape[1];
            for i in 0..rows {
                let s = &src[i * n * d..(i + 1) * n * d];
                dst[(i * cap + at) * d..(i * cap + at + n) * d].copy_from_slice(s);
            }
        }
        Ok(())
    }

    /// The symbolic sizes of the prefill that the model's own inputs fix (`B`, `T`, ...).
    fn bind_model_dims(&self, inputs: &BTreeMap<String, Tensor>) -> R<Bindings> {
        let mut dims = Bindings::new();
        for (_, name, ty) in self.prefill.graph().inputs() {
            if is_engine_input(name) {
                continue;
            }
            let Some(t) = inputs.get(name) else {
                return fail(format!("missing input `{name}` ({ty})"));
            };
            if t.shape.len() != ty.rank() {
                return fail(format!(
                    "input `{name}` has shape {}, but the model expects {ty}",
                    t.shape_text()
                ));
            }
            for (d, &n) in ty.shape.0.iter().zip(&t.shape) {
                if let Some(s) = d.as_symbol() {
                    dims.entry(s.to_string()).or_insert(n as i64);
                }
            }
        }
        Ok(dims)
    }

    /// Whether the prefill's input `name` has the ids' token axis as its axis 1.
    fn token_axis(&self, name: &str) -> bool {
        let g = self.prefill.graph();
        let of = |n: &str| {
            g.inputs()
                .into_iter()
                .find(|(_, m, _)| *m == n)
                .and_then(|(_, _, t)| t.shape.0.get(1).cloned())
        };
        match (of("ids"), of(name)) {
            (Some(a), Some(b)) => a == b && a.as_symbol().is_some(),
            _ => false,
        }
    }

    /// The number of compiled plans of the prefill and the step.
    pub fn compiled_plans(&self) -> (usize, usize) {
        (self.prefill.compiled_plans(), self.step.compiled_plans())
    }
}

/// Whether `name` is an input the engine fills (positions, masks, caches).
pub fn is_engine_input(name: &str) -> bool {
    name.starts_with(PAST)
        || name.starts_with(KEEP)
        || name == POSITIONS
        || name == VALID
        || name == PAST_VALID
}

/// The caches a generation graph reads, from its `past:` inputs.
fn caches_of(g: &Graph) -> R<Vec<CacheSpec>> {
    let mut out = Vec::new();
    for (_, name, ty) in g.inputs() {
        let Some(n) = name.strip_prefix(PAST) else {
            continue;
        };
        let konst = |i: usize| ty.shape.0.get(i).and_then(|d| d.as_const());
        let (Some(h), Some(d)) = (konst(1), konst(3)) else {
            return fail(format!(
                "the cache `{n}` is {ty}: its heads and features must be fixed sizes"
            ));
        };
        if ty.dtype != DType::F32 {
            return fail(format!("the cache `{n}` is {ty}: caches hold f32"));
        }
        out.push(CacheSpec {
            name: n.to_string(),
            heads: h as usize,
            features: d as usize,
        });
    }
    if out.is_empty() {
        return fail("the model's generation graph reads no key/value cache");
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The output holding the logits: `logits`, else `output`, else the first other output.
fn logits_output(g: &Graph) -> R<String> {
    match vlmc::elab::gen::logits_output(g) {
        Some(n) => Ok(n),
        None => fail("the model returns no logits"),
    }
}

/// The logits of each row's last position, `[b * vocab]`.
fn take_last(out: &BTreeMap<String, Tensor>, name: &str, b: usize) -> R<Vec<f32>> {
    let t = out.get(name).ok_or_else(|| RunError {
        message: format!("no output `{name}`"),
    })?;
    let Data::F32(v) = &t.data else {
        return fail(format!("the logits `{name}` are not f32"));
    };
    if t.shape.len() != 3 || t.shape[0] != b || t.shape[1] == 0 {
        return fail(format!(
            "the logits `{name}` have shape {}; generation needs [batch, positions, vocab]",
            t.shape_text()
        ));
    }
    let (l, vocab) = (t.shape[1], t.shape[2]);
    let mut last = Vec::with_capacity(b * vocab);
    for r in 0..b {
        let at = (r * l + l - 1) * vocab;
        last.extend_from_slice(&v[at..at + vocab]);
    }
    Ok(last)
}

fn set_i32(inputs: &mut BTreeMap<String, Tensor>, name: &str, at: usize, value: i32) {
    if let Some(Data::I32(v)) = inputs.get_mut(name).map(|t| &mut t.data) {
        if let Some(x) = v.get_mut(at) {
            *x = value;
        }
    }
}

/// A prompt's part `[rows, n, ...]` of an input with a token axis, left-padded with zeros to
/// `[rows, t, ...]` (`n` is the prompt's number of tokens).
fn left_pad1(x: &Tensor, n: usize, t: usize, name: &str) -> R<Tensor> {
    if x.shape.len() < 2 || x.shape[1] != n {
        return fail(format!(
            "the prompt's `{name}` has shape {}; its axis 1 must be the prompt's {n} tokens",
            x.shape_text()
        ));
    }
    let rows = x.shape[0];
    let inner: usize = x.shape[2..].iter().product();
    let mut shape = x.shape.clone();
    shape[1] = t;
    fn pad<T: Copy>(src: &[T], zero: T, rows: usize, n: usize, t: usize, inner: usize) -> Vec<T> {
        let mut v = vec![zero; rows * t * inner];
        for r in 0..rows {
            let at = (r * t + t - n) * inner;
            v[at..at + n * inner].copy_from_slice(&src[r * n * inner..(r + 1) * n * inner]);
        }
        v
    }
    Ok(match &x.data {
        Data::F32(v) => Tensor::f32(shape, pad(v, 0f32, rows, n, t, inner)),
        Data::I32(v) => Tensor::i32(shape, pad(v, 0i32, rows, n, t, inner)),
        _ => return fail(format!("`{name}` is f32 or i32")),
    })
}

/// Tensors of equal trailing shapes stacked along axis 0.
fn concat0(parts: &[&Tensor]) -> R<Tensor> {
    let first = parts[0];
    let mut shape = first.shape.clone();
    if shape.is_empty() {
        return fail("a prompt input must have a batch axis");
    }
    shape[0] = 0;
    for p in parts {
        if p.shape[1..] != first.shape[1..] || p.dtype() != first.dtype() {
            return fail(format!(
                "prompt inputs of one batch differ: {} and {}",
                first.shape_text(),
                p.shape_text()
            ));
        }
        shape[0] += p.shape[0];
    }
    Ok(match &first.data {
        Data::F32(_) => Tensor::f32(
            shape,
            parts
                .iter()
                .flat_map(|p| p.as_f32().unwrap_or(&[]).iter().copied())
                .collect(),
        ),
        Data::I32(_) => Tensor::i32(
            shape,
            parts
                .iter()
                .flat_map(|p| p.as_i32().unwrap_or(&[]).iter().copied())
                .collect(),
        ),
        _ => return fail("prompt inputs are f32 or i32"),
    })
}
