//! The disk cache of compiled loop nests: one file per function, holding the machine code
//! Cranelift produced for it and its relocations (with targets by symbol name, so the code can
//! be linked into any later module).
//!
//! The key is the function's Cranelift IR as text (with its own name replaced by a fixed one, so
//! the same loop nest hits wherever it sits in a plan) after a prefix naming everything else that
//! decides the machine code: the vlmc and Cranelift versions, the target triple, every shared
//! and ISA-specific Cranelift flag (FMA, AVX, ... as detected on this CPU) and the table of
//! imported functions. The file is named by a 128-bit hash of the key and stores the whole key,
//! which a hit must match byte for byte; a checksum over the entry catches truncated or
//! corrupted files, which are recompiled (and rewritten), never run.
//!
//! Entry layout (little-endian): `VLMCCPU1`, the body length (u64), the body, a 128-bit
//! FNV-1a checksum of the body. Body: key length (u32) and key, code alignment (u64), code
//! length (u32) and code, relocation count (u32), then per relocation its offset (u32), kind
//! (u8, [`KINDS`]), addend (i64) and target: `0` + a symbol name (u16 length, bytes) for an
//! imported function, `1` + a name for a Cranelift library call, `2` + an offset (u32) into the
//! function itself.
//!
//! Files are written under a temporary name and renamed into place, so readers never see half
//! an entry and concurrent writers of the same key leave one whole file.

use super::CpuError;
use crate::hash::fnv128;
use cranelift_codegen::binemit::Reloc;
use cranelift_codegen::ir::{Function, LibCall, UserFuncName};
use cranelift_codegen::isa::TargetIsa;
use cranelift_module::{FuncId, FuncOrDataId, Linkage, Module, ModuleReloc, ModuleRelocTarget};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const MAGIC: &[u8; 8] = b"VLMCCPU1";

/// The relocation kinds an entry may hold (their index is stored); code with any other kind is
/// compiled every time.
const KINDS: [Reloc; 11] = [
    Reloc::Abs4,
    Reloc::Abs8,
    Reloc::X86PCRel4,
    Reloc::X86CallPCRel4,
    Reloc::X86CallPLTRel4,
    Reloc::X86GOTPCRel4,
    Reloc::Arm64Call,
    Reloc::Aarch64AdrGotPage21,
    Reloc::Aarch64Ld64GotLo12Nc,
    Reloc::Aarch64AdrPrelPgHi21,
    Reloc::Aarch64AddAbsLo12Nc,
];

/// How many bytes a relocation of a kind patches.
fn patch_len(k: Reloc) -> usize {
    match k {
        Reloc::Abs8 => 8,
        _ => 4,
    }
}

/// What the disk cache did during one compilation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Functions whose code came from the cache.
    pub hits: usize,
    /// Functions compiled by Cranelift while a cache was in use (and stored when possible).
    pub misses: usize,
    /// Entries found but not used: corrupted, truncated, for another key, or naming a symbol
    /// this module lacks (each is also a miss).
    pub rejected: usize,
}

/// Where a relocation points, independent of any module's numbering.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    /// An imported function, by symbol name.
    Import(String),
    /// A Cranelift library call, by name.
    LibCall(String),
    /// An offset into the function itself.
    Own(u32),
}

#[derive(Clone, Debug, PartialEq)]
struct Relocation {
    offset: u32,
    kind: u8,
    addend: i64,
    target: Target,
}

/// One compiled function as stored.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Entry {
    pub align: u64,
    pub code: Vec<u8>,
    relocs: Vec<Relocation>,
}

/// Warns once per process that the cache cannot be used.
pub(super) fn warn_once(message: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("warning: {message}; compiling CPU kernels without the disk cache");
    }
}

/// The cache of one compilation: a folder and the key prefix shared by its functions.
pub(super) struct DiskCache {
    dir: PathBuf,
    prefix: String,
    /// Set after a failed write: stop writing (reads go on).
    read_only: bool,
    pub stats: CacheStats,
}

impl DiskCache {
    /// A cache in `dir` for code compiled for `isa`, with the module's imported functions in
    /// declaration order.
    pub fn new(dir: &Path, isa: &dyn TargetIsa, imports: &[(&str, usize)]) -> DiskCache {
        let mut prefix = format!(
            "vlmc {}\ncranelift {}\ntarget {} {}\n{}",
            env!("CARGO_PKG_VERSION"),
            cranelift_codegen::VERSION,
            isa.name(),
            isa.triple(),
            isa.flags()
        );
        prefix.push_str("[isa]\n");
        for v in isa.isa_flags() {
            prefix.push_str(&format!("{v}\n"));
        }
        for (i, (name, arity)) in imports.iter().enumerate() {
            prefix.push_str(&format!("import u0:{i} {name}/{arity}\n"));
        }
        DiskCache {
            dir: dir.to_path_buf(),
            prefix,
            read_only: false,
            stats: CacheStats::default(),
        }
    }

    /// The key of a function: the prefix and the function's IR under a fixed name.
    pub fn key(&self, func: &mut Function) -> Vec<u8> {
        let name = std::mem::replace(&mut func.name, UserFuncName::testcase("kernel"));
        let text = format!("{}{}", self.prefix, func.display());
        func.name = name;
        text.into_bytes()
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        self.dir.join(format!("{:032x}.fn", fnv128(key)))
    }

    /// The entry stored under `key`, if there is a valid one (an invalid one is counted as
    /// rejected; the caller counts hits). Only regular files are read: anything else under an
    /// entry's name (a FIFO, which would block the read forever, a directory, a device node)
    /// is rejected like a corrupted entry.
    pub fn load(&mut self, key: &[u8]) -> Option<Entry> {
        let bytes = match crate::files::read(self.path(key)) {
            Ok(b) => b,
            Err(e) if crate::files::is_not_regular(&e) => {
                self.stats.rejected += 1;
                return None;
            }
            Err(_) => return None,
        };
        let e = decode(&bytes, key);
        if e.is_none() {
            self.stats.rejected += 1;
        }
        e
    }

    /// Stores an entry under `key`; a cache that cannot be written is only slower (one warning
    /// per process).
    pub fn store(&mut self, key: &[u8], entry: &Entry) {
        if self.read_only {
            return;
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = self.path(key);
        let tmp = path.with_extension(format!(
            "tmp{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let res = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&tmp, encode(key, entry)))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            self.read_only = true;
            warn_once(&format!(
                "cannot write the kernel cache in {}: {e}",
                self.dir.display()
            ));
        }
    }
}

fn encode(key: &[u8], e: &Entry) -> Vec<u8> {
    let mut body = Vec::with_capacity(key.len() + e.code.len() + 64);
    body.extend_from_slice(&(key.len() as u32).to_le_bytes());
    body.extend_from_slice(key);
    body.extend_from_slice(&e.align.to_le_bytes());
    body.extend_from_slice(&(e.code.len() as u32).to_le_bytes());
    body.extend_from_slice(&e.code);
    body.extend_from_slice(&(e.relocs.len() as u32).to_le_bytes());
    for r in &e.relocs {
        body.extend_from_slice(&r.offset.to_le_bytes());
        body.push(r.kind);
        body.extend_from_slice(&r.addend.to_le_bytes());
        match &r.target {
            Target::Import(n) | Target::LibCall(n) => {
                body.push(if matches!(r.target, Target::Import(_)) {
                    0
                } else {
                    1
                });
                body.extend_from_slice(&(n.len() as u16).to_le_bytes());
                body.extend_from_slice(n.as_bytes());
            }
            Target::Own(off) => {
                body.push(2);
                body.extend_from_slice(&off.to_le_bytes());
            }
        }
    }
    let mut out = Vec::with_capacity(body.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&fnv128(&body).to_le_bytes());
    out
}

/// A bounds-checked reader.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn name(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// The entry in `bytes` when they are whole, uncorrupted and stored under exactly `key`.
fn decode(bytes: &[u8], key: &[u8]) -> Option<Entry> {
    let mut c = Cursor(bytes);
    if c.take(8)? != MAGIC {
        return None;
    }
    let len = usize::try_from(c.u64()?).ok()?;
    let body = c.take(len)?;
    let sum = u128::from_le_bytes(c.take(16)?.try_into().ok()?);
    if !c.0.is_empty() || fnv128(body) != sum {
        return None;
    }
    let mut c = Cursor(body);
    let klen = c.u32()? as usize;
    if c.take(klen)? != key {
        return None;
    }
    let align = c.u64()?;
    if !align.is_power_of_two() {
        return None;
    }
    let clen = c.u32()? as usize;
    let code = c.take(clen)?.to_vec();
    let n = c.u32()? as usize;
    let mut relocs = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let offset = c.u32()?;
        let kind = c.u8()?;
        let addend = c.u64()? as i64;
        let target = match c.u8()? {
            0 => Target::Import(c.name()?),
            1 => Target::LibCall(c.name()?),
            2 => Target::Own(c.u32()?),
            _ => return None,
        };
        let k = *KINDS.get(kind as usize)?;
        if (offset as usize).checked_add(patch_len(k))? > code.len() {
            return None;
        }
        if matches!(target, Target::Own(o) if o as usize >= code.len()) {
            return None;
        }
        relocs.push(Relocation {
            offset,
            kind,
            addend,
            target,
        });
    }
    if !c.0.is_empty() {
        return None;
    }
    Some(Entry {
        align,
        code,
        relocs,
    })
}

impl Entry {
    /// The compiled code of `func` (defined as `id` in `module`) in portable form, or `None`
    /// when a relocation cannot be stored (an unknown kind, or a target that is not an
    /// imported function, a library call or the function itself).
    pub fn portable(
        module: &dyn Module,
        id: FuncId,
        align: u64,
        code: &[u8],
        relocs: &[ModuleReloc],
    ) -> Option<Entry> {
        let mut out = Vec::with_capacity(relocs.len());
        for r in relocs {
            let kind = KINDS.iter().position(|k| *k == r.kind)? as u8;
            let target = match &r.name {
                ModuleRelocTarget::User {
                    namespace: 0,
                    index,
                } => {
                    let decl = module
                        .declarations()
                        .get_function_decl(FuncId::from_u32(*index));
                    if decl.linkage != Linkage::Import {
                        return None;
                    }
                    Target::Import(decl.name.clone()?)
                }
                ModuleRelocTarget::LibCall(lc) if lc.to_string().parse() == Ok(*lc) => {
                    Target::LibCall(lc.to_string())
                }
                ModuleRelocTarget::FunctionOffset(f, off) if *f == id => Target::Own(*off),
                _ => return None,
            };
            out.push(Relocation {
                offset: r.offset,
                kind,
                addend: r.addend,
                target,
            });
        }
        Some(Entry {
            align,
            code: code.to_vec(),
            relocs: out,
        })
    }

    /// The relocations for defining this code as `id` in `module`, or an error naming a symbol
    /// the module does not import.
    pub fn module_relocs(
        &self,
        module: &dyn Module,
        id: FuncId,
    ) -> Result<Vec<ModuleReloc>, CpuError> {
        let mut out = Vec::with_capacity(self.relocs.len());
        for r in &self.relocs {
            let name = match &r.target {
                Target::Import(n) => match module.get_name(n) {
                    Some(FuncOrDataId::Func(f))
                        if module.declarations().get_function_decl(f).linkage
                            == Linkage::Import =>
                    {
                        ModuleRelocTarget::user(0, f.as_u32())
                    }
                    _ => {
                        return Err(CpuError::new(format!(
                            "a cached function calls `{n}`, which is not imported"
                        )))
                    }
                },
                Target::LibCall(n) => {
                    ModuleRelocTarget::LibCall(n.parse::<LibCall>().map_err(|()| {
                        CpuError::new(format!("a cached function calls unknown libcall `{n}`"))
                    })?)
                }
                Target::Own(off) => ModuleRelocTarget::FunctionOffset(id, *off),
            };
            out.push(ModuleReloc {
                offset: r.offset,
                kind: KINDS[r.kind as usize],
                name,
                addend: r.addend,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            align: 16,
            code: (0u8..64).collect(),
            relocs: vec![
                Relocation {
                    offset: 8,
                    kind: 1,
                    addend: -4,
                    target: Target::Import("vlmc_log".into()),
                },
                Relocation {
                    offset: 20,
                    kind: 2,
                    addend: 0,
                    target: Target::LibCall("FmaF32".into()),
                },
                Relocation {
                    offset: 30,
                    kind: 0,
                    addend: 3,
                    target: Target::Own(12),
                },
            ],
        }
    }

    #[test]
    fn entries_read_back_exactly() {
        let e = entry();
        let bytes = encode(b"key", &e);
        assert_eq!(decode(&bytes, b"key"), Some(e));
    }

    #[test]
    fn another_key_truncation_and_any_flipped_byte_are_rejected() {
        let bytes = encode(b"key", &entry());
        assert_eq!(decode(&bytes, b"kez"), None);
        for n in 0..bytes.len() {
            assert_eq!(decode(&bytes[..n], b"key"), None, "truncated to {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert_eq!(decode(&b, b"key"), None, "byte {i} flipped");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer, b"key"), None);
    }

    #[test]
    fn relocations_outside_the_code_are_rejected() {
        let mut e = entry();
        e.relocs[0].offset = 60;
        assert_eq!(decode(&encode(b"k", &e), b"k"), None);
        let mut e = entry();
        e.relocs[2].target = Target::Own(64);
        assert_eq!(decode(&encode(b"k", &e), b"k"), None);
        let mut e = entry();
        e.relocs[1].kind = KINDS.len() as u8;
        assert_eq!(decode(&encode(b"k", &e), b"k"), None);
    }

    fn isa(opt_level: &str, fma: bool) -> std::sync::Arc<dyn TargetIsa> {
        use cranelift_codegen::settings::{self, Configurable};
        let mut flags = settings::builder();
        flags.set("opt_level", opt_level).expect("opt_level");
        let mut b = cranelift_native::builder().expect("host ISA");
        if !fma {
            #[cfg(target_arch = "x86_64")]
            b.set("has_fma", "false").expect("has_fma");
        }
        b.finish(settings::Flags::new(flags)).expect("ISA")
    }

    #[test]
    fn keys_name_the_isa_flags_and_ignore_the_function_name() {
        use cranelift_codegen::ir::{AbiParam, Signature, UserFuncName};
        let mut sig = Signature::new(cranelift_codegen::isa::CallConv::SystemV);
        sig.params
            .push(AbiParam::new(cranelift_codegen::ir::types::I64));
        let mut f = Function::with_name_signature(UserFuncName::user(0, 7), sig.clone());
        let mut g = Function::with_name_signature(UserFuncName::user(0, 9), sig);
        let imports = [("vlmc_log", 1)];
        let dir = Path::new("unused");
        let speed = DiskCache::new(dir, &*isa("speed", true), &imports);
        let key = speed.key(&mut f);
        assert_eq!(f.name, UserFuncName::user(0, 7), "the name is put back");
        assert_eq!(
            key,
            speed.key(&mut g),
            "the same function under another name"
        );
        let text = String::from_utf8(key.clone()).expect("text");
        assert!(text.contains(&format!("vlmc {}", env!("CARGO_PKG_VERSION"))));
        assert!(text.contains("opt_level = \"speed\""), "{text}");
        assert!(text.contains("import u0:0 vlmc_log/1"));
        let none = DiskCache::new(dir, &*isa("none", true), &imports);
        assert_ne!(key, none.key(&mut f), "another opt_level");
        let other_imports = DiskCache::new(dir, &*isa("speed", true), &[("vlmc_sin", 1)]);
        assert_ne!(key, other_imports.key(&mut f), "another import table");
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("fma") {
            let no_fma = DiskCache::new(dir, &*isa("speed", false), &imports);
            let k = no_fma.key(&mut f);
            assert_ne!(key, k, "FMA off");
            assert!(String::from_utf8(k).expect("text").contains("has_fma=0"));
            assert!(text.contains("has_fma=1"));
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_or_a_folder_under_an_entry_name_is_rejected_without_blocking() {
        let dir = std::env::temp_dir().join(format!("vlmc-cache-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut cache = DiskCache::new(&dir, &*isa("speed", true), &[]);
        let key = b"some key".to_vec();
        let path = cache.path(&key);
        let c = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("c string");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // Reading the FIFO would block forever: the entry is rejected instead.
        assert_eq!(cache.load(&key), None);
        assert_eq!(cache.stats.rejected, 1);
        // Storing replaces it with a regular file that reads back.
        cache.store(&key, &entry());
        assert!(std::fs::metadata(&path).expect("entry").is_file());
        assert_eq!(cache.load(&key), Some(entry()));
        let other = b"other key".to_vec();
        std::fs::create_dir_all(cache.path(&other)).expect("a folder as an entry");
        assert_eq!(cache.load(&other), None);
        assert_eq!(cache.stats.rejected, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_hash_is_stable() {
        // The published FNV-1a test vectors: file names must not change between builds.
        assert_eq!(fnv128(b""), 0x6c62272e07bb014262b821756295c58d);
        assert_eq!(fnv128(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
    }
}
