//! An fsx-style exerciser: random writes, reads, mmap reads and writes, truncates,
//! fallocate modes, syncs and reopens (buffered and O_DIRECT) on ONE file, every read
//! checked against an in-memory model of what the file must hold. Seeded and
//! deterministic, so a failure replays with the same seed and op count.
//!
//! It is a library module so the same exerciser runs on a local fs (which validates the
//! model itself) and on the Spool FUSE mount.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use spool_ffi::posix::{self, NotePart};

/// What to run.
#[derive(Clone, Debug)]
pub struct FsxConfig {
    pub seed: u64,
    pub ops: usize,
    /// No op makes the file larger than this (writes, truncates, fallocate ranges).
    pub file_size_max: u64,
    /// mmap reads and writes (MAP_SHARED).
    pub mmap: bool,
    /// Reopens may use O_DIRECT; while the fd is direct, reads and writes are aligned.
    pub direct_io: bool,
    /// FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE (the modes that destroy data).
    pub punch: bool,
}

impl Default for FsxConfig {
    fn default() -> Self {
        FsxConfig {
            seed: 1,
            ops: 1000,
            file_size_max: 16 << 20,
            mmap: true,
            direct_io: true,
            punch: true,
        }
    }
}

/// What a run did: ops per kind, and the modes the fs refused.
#[derive(Clone, Debug, Default)]
pub struct FsxReport {
    pub seed: u64,
    pub ops: usize,
    pub file: PathBuf,
    /// Completed ops per kind (see `KINDS`).
    pub counts: BTreeMap<&'static str, u64>,
    /// Refusals as unsupported, per kind: EOPNOTSUPP for a fallocate mode, EINVAL for
    /// an O_DIRECT open ("reopen_direct"), ENODEV for mmap ("mmap", or "mmap_direct_fd"
    /// when only O_DIRECT fds are refused). A kind is disabled at its first refusal.
    pub unsupported: BTreeMap<&'static str, u64>,
    /// When and why each kind was disabled, for the test log.
    pub disabled: Vec<String>,
    pub final_size: u64,
}

/// Every op kind a report can count, in a stable order.
pub const KINDS: &[&str] = &[
    "write",
    "direct_write",
    "read",
    "direct_read",
    "mapread",
    "mapwrite",
    "truncate_up",
    "truncate_down",
    "falloc",
    "falloc_keep_size",
    "punch_hole",
    "zero_range",
    "zero_range_keep_size",
    "fsync",
    "fdatasync",
    "reopen",
    "reopen_direct",
];

impl FsxReport {
    pub fn count(&self, kind: &str) -> u64 {
        self.counts.get(kind).copied().unwrap_or(0)
    }
}

impl fmt::Display for FsxReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fsx seed {:#x}: {} ops on {}, final size {:#x}:",
            self.seed,
            self.ops,
            self.file.display(),
            self.final_size
        )?;
        for k in KINDS {
            write!(f, " {k}={}", self.count(k))?;
        }
        if !self.disabled.is_empty() {
            write!(f, "; unsupported: {}", self.disabled.join("; "))?;
        }
        Ok(())
    }
}

/// O_DIRECT alignment for offsets, lengths and buffers. 4096 covers every logical block
/// size in use (512 and 4096) and the page size.
const ALIGN: u64 = 4096;
/// Ops kept for the failure message.
const RING: usize = 50;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Runs `cfg.ops` random ops on a fresh file in `dir` (named after the seed, truncated
/// first), then reads the whole file back through a fresh fd.
pub fn run_fsx(dir: &Path, cfg: &FsxConfig) -> Result<FsxReport, String> {
    if cfg.file_size_max == 0 {
        return Err("fsx: file_size_max must be > 0".into());
    }
    let path = dir.join(format!("fsx.{:016x}.dat", cfg.seed));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("fsx seed {:#x}: create {}: {e}", cfg.seed, path.display()))?;
    let mut fsx = Fsx {
        cfg: cfg.clone(),
        path: path.clone(),
        file: Some(file),
        direct: false,
        model: Vec::new(),
        rng: SplitMix64(cfg.seed),
        ring: VecDeque::with_capacity(RING + 1),
        op: 0,
        disabled: BTreeSet::new(),
        page: page_size(),
        trace: std::env::var_os("SPOOL_FSX_TRACE").is_some(),
        report: FsxReport {
            seed: cfg.seed,
            ops: cfg.ops,
            file: path,
            ..FsxReport::default()
        },
    };
    if cfg.file_size_max < ALIGN {
        // No aligned range fits, so O_DIRECT could only ever be opened and not used.
        fsx.disabled.insert("reopen_direct");
    }
    install_sigbus_note();
    SIGBUS_SEED.store(cfg.seed, Ordering::Relaxed);
    for i in 0..cfg.ops {
        fsx.op = i;
        SIGBUS_OP.store(i as u64, Ordering::Relaxed);
        let kind = fsx.pick();
        fsx.step(kind)?;
        fsx.check_size()?;
    }
    fsx.op = cfg.ops;
    fsx.verify_whole_file()?;
    fsx.report.final_size = fsx.model.len() as u64;
    Ok(fsx.report)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
    MapRead,
    MapWrite,
    Truncate,
    Falloc,
    FallocKeepSize,
    PunchHole,
    ZeroRange,
    ZeroRangeKeepSize,
    Fsync,
    Fdatasync,
    Reopen,
}

/// Relative frequencies, roughly fsx's mix with reads and writes dominant.
const WEIGHTS: &[(Kind, u64)] = &[
    (Kind::Write, 20),
    (Kind::Read, 16),
    (Kind::MapRead, 7),
    (Kind::MapWrite, 5),
    (Kind::Truncate, 6),
    (Kind::Falloc, 3),
    (Kind::FallocKeepSize, 3),
    (Kind::PunchHole, 4),
    (Kind::ZeroRange, 3),
    (Kind::ZeroRangeKeepSize, 2),
    (Kind::Fsync, 2),
    (Kind::Fdatasync, 2),
    (Kind::Reopen, 3),
];

struct OpRecord {
    index: usize,
    desc: String,
    /// Bytes whose content the op changed, for "which recent ops touched this offset".
    touched: Option<(u64, u64)>,
}

struct Fsx {
    cfg: FsxConfig,
    path: PathBuf,
    /// Always Some except for the instant of a reopen (the old fd is closed first, as a
    /// real close-then-open would).
    file: Option<File>,
    direct: bool,
    model: Vec<u8>,
    rng: SplitMix64,
    ring: VecDeque<OpRecord>,
    op: usize,
    /// Kinds refused by the fs (by report name, plus "mmap" and "mmap_direct_fd").
    disabled: BTreeSet<&'static str>,
    page: u64,
    /// SPOOL_FSX_TRACE set: print each op as it starts, for failures that kill the
    /// process (SIGBUS from an mmap access) before a message can be built.
    trace: bool,
    report: FsxReport,
}

impl Fsx {
    fn file(&self) -> Result<&File, String> {
        self.file
            .as_ref()
            .ok_or_else(|| self.fail("no open file (a failed reopen)".into()))
    }

    fn size(&self) -> u64 {
        self.model.len() as u64
    }

    fn enabled(&self, kind: Kind) -> bool {
        let c = &self.cfg;
        match kind {
            Kind::MapRead | Kind::MapWrite => {
                // Mapping an empty file is EINVAL by definition: nothing to check.
                let refused_here = self.direct && self.disabled.contains("mmap_direct_fd");
                c.mmap && !self.disabled.contains("mmap") && !refused_here && !self.model.is_empty()
            }
            Kind::Falloc => !self.disabled.contains("falloc"),
            Kind::FallocKeepSize => !self.disabled.contains("falloc_keep_size"),
            Kind::PunchHole => c.punch && !self.disabled.contains("punch_hole"),
            Kind::ZeroRange => c.punch && !self.disabled.contains("zero_range"),
            Kind::ZeroRangeKeepSize => c.punch && !self.disabled.contains("zero_range_keep_size"),
            _ => true,
        }
    }

    fn pick(&mut self) -> Kind {
        let total: u64 = WEIGHTS
            .iter()
            .filter(|(k, _)| self.enabled(*k))
            .map(|(_, w)| w)
            .sum();
        let mut r = self.rng.below(total);
        for &(k, w) in WEIGHTS {
            if !self.enabled(k) {
                continue;
            }
            if r < w {
                return k;
            }
            r -= w;
        }
        Kind::Read
    }

    fn step(&mut self, kind: Kind) -> Result<(), String> {
        match kind {
            Kind::Write if self.direct => self.op_direct_write(),
            Kind::Write => self.op_write(),
            Kind::Read if self.direct => self.op_direct_read(),
            Kind::Read => self.op_read(),
            Kind::MapRead => self.op_mapread(),
            Kind::MapWrite => self.op_mapwrite(),
            Kind::Truncate => self.op_truncate(),
            Kind::Falloc => self.op_fallocate("falloc", 0),
            Kind::FallocKeepSize => {
                self.op_fallocate("falloc_keep_size", libc::FALLOC_FL_KEEP_SIZE)
            }
            Kind::PunchHole => self.op_fallocate(
                "punch_hole",
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            Kind::ZeroRange => self.op_fallocate("zero_range", libc::FALLOC_FL_ZERO_RANGE),
            Kind::ZeroRangeKeepSize => self.op_fallocate(
                "zero_range_keep_size",
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            Kind::Fsync => self.op_sync(false),
            Kind::Fdatasync => self.op_sync(true),
            Kind::Reopen => self.op_reopen(),
        }
    }

    fn count(&mut self, kind: &'static str) {
        *self.report.counts.entry(kind).or_insert(0) += 1;
    }

    /// Logs the op before it runs, so a failing op is the last line of the ring.
    fn record(&mut self, desc: String, touched: Option<(u64, u64)>) {
        if self.trace {
            eprintln!("fsx {:#x} #{:<6} {desc}", self.cfg.seed, self.op);
        }
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back(OpRecord {
            index: self.op,
            desc,
            touched,
        });
    }

    /// A failure message with everything needed to replay and read it.
    fn fail(&self, what: String) -> String {
        let mut s = format!(
            "fsx seed {seed:#x} on {path}: op #{op} of {ops}{direct}: {what}\n\
             replay: SPOOL_FSX_SEED={seed:#x} SPOOL_FSX_OPS={ops} (file_size_max {max:#x}, \
             mmap {mmap}, direct_io {dio}, punch {punch})\n\
             model size {size:#x}\nlast {n} ops:\n",
            seed = self.cfg.seed,
            path = self.path.display(),
            op = self.op,
            ops = self.cfg.ops,
            direct = if self.direct { " (fd is O_DIRECT)" } else { "" },
            max = self.cfg.file_size_max,
            mmap = self.cfg.mmap,
            dio = self.cfg.direct_io,
            punch = self.cfg.punch,
            size = self.size(),
            n = self.ring.len(),
        );
        for r in &self.ring {
            s.push_str(&format!("  #{:<6} {}\n", r.index, r.desc));
        }
        s
    }

    /// Compares what the fs returned for `[off, off + expected.len())` with the model.
    fn compare(&self, what: &str, off: u64, expected: &[u8], got: &[u8]) -> Result<(), String> {
        if expected == got {
            return Ok(());
        }
        let common = expected.len().min(got.len());
        let first = expected[..common]
            .iter()
            .zip(&got[..common])
            .position(|(a, b)| a != b)
            .unwrap_or(common);
        let at = off + first as u64;
        let mut s = format!(
            "{what}: data mismatch at file offset {at:#x} (byte {first} of the read at \
             {off:#x}; expected {} bytes, got {})\n",
            expected.len(),
            got.len()
        );
        s.push_str(&hexdump(off, expected, got, first));
        let touching: Vec<String> = self
            .ring
            .iter()
            .filter(|r| matches!(r.touched, Some((lo, hi)) if lo <= at && at < hi))
            .map(|r| format!("#{}", r.index))
            .collect();
        s.push_str(&format!(
            "recent ops that changed offset {at:#x}: {}",
            if touching.is_empty() {
                "none in the ring".to_string()
            } else {
                touching.join(", ")
            }
        ));
        Err(self.fail(s))
    }

    fn check_size(&self) -> Result<(), String> {
        let st = self
            .file()?
            .metadata()
            .map_err(|e| self.fail(format!("fstat: {e}")))?;
        if st.len() != self.size() {
            return Err(self.fail(format!(
                "fstat size {:#x}, model size {:#x}",
                st.len(),
                self.size()
            )));
        }
        Ok(())
    }

    /// A length from 1 byte to 1 MiB, mostly small and unaligned.
    fn pick_len(&mut self) -> u64 {
        let r = self.rng.below(20);
        let len = match r {
            0..=10 => 1 + self.rng.below(4 * KIB),
            11..=16 => 1 + self.rng.below(64 * KIB),
            17..=18 => 1 + self.rng.below(MIB),
            // Page multiples too: a different path in most page caches.
            _ => ALIGN * (1 + self.rng.below(64)),
        };
        len.clamp(1, self.cfg.file_size_max)
    }

    /// A range for an op that may extend the file: anywhere up to the size limit (holes),
    /// inside the data, straddling a 64 KiB / 1 MiB boundary (the chunk sizes the mount
    /// tests use), or just around EOF.
    fn pick_range(&mut self) -> (u64, u64) {
        let max = self.cfg.file_size_max;
        let len = self.pick_len();
        let max_off = max - len;
        let size = self.size();
        let off = match self.rng.below(10) {
            0..=2 => self.rng.below(max_off + 1),
            3..=5 => self.rng.below(size.min(max_off) + 1),
            6..=7 => {
                let unit = if self.rng.chance(1, 2) { MIB } else { 64 * KIB };
                let b = unit * self.rng.below(max / unit + 1);
                // Just before the boundary, so the range crosses it.
                (b + self.rng.below(17)).saturating_sub(8 + self.rng.below(len.min(4 * KIB)))
            }
            _ => size.saturating_sub(4 * KIB) + self.rng.below(68 * KIB),
        };
        (off.min(max_off), len)
    }

    fn op_write(&mut self) -> Result<(), String> {
        let (off, len) = self.pick_range();
        let mut data = vec![0u8; len as usize];
        self.rng.fill(&mut data);
        self.do_write("write", off, &data, &data)
    }

    /// O_DIRECT write: offset, length and buffer aligned to ALIGN.
    fn op_direct_write(&mut self) -> Result<(), String> {
        let (off, len) = self.pick_direct_range();
        let mut buf = AlignedBuf::new(len as usize);
        self.rng.fill(buf.as_mut_slice());
        let data = buf.as_slice().to_vec();
        self.do_write("direct_write", off, buf.as_slice(), &data)
    }

    /// `buf` is what goes to pwrite (maybe an aligned buffer), `data` the same bytes for
    /// the model (kept apart so the borrow of `buf` does not outlive the aligned alloc).
    fn do_write(
        &mut self,
        kind: &'static str,
        off: u64,
        buf: &[u8],
        data: &[u8],
    ) -> Result<(), String> {
        let len = data.len() as u64;
        let end = off + len;
        let new_size = self.size().max(end);
        self.record(
            format!(
                "{kind:<20} {off:#010x} .. {end:#010x} ({len:#x} bytes) size {:#x} -> {new_size:#x}",
                self.size()
            ),
            Some((off, end)),
        );
        self.file()?
            .write_all_at(buf, off)
            .map_err(|e| self.fail(format!("pwrite {len:#x} bytes at {off:#x}: {e}")))?;
        if end > self.size() {
            self.model.resize(end as usize, 0);
        }
        self.model[off as usize..end as usize].copy_from_slice(data);
        self.count(kind);
        Ok(())
    }

    /// An aligned range for O_DIRECT: 4 KiB to 1 MiB, at or around the data and EOF.
    fn pick_direct_range(&mut self) -> (u64, u64) {
        let blocks_max = self.cfg.file_size_max / ALIGN;
        let nblocks = match self.rng.below(4) {
            0..=1 => 1 + self.rng.below(4),
            2 => 1 + self.rng.below(32),
            _ => 1 + self.rng.below(256),
        }
        .min(blocks_max);
        let size_blocks = self.size().div_ceil(ALIGN);
        let last = blocks_max - nblocks;
        let b = match self.rng.below(4) {
            0 => self.rng.below(last + 1),
            1..=2 => self.rng.below(size_blocks + 1),
            _ => size_blocks.saturating_sub(2) + self.rng.below(4),
        };
        (b.min(last) * ALIGN, nblocks * ALIGN)
    }

    fn op_read(&mut self) -> Result<(), String> {
        let len = self.pick_len();
        let size = self.size();
        let off = match self.rng.below(20) {
            // Past EOF: must read 0 bytes.
            0 => size + self.rng.below(8 * KIB),
            // Straddling EOF: must come back short.
            1..=2 => size.saturating_sub(self.rng.below(len + 1)),
            _ => self.rng.below(size.max(1)),
        };
        self.record(
            format!(
                "{:<20} {off:#010x} .. {:#010x} ({len:#x} bytes)",
                "read",
                off + len
            ),
            None,
        );
        let mut got = vec![0u8; len as usize];
        let n = read_full(self.file()?, &mut got, off, false)
            .map_err(|e| self.fail(format!("pread {len:#x} bytes at {off:#x}: {e}")))?;
        got.truncate(n);
        let expected = self.expected(off, len);
        self.compare("pread", off, expected, &got)?;
        self.count("read");
        Ok(())
    }

    fn op_direct_read(&mut self) -> Result<(), String> {
        let (off, len) = self.pick_direct_range();
        self.record(
            format!(
                "{:<20} {off:#010x} .. {:#010x} ({len:#x} bytes)",
                "direct_read",
                off + len
            ),
            None,
        );
        let mut buf = AlignedBuf::new(len as usize);
        let n = read_full(self.file()?, buf.as_mut_slice(), off, true)
            .map_err(|e| self.fail(format!("O_DIRECT pread {len:#x} bytes at {off:#x}: {e}")))?;
        let expected = self.expected(off, len);
        self.compare("O_DIRECT pread", off, expected, &buf.as_slice()[..n])?;
        self.count("direct_read");
        Ok(())
    }

    /// The model's bytes for a read of `len` at `off`: cut at EOF.
    fn expected(&self, off: u64, len: u64) -> &[u8] {
        let size = self.size();
        if off >= size {
            return &[];
        }
        &self.model[off as usize..(off + len).min(size) as usize]
    }

    /// A range inside the file for mmap ops: the whole file a quarter of the time.
    fn pick_map_range(&mut self, max_len: u64) -> (u64, u64) {
        let size = self.size();
        if self.rng.chance(1, 4) && size <= max_len {
            return (0, size);
        }
        let off = match self.rng.below(4) {
            // Ending at EOF: exercises the partial last page.
            0 => size - 1 - self.rng.below(size.min(8 * KIB)),
            _ => self.rng.below(size),
        };
        let len = 1 + self.rng.below((size - off).min(max_len));
        (off, len)
    }

    /// Maps `[off, off + len)` (from the page that holds `off`), or reports the fs
    /// refusing mmap as Ok(None). ENODEV is what FUSE returns for MAP_SHARED on a file
    /// the daemon opened with FOPEN_DIRECT_IO (unless it negotiated
    /// FUSE_DIRECT_IO_ALLOW_MMAP); a daemon may do that only for O_DIRECT opens, so a
    /// refusal on an O_DIRECT fd disables mmap only while the fd is O_DIRECT.
    fn map(&mut self, off: u64, len: u64, write: bool) -> Result<Option<Mapping>, String> {
        let pg_off = off & !(self.page - 1);
        let map_len = (off + len - pg_off) as usize;
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        match Mapping::new(self.file()?, pg_off, map_len, write, self.page) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                if self.direct {
                    self.unsupported("mmap_direct_fd", "ENODEV from mmap of an O_DIRECT fd");
                } else {
                    self.unsupported("mmap", "ENODEV from mmap");
                }
                Ok(None)
            }
            Err(e) => Err(self.fail(format!(
                "mmap {map_len:#x} bytes at {pg_off:#x} (prot {prot}): {e}"
            ))),
        }
    }

    fn op_mapread(&mut self) -> Result<(), String> {
        let (off, len) = self.pick_map_range(u64::MAX);
        let size = self.size();
        self.record(
            format!(
                "{:<20} {off:#010x} .. {:#010x} ({len:#x} bytes)",
                "mapread",
                off + len
            ),
            None,
        );
        let Some(map) = self.map(off, len, false)? else {
            return Ok(());
        };
        let pg_off = map.file_off;
        let got = map.slice((off - pg_off) as usize, len as usize);
        self.compare("mmap read", off, self.expected(off, len), got)?;
        // POSIX: the rest of the page holding EOF reads as zeros (fsx's check_eofpage).
        // A stale tail here means a truncate-down or a short read left old bytes in the
        // page cache.
        if off + len == size && size % self.page != 0 {
            let tail_len = (self.page - size % self.page) as usize;
            let tail = map.slice((size - pg_off) as usize, tail_len);
            if let Some(i) = tail.iter().position(|&b| b != 0) {
                return Err(self.fail(format!(
                    "mmap read: byte {:#x} past EOF {size:#x} (in the EOF page) is {:#04x}, \
                     not zero",
                    size + i as u64,
                    tail[i]
                )));
            }
        }
        drop(map);
        self.count("mapread");
        Ok(())
    }

    fn op_mapwrite(&mut self) -> Result<(), String> {
        // Inside the file only: stores past EOF in the EOF page are not file data.
        let (off, len) = self.pick_map_range(MIB);
        let end = off + len;
        self.record(
            format!(
                "{:<20} {off:#010x} .. {end:#010x} ({len:#x} bytes)",
                "mapwrite"
            ),
            Some((off, end)),
        );
        let mut data = vec![0u8; len as usize];
        self.rng.fill(&mut data);
        let Some(mut map) = self.map(off, len, true)? else {
            return Ok(());
        };
        let rel = (off - map.file_off) as usize;
        map.slice_mut(rel, len as usize).copy_from_slice(&data);
        // MS_SYNC like fsx: the data must reach the fs now, so a following O_DIRECT read
        // or truncate sees it whatever the fs's page cache mode.
        map.msync()
            .map_err(|e| self.fail(format!("msync {len:#x} bytes at {off:#x}: {e}")))?;
        drop(map);
        self.model[off as usize..end as usize].copy_from_slice(&data);
        self.count("mapwrite");
        Ok(())
    }

    fn op_truncate(&mut self) -> Result<(), String> {
        let size = self.size();
        let max = self.cfg.file_size_max;
        let new = match self.rng.below(8) {
            0..=3 if size > 0 => self.rng.below(size),
            0..=5 => size + self.rng.below((max - size).min(4 * MIB) + 1),
            6 => self.rng.below(max + 1),
            // A chunk boundary exactly, or one byte either side.
            _ => (MIB * self.rng.below(max / MIB + 1) + self.rng.below(3))
                .saturating_sub(1)
                .min(max),
        };
        let kind = if new < size {
            "truncate_down"
        } else {
            "truncate_up"
        };
        let touched = if new < size {
            Some((new, size))
        } else {
            Some((size, new))
        };
        self.record(format!("{kind:<20} {size:#010x} -> {new:#010x}"), touched);
        self.file()?
            .set_len(new)
            .map_err(|e| self.fail(format!("ftruncate to {new:#x}: {e}")))?;
        self.model.resize(new as usize, 0);
        self.count(kind);
        Ok(())
    }

    /// One fallocate mode. Model: mode 0 and ZERO_RANGE without KEEP_SIZE extend the
    /// size to the end of the range; PUNCH_HOLE and ZERO_RANGE zero the bytes below EOF;
    /// KEEP_SIZE never changes the size (blocks past EOF are allocated but invisible,
    /// and must read as zeros if a later truncate or write exposes them).
    fn op_fallocate(&mut self, kind: &'static str, mode: i32) -> Result<(), String> {
        let (off, len) = self.pick_range();
        let end = off + len;
        let size = self.size();
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zeroes = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let new_size = if keep { size } else { size.max(end) };
        let touched = if zeroes {
            Some((off, end.min(new_size)))
        } else if new_size > size {
            Some((size, new_size))
        } else {
            None
        };
        self.record(
            format!(
                "{kind:<20} {off:#010x} .. {end:#010x} ({len:#x} bytes) size {size:#x} -> \
                 {new_size:#x}"
            ),
            touched,
        );
        match fallocate(self.file()?, mode, off, len) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.unsupported(kind, "EOPNOTSUPP");
                return Ok(());
            }
            Err(e) => {
                return Err(self.fail(format!(
                    "fallocate mode {mode:#x} {len:#x} bytes at {off:#x}: {e}"
                )))
            }
        }
        self.model.resize(new_size as usize, 0);
        if zeroes && off < new_size {
            self.model[off as usize..end.min(new_size) as usize].fill(0);
        }
        self.count(kind);
        Ok(())
    }

    /// Disables `kind` for the rest of the run and notes it in the report and the ring.
    fn unsupported(&mut self, kind: &'static str, errno: &str) {
        *self.report.unsupported.entry(kind).or_insert(0) += 1;
        if self.disabled.insert(kind) {
            self.report
                .disabled
                .push(format!("{kind} at op #{}: {errno}", self.op));
        }
        self.record(
            format!("  ^ {errno}: {kind} disabled for the rest of the run"),
            None,
        );
    }

    fn op_sync(&mut self, data_only: bool) -> Result<(), String> {
        let kind = if data_only { "fdatasync" } else { "fsync" };
        self.record(kind.to_string(), None);
        let f = self.file()?;
        let r = if data_only {
            f.sync_data()
        } else {
            f.sync_all()
        };
        r.map_err(|e| self.fail(format!("{kind}: {e}")))?;
        self.count(kind);
        Ok(())
    }

    /// Close, then open again read-write (no O_TRUNC), O_DIRECT a third of the time.
    fn op_reopen(&mut self) -> Result<(), String> {
        let want_direct =
            self.cfg.direct_io && !self.disabled.contains("reopen_direct") && self.rng.chance(1, 3);
        let kind = if want_direct {
            "reopen_direct"
        } else {
            "reopen"
        };
        self.record(kind.to_string(), None);
        // Closed before the open, so the fs sees a real last close (flush/release).
        self.file = None;
        let path = self.path.clone();
        let open = |direct: bool| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(&path)
        };
        let file = match open(want_direct) {
            Ok(f) => {
                self.direct = want_direct;
                f
            }
            Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.unsupported("reopen_direct", "EINVAL on open(O_DIRECT)");
                self.direct = false;
                open(false).map_err(|e| self.fail(format!("reopen: {e}")))?
            }
            Err(e) => return Err(self.fail(format!("{kind}: {e}"))),
        };
        self.file = Some(file);
        self.count(if self.direct {
            "reopen_direct"
        } else {
            "reopen"
        });
        Ok(())
    }

    /// The whole file through a fresh buffered fd, after the last op.
    fn verify_whole_file(&mut self) -> Result<(), String> {
        self.record("final: close, reopen, read the whole file".into(), None);
        self.file = None;
        self.direct = false;
        let f = File::open(&self.path).map_err(|e| self.fail(format!("final open: {e}")))?;
        let size = self.size();
        // One byte more than the model: a file longer than the model must show up.
        let mut got = vec![0u8; size as usize + 1];
        let n =
            read_full(&f, &mut got, 0, false).map_err(|e| self.fail(format!("final read: {e}")))?;
        got.truncate(n);
        self.compare("final read", 0, &self.model, &got)?;
        self.file = Some(f);
        self.check_size()
    }
}

/// pread until `buf` is full or EOF. With O_DIRECT a short read ends at EOF (the next
/// offset would be unaligned, which O_DIRECT may refuse), so stop there.
fn read_full(f: &File, buf: &mut [u8], off: u64, direct: bool) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if direct && n as u64 % ALIGN != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    posix::fallocate(f.as_fd(), mode, off as i64, len as i64)
}

fn page_size() -> u64 {
    posix::page_size().map(|p| p as u64).unwrap_or(4096)
}

/// Seed and op for the SIGBUS note (a signal handler cannot reach the Fsx state).
static SIGBUS_SEED: AtomicU64 = AtomicU64::new(0);
static SIGBUS_OP: AtomicU64 = AtomicU64::new(0);

static SIGBUS_NOTE: [NotePart; 5] = [
    NotePart::Text("\nfsx: SIGBUS in an mmap access (a page fault the fs failed) at seed 0x"),
    NotePart::Hex(&SIGBUS_SEED),
    NotePart::Text(" op #"),
    NotePart::Dec(&SIGBUS_OP),
    NotePart::Text("; replay with SPOOL_FSX_TRACE=1 and that seed to see the ops\n"),
];

/// A page fault the fs fails (EIO from the daemon, a dead daemon, or a size the kernel
/// believes smaller than the model) kills the process with SIGBUS, before any message.
/// This handler says which seed and op that was, then dies of the same signal.
fn install_sigbus_note() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Best effort: the note only improves the crash message.
        let _ = posix::install_sigbus_reporter(&SIGBUS_NOTE);
    });
}

/// A MAP_SHARED mapping of part of a file, unmapped on drop.
struct Mapping {
    map: posix::Mapping,
    len: usize,
    /// The kernel maps whole pages: bytes up to here are addressable.
    page_len: usize,
    file_off: u64,
}

impl Mapping {
    fn new(file: &File, file_off: u64, len: usize, write: bool, page: u64) -> io::Result<Mapping> {
        let map = posix::Mapping::new(file, file_off, len, write)?;
        Ok(Mapping {
            map,
            len,
            page_len: (len as u64).div_ceil(page) as usize * page as usize,
            file_off,
        })
    }

    /// Bytes `[start, start + len)` of the mapping. The caller keeps every touched byte
    /// below EOF or in the page that holds EOF: pages wholly past EOF raise SIGBUS.
    fn slice(&self, start: usize, len: usize) -> &[u8] {
        assert!(start + len <= self.page_len, "outside the mapping");
        &self.map.as_slice()[start..start + len]
    }

    fn slice_mut(&mut self, start: usize, len: usize) -> &mut [u8] {
        assert!(start + len <= self.len, "outside the mapping");
        &mut self.map.as_mut_slice()[start..start + len]
    }

    fn msync(&self) -> io::Result<()> {
        self.map.msync()
    }
}

/// A zeroed buffer whose start is ALIGN-aligned, as O_DIRECT needs. Over-allocates a
/// Vec and uses an aligned window of it: no raw pointers, and a Vec's heap block does not
/// move when the Vec does.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN as usize];
        // For a byte pointer align_offset is always < ALIGN.
        let start = raw.as_ptr().align_offset(ALIGN as usize);
        assert!(start < ALIGN as usize, "cannot align a byte buffer");
        AlignedBuf { raw, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Rows of 16 bytes around `first` (an index into both slices), expected over got,
/// `--` where a side has no byte (a short read).
fn hexdump(base: u64, expected: &[u8], got: &[u8], first: usize) -> String {
    let total = expected.len().max(got.len());
    let abs_first = base + first as u64;
    let lo = (abs_first.saturating_sub(32) & !15).max(base & !15);
    let hi = (abs_first + 48).min(base + total as u64);
    let byte = |s: &[u8], abs: u64| -> String {
        if abs < base {
            return "  ".into();
        }
        match s.get((abs - base) as usize) {
            Some(b) => format!("{b:02x}"),
            None => "--".into(),
        }
    };
    let mut out = String::new();
    let mut row = lo;
    while row < hi.max(abs_first + 1) {
        let cols: Vec<u64> = (row..row + 16).collect();
        let exp: Vec<String> = cols.iter().map(|&a| byte(expected, a)).collect();
        let g: Vec<String> = cols.iter().map(|&a| byte(got, a)).collect();
        let mark = if exp != g { "  <-- differs" } else { "" };
        out.push_str(&format!("  {row:#010x} expected {}\n", exp.join(" ")));
        out.push_str(&format!("  {:10} got      {}{mark}\n", "", g.join(" ")));
        row += 16;
    }
    out
}

/// splitmix64: tiny, fast, good enough to drive op choice and fill data, and fully
/// determined by the seed.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `[0, n)` (modulo bias is irrelevant here); 0 when n is 0.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}
