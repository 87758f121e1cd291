//! Files the tests write for vlmc to read: `.npy` bytes, FIFOs and a few rows of training
//! text. Shared by the root test crate (`tests/common/mod.rs`) and the command line's tests
//! (`cli/tests/common/mod.rs`, through `#[path]`), so it uses nothing but std.

use std::path::{Path, PathBuf};

/// A `.npy` file's bytes (version 1.0) with the given header dict and data.
pub fn npy_bytes(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Makes a FIFO at `p` (with the `mkfifo` command).
#[cfg(unix)]
pub fn mkfifo(p: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .expect("mkfifo runs");
    assert!(st.success(), "mkfifo {}", p.display());
}

/// Four rows of TinyLm text in `dir/text.jsonl` (`dir` is created if missing).
pub fn text_data(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let p = dir.join("text.jsonl");
    std::fs::write(
        &p,
        "{\"text\": \"red green blue\"}\n{\"text\": \"what colour is the square ? cyan\"}\n\
         {\"text\": \"yellow cyan magenta red\"}\n{\"text\": \"the square is blue\"}\n",
    )
    .expect("write data");
    p
}

/// Asserts that an error message is words, never a Debug dump of an error enum (of the
/// safetensors crate, serde or `std::io`).
pub fn assert_no_raw_error(message: &str) {
    for raw in [
        "InvalidHeader",
        "HeaderTooSmall",
        "HeaderTooLarge",
        "InvalidHeaderLength",
        "TensorInvalidInfo",
        "InvalidOffset",
        "MetadataIncompleteBuffer",
        "ValidationOverflow",
        "IoError",
        "JsonError",
        "Custom {",
        "Os {",
    ] {
        assert!(!message.contains(raw), "raw error name in: {message}");
    }
}
