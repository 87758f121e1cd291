//! Elaboration for generation: the key/value cache as graph inputs and outputs.
//!
//! A model elaborated with `generating` on runs the same `.vlm` code, but `generating()` is true,
//! so the std attention layers take their cached branch (`std.attention.cached_attend`):
//!
//! - `gen_input(name, shape)` declares (once) one of the engine's inputs: `gen.positions`
//!   (`i32[b, t]`, each current token's position), `gen.valid` (`i32[b, t]`, 0 at padding) and
//!   `gen.past_valid` (`i32[b, CACHE]`, 1 at the cache slots that hold a token).
//! - `past(x, name)` declares the cache input `past:<layer path>.<name>` of shape
//!   `[b, heads, CACHE, d]` for a layer's keys or values `x: [b, heads, t, d]`, and makes `x`
//!   the output `present:<layer path>.<name>`.
//!
//! - `keep(x, name)` makes `x` the output `keep:<block path>.<name>` (in the prefill: state the
//!   step needs, computed once) and returns `x`; `kept(name, shape, dtype)` declares the input
//!   `keep:<block path>.<name>` (in the step), which the engine gives the prefill's output of the
//!   same name at every step. A string in `kept`'s shape names a symbolic size of its own.
//!
//! The graph never writes the cache: it reads it, and returns the current tokens' keys and
//! values, which the engine (`vlmc_runtime::generate`) copies into the preallocated cache, in
//! place, at the next free slots. `CACHE` (the capacity) is a symbolic size like `B` and `T`, so
//! a step compiles once per batch size and capacity.

use super::value::Value;
use super::{Ctx, Elaborator};
use crate::diag::{Diagnostic, Loc};
use crate::ir::{DType, Dim, NodeId, Op, TensorType};
use std::collections::HashMap;
use vlmc_grammar::ast::Span;

type R<T> = Result<T, Diagnostic>;

/// The symbolic size of the cache's capacity.
pub const CAPACITY: &str = "CACHE";
/// Prefix of the cache inputs (`past:language_model.model.layers.0.self_attn.k`).
pub const PAST: &str = "past:";
/// Prefix of the new keys and values returned by a step.
pub const PRESENT: &str = "present:";
/// Prefix of the state a prefill keeps for every step (`keep(x, name)`, `kept(name, shape)`).
pub const KEEP: &str = "keep:";
/// The engine's inputs.
pub const POSITIONS: &str = "gen.positions";
pub const VALID: &str = "gen.valid";
pub const PAST_VALID: &str = "gen.past_valid";
/// The names `gen_input` accepts (without the `gen.` prefix).
const GEN_INPUTS: &[&str] = &["positions", "valid", "past_valid"];

/// What a generating elaboration has declared so far.
#[derive(Debug, Default)]
pub struct GenState {
    inputs: HashMap<String, NodeId>,
    presents: Vec<(String, NodeId)>,
    keeps: Vec<(String, NodeId)>,
}

impl Elaborator<'_> {
    fn need_gen(&self, cx: &Ctx, span: Span, what: &str) -> R<()> {
        match self.gen {
            Some(_) => Ok(()),
            None => Err(self
                .err(
                    cx,
                    span,
                    format!("`{what}` is only defined while generating"),
                )
                .label("not generating")
                .note("guard it with `if generating() { ... }`")),
        }
    }

    /// `gen_input(name, shape, dtype)`: the engine's input `gen.<name>`, declared on first use;
    /// every use must agree on its type.
    pub(super) fn gen_input(
        &mut self,
        cx: &Ctx,
        name: &Value,
        shape: Vec<Dim>,
        dtype: DType,
        span: Span,
    ) -> R<Value> {
        self.need_gen(cx, span, "gen_input")?;
        let Value::Str(name) = name else {
            return Err(self.err(cx, span, "`gen_input` needs a name string"));
        };
        if !GEN_INPUTS.contains(&name.as_str()) {
            return Err(self
                .err(cx, span, format!("unknown generation input `{name}`"))
                .note(format!("known: {}", GEN_INPUTS.join(", "))));
        }
        let full = format!("gen.{name}");
        let ty = TensorType::new(dtype, shape);
        if let Some(id) = self.gen.as_ref().and_then(|g| g.inputs.get(&full)).copied() {
            let have = self.ty(id);
            if have != ty {
                return Err(self
                    .err(
                        cx,
                        span,
                        format!("generation input `{full}` is {have} here it would be {ty}"),
                    )
                    .note("every cached attention layer of a model must see the same batch and sequence sizes"));
            }
            return Ok(Value::Tensor(id));
        }
        let id = self
            .graph
            .add_source(Op::Input { name: full.clone() }, ty, "")
            .map_err(|e| self.err(cx, span, e.to_string()))?;
        if let Some(g) = self.gen.as_mut() {
            g.inputs.insert(full, id);
        }
        Ok(Value::Tensor(id))
    }

    /// `past(x, name)`: this layer's cache for `x` (keys or values, `[b, heads, t, d]`), as the
    /// input `[b, heads, CACHE, d]`; `x` becomes the step's output for the engine to store.
    pub(super) fn past(&mut self, cx: &Ctx, x: NodeId, name: &Value, span: Span) -> R<Value> {
        self.need_gen(cx, span, "past")?;
        let Value::Str(name) = name else {
            return Err(self.err(cx, span, "`past` needs a name string (\"k\" or \"v\")"));
        };
        let ty = self.ty(x);
        if ty.rank() != 4 {
            return Err(self
                .err(
                    cx,
                    span,
                    format!("`past` caches [batch, heads, tokens, features], got {ty}"),
                )
                .label("not rank 4"));
        }
        let key = format!("{}.{name}", cx.scope());
        let key = key.trim_start_matches('.').to_string();
        let mut dims = ty.shape.0.clone();
        dims[2] = Dim::sym(CAPACITY);
        if !self.graph.dims.iter().any(|d| d == CAPACITY) {
            self.graph.dims.push(CAPACITY.to_string());
        }
        let past_name = format!("{PAST}{key}");
        if self.graph.input(&past_name).is_some() {
            return Err(self
                .err(cx, span, format!("the cache `{key}` is declared twice"))
                .note("a layer caches its keys and values once per step"));
        }
        let id = self
            .graph
            .add_source(
                Op::Input { name: past_name },
                TensorType::new(ty.dtype, dims),
                "",
            )
            .map_err(|e| self.err(cx, span, e.to_string()))?;
        if let Some(g) = self.gen.as_mut() {
            g.presents.push((format!("{PRESENT}{key}"), x));
        }
        Ok(Value::Tensor(id))
    }

    /// The scoped name `<block path>.<name>` of a `keep`/`kept` call.
    fn keep_key(&self, cx: &Ctx, name: &Value, span: Span, what: &str) -> R<String> {
        let Value::Str(name) = name else {
            return Err(self.err(cx, span, format!("`{what}` needs a name string")));
        };
        let key = format!("{}.{name}", cx.scope());
        Ok(format!("{KEEP}{}", key.trim_start_matches('.')))
    }

    /// `keep(x, name)`: `x` becomes the output `keep:<block path>.<name>`, which the engine
    /// gives every step as its input of the same name (`kept`); returns `x`.
    pub(super) fn keep(&mut self, cx: &Ctx, x: NodeId, name: &Value, span: Span) -> R<Value> {
        self.need_gen(cx, span, "keep")?;
        let key = self.keep_key(cx, name, span, "keep")?;
        let twice = self
            .gen
            .as_ref()
            .is_some_and(|g| g.keeps.iter().any(|(n, _)| *n == key));
        if twice {
            return Err(self
                .err(cx, span, format!("`{key}` is kept twice"))
                .note("each kept value needs a name of its own in its block"));
        }
        if let Some(g) = self.gen.as_mut() {
            g.keeps.push((key, x));
        }
        Ok(Value::Tensor(x))
    }

    /// `kept(name, shape, dtype)`: the input `keep:<block path>.<name>`, what the prefill kept
    /// under that name. Strings in the shape are symbolic sizes (`[b, heads, "S", d]`).
    pub(super) fn kept(
        &mut self,
        cx: &Ctx,
        name: &Value,
        shape: Vec<Dim>,
        dtype: DType,
        span: Span,
    ) -> R<Value> {
        self.need_gen(cx, span, "kept")?;
        let key = self.keep_key(cx, name, span, "kept")?;
        if self.graph.input(&key).is_some() {
            return Err(self
                .err(cx, span, format!("`{key}` is declared twice"))
                .note("read a kept value once and pass it on"));
        }
        let id = self
            .graph
            .add_source(Op::Input { name: key }, TensorType::new(dtype, shape), "")
            .map_err(|e| self.err(cx, span, e.to_string()))?;
        Ok(Value::Tensor(id))
    }

    /// After the entry point: the step's keys and values become outputs. A model none of whose
    /// layers cached anything cannot generate.
    pub(super) fn finish_generation(&mut self, loc: Loc) -> R<()> {
        let Some(g) = self.gen.take() else {
            return Ok(());
        };
        if g.presents.is_empty() {
            return Err(Diagnostic::new(
                loc,
                "this model cannot generate: none of its layers uses a key/value cache",
            )
            .note(
                "generation needs a causal decoder built from std blocks (Llama, GPT-2, OPT, \
                 Persimmon, Chameleon) or attention that calls `std.attention.cached_attend` \
                 when `generating()`",
            ));
        }
        for (name, id) in g.presents.into_iter().chain(g.keeps) {
            self.graph
                .set_output(&name, id)
                .map_err(|e| Diagnostic::new(loc, e.to_string()))?;
        }
        Ok(())
    }
}

/// The output of a generation graph that holds the logits: `logits` or `output` when there is
/// one, else the first output that is neither a cache (`present:`) nor kept state (`keep:`).
pub fn logits_output(g: &crate::ir::Graph) -> Option<String> {
    let names: Vec<&str> = g
        .outputs
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !n.starts_with(PRESENT) && !n.starts_with(KEEP))
        .collect();
    ["logits", "output"]
        .into_iter()
        .find(|n| names.contains(n))
        .or(names.first().copied())
        .map(str::to_string)
}

/// Makes the prefill return the logits of its last position only (`[b, 1, vocab]` from
/// `[b, t, vocab]`): the engine reads nothing else of them (prompts are left-padded, so every
/// prompt ends there). The simplifier's `sink_slice` then pushes the slice down to the language
/// head, which multiplies one row per prompt instead of every position (SmolLM2, 128 tokens:
/// 7.2 of 34 GFLOP). Logits that are not `[b, t, vocab]` are left as they are.
pub fn last_position(g: &mut crate::ir::Graph) -> Result<(), String> {
    let Some(name) = logits_output(g) else {
        return Ok(());
    };
    let Some(at) = g.outputs.iter().position(|(n, _)| *n == name) else {
        return Ok(());
    };
    let x = g.outputs[at].1;
    let ty = g.node(x).ty.clone();
    if ty.rank() != 3 || ty.shape.0[1].as_const() == Some(1) {
        return Ok(());
    }
    let t = ty.shape.0[1].clone();
    let start = t
        .checked_sub(&Dim::c(1))
        .ok_or("the logits' length overflows")?;
    let scope = g.node(x).scope.clone();
    let op = Op::Slice {
        axis: 1,
        start,
        end: t,
        step: 1,
    };
    let last = g.add(op, &[x], &scope).map_err(|e| e.to_string())?;
    g.outputs[at].1 = last;
    Ok(())
}

/// The suffix of a weight stored transposed: `lm.layers.0.mlp.up_proj.weight:T` holds
/// `lm.layers.0.mlp.up_proj.weight`ᵀ.
pub const TRANSPOSED: &str = ":T";

/// Makes every 2-D f32 parameter that the graph reads only transposed (a linear layer's
/// `x · Wᵀ`) a parameter of its own in the transposed layout, named with [`TRANSPOSED`], and
/// returns the original paths. Generation's CPU plans take their weights this way: one
/// row-major copy, made once at load (`vlmc_runtime::generate::Generator::new`) and read by
/// every plan, so that the prefill's GEMMs get the right-hand side in the layout they pack
/// fastest and a step streams each weight once.
pub fn transposed_weights(g: &mut crate::ir::Graph) -> Vec<String> {
    let params: Vec<_> = g
        .params()
        .into_iter()
        .map(|(id, path, ty, init)| (id, path.to_string(), ty.clone(), init.clone()))
        .collect();
    let mut done = Vec::new();
    for (id, path, ty, init) in params {
        if ty.rank() != 2 || ty.dtype != DType::F32 || g.outputs.iter().any(|(_, o)| *o == id) {
            continue;
        }
        let users = g.users(id);
        let transposes =
            |u: &NodeId| matches!(&g.node(*u).op, Op::Permute { perm } if perm == &[1, 0]);
        if users.is_empty() || !users.iter().all(transposes) {
            continue;
        }
        let scope = g.node(id).scope.clone();
        let t = TensorType::new(
            ty.dtype,
            crate::ir::Shape(vec![ty.shape.0[1].clone(), ty.shape.0[0].clone()]),
        );
        let op = Op::Param {
            path: format!("{path}{TRANSPOSED}"),
            init,
        };
        let Ok(new) = g.add_source(op, t, &scope) else {
            continue;
        };
        for u in users {
            g.replace_uses(u, new);
            g.remove(u);
        }
        g.remove(id);
        done.push(path);
    }
    done
}
