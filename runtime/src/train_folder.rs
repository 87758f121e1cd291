//! The output folder of a training run: a lock so that one run at a time writes into it, what
//! an earlier run left there, clearing that (`--overwrite`), and cutting `log.jsonl` back to
//! the checkpoint a run resumes from.
//!
//! The lock is an advisory lock (`File::try_lock`) on `DIR/.vlmc.lock`, which holds the
//! holder's pid and command line. The operating system drops it when the holder exits, even
//! by `kill -9`, so a stale lock file never blocks anyone; a clean exit also removes the file.
//! On a file system that has no locks the run goes on unlocked.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The name of the lock file inside a locked folder.
pub const LOCK_FILE: &str = ".vlmc.lock";

/// The folder of a run's TensorBoard event files, as [`run_files`] lists it.
pub const RUNS_DIR: &str = "runs/";

/// Whether `name` is a TensorBoard event file's name (what [`clear_run`] deletes in `runs/`).
fn is_event_file(name: &str) -> bool {
    name.contains(crate::tensorboard::INFIX) && !name.starts_with('.')
}

/// A held lock on an output folder; dropping it releases the lock (and removes the lock file,
/// and the folder when this lock created it and it is still empty).
#[derive(Debug)]
pub struct FolderLock {
    file: Option<File>,
    path: PathBuf,
    dir: PathBuf,
    created: bool,
}

/// Whether `file` is the file at `path` now (the lock file was not removed and created again
/// by a holder that released it while this process was opening it).
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &File, _: &Path) -> bool {
    true
}

/// Who holds a lock, read from the lock file (the holder writes it right after locking: wait a
/// little for it).
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    for _ in 0..25 {
        text.clear();
        if file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) {
                let pid = v.get("pid").and_then(|p| p.as_u64());
                let cmd = v.get("command").and_then(|c| c.as_str()).unwrap_or("");
                let since = v
                    .get("started")
                    .and_then(|s| s.as_u64())
                    .and_then(|s| {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .ok()?
                            .as_secs();
                        now.checked_sub(s)
                    })
                    .map_or(String::new(), |s| format!(", started {s} s ago"));
                if let Some(pid) = pid {
                    return format!("pid {pid} (`{cmd}`{since})");
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    format!("a process whose pid is not recorded ({text:?})")
}

impl FolderLock {
    /// Creates `dir` if needed and locks it, or fails at once (naming the holder's pid) when
    /// another process holds it.
    pub fn acquire(dir: &Path) -> Result<FolderLock, String> {
        let created = !dir.exists();
        let path = dir.join(LOCK_FILE);
        for _ in 0..50 {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if !dir.is_dir() {
                return Err(format!("{} is not a folder", dir.display()));
            }
            let mut file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
            {
                Ok(f) => f,
                // The folder was removed while we opened it: make it again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("cannot open the lock {}: {e}", path.display())),
            };
            match file.try_lock() {
                Ok(()) => {
                    if !same_file(&file, &path) {
                        // Locked a lock file that its last holder removed: try the new one.
                        continue;
                    }
                    let started = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let command: Vec<String> = std::env::args().collect();
                    let text = serde_json::json!({
                        "pid": std::process::id(),
                        "command": command.join(" "),
                        "started": started,
                    })
                    .to_string();
                    let wrote = file
                        .set_len(0)
                        .and_then(|_| file.seek(SeekFrom::Start(0)))
                        .and_then(|_| file.write_all(format!("{text}\n").as_bytes()));
                    if let Err(e) = wrote {
                        return Err(format!("cannot write the lock {}: {e}", path.display()));
                    }
                    return Ok(FolderLock {
                        file: Some(file),
                        path,
                        dir: dir.to_path_buf(),
                        created,
                    });
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(format!(
                        "{} is in use by another training run: {} holds its lock {}; wait for \
                         it to finish, or write to another folder",
                        dir.display(),
                        holder(&mut file),
                        path.display()
                    ));
                }
                // A file system without locks: run unlocked rather than not at all.
                Err(std::fs::TryLockError::Error(e))
                    if e.kind() == std::io::ErrorKind::Unsupported =>
                {
                    return Ok(FolderLock {
                        file: None,
                        path,
                        dir: dir.to_path_buf(),
                        created,
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(format!("cannot lock {}: {e}", path.display()));
                }
            }
        }
        Err(format!(
            "cannot lock {}: the lock file keeps being replaced",
            path.display()
        ))
    }

    /// The locked folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            // Removed while still locked: a process that opened it meanwhile sees that it
            // locked a removed file and opens the path again.
            if cfg!(unix) && same_file(&file, &self.path) {
                let _ = std::fs::remove_file(&self.path);
            }
            drop(file);
        }
        if self.created {
            // Only succeeds when nothing was written.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// The step of a checkpoint folder name `checkpoint-<step>`.
pub fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a training run writes into its folder, present in `dir`: `log.jsonl`,
/// `checkpoint-<N>/`, `model.safetensors`, `adapter/`, `runs/` (when it holds an event file;
/// sorted, folders with a `/`).
pub fn run_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        if name == "log.jsonl" || name == "model.safetensors" {
            out.push(name);
        } else if (checkpoint_step(&name).is_some() && path.is_dir())
            || (name == "adapter"
                && (path.join("adapter_model.safetensors").exists()
                    || path.join("adapter_config.json").exists()))
            || (name == "runs" && !crate::tensorboard::event_files(&path).is_empty())
        {
            out.push(format!("{name}/"));
        }
    }
    out.sort_by_key(|n| {
        (
            checkpoint_step(n.trim_end_matches('/')).unwrap_or(0),
            n.clone(),
        )
    });
    out
}

/// Whether `name` is a temporary file or folder that a training run writes and renames:
/// `.checkpoint-N.tmp<pid>`, `.log.jsonl.tmp<pid>`, `.model.safetensors.tmp<pid>`, in
/// `adapter/` the adapter's two files, and in `runs/` event files (cut back on resume).
fn is_temporary(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some((base, _)) = rest.split_once(".tmp") else {
        return false;
    };
    checkpoint_step(base).is_some()
        || is_event_file(base)
        || matches!(
            base,
            "log.jsonl"
                | "model.safetensors"
                | "adapter_model.safetensors"
                | "adapter_config.json"
                | "vlmc_base.json"
        )
}

/// Removes what writers that died (`kill -9`) left half-written in `dir`: temporary
/// checkpoints and files. Call it holding the folder's lock (no live writer then).
pub fn clear_temporary(dir: &Path) -> std::io::Result<()> {
    for d in [dir.to_path_buf(), dir.join("adapter"), dir.join("runs")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !is_temporary(&name) {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
    }
    Ok(())
}

/// Deletes what an earlier run wrote into `dir` (see [`run_files`]) and nothing else: other
/// files in the folder, and in `adapter/`, stay.
pub fn clear_run(dir: &Path) -> Result<(), String> {
    let e = |p: &Path, e: std::io::Error| format!("cannot delete {}: {e}", p.display());
    clear_temporary(dir).map_err(|x| e(dir, x))?;
    for name in run_files(dir) {
        let p = dir.join(name.trim_end_matches('/'));
        if name == "adapter/" {
            for f in [
                "adapter_model.safetensors",
                "adapter_config.json",
                crate::adapter::BASE_FILE,
            ] {
                let q = p.join(f);
                if q.exists() {
                    std::fs::remove_file(&q).map_err(|x| e(&q, x))?;
                }
            }
            let _ = std::fs::remove_dir(&p);
        } else if name == RUNS_DIR {
            // The event files only: anything else a user keeps there stays.
            for q in crate::tensorboard::event_files(&p) {
                std::fs::remove_file(&q).map_err(|x| e(&q, x))?;
            }
            let _ = std::fs::remove_dir(&p);
        } else if name.ends_with('/') {
            std::fs::remove_dir_all(&p).map_err(|x| e(&p, x))?;
        } else {
            std::fs::remove_file(&p).map_err(|x| e(&p, x))?;
        }
    }
    Ok(())
}

/// Keeps the newest `keep` checkpoints of `dir` (by step) and deletes the older ones (the
/// trainer's `save_total_limit`, as transformers' `Trainer`); returns the deleted folders.
/// Call it after a new checkpoint is renamed into place.
pub fn prune_checkpoints(dir: &Path, keep: u64) -> Result<Vec<PathBuf>, String> {
    let mut steps: Vec<u64> = run_files(dir)
        .iter()
        .filter_map(|n| checkpoint_step(n.strip_suffix('/')?))
        .collect();
    steps.sort_unstable();
    let old = steps.len().saturating_sub(keep as usize);
    let mut deleted = Vec::new();
    for s in &steps[..old] {
        let p = dir.join(format!("checkpoint-{s}"));
        std::fs::remove_dir_all(&p).map_err(|e| format!("cannot delete {}: {e}", p.display()))?;
        deleted.push(p);
    }
    Ok(deleted)
}

/// The step of a `log.jsonl` line, if it is a whole JSON line with a `step`.
fn line_step(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("step")?
        .as_u64()
}

/// Writes to `dst` (atomically: a temporary file renamed over it) the lines of the log `src`
/// up to and including `step`; lines after it (written by a run that stopped before its next
/// checkpoint) and a torn last line are dropped. Returns how many lines were dropped. A
/// missing `src` gives an empty log.
pub fn cut_log(src: &Path, dst: &Path, step: u64) -> Result<usize, String> {
    let text = match crate::files::read(src) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", src.display())),
    };
    let mut kept = String::new();
    let mut dropped = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match line_step(line) {
            Some(s) if s <= step => {
                kept.push_str(line);
                kept.push('\n');
            }
            _ => dropped += 1,
        }
    }
    crate::weights::write_atomic(dst, kept.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", dst.display()))?;
    Ok(dropped)
}

/// Whether two paths name the same file or folder (both exist and resolve to one place).
pub fn same_path(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("vlmc-train-folder-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_locked_folder_refuses_a_second_lock_naming_the_holder() {
        let d = tmp("lock");
        let a = FolderLock::acquire(&d).expect("first lock");
        assert!(d.join(LOCK_FILE).is_file());
        let e = FolderLock::acquire(&d).expect_err("second lock");
        assert!(
            e.contains(&format!("pid {}", std::process::id())),
            "the holder is named: {e}"
        );
        drop(a);
        // Released and the (created, now empty) folder removed.
        assert!(!d.exists());
        let b = FolderLock::acquire(&d).expect("lock again");
        std::fs::write(d.join("keep.txt"), "x").expect("write");
        drop(b);
        assert!(d.join("keep.txt").is_file());
        assert!(!d.join(LOCK_FILE).exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn clearing_a_run_keeps_other_files() {
        let d = tmp("clear");
        std::fs::create_dir_all(d.join("checkpoint-3")).expect("mkdir");
        std::fs::create_dir_all(d.join(".checkpoint-4.tmp123")).expect("mkdir");
        std::fs::create_dir_all(d.join("adapter")).expect("mkdir");
        std::fs::create_dir_all(d.join("checkpoint-x")).expect("mkdir");
        std::fs::create_dir_all(d.join("runs")).expect("mkdir");
        for f in [
            "log.jsonl",
            "model.safetensors",
            "notes.txt",
            "adapter/adapter_config.json",
            "adapter/readme.md",
            ".log.jsonl.tmp99",
            "runs/events.out.tfevents.1700000000.host.1.0",
            "runs/.events.out.tfevents.1700000000.host.1.0.tmp99-0",
            "runs/notes.txt",
        ] {
            std::fs::write(d.join(f), "x").expect("write");
        }
        assert_eq!(
            run_files(&d),
            [
                "adapter/",
                "log.jsonl",
                "model.safetensors",
                "runs/",
                "checkpoint-3/"
            ]
        );
        clear_run(&d).expect("clears");
        let mut left: Vec<String> = std::fs::read_dir(&d)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["adapter", "checkpoint-x", "notes.txt", "runs"]);
        assert!(d.join("adapter/readme.md").is_file());
        let runs: Vec<String> = std::fs::read_dir(d.join("runs"))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(
            runs,
            ["notes.txt"],
            "the event files and their temporaries only"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn pruning_keeps_the_newest_checkpoints_by_step() {
        let d = tmp("prune");
        for n in [2, 9, 10, 11] {
            std::fs::create_dir_all(d.join(format!("checkpoint-{n}"))).expect("mkdir");
        }
        std::fs::create_dir_all(d.join("checkpoint-x")).expect("mkdir");
        assert!(prune_checkpoints(&d, 5).expect("prunes").is_empty());
        let gone = prune_checkpoints(&d, 2).expect("prunes");
        assert_eq!(gone, [d.join("checkpoint-2"), d.join("checkpoint-9")]);
        let mut left: Vec<String> = std::fs::read_dir(&d)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["checkpoint-10", "checkpoint-11", "checkpoint-x"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_log_is_cut_back_to_a_step() {
        let d = tmp("cut");
        std::fs::create_dir_all(&d).expect("mkdir");
        let log = d.join("log.jsonl");
        std::fs::write(
            &log,
            "{\"step\":1,\"loss\":1}\n{\"step\":2,\"loss\":1}\n{\"step\":2,\"eval_loss\":1}\n\
             {\"step\":3,\"loss\":1}\n{\"step\":4,\"lo",
        )
        .expect("write");
        assert_eq!(cut_log(&log, &log, 2).expect("cut"), 2);
        let text = std::fs::read_to_string(&log).expect("read");
        assert_eq!(
            text,
            "{\"step\":1,\"loss\":1}\n{\"step\":2,\"loss\":1}\n{\"step\":2,\"eval_loss\":1}\n"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
