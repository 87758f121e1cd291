//! TensorBoard event files (`vlmc train --report-to tensorboard`): the record format written
//! by hand, no TensorFlow or protobuf library.
//!
//! An event file is a sequence of TFRecords: `u64` length (little-endian), the masked CRC-32C
//! of those 8 bytes, the data, the masked CRC-32C of the data. Each record is a serialised
//! `tensorflow.Event` (proto3): `wall_time` (field 1, double), `step` (2, int64), and one of
//! `file_version` (3, string; `"brain.Event:2"` in the first record of every file) or
//! `summary` (5) holding `value { tag (1), simple_value (2, float) }`. Fields are written in
//! field order and proto3's defaults (a zero `wall_time` or `step`, an empty tag) are left out,
//! as the Python protobuf library serialises them: [`encode`] is byte-identical to it
//! (`tests/fixtures/tensorboard/make.py` writes the reference the tests compare with).
//!
//! Scalars are written one event per value, as PyTorch's `SummaryWriter.add_scalar` and
//! Hugging Face's `TensorBoardCallback` do. Each record goes to the file with one `write`, so
//! a run that crashes or is killed leaves every record before it readable.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The `file_version` of the first event of a file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// Event files contain this in their name (TensorBoard's test for an event file).
pub const INFIX: &str = "tfevents";

/// What an event holds besides its time and step.
#[derive(Clone, Debug, PartialEq)]
pub enum What {
    /// The first event of a file.
    FileVersion(String),
    /// A summary of `simple_value` scalars: (tag, value).
    Scalars(Vec<(String, f32)>),
    /// Anything else (a graph, a session log, ...): read past, never written.
    Other,
}

/// One `tensorflow.Event`, as far as scalars go.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub what: What,
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise: records are small.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC: rotated right by 15 bits, plus 0xa282ead8.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record: length, masked CRC of the length, data, masked CRC of the data.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// The protobuf bytes of an event (fields in order, proto3 defaults left out, as Python's
/// protobuf writes them).
pub fn encode(e: &Event) -> Vec<u8> {
    let mut out = Vec::new();
    if e.wall_time != 0.0 {
        out.push(1 << 3 | 1);
        out.extend_from_slice(&e.wall_time.to_le_bytes());
    }
    if e.step != 0 {
        varint(&mut out, 2 << 3);
        varint(&mut out, e.step as u64);
    }
    match &e.what {
        What::FileVersion(v) => bytes_field(&mut out, 3, v.as_bytes()),
        What::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                if !tag.is_empty() {
                    bytes_field(&mut value, 1, tag.as_bytes());
                }
                // `simple_value` is in a oneof: written even when 0.
                value.push(2 << 3 | 5);
                value.extend_from_slice(&v.to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut out, 5, &summary);
        }
        What::Other => {}
    }
    out
}

/// A protobuf field: its number and its value.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

/// Reads the fields of a message.
fn fields(mut b: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    fn read_varint(b: &mut &[u8]) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&x, rest) = b.split_first().ok_or("a varint runs past the end")?;
            *b = rest;
            v |= u64::from(x & 0x7f) << (7 * i);
            if x & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("a field of {n} bytes runs past the end"));
        }
        let (x, rest) = b.split_at(n);
        *b = rest;
        Ok(x)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = read_varint(&mut b)?;
        let f = match key & 7 {
            0 => Field::Varint(read_varint(&mut b)?),
            1 => Field::Fixed64(take(&mut b, 8)?.try_into().expect("8 bytes")),
            2 => {
                let n = read_varint(&mut b)?;
                let n = usize::try_from(n).map_err(|_| "a length out of range")?;
                Field::Bytes(take(&mut b, n)?)
            }
            5 => Field::Fixed32(take(&mut b, 4)?.try_into().expect("4 bytes")),
            w => return Err(format!("wire type {w} is not read")),
        };
        out.push((key >> 3, f));
    }
    Ok(out)
}

/// Reads an event's protobuf bytes.
pub fn decode(b: &[u8]) -> Result<Event, String> {
    let mut e = Event {
        wall_time: 0.0,
        step: 0,
        what: What::Other,
    };
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Fixed64(x)) => e.wall_time = f64::from_le_bytes(x),
            (2, Field::Varint(x)) => e.step = x as i64,
            (3, Field::Bytes(x)) => {
                e.what = What::FileVersion(String::from_utf8_lossy(x).into_owned());
            }
            (5, Field::Bytes(x)) => {
                let mut values = Vec::new();
                for (n, f) in fields(x)? {
                    let (1, Field::Bytes(v)) = (n, f) else {
                        continue;
                    };
                    let mut tag = String::new();
                    let mut value = None;
                    for (n, f) in fields(v)? {
                        match (n, f) {
                            (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(t).into_owned(),
                            (2, Field::Fixed32(x)) => value = Some(f32::from_le_bytes(x)),
                            _ => {}
                        }
                    }
                    if let Some(v) = value {
                        values.push((tag, v));
                    }
                }
                e.what = What::Scalars(values);
            }
            (1 | 2 | 3 | 5, _) => return Err(format!("field {n} has the wrong wire type")),
            _ => {}
        }
    }
    Ok(e)
}

/// The records of an event file's bytes, in order, each with the offset just past it. Reading
/// stops at the first record that is cut short or whose checksum is wrong (what a killed
/// writer leaves at the end), saying why.
pub fn records(bytes: &[u8]) -> (Vec<(&[u8], usize)>, Option<String>) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < 12 {
            return (out, Some(format!("a record header cut short at byte {at}")));
        }
        let len_bytes = &rest[..8];
        let crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            return (out, Some(format!("a bad length checksum at byte {at}")));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let end = usize::try_from(len)
            .ok()
            .and_then(|n| n.checked_add(16))
            .filter(|&n| n <= rest.len());
        let Some(end) = end else {
            return (out, Some(format!("a record cut short at byte {at}")));
        };
        let data = &rest[12..end - 4];
        let crc = u32::from_le_bytes(rest[end - 4..end].try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            return (out, Some(format!("a bad data checksum at byte {at}")));
        }
        at += end;
        out.push((data, at));
    }
    (out, None)
}

/// The events of an event file, up to the first damaged or cut record.
pub fn read_events(path: &Path) -> Result<Vec<Event>, String> {
    let bytes = crate::files::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (recs, _) = records(&bytes);
    recs.iter()
        .map(|(d, _)| decode(d).map_err(|e| format!("{}: an event: {e}", path.display())))
        .collect()
}

/// The event files in `dir` (names containing `tfevents`), in name order: the order
/// TensorBoard reads them in.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.contains(INFIX) && !n.starts_with('.') && e.path().is_file()
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name, as it goes into an event file's name.
fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let h: String = h
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

/// The seconds in an event file's name `events.out.tfevents.<seconds>.<host>...`.
fn name_seconds(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let rest = name.split_once(".tfevents.")?.1;
    rest.split('.').next()?.parse().ok()
}

/// Appends events to a new event file, one record per `write`.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if needed), named as TensorFlow and PyTorch
    /// name theirs, `events.out.tfevents.<seconds>.<host>.<pid>.0`, and writes its
    /// `file_version` event. The name sorts after every event file already in `dir` (its
    /// seconds are raised past theirs if need be), since readers take a folder's files in
    /// name order.
    pub fn create(dir: &Path) -> io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let wall = now();
        let mut secs = wall as u64;
        let host = hostname();
        let pid = std::process::id();
        let existing = event_files(dir);
        let name = |s: u64| format!("events.out.{INFIX}.{s:010}.{host}.{pid}.0");
        if let Some(last) = existing.last() {
            let last_name = last.file_name().map(|n| n.to_string_lossy().to_string());
            if last_name.is_some_and(|l| name(secs) <= l) {
                secs = secs.max(name_seconds(last).map_or(secs, |s| s + 1));
            }
        }
        let path = dir.join(name(secs));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut w = EventWriter { file, path };
        w.write(&Event {
            wall_time: wall,
            step: 0,
            what: What::FileVersion(FILE_VERSION.into()),
        })?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event (one record, one `write`).
    pub fn write(&mut self, e: &Event) -> io::Result<()> {
        self.file.write_all(&frame(&encode(e)))?;
        self.file.flush()
    }

    /// Writes each scalar as its own event at `step`, stamped now.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> io::Result<()> {
        for (tag, v) in values {
            self.write(&Event {
                wall_time: now(),
                step: step as i64,
                what: What::Scalars(vec![(tag.to_string(), *v as f32)]),
            })?;
        }
        Ok(())
    }
}

/// Writes into `dst_dir` the event files of `src_dir` cut back to `step`: each keeps its
/// records up to the first one of a later step (and up to any damaged or cut record); written
/// under a temporary name, then renamed (over the file itself when the two folders are one).
/// Returns how many records were dropped. A resumed run calls it so that the steps it
/// computes again are not in the folder twice.
pub fn cut_events(src_dir: &Path, dst_dir: &Path, step: u64) -> Result<usize, String> {
    let mut dropped = 0;
    for src in event_files(src_dir) {
        let bytes = crate::files::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        let (recs, _) = records(&bytes);
        let mut keep = 0usize;
        let mut kept = 0usize;
        for (data, end) in &recs {
            match decode(data) {
                Ok(e) if e.step <= step as i64 => {
                    keep = *end;
                    kept += 1;
                }
                _ => break,
            }
        }
        dropped += recs.len() - kept;
        let dst = dst_dir.join(src.file_name().expect("a file name"));
        if keep == bytes.len() && crate::files::same_file(&src, &dst) {
            continue;
        }
        crate::files::write_atomic(&dst, &bytes[..keep])
            .map_err(|e| format!("cannot write {}: {e}", dst.display()))?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_the_check_string() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn events_round_trip() {
        for e in [
            Event {
                wall_time: 1.5e9,
                step: 0,
                what: What::FileVersion(FILE_VERSION.into()),
            },
            Event {
                wall_time: 1.25,
                step: 300,
                what: What::Scalars(vec![("train/loss".into(), 0.0), ("x".into(), -2.5)]),
            },
            Event {
                wall_time: 0.0,
                step: -1,
                what: What::Scalars(vec![]),
            },
        ] {
            let framed = frame(&encode(&e));
            let (recs, why) = records(&framed);
            assert!(why.is_none());
            assert_eq!(recs.len(), 1);
            assert_eq!(decode(recs[0].0).expect("decodes"), e);
        }
    }

    #[test]
    fn a_torn_record_ends_the_file() {
        let mut b = frame(&encode(&Event {
            wall_time: 1.0,
            step: 1,
            what: What::Scalars(vec![("a".into(), 1.0)]),
        }));
        let whole = b.len();
        b.extend_from_slice(&b.clone()[..whole - 3]);
        let (recs, why) = records(&b);
        assert_eq!(recs.len(), 1);
        assert!(why.expect("says why").contains("cut short"));
        b.truncate(whole);
        b.extend_from_slice(&b.clone());
        let last = b.len() - 1;
        b[last] ^= 1;
        let (recs, why) = records(&b);
        assert_eq!(recs.len(), 1);
        assert!(why.expect("says why").contains("checksum"));
    }
}
