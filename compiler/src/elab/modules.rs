//! Loading `.vlm` files and resolving `use` imports into one [`Program`]: a module per file,
//! each with the scope of names it can see. Import cycles are reported here.

use crate::diag::{Diagnostic, FileId, Loc, SourceMap};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vlmc_grammar::ast::{File, Item, Span, UseNames};

/// A reference to a top-level item: module index and item index in that module's AST.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ItemRef {
    pub module: usize,
    pub item: usize,
}

/// One loaded file.
#[derive(Debug)]
pub struct Module {
    pub file: FileId,
    /// Dotted module name (`std.nn`), or the file stem for the root.
    pub name: String,
    pub ast: File,
    /// Every name visible at top level: own items and imports.
    pub scope: HashMap<String, ItemRef>,
}

/// All modules reachable from a root file.
#[derive(Debug, Default)]
pub struct Program {
    pub sources: SourceMap,
    pub modules: Vec<Module>,
}

impl Program {
    /// The declaration an item reference points to.
    pub fn item(&self, r: ItemRef) -> &Item {
        &self.modules[r.module].ast.items[r.item]
    }
    /// The location of a span in a module.
    pub fn loc(&self, module: usize, span: Span) -> Loc {
        Loc {
            file: self.modules[module].file,
            span,
        }
    }
    /// The name an item declares, if any.
    pub fn item_name(&self, r: ItemRef) -> Option<&str> {
        item_name(self.item(r))
    }
}

fn item_name(item: &Item) -> Option<&str> {
    match item {
        Item::Use(_) => None,
        Item::Fn(f) => Some(&f.name.name),
        Item::Block(b) => Some(&b.name.name),
        Item::Alias(a) => Some(&a.name.name),
        Item::Adapter(a) => Some(&a.name.name),
        Item::Trainer(t) => Some(&t.name.name),
    }
}

/// The directories searched for `use a.b` after the importing file's own directory:
/// `$VLMC_PATH` (colon-separated), then the `models/` folder of this source tree.
pub fn search_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(p) = std::env::var("VLMC_PATH") {
        roots.extend(p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    roots.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models"
    )));
    roots
}

struct Loader {
    prog: Program,
    by_path: HashMap<PathBuf, usize>,
    /// Modules being loaded (for cycle detection): (canonical path, module name).
    loading: Vec<(PathBuf, String)>,
    diags: Vec<Diagnostic>,
}

/// Loads `root` and everything it imports. Returns the program and the root module index.
pub fn load(root: &Path) -> Result<(Program, usize), (Program, Vec<Diagnostic>)> {
    match crate::files::read_to_string(root) {
        Ok(text) => load_text(root, text),
        Err(e) => {
            let mut prog = Program::default();
            let file = prog.sources.add(root.to_path_buf(), String::new());
            let d = Diagnostic::new(
                Loc {
                    file,
                    span: Span::default(),
                },
                format!("cannot read {}: {}", root.display(), e),
            );
            Err((prog, vec![d]))
        }
    }
}

/// Like [`load`], with the root file's text given (imports are still read from disk,
/// relative to `root`'s directory).
pub fn load_text(
    root: &Path,
    text: String,
) -> Result<(Program, usize), (Program, Vec<Diagnostic>)> {
    let mut l = Loader {
        prog: Program::default(),
        by_path: HashMap::new(),
        loading: Vec::new(),
        diags: Vec::new(),
    };
    let name = root
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let idx = l.load_text(root.to_path_buf(), text, name);
    if l.diags.is_empty() {
        if let Some(i) = idx {
            return Ok((l.prog, i));
        }
    }
    Err((l.prog, l.diags))
}

impl Loader {
    fn load_text(&mut self, path: PathBuf, text: String, name: String) -> Option<usize> {
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let file = self.prog.sources.add(path.clone(), text);
        let ast = match vlmc_grammar::parse(self.prog.sources.text(file)) {
            Ok(a) => a,
            Err(e) => {
                self.diags
                    .push(Diagnostic::new(Loc { file, span: e.span }, e.message));
                return None;
            }
        };
        let idx = self.prog.modules.len();
        self.by_path.insert(canon.clone(), idx);
        self.prog.modules.push(Module {
            file,
            name: name.clone(),
            ast,
            scope: HashMap::new(),
        });
        self.loading.push((canon, name));
        self.declare_own_items(idx);
        self.resolve_imports(idx, &path);
        self.loading.pop();
        Some(idx)
    }

    fn declare_own_items(&mut self, idx: usize) {
        let m = &self.prog.modules[idx];
        let mut scope: HashMap<String, ItemRef> = HashMap::new();
        let mut diags = Vec::new();
        for (i, item) in m.ast.items.iter().enumerate() {
            let Some(name) = item_name(item) else {
                continue;
            };
            if let Some(prev) = scope.get(name) {
                let prev_span = name_span(&m.ast.items[prev.item]);
                diags.push(
                    Diagnostic::new(
                        Loc {
                            file: m.file,
                            span: name_span(item),
                        },
                        format!("`{name}` is defined twice in this file"),
                    )
                    .label("second definition")
                    .also(
                        Loc {
                            file: m.file,
                            span: prev_span,
                        },
                        "first definition",
                    ),
                );
                continue;
            }
            scope.insert(
                name.to_string(),
                ItemRef {
                    module: idx,
                    item: i,
                },
            );
        }
        self.diags.extend(diags);
        self.prog.modules[idx].scope = scope;
    }

    fn resolve_imports(&mut self, idx: usize, path: &Path) {
        let uses: Vec<_> = self.prog.modules[idx]
            .ast
            .items
            .iter()
            .filter_map(|i| match i {
                Item::Use(u) => Some(u.clone()),
                _ => None,
            })
            .collect();
        let file = self.prog.modules[idx].file;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        for u in uses {
            let loc = Loc { file, span: u.span };
            // Errors about the module point at its dotted path, not at the whole `use`.
            let path_loc = match (u.module.first(), u.module.last()) {
                (Some(a), Some(b)) => Loc {
                    file,
                    span: a.span.to(b.span),
                },
                _ => loc,
            };
            let modname: Vec<&str> = u.module.iter().map(|i| i.name.as_str()).collect();
            let dotted = modname.join(".");
            if modname.is_empty() {
                self.diags.push(
                    Diagnostic::new(loc, "`use` needs a module path, e.g. `use std.nn.Linear`")
                        .label("no module named here"),
                );
                continue;
            }
            let Some(target) = self.import_module(&dir, &modname, &dotted, path_loc) else {
                continue;
            };
            let names: Vec<(String, Span)> = match &u.names {
                UseNames::One(i) => vec![(i.name.clone(), i.span)],
                UseNames::Many(v) => v.iter().map(|i| (i.name.clone(), i.span)).collect(),
                UseNames::All(_) => {
                    let t = &self.prog.modules[target];
                    let mut own: Vec<(String, Span)> = t
                        .scope
                        .iter()
                        .filter(|(_, r)| r.module == target)
                        .map(|(n, _)| (n.clone(), u.span))
                        .collect();
                    own.sort_by(|a, b| a.0.cmp(&b.0));
                    own
                }
            };
            for (n, sp) in names {
                let found = self.prog.modules[target].scope.get(&n).copied();
                let nloc = Loc { file, span: sp };
                match found {
                    None => self.diags.push(
                        Diagnostic::new(nloc, format!("module `{dotted}` has no item `{n}`"))
                            .label("not found"),
                    ),
                    Some(r) => {
                        let prev = self.prog.modules[idx].scope.get(&n).copied();
                        match prev {
                            // A local definition clashes with the import: point at the
                            // definition, and show the import.
                            Some(prev) if prev.module == idx => {
                                let def = Loc {
                                    file,
                                    span: name_span(&self.prog.modules[idx].ast.items[prev.item]),
                                };
                                self.diags.push(
                                    Diagnostic::new(
                                        def,
                                        format!("`{n}` is both imported and defined in this file"),
                                    )
                                    .label("defined here")
                                    .also(nloc, "imported here"),
                                );
                            }
                            Some(prev) if prev != r => self.diags.push(
                                Diagnostic::new(
                                    nloc,
                                    format!("`{n}` is imported twice from different modules"),
                                )
                                .label("imported again here"),
                            ),
                            _ => {
                                self.prog.modules[idx].scope.insert(n, r);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Finds, loads (once) and returns the module for `a.b.c`.
    fn import_module(
        &mut self,
        dir: &Path,
        modname: &[&str],
        dotted: &str,
        loc: Loc,
    ) -> Option<usize> {
        let rel: PathBuf = modname.iter().collect::<PathBuf>().with_extension("vlm");
        let mut candidates = vec![dir.join(&rel)];
        candidates.extend(search_roots().into_iter().map(|r| r.join(&rel)));
        let Some(found) = candidates.iter().find(|c| c.is_file()).cloned() else {
            let tried: Vec<String> = candidates
                .iter()
                .map(|c| {
                    let shown = std::fs::canonicalize(c.parent().unwrap_or(c))
                        .map(|d| display_path(&d.join(c.file_name().unwrap_or_default())))
                        .unwrap_or_else(|_| c.clone());
                    shown.display().to_string()
                })
                .collect();
            self.diags.push(
                Diagnostic::new(loc, format!("cannot find module `{dotted}`"))
                    .label("imported here")
                    .note(format!("looked for: {}", tried.join(", "))),
            );
            return None;
        };
        let canon = std::fs::canonicalize(&found).unwrap_or_else(|_| found.clone());
        if let Some(pos) = self.loading.iter().position(|(p, _)| *p == canon) {
            let mut chain: Vec<String> =
                self.loading[pos..].iter().map(|(_, n)| n.clone()).collect();
            chain.push(self.loading[pos].1.clone());
            self.diags.push(
                Diagnostic::new(loc, format!("import cycle: {}", chain.join(" -> ")))
                    .label("this import closes the cycle"),
            );
            return None;
        }
        if let Some(&i) = self.by_path.get(&canon) {
            return Some(i);
        }
        let text = match crate::files::read_to_string(&found) {
            Ok(t) => t,
            Err(e) => {
                self.diags.push(
                    Diagnostic::new(loc, format!("cannot read {}: {e}", found.display()))
                        .label("imported here"),
                );
                return None;
            }
        };
        self.load_text(display_path(&canon), text, dotted.to_string())
    }
}

fn name_span(item: &Item) -> Span {
    match item {
        Item::Use(u) => u.span,
        Item::Fn(f) => f.name.span,
        Item::Block(b) => b.name.span,
        Item::Alias(a) => a.name.span,
        Item::Adapter(a) => a.name.span,
        Item::Trainer(t) => t.name.span,
    }
}

/// A path as shown in diagnostics: relative to the working directory when it lies inside it.
fn display_path(canon: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .and_then(|d| canon.strip_prefix(d).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| canon.to_path_buf())
}
