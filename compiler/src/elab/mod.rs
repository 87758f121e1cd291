//! Elaboration: from the AST of a `model` to the typed graph IR.
//!
//! Blocks are instantiated with their compile-time arguments (parameters become named graph
//! inputs with their full path), then the model's `forward` is run symbolically: every tensor
//! expression adds primitive ops to the graph, every compile-time expression (`if`, `for`, sizes)
//! is evaluated. Shapes are checked at every step; errors point at the source.

mod builtins;
mod decls;
mod eval;
pub mod gen;
mod instance;
pub mod modules;
mod signature;
mod stmt;
mod tensor;
pub mod value;

use crate::diag::{Diagnostic, Loc};
use crate::ir::Graph;
use modules::{ItemRef, Program};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use value::{Instance, Value};
use vlmc_grammar::ast::{BlockKind, Item, Span};

pub use decls::{
    AdapterInfo, NameRule, Preprocess, Setting, TrainerInfo, DPO_LOSS_TYPES, PAIR_VOCABULARY,
};

/// A model elaborated into a graph, with its adapters and trainers checked.
#[derive(Clone, Debug)]
pub struct Elaborated {
    pub model: String,
    pub graph: Graph,
    pub adapters: Vec<AdapterInfo>,
    pub trainers: Vec<TrainerInfo>,
    /// How checkpoint tensor names map to parameter paths, in order.
    pub checkpoint: Vec<NameRule>,
    /// How raw inputs (text, images) become input tensors.
    pub preprocess: Vec<Preprocess>,
    /// The model declaration it instantiates and its compile-time parameters' values.
    pub params: ModelParams,
}

/// The compile-time parameters of an elaborated model: the declaration instantiated (`Llava`
/// for `model LlavaFixture = Llava(image: 12, ...)`) and every parameter's value after
/// defaults, aliases and `--set` overrides, in declaration order (enum variants and functions
/// as symbols; other kinds of values are left out).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelParams {
    pub block: String,
    pub values: Vec<(String, Setting)>,
}

impl ModelParams {
    /// The value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&Setting> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// The result of checking one file: the sources read (for rendering diagnostics) and either
/// every model in the file, elaborated, or the diagnostics.
pub struct Checked {
    pub program: Program,
    pub result: Result<Vec<Elaborated>, Vec<Diagnostic>>,
}

/// The note listing valid dtypes.
const DTYPES_NOTE: &str = "dtypes: f32, f16, bf16, i32, bool, nf4";

impl Checked {
    /// Every diagnostic, rendered against the sources (empty when the check passed).
    pub fn render(&self) -> String {
        match &self.result {
            Ok(_) => String::new(),
            Err(diags) => diags
                .iter()
                .map(|d| d.render(&self.program.sources))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// Most ops a single elaboration may create (guards against runaway compile-time loops).
const OP_BUDGET: usize = 2_000_000;
/// Deepest call nesting allowed.
const MAX_DEPTH: usize = 200;

/// Compile-time arguments given from outside the file (`vlmc build --set depth=4`): each
/// `name=value` overrides the parameter of that name of every model in the file.
pub type Overrides = [(String, String)];

/// Parses, resolves and elaborates every `model` in `path`, and checks its adapters and trainers.
/// A file without models (a library) is checked for syntax and imports.
pub fn check_file(path: &Path) -> Checked {
    check_loaded(modules::load(path), &[])
}

/// Like [`check_file`], with compile-time overrides for the models.
pub fn check_file_with(path: &Path, overrides: &Overrides) -> Checked {
    check_loaded(modules::load(path), overrides)
}

/// Like [`check_file`], with the file's text given (imports are read relative to `path`).
pub fn check_text(path: &Path, text: String) -> Checked {
    check_loaded(modules::load_text(path, text), &[])
}

type Loaded = Result<(Program, usize), (Program, Vec<Diagnostic>)>;

fn check_loaded(loaded: Loaded, overrides: &Overrides) -> Checked {
    let (program, root) = match loaded {
        Ok(x) => x,
        Err((program, diags)) => {
            return Checked {
                program,
                result: Err(diags),
            }
        }
    };
    let models = model_items(&program, root);
    let mut out = Vec::new();
    let mut diags = Vec::new();
    for m in models {
        match elaborate_model(&program, m, overrides) {
            Ok(e) => out.push(e),
            Err(d) => diags.push(d),
        }
    }
    // Adapters and trainers that name a model of this file are checked against it; any that
    // name an unknown model are reported here.
    diags.extend(decls::check_orphans(&program, root, &out));
    Checked {
        program,
        result: if diags.is_empty() {
            Ok(out)
        } else {
            Err(diags)
        },
    }
}

/// The `model` declarations and aliases of module `root`, in order.
fn model_items(program: &Program, root: usize) -> Vec<ItemRef> {
    program.modules[root]
        .ast
        .items
        .iter()
        .enumerate()
        .filter(|(_, it)| {
            matches!(it, Item::Block(b) if b.kind == BlockKind::Model)
                || matches!(it, Item::Alias(_))
        })
        .map(|(i, _)| ItemRef {
            module: root,
            item: i,
        })
        .collect()
}

/// Elaborates one model declaration (or alias) with compile-time overrides.
pub fn elaborate_model(
    program: &Program,
    model: ItemRef,
    overrides: &Overrides,
) -> Result<Elaborated, Diagnostic> {
    elaborate_entry(program, model, overrides, "forward", false)
}

/// Elaborates one model with the method `entry` as the graph's entry point; with `generating`,
/// the std attention layers read a key/value cache and return their new keys and values (see
/// [`gen`]), and the graph gains the generation inputs and `present:` outputs.
pub fn elaborate_entry(
    program: &Program,
    model: ItemRef,
    overrides: &Overrides,
    entry: &str,
    generating: bool,
) -> Result<Elaborated, Diagnostic> {
    let name = program.item_name(model).unwrap_or("").to_string();
    let (target, mut args) = match program.item(model) {
        Item::Alias(alias) => resolve_alias(program, model.module, alias)?,
        _ => (model, Vec::new()),
    };
    let Item::Block(decl) = program.item(target) else {
        return Err(Diagnostic::new(
            program.loc(model.module, Span::default()),
            "not a model",
        ));
    };
    for (key, text) in overrides {
        let Some(p) = decl.params.iter().find(|p| p.name.name == *key) else {
            let names: Vec<&str> = decl.params.iter().map(|p| p.name.name.as_str()).collect();
            return Err(Diagnostic::new(
                program.loc(target.module, decl.name.span),
                format!("model `{}` has no parameter `{key}` to set", decl.name.name),
            )
            .note(format!(
                "its parameters: {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        };
        args.retain(|a| a.name.as_ref().is_none_or(|n| n.name != *key));
        args.push(eval::ArgVal {
            name: Some(p.name.clone()),
            value: override_value(program, target.module, text),
            span: p.name.span,
            raw: Some(text.clone()),
        });
    }
    let given: Vec<String> = args
        .iter()
        .filter_map(|a| a.name.as_ref().map(|n| n.name.clone()))
        .collect();
    let decl_name_span = decl.name.span;
    let mut el = Elaborator {
        prog: program,
        graph: Graph::new(&name),
        stack: Vec::new(),
        budget: OP_BUDGET,
        instantiating: Vec::new(),
        model_decls: Vec::new(),
        gen: generating.then(gen::GenState::default),
    };
    let loc = program.loc(target.module, decl_name_span);
    if let Some(p) = decl
        .params
        .iter()
        .find(|p| p.default.is_none() && !given.contains(&p.name.name))
    {
        return Err(Diagnostic::new(
            program.loc(target.module, p.name.span),
            format!("model parameter `{}` needs a default value", p.name.name),
        )
        .label("no default")
        .note("a model is built without arguments; give every parameter a default, e.g. `dim: int = 64`"));
    }
    // Errors in the arguments point at the alias's call when there is one.
    let site = match program.item(model) {
        Item::Alias(a) => program.loc(model.module, a.target.span),
        _ => loc,
    };
    let root = el.instantiate(target, args, String::new(), site)?;
    let params = ModelParams {
        block: decl.name.name.clone(),
        values: decl
            .params
            .iter()
            .filter_map(|p| {
                let v = match root.env.get(&p.name.name)? {
                    Value::Int(i) => Setting::Int(*i),
                    Value::Float(f) => Setting::Float(*f),
                    Value::Bool(b) => Setting::Bool(*b),
                    Value::Str(s) => Setting::Str(s.clone()),
                    Value::Enum(e) => Setting::Symbol(e.clone()),
                    // a function parameter (`act: fn = quick_gelu`): the function's name
                    Value::Func(value::Func::Item(f)) => {
                        Setting::Symbol(program.item_name(*f)?.to_string())
                    }
                    Value::Func(value::Func::Builtin(f)) => Setting::Symbol(f.to_string()),
                    _ => return None,
                };
                Some((p.name.name.clone(), v))
            })
            .collect(),
    };
    el.run_entry(&root, loc, entry)?;
    el.finish_generation(loc)?;
    // Adapters and trainers are checked against `forward`'s graph (not generation's); another
    // entry (a generation `step`) lacks the inputs that `preprocess` fills.
    let (adapters, trainers) = match generating {
        true => (Vec::new(), Vec::new()),
        false => {
            let adapters = decls::check_adapters(program, target, &root, &el.graph)?;
            let trainers = decls::check_trainers(program, target, &root, &el.graph, &adapters)?;
            (adapters, trainers)
        }
    };
    if entry != "forward" {
        el.model_decls
            .retain(|d| matches!(d, decls::ModelDecl::Checkpoint(_)));
    }
    let (checkpoint, preprocess) =
        decls::check_model_decls(program, target.module, &el.model_decls, &el.graph)?;
    crate::ir::verify(&el.graph).map_err(|errs| {
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        Diagnostic::new(
            loc,
            format!(
                "internal error: the elaborated graph is invalid: {}",
                text.join("; ")
            ),
        )
    })?;
    Ok(Elaborated {
        model: name,
        graph: el.graph,
        adapters,
        trainers,
        checkpoint,
        preprocess,
        params,
    })
}

/// The state of one elaboration.
pub(crate) struct Elaborator<'p> {
    pub prog: &'p Program,
    pub graph: Graph,
    /// Active calls and instantiations, innermost last: (identity, "in X, called at", site).
    pub stack: Vec<(String, String, Loc)>,
    pub budget: usize,
    /// Blocks being instantiated, to detect a block that contains itself.
    pub instantiating: Vec<ItemRef>,
    /// The model's `checkpoint` and `preprocess` members.
    pub model_decls: Vec<decls::ModelDecl>,
    /// Set when elaborating for generation (the key/value cache's inputs and outputs).
    pub gen: Option<gen::GenState>,
}

/// One activation: where names resolve and where new ops are attributed.
pub(crate) struct Ctx {
    pub module: usize,
    pub inst: Option<Rc<Instance>>,
    pub locals: Vec<HashMap<String, Value>>,
    /// The IR scope new nodes are attributed to: the instance path of the innermost method
    /// (top-level functions inherit their caller's).
    pub path: String,
}

impl Ctx {
    /// The IR scope new nodes are attributed to.
    pub fn scope(&self) -> String {
        self.path.clone()
    }
}

impl Elaborator<'_> {
    /// A diagnostic at `span` in the module of `cx`, with the call stack as notes.
    pub fn err(&self, cx: &Ctx, span: Span, msg: impl Into<String>) -> Diagnostic {
        self.err_in(cx.module, span, msg)
    }

    /// A diagnostic at `span` in `module`, with the call stack as notes.
    pub fn err_in(&self, module: usize, span: Span, msg: impl Into<String>) -> Diagnostic {
        let mut d = Diagnostic::new(self.prog.loc(module, span), msg);
        // An error inside an imported file (the standard library) also points at the innermost
        // call in the file being checked.
        let user_file = self.prog.modules[0].file;
        if d.loc.file != user_file {
            if let Some((_, what, site)) = self
                .stack
                .iter()
                .rev()
                .find(|f| f.2.file == user_file && !f.1.is_empty())
            {
                let label = if what.ends_with("instantiated at") {
                    "instantiated here"
                } else {
                    "called here"
                };
                d = d.also(*site, label);
            }
        }
        let primary = d.loc;
        for (_, what, site) in self
            .stack
            .iter()
            .rev()
            .filter(|f| !f.1.is_empty() && f.2 != primary)
            .take(8)
        {
            d = d.trace(format!("{what} {}", self.prog.sources.describe(*site)));
        }
        d
    }
}

/// `model Small = Clip(dim: 40)`: the target model and the arguments, evaluated in the alias's
/// module.
fn resolve_alias(
    program: &Program,
    module: usize,
    alias: &vlmc_grammar::ast::AliasDecl,
) -> Result<(ItemRef, Vec<eval::ArgVal>), Diagnostic> {
    use vlmc_grammar::ast::ExprKind;
    let (callee, call_args) = match &alias.target.kind {
        ExprKind::Call { callee, args } => (callee.as_ref(), args.as_slice()),
        _ => (&alias.target, &[][..]),
    };
    let bad = || {
        Diagnostic::new(
            program.loc(module, callee.span),
            "a model alias names another model: `model Small = Clip(dim: 40)`",
        )
        .label("not a model")
    };
    let ExprKind::Name(n) = &callee.kind else {
        return Err(bad());
    };
    let Some(target) = program.modules[module].scope.get(n).copied() else {
        return Err(Diagnostic::new(
            program.loc(module, callee.span),
            format!("unknown model `{n}`"),
        )
        .label("not defined here"));
    };
    if !matches!(program.item(target), Item::Block(b) if b.kind == BlockKind::Model) {
        return Err(bad());
    }
    let mut el = Elaborator {
        prog: program,
        graph: Graph::new(n),
        stack: Vec::new(),
        budget: OP_BUDGET,
        instantiating: Vec::new(),
        model_decls: Vec::new(),
        gen: None,
    };
    let mut cx = Ctx {
        module,
        inst: None,
        locals: vec![HashMap::new()],
        path: String::new(),
    };
    let args = el.eval_args(&mut cx, call_args)?;
    if let Some(a) = args.iter().find(|a| matches!(a.value, Value::Tensor(_))) {
        return Err(Diagnostic::new(
            program.loc(module, a.span),
            "model arguments are compile-time values",
        ));
    }
    Ok((target, args))
}

/// The value of `--set name=text`: a number, `true`/`false`, a quoted string, a function or
/// block visible in the model's file, or else a name (an enum variant).
fn override_value(program: &Program, module: usize, text: &str) -> Value {
    let t = text.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Value::Int(i);
    }
    if let Ok(f) = t.parse::<f64>() {
        return Value::Float(f);
    }
    match t {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    if let Some(s) = t.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return Value::Str(s.to_string());
    }
    if let Some(r) = program.modules[module].scope.get(t) {
        return Value::Func(value::Func::Item(*r));
    }
    if let Some(b) = builtins::lookup(t) {
        return Value::Func(value::Func::Builtin(b));
    }
    Value::Enum(t.to_string())
}

/// A model's two generation graphs: the prefill (its `forward`) and the step that continues it
/// one token at a time (its `fn step`, or `forward` again when the model has no `step`).
pub struct Generation {
    pub prefill: Elaborated,
    pub step: Elaborated,
    /// The sources read (for rendering diagnostics).
    pub program: Program,
}

/// Elaborates the model `model` (or the last of the file) of `path` for generation. Errors are
/// rendered against the sources.
pub fn generation_graphs(
    path: &Path,
    model: Option<&str>,
    overrides: &Overrides,
) -> Result<Generation, String> {
    let (program, root) = match modules::load(path) {
        Ok(x) => x,
        Err((program, diags)) => return Err(render_all(&program, &diags)),
    };
    let models = model_items(&program, root);
    let chosen = match model {
        Some(name) => models
            .iter()
            .find(|m| program.item_name(**m) == Some(name))
            .copied()
            .ok_or_else(|| format!("{} has no model `{name}`", path.display()))?,
        None => *models
            .last()
            .ok_or_else(|| format!("{} declares no model", path.display()))?,
    };
    let step_entry = if has_method(&program, chosen, "step") {
        "step"
    } else {
        "forward"
    };
    let one = |entry: &str| {
        elaborate_entry(&program, chosen, overrides, entry, true)
            .map_err(|d| render_all(&program, &[d]))
    };
    let mut prefill = one("forward")?;
    gen::last_position(&mut prefill.graph)?;
    let step = one(step_entry)?;
    Ok(Generation {
        prefill,
        step,
        program,
    })
}

fn render_all(program: &Program, diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(|d| d.render(&program.sources))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the model (through an alias too) declares a method `name` at its top level.
fn has_method(program: &Program, model: ItemRef, name: &str) -> bool {
    let target = match program.item(model) {
        Item::Alias(alias) => match resolve_alias(program, model.module, alias) {
            Ok((t, _)) => t,
            Err(_) => return false,
        },
        _ => model,
    };
    match program.item(target) {
        Item::Block(decl) => decl
            .members
            .iter()
            .any(|m| matches!(m, vlmc_grammar::ast::Member::Fn(f) if f.name.name == name)),
        _ => false,
    }
}
