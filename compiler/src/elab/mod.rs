//! Elaboration: from the AST of a `model` to the typed graph IR.
//!
//! Blocks are instantiated with their compile-time arguments (parameters become named graph
//! inputs with their full path), then the model's `forward` is run symbolically: every tensor
//! expression adds primitive ops to the graph, every compile-time expression (`if`, `for`, sizes)
//! is evaluated. Shapes are checked at every step; errors point at the source.

mod builtins;
mod decls;
mod eval;
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

pub use decls::{AdapterInfo, NameRule, Preprocess, Setting, TrainerInfo};

/// A model elaborated into a graph, with its adapters and trainers checked.
#[derive(Debug)]
pub struct Elaborated {
    pub model: String,
    pub graph: Graph,
    pub adapters: Vec<AdapterInfo>,
    pub trainers: Vec<TrainerInfo>,
    /// How checkpoint tensor names map to parameter paths, in order.
    pub checkpoint: Vec<NameRule>,
    /// How raw inputs (text, images) become input tensors.
    pub preprocess: Vec<Preprocess>,
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

/// Parses, resolves and elaborates every `model` in `path`, and checks its adapters and trainers.
/// A file without models (a library) is checked for syntax and imports.
pub fn check_file(path: &Path) -> Checked {
    check_loaded(modules::load(path))
}

/// Like [`check_file`], with the file's text given (imports are read relative to `path`).
pub fn check_text(path: &Path, text: String) -> Checked {
    check_loaded(modules::load_text(path, text))
}

type Loaded = Result<(Program, usize), (Program, Vec<Diagnostic>)>;

fn check_loaded(loaded: Loaded) -> Checked {
    let (program, root) = match loaded {
        Ok(x) => x,
        Err((program, diags)) => {
            return Checked {
                program,
                result: Err(diags),
            }
        }
    };
    let models: Vec<ItemRef> = program.modules[root]
        .ast
        .items
        .iter()
        .enumerate()
        .filter(|(_, it)| matches!(it, Item::Block(b) if b.kind == BlockKind::Model))
        .map(|(i, _)| ItemRef {
            module: root,
            item: i,
        })
        .collect();
    let mut out = Vec::new();
    let mut diags = Vec::new();
    for m in models {
        match elaborate_model(&program, m) {
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

/// Elaborates one model declaration.
pub fn elaborate_model(program: &Program, model: ItemRef) -> Result<Elaborated, Diagnostic> {
    let Item::Block(decl) = program.item(model) else {
        return Err(Diagnostic::new(
            program.loc(model.module, Span::default()),
            "not a model",
        ));
    };
    let mut el = Elaborator {
        prog: program,
        graph: Graph::new(&decl.name.name),
        stack: Vec::new(),
        budget: OP_BUDGET,
        instantiating: Vec::new(),
        model_decls: Vec::new(),
    };
    let loc = program.loc(model.module, decl.name.span);
    if let Some(p) = decl.params.iter().find(|p| p.default.is_none()) {
        return Err(Diagnostic::new(
            program.loc(model.module, p.name.span),
            format!("model parameter `{}` needs a default value", p.name.name),
        )
        .label("no default")
        .note("a model is built without arguments; give every parameter a default, e.g. `dim: int = 64`"));
    }
    let root = el.instantiate(model, Vec::new(), String::new(), loc)?;
    el.run_entry(&root, loc)?;
    let adapters = decls::check_adapters(program, model, &root, &el.graph)?;
    let trainers = decls::check_trainers(program, model, &root, &el.graph, &adapters)?;
    let (checkpoint, preprocess) =
        decls::check_model_decls(program, model.module, &el.model_decls, &el.graph)?;
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
        model: decl.name.name.clone(),
        graph: el.graph,
        adapters,
        trainers,
        checkpoint,
        preprocess,
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
