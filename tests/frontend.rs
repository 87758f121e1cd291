//! Front-end tests as data: every `.vlm` under `tests/blocks/` (one per standard-library block)
//! and every model in `models/` is elaborated, and its IR text is pinned by an insta snapshot;
//! the IR text form must read back to the same text.

use std::path::{Path, PathBuf};
use vlmc::elab::{check_file, Elaborated};
use vlmc::ir;

/// Elaborates the only model of `path`, failing the test with the rendered diagnostics.
fn elaborate(path: &Path) -> Elaborated {
    let checked = check_file(path);
    let text = checked.render();
    let mut models = checked
        .result
        .unwrap_or_else(|_| panic!("{} does not check:\n{text}", path.display()));
    assert_eq!(
        models.len(),
        1,
        "{} should declare exactly one model",
        path.display()
    );
    models.remove(0)
}

fn vlm_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "vlm"))
        .collect();
    files.sort();
    files
}

/// The `fixture.vlm` of every zoo fixture.
fn fixture_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/zoo")
        .expect("tests/fixtures/zoo")
        .map(|e| e.expect("dir entry").path().join("fixture.vlm"))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn ir_of_every_std_block() {
    insta::glob!("blocks/*.vlm", |path| {
        let m = elaborate(path);
        insta::assert_snapshot!(ir::text::print(&m.graph));
    });
}

#[test]
fn ir_of_every_model() {
    // The example models at their own sizes; the zoo's full-size specs are pinned at their
    // fixture sizes below (the same structure, a tenth of the text).
    insta::glob!("../models", "{llava_tiny,clip_tiny,minilm}.vlm", |path| {
        let m = elaborate(path);
        insta::assert_snapshot!(ir::text::print(&m.graph));
    });
}

#[test]
fn ir_of_every_zoo_spec_at_fixture_size() {
    for path in fixture_files() {
        let arch = path
            .parent()
            .and_then(|d| d.file_name())
            .expect("fixture dir");
        let m = elaborate(&path);
        insta::assert_snapshot!(
            format!("zoo_{}", arch.to_string_lossy()),
            ir::text::print(&m.graph)
        );
    }
}

#[test]
fn ir_text_reads_back_identically() {
    let mut files = vlm_files("models");
    files.extend(vlm_files("tests/blocks"));
    assert!(
        files.len() > 20,
        "expected the zoo and the block tests, found {}",
        files.len()
    );
    for path in files {
        let m = elaborate(&path);
        let text = ir::text::print(&m.graph);
        let back = ir::read::read(&text)
            .unwrap_or_else(|e| panic!("{}: the IR does not read back: {e}", path.display()));
        ir::verify::verify(&back).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        assert_eq!(
            ir::text::print(&back),
            text,
            "{}: print -> read -> print differs",
            path.display()
        );
    }
}

#[test]
fn every_graph_verifies_and_has_named_params() {
    for path in vlm_files("models") {
        let m = elaborate(&path);
        ir::verify::verify(&m.graph).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        for (_, name, ty, _) in m.graph.params() {
            assert!(
                !name.is_empty() && !name.starts_with('.') && !name.ends_with('.'),
                "bad param path {name}"
            );
            assert!(ty.rank() <= 4, "{name}: {ty}");
        }
    }
}

#[test]
fn llava_tiny_parameter_tree_follows_hugging_face_names() {
    let m = elaborate(Path::new("models/llava_tiny.vlm"));
    let names: Vec<String> = m
        .graph
        .params()
        .iter()
        .map(|(_, n, _, _)| n.to_string())
        .collect();
    for expected in [
        "vision_tower.embeddings.class_embedding",
        "vision_tower.embeddings.patch_embedding.weight",
        "vision_tower.embeddings.position_embedding.weight",
        "vision_tower.pre_layrnorm.weight",
        "vision_tower.encoder.layers.2.self_attn.q_proj.bias",
        "vision_tower.encoder.layers.0.mlp.fc2.weight",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.1.self_attn.o_proj.weight",
        "language_model.model.layers.0.mlp.gate_proj.weight",
        "language_model.model.layers.0.input_layernorm.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "missing parameter {expected}"
        );
    }
    // GQA: 4 query heads, 2 key/value heads of width 96 / 4 = 24.
    let k = m
        .graph
        .param("language_model.model.layers.0.self_attn.k_proj.weight")
        .expect("k_proj");
    assert_eq!(m.graph.node(k).ty.to_string(), "f32[48, 96]");
    // The output has the image prefix: (32 / 8)^2 = 16 positions before the text.
    let (_, out) = &m.graph.outputs[0];
    assert_eq!(m.graph.node(*out).ty.to_string(), "f32[B, T + 16, 512]");
    // Adapters and trainers are checked and resolved.
    assert_eq!(m.adapters.len(), 1);
    assert_eq!(
        m.adapters[0].targets.len(),
        4,
        "q_proj and v_proj of 2 layers"
    );
    let align = &m.trainers[0];
    assert!(align
        .trainable
        .iter()
        .all(|p| p.starts_with("multi_modal_projector.")));
    assert_eq!(align.trainable.len(), 4);
}

#[test]
fn build_writes_ir_and_dot() {
    let dir = std::env::temp_dir().join(format!("vlmc-build-{}", std::process::id()));
    let emit = [vlmc_cli::Emit::Ast, vlmc_cli::Emit::Ir, vlmc_cli::Emit::Dot];
    vlmc_cli::build(
        Path::new("models/llava_tiny.vlm"),
        &vlmc_cli::Pick::default(),
        &emit,
        Some(&dir),
    )
    .expect("build");
    let ir_text = std::fs::read_to_string(dir.join("LlavaTiny.ir")).expect("ir written");
    assert!(ir_text.starts_with("graph LlavaTiny\ndims B, T\n"));
    let dot = std::fs::read_to_string(dir.join("LlavaTiny.dot")).expect("dot written");
    assert!(dot.starts_with("digraph"));
    for cluster in [
        "vision_tower",
        "vision_tower.encoder.layers.1",
        "language_model.model.layers.0.self_attn",
    ] {
        assert!(
            dot.contains(&format!("label=\"{cluster}\"")) || dot.contains(cluster),
            "no cluster {cluster}"
        );
    }
    let ast = std::fs::read_to_string(dir.join("LlavaTiny.ast")).expect("ast written");
    assert!(ast.contains("LlavaTiny"));
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ast_of_a_small_spec() {
    let text = std::fs::read_to_string("tests/blocks/linear.vlm").expect("readable");
    let ast = vlmc_grammar::parse(&text).expect("parses");
    insta::assert_snapshot!(format!("{ast:#?}"));
}
