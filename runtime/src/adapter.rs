//! Running base weights with a LoRA adapter, and checking that they are the adapter's base.
//!
//! [`attach`] adds a PEFT adapter to a model's graph without merging it: each target becomes
//! `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` (the LoRA pass) and the adapter's `modules_to_save` replace the base's
//! parameters. [`BaseRecord`] is what vlmc writes beside an adapter it trained
//! (`vlmc_base.json`): a hash of each base tensor the adapter was trained on top of, so that
//! applying it to other weights is refused, naming the tensors that differ.

use crate::tensor::Tensor;
use crate::train_ckpt::{hash_tensor, CkptError, Peft};
use std::collections::BTreeMap;
use std::path::Path;

/// The file of an adapter folder that records its base.
pub const BASE_FILE: &str = "vlmc_base.json";

fn cerr<T>(message: impl Into<String>) -> Result<T, CkptError> {
    Err(CkptError {
        message: message.into(),
    })
}

/// The base tensors an adapter was trained on top of: parameter path → hash of its shape and
/// values ([`hash_tensor`], 16 hex digits). Parameters that trained (LoRA, `modules_to_save`)
/// are not in it.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseRecord {
    pub tensors: BTreeMap<String, String>,
}

impl BaseRecord {
    /// The record of `params` less the paths in `skip`.
    pub fn of(params: &BTreeMap<String, Tensor>, paths: &[&str], skip: &[String]) -> BaseRecord {
        let tensors = paths
            .iter()
            .filter(|p| !skip.iter().any(|s| s == *p))
            .filter_map(|p| {
                params
                    .get(*p)
                    .map(|t| (p.to_string(), format!("{:016x}", hash_tensor(t))))
            })
            .collect();
        BaseRecord { tensors }
    }

    /// Writes `dir/vlmc_base.json`.
    pub fn write(&self, dir: &Path) -> Result<(), CkptError> {
        let path = dir.join(BASE_FILE);
        let v = serde_json::json!({
            "what": "the base tensors this adapter was trained on: parameter path -> FNV-1a \
                     style hash of shape and values (vlmc)",
            "tensors": self.tensors,
        });
        crate::weights::write_atomic(
            &path,
            serde_json::to_string_pretty(&v)
                .unwrap_or_default()
                .as_bytes(),
        )
        .map_err(|e| CkptError {
            message: format!("{}: {e}", path.display()),
        })
    }

    /// Reads `dir/vlmc_base.json`, checked; `None` when there is none (an adapter that
    /// another tool wrote).
    pub fn read(dir: &Path) -> Result<Option<BaseRecord>, CkptError> {
        let path = dir.join(BASE_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let at = path.display().to_string();
        let text = crate::files::read_to_string(&path).map_err(|e| CkptError {
            message: format!("{at}: {e}"),
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| CkptError {
            message: format!("{at}: not valid JSON: {e}"),
        })?;
        let Some(obj) = v.get("tensors").and_then(|t| t.as_object()) else {
            return cerr(format!("{at}: no object `tensors`"));
        };
        let mut tensors = BTreeMap::new();
        for (k, h) in obj {
            match h.as_str() {
                Some(s) if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    tensors.insert(k.clone(), s.to_string());
                }
                _ => {
                    return cerr(format!(
                        "{at}: `{k}` must be a hash of 16 hex digits, not {h}"
                    ))
                }
            }
        }
        Ok(Some(BaseRecord { tensors }))
    }

    /// The recorded tensors that `base` lacks or holds with other values, in path order.
    pub fn differences(&self, base: &BTreeMap<String, Tensor>) -> Vec<String> {
        self.tensors
            .iter()
            .filter(|(p, h)| {
                base.get(*p)
                    .is_none_or(|t| format!("{:016x}", hash_tensor(t)) != **h)
            })
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// Checks that `base` is the base `peft` was trained on (when it records one): the error
/// names the tensors that differ and says what to do. `weights` names the base in messages.
pub fn check_base(
    peft: &Peft,
    adapter: &Path,
    base: &BTreeMap<String, Tensor>,
    weights: &Path,
) -> Result<(), CkptError> {
    let Some(rec) = &peft.base else {
        return Ok(());
    };
    let diff = rec.differences(base);
    if diff.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = diff.iter().take(6).map(|p| format!("`{p}`")).collect();
    cerr(format!(
        "the adapter {} was trained on other base weights than {}: {} of the {} base tensors \
         it records ({}) differ: {}{}; give the weights the training started from{}, or \
         --allow-other-base to apply it anyway",
        adapter.display(),
        weights.display(),
        diff.len(),
        rec.tensors.len(),
        adapter.join(BASE_FILE).display(),
        shown.join(", "),
        if diff.len() > 6 { ", ..." } else { "" },
        peft.base_model.as_ref().map_or(String::new(), |b| format!(
            " (`base_model_name_or_path`: {b})"
        ))
    ))
}

/// Adds `peft` to `graph` without merging it: each target's matmul gets the LoRA branch (the
/// LoRA pass) and `params` gets the adapter's A and B and its `modules_to_save` (replacing the
/// base's). Layers stored `[in, out]` (`fan_in_fan_out`) are refused: merge those instead.
pub fn attach(
    graph: &mut vlmc::ir::Graph,
    params: &mut BTreeMap<String, Tensor>,
    peft: &Peft,
) -> Result<(), CkptError> {
    if peft.fan_in_fan_out {
        return cerr(
            "the adapter sets `fan_in_fan_out` (its layers store their weight [in, out], as \
             GPT-2's Conv1D): vlmc runs such adapters merged only; merge it first with `vlmc \
             merge`",
        );
    }
    if peft.targets.is_empty() {
        return cerr("the adapter has no LoRA weights");
    }
    // Names and shapes first (the errors of `vlmc merge`).
    let modules = crate::train_ckpt::saved_modules(graph, peft)?;
    for t in &peft.targets {
        let path = format!("{t}.weight");
        let Some(id) = graph.param(&path) else {
            return cerr(format!(
                "the adapter adapts `{t}`, but the model has no parameter `{path}`"
            ));
        };
        let w = &graph.node(id).ty.shape.0;
        let (a, b) = (
            &peft.params[&format!("{t}.lora_A.weight")].shape,
            &peft.params[&format!("{t}.lora_B.weight")].shape,
        );
        let fits = w.len() == 2
            && w[0].as_const() == Some(b[0] as i64)
            && w[1].as_const() == Some(a[1] as i64);
        if !fits {
            return cerr(format!(
                "`{path}` is {}, but the adapter's lora_A {a:?} and lora_B {b:?} fit a weight \
                 [{}, {}] ([out, in])",
                graph.node(id).ty,
                b[0],
                a[1]
            ));
        }
    }
    vlmc::passes::lora::apply(graph, &peft.targets, &peft.lora).map_err(|e| CkptError {
        message: e.to_string(),
    })?;
    params.extend(peft.params.clone());
    params.extend(modules);
    Ok(())
}

/// Renames the adapter's modules to the model's parameter paths with its `checkpoint` rules
/// (PEFT names them as the checkpoint does, e.g. transformers' `model.language_model.layers`).
/// A name that already is a parameter path of `graph` (an adapter vlmc wrote) stays.
pub fn map_names(
    peft: &mut Peft,
    graph: &vlmc::ir::Graph,
    rules: &[vlmc::elab::NameRule],
) -> Result<(), CkptError> {
    if rules.is_empty() {
        return Ok(());
    }
    let path_of = |name: &str| {
        if graph.param(name).is_some() {
            return Ok(name.to_string());
        }
        crate::weights::map_name(name, rules).ok_or_else(|| CkptError {
            message: format!(
                "the adapter holds `{name}`, which the model's `checkpoint` rules ignore"
            ),
        })
    };
    let mut targets = Vec::new();
    let mut params = BTreeMap::new();
    for t in &peft.targets {
        let w = path_of(&format!("{t}.weight"))?;
        let to = w.strip_suffix(".weight").unwrap_or(&w).to_string();
        for x in ["lora_A", "lora_B"] {
            if let Some(v) = peft.params.get(&format!("{t}.{x}.weight")) {
                params.insert(format!("{to}.{x}.weight"), v.clone());
            }
        }
        targets.push(to);
    }
    let mut modules = BTreeMap::new();
    for (p, v) in &peft.modules {
        modules.insert(path_of(p)?, v.clone());
    }
    peft.targets = targets;
    peft.params = params;
    peft.modules = modules;
    Ok(())
}

/// The tensors of `names` that are LoRA weights (`….lora_A.weight`, `….lora_B.weight`, and
/// PEFT's `….lora_A.default.weight` form).
pub fn lora_tensors(names: &[String]) -> Vec<&str> {
    names
        .iter()
        .filter(|n| {
            [
                ".lora_A.",
                ".lora_B.",
                ".lora_embedding_A",
                ".lora_embedding_B",
            ]
            .iter()
            .any(|k| n.contains(k))
        })
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_record_names_the_tensors_that_differ_and_reads_back_checked() {
        let t = |v: f32| Tensor::f32(vec![2], vec![v, 1.0]);
        let base: BTreeMap<String, Tensor> = [("a", t(0.5)), ("b", t(2.0)), ("lora", t(3.0))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let rec = BaseRecord::of(&base, &["a", "b", "lora"], &["lora".to_string()]);
        assert_eq!(rec.tensors.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(rec.differences(&base).is_empty());
        let mut other = base.clone();
        other.insert("b".into(), t(2.5));
        other.remove("a");
        assert_eq!(rec.differences(&other), ["a", "b"]);
        // The shape counts too.
        other.insert("a".into(), Tensor::f32(vec![1, 2], vec![0.5, 1.0]));
        assert_eq!(rec.differences(&other), ["a", "b"]);

        let dir = std::env::temp_dir().join(format!("vlmc-base-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        assert_eq!(BaseRecord::read(&dir).expect("none"), None);
        rec.write(&dir).expect("write");
        assert_eq!(BaseRecord::read(&dir).expect("reads"), Some(rec));
        std::fs::write(dir.join(BASE_FILE), r#"{"tensors": {"a": "xyz"}}"#).expect("write");
        let e = BaseRecord::read(&dir).expect_err("bad hash");
        assert!(
            e.message.contains("`a` must be a hash of 16 hex digits"),
            "{}",
            e.message
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
