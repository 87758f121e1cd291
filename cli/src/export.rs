//! `vlmc export FILE --weights W --hf DIR`: a model's weights as a transformers checkpoint
//! folder (config.json + safetensors, sharded above --max-shard-size).

use std::path::PathBuf;

/// `vlmc export`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The .vlm file of the model.
    pub file: PathBuf,
    /// Which model of the file (default: the last one).
    #[arg(long)]
    pub model: Option<String>,
    /// Set a compile-time parameter of the model: NAME=VALUE (repeatable).
    #[arg(long = "set", value_parser = crate::parse_set)]
    pub sets: Vec<(String, String)>,
    /// The weights (files, an index or a folder, as for `vlmc run`).
    #[arg(long, required = true, value_delimiter = ',')]
    pub weights: Vec<PathBuf>,
    /// The folder to write (must not exist, or be empty): config.json and model.safetensors,
    /// or model-0000K-of-0000N.safetensors with model.safetensors.index.json.
    #[arg(long)]
    pub hf: PathBuf,
    /// The largest shard: bytes, or with a unit as transformers writes it (5GB, 500MB, 2GiB).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// A LoRA adapter (PEFT layout) trained on these weights: also written, as DIR/adapter/,
    /// under transformers' module names, so PEFT loads it on the exported model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// A size as transformers' `max_shard_size` reads it: an integer number of bytes, or a number
/// with KB/MB/GB (powers of 10) or KiB/MiB/GiB (powers of 2).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let units: [(&str, u64); 7] = [
        ("KIB", 1 << 10),
        ("MIB", 1 << 20),
        ("GIB", 1 << 30),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("B", 1),
    ];
    let upper = t.to_ascii_uppercase();
    let (number, scale) = units
        .iter()
        .find_map(|(u, k)| upper.strip_suffix(u).map(|n| (n.trim().to_string(), *k)))
        .unwrap_or((upper.clone(), 1));
    let bad = || format!("`{s}` is not a size (e.g. 5GB, 500MB, 2GiB or a number of bytes)");
    let x: f64 = number.parse().map_err(|_| bad())?;
    if !x.is_finite() || x <= 0.0 || x * scale as f64 > u64::MAX as f64 {
        return Err(bad());
    }
    Ok((x * scale as f64) as u64)
}

/// Runs `vlmc export`.
pub fn export(a: &ExportArgs) -> Result<(), u8> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        1u8
    };
    let m = crate::load_model(
        &a.file,
        &crate::Pick {
            model: a.model.as_deref(),
            sets: &a.sets,
        },
    )?;
    let weights = vlmc_runtime::weight_set::WeightSet::open(&a.weights).map_err(|e| fail(&e))?;
    // The adapter is read and checked against these weights before anything is written.
    let adapter = match &a.adapter {
        Some(d) => {
            let bound = vlmc_runtime::weights::bind(&m.graph, &weights, &m.checkpoint)
                .map_err(|e| fail(&e))?;
            let peft = crate::adapter::load(&m, d, &bound.params, &a.weights, false)
                .map_err(|e| fail(&e))?;
            if peft.fan_in_fan_out {
                return Err(fail(&format!(
                    "{}: an adapter of `[in, out]` weights (fan_in_fan_out) is not exported; \
                     merge it instead (vlmc merge)",
                    d.display()
                )));
            }
            Some((d, peft))
        }
        None => None,
    };
    let done = vlmc_runtime::export::export(&m, &weights, &a.hf, a.max_shard_size)
        .map_err(|e| fail(&e))?;
    if let Some((d, peft)) = &adapter {
        let n = export_adapter(&m, peft, d, &a.hf).map_err(|e| fail(&e))?;
        eprintln!(
            "wrote {}: the adapter {} ({n} tensors) under transformers' names",
            a.hf.join("adapter").display(),
            d.display()
        );
    }
    if !done.ignored.is_empty() {
        eprintln!(
            "note: {} tensor(s) of the input that the model's checkpoint rules ignore are not \
             exported (e.g. `{}`)",
            done.ignored.len(),
            done.ignored[0]
        );
    }
    eprintln!(
        "wrote {} ({}): config.json and {} tensors, {:.1} MB in {}",
        a.hf.display(),
        done.architecture,
        done.tensors,
        done.bytes as f64 / 1e6,
        done.files.join(", ")
    );
    Ok(())
}

/// Writes `peft` (its names the spec's parameter paths) into `hf/adapter/` in PEFT's layout
/// under the exported model's (transformers') names, with `base_model_name_or_path` the
/// exported folder; `lora_dropout` and `task_type` as the adapter's own config says. Returns
/// the number of tensors.
fn export_adapter(
    m: &vlmc::elab::Elaborated,
    peft: &vlmc_runtime::train_ckpt::Peft,
    from: &std::path::Path,
    hf: &std::path::Path,
) -> Result<usize, String> {
    let layout = vlmc_runtime::hf_config::layout(&m.params)?;
    let cfg: serde_json::Value = std::fs::read(from.join("adapter_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut params = std::collections::BTreeMap::new();
    let (mut lora, mut modules) = (Vec::new(), Vec::new());
    for (list, source) in [(&mut lora, &peft.params), (&mut modules, &peft.modules)] {
        for (path, t) in source {
            let name = layout.hf_name(path);
            params.insert(name.clone(), t.clone());
            list.push(name);
        }
    }
    let base = hf.display().to_string();
    let save = vlmc_runtime::train_ckpt::AdapterSave {
        adapter_params: &lora,
        modules: &modules,
        lora: &peft.lora,
        dropout: cfg["lora_dropout"].as_f64().unwrap_or(0.0),
        task_type: cfg["task_type"].as_str(),
        base_model: Some(&base),
        base: None,
    };
    vlmc_runtime::train_ckpt::save_peft(&hf.join("adapter"), &params, &save)
        .map_err(|e| e.message)?;
    Ok(params.len())
}
