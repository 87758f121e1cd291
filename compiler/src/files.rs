//! Reading and writing files safely, for every file vlmc reads or writes on a user's behalf.
//!
//! Reading: only regular files are read (after following symlinks). A FIFO would block the
//! reader forever, a directory or a device node is never what was meant; each is refused with
//! an error saying what the path is. The file is opened without blocking and checked again
//! after opening, so a path swapped for a FIFO in between cannot hang the reader either.
//!
//! Writing: [`write_atomic`] writes to a temporary name unique to the process (its id and a
//! counter) in the destination's folder, syncs it and renames it over the destination, so a
//! reader never sees half a file and an interrupted write leaves the old file. A symlink is
//! written through to its target (the link stays); `/dev/null` is written to as is; a
//! directory, FIFO, socket or any other device node is refused.
//!
//! [`same_file`] and [`refuse_overwriting`] tell when an output path is one of the inputs (the
//! same device and inode, whatever the spelling), so a command never replaces what it reads.

use std::fs::{File, FileType, Metadata};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A path that exists but is not a regular file: the `io::Error` payload of the refusals.
#[derive(Debug)]
pub struct NotRegular {
    /// What it is instead: "a directory", "a FIFO (named pipe)", ...
    pub what: &'static str,
}

impl std::fmt::Display for NotRegular {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "it is {}, not a regular file", self.what)
    }
}

impl std::error::Error for NotRegular {}

/// What a file type is, in words ("a regular file", "a directory", "a FIFO (named pipe)", ...).
pub fn describe_type(t: &FileType) -> &'static str {
    if t.is_file() {
        return "a regular file";
    }
    if t.is_dir() {
        return "a directory";
    }
    if t.is_symlink() {
        return "a symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_char_device() {
            return "a character device";
        }
    }
    "not a regular file"
}

fn not_regular(t: &FileType) -> io::Error {
    let kind = if t.is_dir() {
        io::ErrorKind::IsADirectory
    } else {
        io::ErrorKind::InvalidInput
    };
    io::Error::new(
        kind,
        NotRegular {
            what: describe_type(t),
        },
    )
}

/// Whether `e` is one of this module's refusals of a path that is not a regular file.
pub fn is_not_regular(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NotRegular>())
}

/// The metadata of `path` (symlinks followed) when it is a regular file; otherwise an error
/// saying what it is (or the system's error: not found, permission denied, ...).
pub fn check_regular(path: impl AsRef<Path>) -> io::Result<Metadata> {
    let path = path.as_ref();
    let m = std::fs::metadata(path)?;
    if m.is_file() {
        Ok(m)
    } else {
        Err(not_regular(&m.file_type()))
    }
}

/// Opens `path` for reading when it is a regular file (after following symlinks). Never
/// blocks: the path is checked before opening (a device node is not even opened), the open
/// itself does not wait for a FIFO writer, and the opened file is checked again.
pub fn open_regular(path: impl AsRef<Path>) -> io::Result<File> {
    let path = path.as_ref();
    check_regular(path)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK is ignored for regular files; it only keeps a FIFO from blocking the open.
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let f = options.open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(not_regular(&m.file_type()));
    }
    Ok(f)
}

/// The bytes of a regular file.
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// The text of a regular file (UTF-8).
pub fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    let mut f = open_regular(path)?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(s)
}

/// Whether `a` and `b` name the same existing file (same device and inode after following
/// symlinks; a path that does not exist is the same as nothing).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }
}

/// An error when the output `out` is one of `inputs` (each with what it is, e.g. "the
/// weights (--weights)"): writing it would destroy an input.
pub fn refuse_overwriting(out: &Path, inputs: &[(&str, &Path)]) -> Result<(), String> {
    for (role, input) in inputs {
        if same_file(out, input) {
            let spelled = if out == *input {
                String::new()
            } else {
                format!(" ({})", input.display())
            };
            return Err(format!(
                "refusing to write {}: it is {role}{spelled}, which this command reads; \
                 choose another output path",
                out.display()
            ));
        }
    }
    Ok(())
}

/// Where a write to a path lands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A regular file (existing or not), after following symlinks: written atomically.
    File(PathBuf),
    /// `/dev/null`: written to as is.
    Null(PathBuf),
}

/// Follows `path` while it is a symlink (also a dangling one: its target is where a new file
/// would go).
pub fn resolve_symlinks(path: &Path) -> io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p)?;
                p = match target.is_absolute() {
                    true => target,
                    false => p
                        .parent()
                        .map_or_else(|| target.clone(), |d| d.join(&target)),
                };
            }
            _ => return Ok(p),
        }
    }
    Err(io::Error::other("too many levels of symbolic links"))
}

/// Where writing `path` would go, or an error when it exists and is neither a regular file
/// nor `/dev/null` (a directory, FIFO, socket, device node).
pub fn destination(path: &Path) -> io::Result<Destination> {
    let target = resolve_symlinks(path)?;
    match std::fs::metadata(&target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Destination::File(target)),
        Err(e) => Err(e),
        Ok(m) if m.is_file() => Ok(Destination::File(target)),
        Ok(m) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::FileTypeExt;
                if m.file_type().is_char_device()
                    && std::fs::canonicalize(&target).is_ok_and(|c| c == Path::new("/dev/null"))
                {
                    return Ok(Destination::Null(target));
                }
            }
            Err(not_regular(&m.file_type()))
        }
    }
}

/// A temporary name beside `path`, unique to this process and call.
fn temp_name(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    path.with_file_name(format!(
        ".{}.tmp{}-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes `bytes` to `path`: to a temporary file beside it (folders created as needed), synced,
/// then renamed over it, so an interrupted write never leaves half a file. A symlink is written
/// through to its target; `/dev/null` is written to directly; a directory, FIFO, socket or
/// other device node is refused (see [`destination`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let target = match destination(path)? {
        Destination::Null(p) => {
            let mut f = std::fs::OpenOptions::new().write(true).open(p)?;
            return f.write_all(bytes);
        }
        Destination::File(p) => p,
    };
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temp_name(&target);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if let Ok(old) = std::fs::metadata(&target) {
            // Keep the permissions of the file being replaced.
            let _ = f.set_permissions(old.permissions());
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vlmc-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn directories_are_refused_with_what_they_are() {
        let d = tmp("dir");
        let e = open_regular(&d).expect_err("a directory");
        assert!(is_not_regular(&e));
        assert_eq!(e.to_string(), "it is a directory, not a regular file");
        let e = write_atomic(&d, b"x").expect_err("a directory");
        assert!(e.to_string().contains("directory"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn reads_and_writes_regular_files_and_through_symlinks() {
        let d = tmp("rw");
        let f = d.join("a.bin");
        write_atomic(&f, b"one").expect("write");
        assert_eq!(read(&f).expect("read"), b"one");
        #[cfg(unix)]
        {
            let link = d.join("link.bin");
            std::os::unix::fs::symlink("a.bin", &link).expect("symlink");
            write_atomic(&link, b"two").expect("write through");
            assert!(std::fs::symlink_metadata(&link)
                .expect("link")
                .file_type()
                .is_symlink());
            assert_eq!(read(&f).expect("read"), b"two");
            assert!(same_file(&f, &link));
            let e = refuse_overwriting(&link, &[("the weights", &f)]).expect_err("same");
            assert!(e.contains("the weights"), "{e}");
        }
        assert!(!same_file(&f, &d.join("missing")));
        let names: Vec<_> = std::fs::read_dir(&d).expect("dir").flatten().collect();
        assert!(names.len() <= 2, "no temporary file left behind");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[cfg(unix)]
    #[test]
    fn fifos_are_refused_without_blocking() {
        let d = tmp("fifo");
        let p = d.join("pipe");
        let c = std::ffi::CString::new(p.to_str().expect("utf-8")).expect("c string");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&p).expect_err("a FIFO");
        assert_eq!(
            e.to_string(),
            "it is a FIFO (named pipe), not a regular file"
        );
        let e = write_atomic(&p, b"x").expect_err("a FIFO");
        assert!(e.to_string().contains("FIFO"), "{e}");
        write_atomic(Path::new("/dev/null"), b"discarded").expect("/dev/null");
        let _ = std::fs::remove_dir_all(&d);
    }
}
