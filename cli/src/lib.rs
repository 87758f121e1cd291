//! The commands behind the `vlmc` binary: `check` and `build`. Diagnostics go to stderr,
//! artefacts are written to a temporary name and renamed into place.

use std::io::Write;
use std::path::{Path, PathBuf};
use vlmc::elab::{check_file, Checked, Elaborated};

/// Artefacts `vlmc build --emit` can write.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Emit {
    /// The parsed syntax tree (`<model>.ast`).
    Ast,
    /// The graph IR text form (`<model>.ir`).
    Ir,
    /// A Graphviz picture of the graph (`<model>.dot`, and `.svg` when `dot` is installed).
    Dot,
}

/// `vlmc check FILE...`: exit status 0 when every file is valid, 1 otherwise.
pub fn check(files: &[PathBuf]) -> Result<(), u8> {
    let mut failed = 0;
    for f in files {
        let checked = check_file(f);
        match &checked.result {
            Ok(models) => {
                let summary: Vec<String> = models
                    .iter()
                    .map(|m| {
                        format!(
                            "{} ({} ops, {} parameters)",
                            m.model,
                            m.graph.len(),
                            param_count(m)
                        )
                    })
                    .collect();
                if summary.is_empty() {
                    eprintln!("ok: {}", f.display());
                } else {
                    eprintln!("ok: {}: {}", f.display(), summary.join(", "));
                }
            }
            Err(_) => {
                failed += 1;
                eprint!("{}", checked.render());
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} file(s) failed", files.len());
        Err(1)
    } else {
        Ok(())
    }
}

/// The number of scalar parameters of a model, as text (symbolic sizes print as expressions).
pub fn param_count(m: &Elaborated) -> String {
    let mut total = vlmc::ir::Dim::c(0);
    for (_, _, ty, _) in m.graph.params() {
        if let Some(n) = ty.shape.numel() {
            if let Some(t) = total.checked_add(&n) {
                total = t;
            }
        }
    }
    total.to_string()
}

/// `vlmc build FILE --emit ...`: writes the artefacts of one model into `out`.
pub fn build(
    file: &Path,
    model: Option<&str>,
    emit: &[Emit],
    out: Option<&Path>,
) -> Result<(), u8> {
    let checked = check_file(file);
    let models = match &checked.result {
        Ok(m) => m,
        Err(_) => {
            eprint!("{}", checked.render());
            return Err(1);
        }
    };
    let chosen = match model {
        Some(name) => models.iter().find(|m| m.model == name),
        None => models.last(),
    };
    let Some(m) = chosen else {
        match model {
            Some(name) => eprintln!("error: {} has no model `{name}`", file.display()),
            None => eprintln!("error: {} declares no model to build", file.display()),
        }
        return Err(1);
    };
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("build").join(&m.model));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("error: cannot create {}: {e}", dir.display());
        return Err(1);
    }
    for e in emit {
        let (ext, text) = match e {
            Emit::Ast => ("ast", ast_text(&checked)),
            Emit::Ir => ("ir", vlmc::ir::text::print(&m.graph)),
            Emit::Dot => ("dot", vlmc::ir::to_dot(&m.graph)),
        };
        let path = dir.join(format!("{}.{ext}", m.model));
        if let Err(err) = write_atomic(&path, text.as_bytes()) {
            eprintln!("error: cannot write {}: {err}", path.display());
            return Err(1);
        }
        eprintln!("wrote {}", path.display());
        if *e == Emit::Dot {
            render_svg(&path);
        }
    }
    Ok(())
}

fn ast_text(checked: &Checked) -> String {
    checked
        .program
        .modules
        .first()
        .map(|m| format!("{:#?}\n", m.ast))
        .unwrap_or_default()
}

/// Runs Graphviz `dot -Tsvg` next to a `.dot` file when it is installed.
fn render_svg(dot_path: &Path) {
    let svg = dot_path.with_extension("svg");
    let tmp = dot_path.with_extension("svg.tmp");
    let status = std::process::Command::new("dot")
        .arg("-Tsvg")
        .arg(dot_path)
        .arg("-o")
        .arg(&tmp)
        .status();
    match status {
        Ok(s) if s.success() => {
            if std::fs::rename(&tmp, &svg).is_ok() {
                eprintln!("wrote {}", svg.display());
            }
        }
        Ok(_) => {
            let _ = std::fs::remove_file(&tmp);
            eprintln!("warning: graphviz `dot` failed; only the .dot file was written");
        }
        Err(_) => eprintln!("note: install graphviz (`dot`) to also get an SVG picture"),
    }
}

/// Writes a file under a temporary name, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
