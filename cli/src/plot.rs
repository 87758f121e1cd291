//! `vlmc plot RUN_DIR... -o curves.svg`: the training curves of a run's `log.jsonl` (the loss
//! with the evaluation loss, the learning rate, the gradient norm, each against the step) as
//! an SVG picture, drawn with `plotters`' SVG backend (text as `<text>` elements: no font
//! files are read).
//!
//! A chain's folder (no `log.jsonl`, a `log.jsonl` in each stage's folder) draws its stages one
//! after another in the chain's order (each stage's steps follow the previous stage's last
//! one), as do several folders given in a row.

use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `vlmc plot RUN_DIR... -o curves.svg`.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Output folders of `vlmc train`: a run's (its log.jsonl) or a chain's (each stage's
    /// log.jsonl, in the chain's order). Several are drawn one after another.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The SVG file to write (written whole or not at all).
    #[arg(short, long)]
    pub out: PathBuf,
}

/// The curves of one run (one stage).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curves {
    /// What the run is called in the legend (the folder's name).
    pub name: String,
    /// The log read.
    pub log: PathBuf,
    /// Training steps: step → (loss, lr, grad_norm); a step logged twice keeps its last line.
    pub train: BTreeMap<u64, (f64, f64, f64)>,
    /// Evaluations: step → loss.
    pub eval: BTreeMap<u64, f64>,
    /// Lines that are not whole JSON objects (a torn last line).
    pub skipped: usize,
}

/// Reads a `log.jsonl`.
pub fn read_log(name: &str, path: &Path) -> Result<Curves, String> {
    let text = vlmc::files::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut c = Curves {
        name: name.to_string(),
        log: path.to_path_buf(),
        ..Curves::default()
    };
    let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            c.skipped += 1;
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_u64()) else {
            c.skipped += 1;
            continue;
        };
        if let Some(loss) = num(&v, "loss") {
            let lr = num(&v, "lr").unwrap_or(f64::NAN);
            let g = num(&v, "grad_norm").unwrap_or(f64::NAN);
            c.train.insert(step, (loss, lr, g));
        }
        if let Some(l) = num(&v, "eval_loss") {
            c.eval.insert(step, l);
        }
    }
    Ok(c)
}

/// `from` of the latest checkpoint in a stage folder (from its fingerprint), if any.
fn stage_from(dir: &Path) -> Option<Option<String>> {
    let ck = vlmc_runtime::train_ckpt::latest_checkpoint(dir).ok()?;
    let st = vlmc_runtime::train_ckpt::read_state(&ck).ok()?;
    let from = st.fingerprint.settings.get("from")?;
    Some(
        from.strip_prefix("Some(\"")
            .and_then(|f| f.strip_suffix("\")"))
            .map(str::to_string),
    )
}

/// The logs in a folder given to `vlmc plot`: its own `log.jsonl`, or else each stage's, in
/// the chain's order: by the `from` of each stage's latest checkpoint (a stage after the one
/// it starts from), then by when the log was last written, then by name.
pub fn discover(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let name = |p: &Path| {
        std::fs::canonicalize(p)
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| p.display().to_string())
    };
    let own = dir.join("log.jsonl");
    if own.is_file() {
        return Ok(vec![(name(dir), own)]);
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut stages: Vec<(String, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("log.jsonl").is_file())
        .map(|p| {
            (
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string(),
                p,
            )
        })
        .collect();
    if stages.is_empty() {
        return Err(format!(
            "{} holds no log.jsonl, nor does any folder in it: give the output folder of \
             `vlmc train` (or of a stage)",
            dir.display()
        ));
    }
    let from: BTreeMap<String, Option<String>> = stages
        .iter()
        .filter_map(|(n, p)| stage_from(p).map(|f| (n.clone(), f)))
        .collect();
    // How many stages of this folder come before a stage (following `from`).
    let count = stages.len();
    let depth = |n: &str| -> Option<usize> {
        let mut at = from.get(n)?.clone();
        let mut d = 0;
        while let Some(f) = at {
            if d > count || !from.contains_key(&f) {
                break;
            }
            d += 1;
            at = from[&f].clone();
        }
        Some(d)
    };
    let mtime = |p: &Path| {
        std::fs::metadata(p.join("log.jsonl"))
            .and_then(|m| m.modified())
            .ok()
    };
    stages.sort_by_key(|(n, p)| (depth(n).unwrap_or(usize::MAX), mtime(p), n.clone()));
    Ok(stages
        .into_iter()
        .map(|(n, p)| (n, p.join("log.jsonl")))
        .collect())
}

/// A tick label: plain with as few digits as the axis' span needs (trailing zeros dropped),
/// scientific for tiny or huge values.
fn tick(v: f64, span: f64) -> String {
    let a = v.abs().max(span.abs());
    if v == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let digits = (2 - span.abs().max(1e-12).log10().floor() as i64).clamp(0, 8) as usize;
    let s = format!("{v:.digits$}");
    match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => s,
    }
}

/// A y range holding the values, with a margin.
fn y_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1e-3) * 0.05
    };
    (lo - pad)..(hi + pad)
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];
const EVAL: RGBColor = RGBColor(214, 39, 40);

/// Draws the curves of `runs` (one after another along the step axis) as SVG text.
pub fn render(runs: &[Curves]) -> Result<String, String> {
    let e = |e: &dyn std::fmt::Display| format!("cannot draw: {e}");
    // Each run's steps follow the previous run's last step.
    let mut offsets = Vec::new();
    let mut at = 0u64;
    for c in runs {
        offsets.push(at);
        let last = c
            .train
            .keys()
            .chain(c.eval.keys())
            .max()
            .copied()
            .unwrap_or(0);
        at += last;
    }
    let x_max = at.max(1) as f64;
    let x_min = runs
        .iter()
        .zip(&offsets)
        .flat_map(|(c, o)| c.train.keys().chain(c.eval.keys()).map(move |s| s + o))
        .min()
        .unwrap_or(0)
        .min(at.saturating_sub(1)) as f64;
    let several = runs.len() > 1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 960)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let panels = root.split_evenly((3, 1));
        type Pick = fn(&(f64, f64, f64)) -> f64;
        let spec: [(&str, &str, Pick); 3] = [
            ("loss", "loss", |r| r.0),
            ("learning rate", "lr", |r| r.1),
            ("gradient norm (before clipping)", "grad_norm", |r| r.2),
        ];
        for (i, (panel, (title, y_desc, pick))) in panels.iter().zip(spec).enumerate() {
            let values = runs.iter().flat_map(|c| {
                let evals = match i {
                    0 => c.eval.values().copied().collect::<Vec<_>>(),
                    _ => Vec::new(),
                };
                c.train.values().map(pick).chain(evals)
            });
            let yr = y_range(values);
            let span = yr.end - yr.start;
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(72)
                .build_cartesian_2d(x_min..x_max, yr)
                .map_err(|x| e(&x))?;
            chart
                .configure_mesh()
                .x_desc(match several {
                    true => "step (each run after the one before)",
                    false => "step",
                })
                .y_desc(y_desc)
                .x_label_formatter(&|v| format!("{}", v.round() as i64))
                .y_label_formatter(&|v| tick(*v, span))
                .draw()
                .map_err(|x| e(&x))?;
            for (k, (c, &o)) in runs.iter().zip(&offsets).enumerate() {
                let colour = COLOURS[k % COLOURS.len()];
                let label = |what: &str| match several {
                    true => format!("{}: {what}", c.name),
                    false => what.to_string(),
                };
                let points: Vec<(f64, f64)> = c
                    .train
                    .iter()
                    .map(|(s, r)| ((s + o) as f64, pick(r)))
                    .filter(|(_, y)| y.is_finite())
                    .collect();
                let series = chart
                    .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                    .map_err(|x| e(&x))?;
                if i == 0 {
                    // A swatch (a rectangle: only the series are polylines).
                    series.label(label("train loss")).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 1), (x + 18, y + 1)], colour.filled())
                    });
                }
                if i == 0 && !c.eval.is_empty() {
                    let points: Vec<(f64, f64)> = c
                        .eval
                        .iter()
                        .map(|(s, l)| ((s + o) as f64, *l))
                        .filter(|(_, y)| y.is_finite())
                        .collect();
                    let dash = match several {
                        true => colour,
                        false => EVAL,
                    };
                    chart
                        .draw_series(LineSeries::new(points.clone(), dash.stroke_width(1)))
                        .map_err(|x| e(&x))?
                        .label(label("eval loss"))
                        .legend(move |(x, y)| Circle::new((x + 9, y), 3, dash.filled()));
                    chart
                        .draw_series(points.into_iter().map(|p| Circle::new(p, 3, dash.filled())))
                        .map_err(|x| e(&x))?;
                }
                if several && k > 0 {
                    // Between the previous run's last step and this run's first.
                    let xs = o as f64 + 0.5;
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(xs, chart.y_range().start), (xs, chart.y_range().end)],
                            BLACK.mix(0.35),
                        )))
                        .map_err(|x| e(&x))?;
                }
            }
            if i == 0 {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.4))
                    .draw()
                    .map_err(|x| e(&x))?;
            }
        }
        root.present().map_err(|x| e(&x))?;
    }
    Ok(svg)
}

/// Runs `vlmc plot`.
pub fn plot(a: &PlotArgs) -> Result<(), u8> {
    let fail = |e: String| {
        eprintln!("error: {e}");
        1u8
    };
    if a.out.extension().and_then(|x| x.to_str()) != Some("svg") {
        return Err(fail(format!(
            "{}: `vlmc plot` writes SVG; give -o a name ending in .svg",
            a.out.display()
        )));
    }
    let mut logs = Vec::new();
    for dir in &a.runs {
        logs.extend(discover(dir).map_err(fail)?);
    }
    let roles: Vec<(String, &Path)> = logs
        .iter()
        .map(|(n, p)| (format!("the log of `{n}`"), p.as_path()))
        .collect();
    let inputs: Vec<(&str, &Path)> = roles.iter().map(|(r, p)| (r.as_str(), *p)).collect();
    crate::check_output(&a.out, &inputs)?;
    let mut runs = Vec::new();
    for (name, log) in &logs {
        let c = read_log(name, log).map_err(fail)?;
        if c.skipped > 0 {
            eprintln!(
                "warning: {}: {} line(s) that are not whole log lines were skipped",
                log.display(),
                c.skipped
            );
        }
        if c.train.is_empty() {
            return Err(fail(format!("{} has no training step yet", log.display())));
        }
        runs.push(c);
    }
    let svg = render(&runs).map_err(fail)?;
    vlmc::files::write_atomic(&a.out, svg.as_bytes())
        .map_err(|e| fail(format!("cannot write {}: {e}", a.out.display())))?;
    let steps: Vec<String> = runs
        .iter()
        .map(|c| {
            format!(
                "`{}` {} steps{}",
                c.name,
                c.train.len(),
                match c.eval.len() {
                    0 => String::new(),
                    1 => ", 1 evaluation".to_string(),
                    n => format!(", {n} evaluations"),
                }
            )
        })
        .collect();
    eprintln!("wrote {} ({})", a.out.display(), steps.join("; "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_readable() {
        assert_eq!(tick(0.0, 1.0), "0");
        assert_eq!(tick(2.5, 3.0), "2.5");
        assert_eq!(tick(2.0, 3.0), "2");
        assert_eq!(tick(120.0, 400.0), "120");
        assert_eq!(tick(0.0104, 0.001), "0.0104");
        assert_eq!(tick(3e-4, 1e-4), "3.0e-4");
    }

    #[test]
    fn a_flat_series_gets_a_range() {
        let r = y_range([2.0, 2.0].into_iter());
        assert!(r.start < 2.0 && r.end > 2.0);
        assert_eq!(y_range([f64::NAN].into_iter()), 0.0..1.0);
    }
}
