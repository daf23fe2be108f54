//! The `nvme` block device: Spool's own NVMe driver, in userspace over VFIO.
//!
//! One controller (`NvmeController`) is opened per device and shared; each dataplane
//! core gets its own I/O queue pair (`NvmeQueue`, a `BlockDevice`), so cores never
//! share a queue or a lock. Commands are written to the submission queue in `submit`;
//! `poll` rings the tail doorbell once for everything queued since the last poll and
//! reaps the completion queue by its phase bit: no syscall, no allocation and no lock
//! per I/O.
//!
//! Memory: the admin and I/O queues, the PRP lists and every pool given at open are
//! mapped into the device's IOMMU domain at IOVAs from `IOVA_BASE` up. A buffer of a
//! pool not given at open (the store's metadata pools) is mapped at its first use, once
//! per controller, and stays mapped (its pool kept alive) until the controller closes;
//! at most `MAPPED_POOLS_MAX` pools. A request larger than the controller's largest
//! transfer (MDTS, and one PRP list page) is split into several commands that complete
//! it together.
//!
//! Failure: a command that gets no completion within `io_timeout_ms`, or a controller
//! that reports fatal status, fails the controller: it is disabled (which stops all
//! DMA) before any buffer is handed back, and every request in flight on every queue
//! completes with an error. Recovery by controller reset is not built: the daemon
//! reports the device failed.

pub mod pci;
pub mod spec;

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_ffi::vfio::{Mmio, VfioDevice};
use spool_hugepages::{DmaBuf, DmaPool, PagePolicy};

use self::spec::{admin, cc, csts, io, reg, Cap, Cqe, IdentifyController, IdentifyNamespace, Sqe};
use super::{validate, BlockDevice, DeviceInfo, IoCompletion, IoKind, IoRequest};
use crate::Error;

/// Offsets and lengths are multiples of this, whatever the namespace's LBA size.
const BLOCK_SIZE: u32 = 4096;
const PAGE_BYTES: usize = 4096;
const ADMIN_ENTRIES: u16 = 64;
/// I/O queue size cap: 1024 entries are 64 KiB of submission queue.
const IO_QUEUE_ENTRIES_MAX: u32 = 1024;
/// Each ring (a submission or completion queue) lives in one buffer of this size.
const RING_BYTES: usize = IO_QUEUE_ENTRIES_MAX as usize * spec::SQE_BYTES;
/// One command transfers at most one PRP list page's worth (no PRP list chaining).
const COMMAND_BYTES_CAP: u32 = spec::PRP_LIST_ENTRIES * PAGE_BYTES as u32;
/// IOVAs start above 4 GiB, clear of the x86 MSI window and low reserved ranges.
const IOVA_BASE: u64 = 1 << 32;
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Polls without a completion (with requests in flight) between two clock reads for
/// the timeout check, so the clock is not read per poll.
const POLLS_PER_TIMEOUT_CHECK: u32 = 1024;

/// How to open an `nvme` device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeOptions {
    /// Requests in flight per queue (each may take several commands).
    pub queue_depth: u32,
    /// A command with no completion for this long fails the controller.
    pub io_timeout_ms: u64,
    /// The namespace to use.
    pub nsid: u32,
    /// Entries per I/O queue (at most the controller's limit and 1024; at least 2):
    /// commands in flight per queue are one fewer.
    pub queue_entries: u32,
}

impl Default for NvmeOptions {
    fn default() -> Self {
        NvmeOptions {
            queue_depth: 64,
            io_timeout_ms: 30_000,
            nsid: 1,
            queue_entries: IO_QUEUE_ENTRIES_MAX,
        }
    }
}

/// Facts about an opened controller, for status and `spool nvme list`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NvmeFacts {
    pub address: String,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub version: String,
    pub lba_bytes: u32,
    pub command_bytes_max: u32,
    pub queue_entries: u32,
    pub volatile_write_cache: bool,
    /// Write Zeroes and deallocate (Dataset Management) are supported.
    pub write_zeroes: bool,
    pub deallocate: bool,
}

/// `cid_slot` entry of a command id not in use.
const CID_FREE: u16 = u16::MAX;
/// Pools mapped for the device at once; more is an error (a sign of a pool per request).
const MAPPED_POOLS_MAX: usize = 1024;

/// One memory range mapped for the device.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    pool_id: u32,
    addr: usize,
    len: usize,
    iova: u64,
}

/// A submission/completion queue pair's memory and positions.
#[derive(Debug)]
struct Rings {
    sq: DmaBuf,
    cq: DmaBuf,
    entries: u16,
    sq_tail: u16,
    cq_head: u16,
    /// The phase bit a new completion carries; flips each time the CQ wraps.
    phase: bool,
    sq_doorbell: usize,
    cq_doorbell: usize,
}

impl Rings {
    fn new(sq: DmaBuf, mut cq: DmaBuf, entries: u16, qid: u16, stride: usize) -> Rings {
        assert!(
            usize::from(entries) * spec::SQE_BYTES <= sq.capacity(),
            "SQ fits its buffer"
        );
        // Zeroed completions carry phase 0, so the first real one (phase 1) is new.
        cq.as_mut_slice().fill(0);
        Rings {
            sq,
            cq,
            entries,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            sq_doorbell: reg::DOORBELLS + 2 * usize::from(qid) * stride,
            cq_doorbell: reg::DOORBELLS + (2 * usize::from(qid) + 1) * stride,
        }
    }

    /// Writes one command at the tail. The caller guarantees room (fewer than
    /// `entries - 1` commands outstanding).
    fn push(&mut self, sqe: &Sqe) {
        let base = usize::from(self.sq_tail) * spec::SQE_BYTES;
        for (i, dw) in sqe.dw.iter().enumerate() {
            self.sq.write_u32_volatile(base + 4 * i, *dw);
        }
        self.sq_tail = (self.sq_tail + 1) % self.entries;
    }

    /// Tells the controller about every command pushed so far.
    fn ring_sq(&self, bar: &Mmio) {
        // The entries must be visible before the doorbell (a compiler barrier on x86,
        // whose stores are ordered; other architectures need a DMA write barrier here).
        fence(Ordering::SeqCst);
        bar.write32(self.sq_doorbell, u32::from(self.sq_tail));
    }

    /// The next completion, if the controller has posted one.
    fn pop(&mut self) -> Option<Cqe> {
        let base = usize::from(self.cq_head) * spec::CQE_BYTES;
        let dw3 = self.cq.read_u32_volatile(base + 12);
        if (dw3 & (1 << 16) != 0) != self.phase {
            return None;
        }
        // The rest of the entry is read only after its phase bit was seen.
        fence(Ordering::Acquire);
        let cqe = Cqe::decode([
            self.cq.read_u32_volatile(base),
            self.cq.read_u32_volatile(base + 4),
            self.cq.read_u32_volatile(base + 8),
            dw3,
        ]);
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(cqe)
    }

    fn ring_cq(&self, bar: &Mmio) {
        bar.write32(self.cq_doorbell, u32::from(self.cq_head));
    }
}

/// The admin queue, used at open and never on the I/O path.
#[derive(Debug)]
struct Admin {
    rings: Rings,
    /// A page for identify data.
    data: DmaBuf,
    next_cid: u16,
}

/// One opened NVMe controller, shared by its queues.
#[derive(Debug)]
pub struct NvmeController {
    /// Holds the mapped pools until its container, and with it every mapping, is gone.
    vfio: VfioDevice,
    /// Pools mapped so far; the queues keep copies, so the hot path takes no lock.
    iova: Mutex<IovaSpace>,
    cap: Cap,
    facts: NvmeFacts,
    nsid: u32,
    lba_shift: u32,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Used at open; kept so the admin queue's memory lives as long as the controller.
    _admin: Mutex<Admin>,
}

fn nvme_err(address: &str, what: impl std::fmt::Display) -> Error {
    Error::Nvme(format!("{address}: {what}"))
}

impl NvmeController {
    /// Opens the controller at PCI `address` (bound to vfio-pci), maps `pools` for DMA,
    /// and creates `queues` I/O queue pairs, one per dataplane core.
    pub fn open(
        address: &str,
        queues: usize,
        opts: &NvmeOptions,
        pools: &[Arc<DmaPool>],
    ) -> Result<Vec<NvmeQueue>, Error> {
        pci::check_address(address)?;
        if queues == 0 || queues >= usize::from(u16::MAX) || opts.queue_depth == 0 {
            return Err(Error::BadRequest(format!(
                "{address}: need at least one queue and a queue depth of at least 1"
            )));
        }
        let vfio = VfioDevice::open(address)?;
        let ring_pool = DmaPool::new(
            "nvme-rings",
            RING_BYTES,
            2 * (queues + 1) + 1,
            PagePolicy::PreferHuge,
        )?;
        let mut space = IovaSpace {
            next: IOVA_BASE,
            mappings: Vec::new(),
        };
        space.map(&vfio, &ring_pool)?;
        let mappings = &space.mappings;
        let bar = vfio.bar0();
        let cap = Cap::decode(bar.read64(reg::CAP));
        if !cap.nvm_command_set || cap.page_size_min_bytes > PAGE_BYTES as u64 {
            return Err(nvme_err(
                address,
                format!(
                    "unsupported controller: NVM command set {}, smallest page {} bytes",
                    cap.nvm_command_set, cap.page_size_min_bytes
                ),
            ));
        }
        let needed_bar = reg::DOORBELLS + (2 * queues + 2) * cap.doorbell_stride_bytes;
        if bar.len() < needed_bar {
            return Err(nvme_err(
                address,
                format!(
                    "BAR0 of {} bytes has no room for {queues} queues' doorbells",
                    bar.len()
                ),
            ));
        }
        let alloc = |p: &Arc<DmaPool>| {
            p.alloc()
                .ok_or_else(|| nvme_err(address, "internal: queue memory pool exhausted"))
        };

        // Reset, then bring the controller up with the admin queue.
        disable(bar, &cap).map_err(|e| nvme_err(address, e))?;
        let (asq, acq) = (alloc(&ring_pool)?, alloc(&ring_pool)?);
        let (asq_iova, acq_iova) = (iova_in(mappings, &asq)?, iova_in(mappings, &acq)?);
        let rings = Rings::new(asq, acq, ADMIN_ENTRIES, 0, cap.doorbell_stride_bytes);
        let entries0 = u32::from(ADMIN_ENTRIES) - 1;
        bar.write32(reg::AQA, entries0 | (entries0 << 16));
        bar.write64(reg::ASQ, asq_iova);
        bar.write64(reg::ACQ, acq_iova);
        bar.write32(reg::CC, cc::EN | cc::IO_QUEUE_ENTRY_SIZES);
        wait_status(bar, &cap, csts::RDY, csts::RDY, "become ready")
            .map_err(|e| nvme_err(address, e))?;
        let vs = bar.read32(reg::VS);
        let mut adm = Admin {
            rings,
            data: alloc(&ring_pool)?,
            next_cid: 0,
        };

        let ctrl_id =
            IdentifyController::decode(&adm.identify(&vfio, mappings, admin::CNS_CONTROLLER, 0)?);
        let ns = IdentifyNamespace::decode(&adm.identify(
            &vfio,
            mappings,
            admin::CNS_NAMESPACE,
            opts.nsid,
        )?);
        if ns.blocks == 0 {
            return Err(nvme_err(
                address,
                format!("namespace {} is not active (size 0)", opts.nsid),
            ));
        }
        if ns.metadata_bytes != 0 || ns.lba_shift < 9 || ns.lba_shift > 12 {
            return Err(nvme_err(address, format!(
                "namespace {} is formatted with {}-byte blocks and {} metadata bytes: Spool needs 512 or 4096-byte blocks without metadata (reformat with `nvme format`)",
                opts.nsid, 1u64 << ns.lba_shift.min(63), ns.metadata_bytes
            )));
        }
        let command_bytes_max = match ctrl_id.mdts {
            0 => COMMAND_BYTES_CAP,
            m => COMMAND_BYTES_CAP.min(
                ((1u64 << m.min(20)) * cap.page_size_min_bytes).min(u64::from(u32::MAX)) as u32,
            ),
        };
        // Queues: ask for `queues` submission and completion queues.
        let nq0 = (queues - 1) as u32;
        let granted = adm
            .command(
                &vfio,
                Sqe::new(admin::SET_FEATURES, 0, 0)
                    .cdw(10, admin::FEATURE_NUMBER_OF_QUEUES)
                    .cdw(11, nq0 | (nq0 << 16)),
                "set number of queues",
            )?
            .result;
        let granted = 1 + (granted & 0xffff).min(granted >> 16) as usize;
        if granted < queues {
            return Err(nvme_err(address, format!("controller grants {granted} I/O queue pairs, {queues} needed (one per dataplane core)")));
        }

        // Command ids are a per-queue budget shared by all requests: a request takes one
        // per command as they free up, so any size works and a full budget only delays.
        let entries = cap
            .queue_entries_max
            .min(IO_QUEUE_ENTRIES_MAX)
            .min(opts.queue_entries.max(2));
        let commands_max = entries as usize - 1;
        let depth = (opts.queue_depth as usize).min(commands_max);
        let prp_pool = DmaPool::new(
            "nvme-prp",
            PAGE_BYTES,
            queues * commands_max,
            PagePolicy::PreferHuge,
        )?;
        for p in std::iter::once(&prp_pool).chain(pools) {
            space.map(&vfio, p)?;
        }
        let mappings = &space.mappings;

        let mut rings = Vec::with_capacity(queues);
        for q in 0..queues {
            let qid = (q + 1) as u16;
            let (sq, cq) = (alloc(&ring_pool)?, alloc(&ring_pool)?);
            let (sq_iova, cq_iova) = (iova_in(mappings, &sq)?, iova_in(mappings, &cq)?);
            let size0 = entries - 1;
            adm.command(
                &vfio,
                Sqe::new(admin::CREATE_IO_CQ, 0, 0)
                    .prp(cq_iova, 0)
                    .cdw(10, u32::from(qid) | (size0 << 16))
                    .cdw(11, 1),
                "create I/O completion queue",
            )?;
            adm.command(
                &vfio,
                Sqe::new(admin::CREATE_IO_SQ, 0, 0)
                    .prp(sq_iova, 0)
                    .cdw(10, u32::from(qid) | (size0 << 16))
                    .cdw(11, 1 | (u32::from(qid) << 16)),
                "create I/O submission queue",
            )?;
            let prp: Vec<DmaBuf> = (0..commands_max)
                .map(|_| alloc(&prp_pool))
                .collect::<Result<_, _>>()?;
            let prp_iova = prp
                .iter()
                .map(|b| iova_in(mappings, b))
                .collect::<Result<Vec<_>, _>>()?;
            rings.push((
                qid,
                Rings::new(sq, cq, entries as u16, qid, cap.doorbell_stride_bytes),
                prp,
                prp_iova,
            ));
        }

        let size_bytes =
            (ns.blocks << ns.lba_shift) / u64::from(BLOCK_SIZE) * u64::from(BLOCK_SIZE);
        let facts = NvmeFacts {
            address: address.to_owned(),
            serial: ctrl_id.serial.clone(),
            model: ctrl_id.model.clone(),
            firmware: ctrl_id.firmware.clone(),
            version: format!("{}.{}.{}", vs >> 16, (vs >> 8) & 0xff, vs & 0xff),
            lba_bytes: 1 << ns.lba_shift,
            command_bytes_max,
            queue_entries: entries,
            volatile_write_cache: ctrl_id.volatile_write_cache,
            write_zeroes: ctrl_id.oncs & spec::ONCS_WRITE_ZEROES != 0,
            deallocate: ctrl_id.oncs & spec::ONCS_DSM != 0,
        };
        tracing::info!(?facts, queues, depth, "nvme controller ready");
        let known = space.mappings.clone();
        let ctrl = Arc::new(NvmeController {
            vfio,
            iova: Mutex::new(space),
            cap,
            facts,
            nsid: opts.nsid,
            lba_shift: ns.lba_shift,
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            _admin: Mutex::new(adm),
        });
        let info = DeviceInfo {
            size_bytes,
            block_size: BLOCK_SIZE,
            backend: "nvme",
            name: address.to_owned(),
        };
        Ok(rings
            .into_iter()
            .map(|(qid, rings, prp, prp_iova)| NvmeQueue {
                ctrl: Arc::clone(&ctrl),
                info: info.clone(),
                mappings: known.clone(),
                qid,
                rings,
                prp: prp.into_boxed_slice(),
                prp_iova: prp_iova.into_boxed_slice(),
                ops: (0..depth).map(|_| Op::default()).collect(),
                free: (0..depth as u16).rev().collect(),
                waiting: VecDeque::with_capacity(depth),
                cid_free: (0..commands_max as u16).rev().collect(),
                cid_slot: vec![CID_FREE; commands_max].into_boxed_slice(),
                command_bytes_max,
                sq_pending: false,
                idle_polls: 0,
                stalled_since: None,
                timeout: Duration::from_millis(opts.io_timeout_ms),
                stray_completions: 0,
            })
            .collect())
    }

    pub fn facts(&self) -> &NvmeFacts {
        &self.facts
    }

    /// Why the controller failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Maps `pool` for the device (once per controller; later calls return the mapping).
    fn map_pool(&self, pool: &Arc<DmaPool>) -> Result<Mapping, Error> {
        let mut space = self.iova.lock().unwrap_or_else(|p| p.into_inner());
        space.map(&self.vfio, pool)
    }

    /// Marks the controller failed and disables it, which stops its DMA: after this
    /// returns, no buffer of an outstanding command is touched by the device again.
    fn fail(&self, reason: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::error!(device = %self.facts.address, %reason, "nvme controller failed: disabling it");
            *f = Some(reason);
            if let Err(e) = disable(self.vfio.bar0(), &self.cap) {
                tracing::error!(device = %self.facts.address, error = %e, "nvme controller did not stop");
            }
            self.failed.store(true, Ordering::Release);
        }
    }
}

impl Drop for NvmeController {
    fn drop(&mut self) {
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        // A normal shutdown lets the controller persist its state; then disable it.
        let bar = self.vfio.bar0();
        let c = bar.read32(reg::CC);
        bar.write32(reg::CC, (c & !cc::SHN_MASK) | cc::SHN_NORMAL);
        if let Err(e) = wait_status(
            bar,
            &self.cap,
            csts::SHST_MASK,
            csts::SHST_COMPLETE,
            "shut down",
        ) {
            tracing::warn!(device = %self.facts.address, error = %e, "nvme shutdown");
        }
        if let Err(e) = disable(bar, &self.cap) {
            tracing::warn!(device = %self.facts.address, error = %e, "nvme disable");
        }
    }
}

/// The device's bus address space: pools mapped at increasing IOVAs.
#[derive(Debug)]
struct IovaSpace {
    next: u64,
    mappings: Vec<Mapping>,
}

impl IovaSpace {
    /// Maps `pool`'s whole region at the next free IOVA, or returns its mapping.
    fn map(&mut self, vfio: &VfioDevice, pool: &Arc<DmaPool>) -> Result<Mapping, Error> {
        if let Some(m) = self.mappings.iter().find(|m| m.pool_id == pool.id()) {
            return Ok(*m);
        }
        if self.mappings.len() >= MAPPED_POOLS_MAX {
            return Err(Error::Nvme(format!(
                "{}: {MAPPED_POOLS_MAX} buffer pools are mapped already; not mapping pool '{}'",
                vfio.bdf(),
                pool.name()
            )));
        }
        let r = pool.region();
        let m = Mapping {
            pool_id: pool.id(),
            addr: r.addr,
            len: r.len,
            iova: self.next,
        };
        vfio.map_pool(pool, m.iova)?;
        // 2 MiB apart, so hugepage-backed pools can use large IOMMU pages.
        self.next = (m.iova + r.len as u64).next_multiple_of(2 << 20);
        self.mappings.push(m);
        Ok(m)
    }
}

fn iova_in(mappings: &[Mapping], buf: &DmaBuf) -> Result<u64, Error> {
    let m = mappings
        .iter()
        .find(|m| m.pool_id == buf.pool_id())
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "buffer of pool '{}' is not registered with the nvme device",
                buf.pool().name()
            ))
        })?;
    let off = buf.addr() - m.addr;
    assert!(
        off + buf.capacity() <= m.len,
        "buffer inside its pool's mapping"
    );
    Ok(m.iova + off as u64)
}

/// Clears CC.EN and waits for CSTS.RDY to drop.
fn disable(bar: &Mmio, cap: &Cap) -> Result<(), String> {
    let c = bar.read32(reg::CC);
    if c & cc::EN != 0 {
        bar.write32(reg::CC, c & !cc::EN);
    }
    wait_status(bar, cap, csts::RDY, 0, "disable")
}

/// Waits until `CSTS & mask == want`, up to the controller's ready timeout.
fn wait_status(bar: &Mmio, cap: &Cap, mask: u32, want: u32, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_millis(cap.ready_timeout_ms.max(500));
    loop {
        let s = bar.read32(reg::CSTS);
        if s == u32::MAX {
            return Err(format!(
                "controller unreachable while waiting to {what} (CSTS reads all ones)"
            ));
        }
        if s & csts::CFS != 0 && want != 0 {
            return Err(format!(
                "controller fatal status while waiting to {what} (CSTS {s:#x})"
            ));
        }
        if s & mask == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {} ms waiting to {what} (CSTS {s:#x})",
                cap.ready_timeout_ms.max(500)
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

impl Admin {
    /// Runs one admin command to completion.
    fn command(&mut self, vfio: &VfioDevice, mut sqe: Sqe, what: &str) -> Result<Cqe, Error> {
        let address = vfio.bdf();
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        sqe.dw[0] = (sqe.dw[0] & 0xffff) | (u32::from(cid) << 16);
        self.rings.push(&sqe);
        self.rings.ring_sq(vfio.bar0());
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            if let Some(c) = self.rings.pop() {
                self.rings.ring_cq(vfio.bar0());
                if c.cid != cid {
                    return Err(nvme_err(
                        address,
                        format!(
                            "{what}: completion for command {} while waiting for {cid}",
                            c.cid
                        ),
                    ));
                }
                if !c.ok() {
                    return Err(nvme_err(
                        address,
                        format!("{what} failed: {}", c.describe()),
                    ));
                }
                return Ok(c);
            }
            if Instant::now() > deadline {
                let s = vfio.bar0().read32(reg::CSTS);
                return Err(nvme_err(
                    address,
                    format!(
                        "{what}: no completion in {} s (CSTS {s:#x})",
                        ADMIN_TIMEOUT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Identify (CNS `cns`, namespace `nsid`): the 4096 bytes it returns.
    fn identify(
        &mut self,
        vfio: &VfioDevice,
        mappings: &[Mapping],
        cns: u32,
        nsid: u32,
    ) -> Result<Vec<u8>, Error> {
        let iova = iova_in(mappings, &self.data)?;
        self.data.as_mut_slice()[..PAGE_BYTES].fill(0);
        self.command(
            vfio,
            Sqe::new(admin::IDENTIFY, 0, nsid).prp(iova, 0).cdw(10, cns),
            "identify",
        )?;
        Ok(self.data.as_slice()[..PAGE_BYTES].to_vec())
    }
}

/// One request in flight on a queue.
#[derive(Debug, Default)]
struct Op {
    tag: u64,
    kind: Option<IoKind>,
    offset: u64,
    len: u32,
    iova: u64,
    buf: Option<DmaBuf>,
    /// Bytes whose commands are in the submission queue.
    issued: u32,
    /// Commands of this request not yet completed (issued or not); 0: the slot is free.
    remaining: u32,
    error: Option<Error>,
}

/// One core's I/O queue pair on a shared controller: a `BlockDevice`.
#[derive(Debug)]
pub struct NvmeQueue {
    ctrl: Arc<NvmeController>,
    info: DeviceInfo,
    /// This queue's copy of the controller's mappings: found here without a lock.
    mappings: Vec<Mapping>,
    qid: u16,
    rings: Rings,
    /// One PRP list page per command id.
    prp: Box<[DmaBuf]>,
    prp_iova: Box<[u64]>,
    ops: Box<[Op]>,
    free: Vec<u16>,
    /// Requests with commands not yet issued, oldest first (at most one per slot).
    waiting: VecDeque<u16>,
    cid_free: Vec<u16>,
    /// The request slot of each command id in use, `CID_FREE` otherwise.
    cid_slot: Box<[u16]>,
    command_bytes_max: u32,
    /// Commands were pushed since the last doorbell.
    sq_pending: bool,
    idle_polls: u32,
    stalled_since: Option<Instant>,
    timeout: Duration,
    /// Completions for no outstanding command (a device bug), counted, never trusted.
    stray_completions: u64,
}

impl NvmeQueue {
    pub fn controller(&self) -> &Arc<NvmeController> {
        &self.ctrl
    }
    pub fn queue_id(&self) -> u16 {
        self.qid
    }
    pub fn stray_completions(&self) -> u64 {
        self.stray_completions
    }

    /// The bus address of `buf`. A pool seen for the first time is mapped (one ioctl,
    /// then never again): the store's own metadata pools need no registration.
    fn iova_of(&mut self, buf: &DmaBuf) -> Result<u64, Error> {
        if !self.mappings.iter().any(|m| m.pool_id == buf.pool_id()) {
            let m = self.ctrl.map_pool(buf.pool())?;
            self.mappings.push(m);
        }
        iova_in(&self.mappings, buf)
    }

    /// Issues commands of waiting requests, oldest first, while command ids are free.
    fn issue_waiting(&mut self) {
        let nsid = self.ctrl.nsid;
        let shift = self.ctrl.lba_shift;
        while let Some(&slot) = self.waiting.front() {
            let Some(cid) = self.cid_free.pop() else {
                return;
            };
            let op = &mut self.ops[usize::from(slot)];
            self.cid_slot[usize::from(cid)] = slot;
            self.sq_pending = true;
            let kind = op.kind.expect("a waiting request has a kind");
            let lba = (op.offset + u64::from(op.issued)) >> shift;
            match kind {
                IoKind::Flush => {
                    self.rings.push(&Sqe::new(io::FLUSH, cid, nsid));
                    self.waiting.pop_front();
                    continue;
                }
                IoKind::WriteZeroes => {
                    let piece = (op.len - op.issued).min(io::ZEROES_BLOCKS_MAX << shift);
                    let sqe = Sqe::new(io::WRITE_ZEROES, cid, nsid)
                        .cdw(10, lba as u32)
                        .cdw(11, (lba >> 32) as u32)
                        .cdw(12, (piece >> shift) - 1);
                    self.rings.push(&sqe);
                    op.issued += piece;
                    if op.issued == op.len {
                        self.waiting.pop_front();
                    }
                    continue;
                }
                IoKind::Deallocate => {
                    // One range (context attributes, length in blocks, first block) in
                    // this command id's PRP page.
                    let range = self.prp[usize::from(cid)].as_mut_slice();
                    range[0..4].fill(0);
                    range[4..8].copy_from_slice(&(op.len >> shift).to_le_bytes());
                    range[8..16].copy_from_slice(&lba.to_le_bytes());
                    let sqe = Sqe::new(io::DATASET_MANAGEMENT, cid, nsid)
                        .prp(self.prp_iova[usize::from(cid)], 0)
                        .cdw(10, 0)
                        .cdw(11, io::DSM_DEALLOCATE);
                    self.rings.push(&sqe);
                    op.issued = op.len;
                    self.waiting.pop_front();
                    continue;
                }
                IoKind::Read | IoKind::Write | IoKind::WriteDurable => {}
            }
            let (opcode, fua) = match kind {
                IoKind::Read => (io::READ, false),
                IoKind::WriteDurable => (io::WRITE, true),
                _ => (io::WRITE, false),
            };
            let piece = (op.len - op.issued).min(self.command_bytes_max);
            let pages = piece / PAGE_BYTES as u32;
            let at = op.iova + u64::from(op.issued);
            if pages > 2 {
                let list = self.prp[usize::from(cid)].as_mut_slice();
                for i in 1..pages {
                    let e = (at + u64::from(i) * PAGE_BYTES as u64).to_le_bytes();
                    list[8 * (i as usize - 1)..8 * i as usize].copy_from_slice(&e);
                }
            }
            let (prp1, prp2) = spec::prp_pair(at, pages, self.prp_iova[usize::from(cid)]);
            let sqe = spec::rw_command(opcode, cid, nsid, lba, piece >> shift, fua).prp(prp1, prp2);
            self.rings.push(&sqe);
            op.issued += piece;
            if op.issued == op.len {
                self.waiting.pop_front();
            }
        }
    }

    /// Completes every outstanding request with the controller's failure. Only called
    /// once the controller is disabled, so the device no longer touches the buffers.
    fn fail_all(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let reason = self
            .ctrl
            .failure()
            .unwrap_or_else(|| "controller failed".into());
        self.waiting.clear();
        for (cid, slot) in self.cid_slot.iter_mut().enumerate() {
            if *slot != CID_FREE {
                *slot = CID_FREE;
                self.cid_free.push(cid as u16);
            }
        }
        let mut n = 0;
        for (slot, op) in self.ops.iter_mut().enumerate() {
            if op.remaining > 0 {
                op.remaining = 0;
                self.free.push(slot as u16);
                done.push(IoCompletion {
                    tag: op.tag,
                    result: Err(Error::Nvme(format!("{}: {reason}", self.info.name))),
                    buf: op.buf.take(),
                });
                n += 1;
            }
        }
        n
    }

    /// Called after polls that found nothing while requests are in flight.
    fn check_timeout(&mut self) {
        self.idle_polls += 1;
        if self.idle_polls < POLLS_PER_TIMEOUT_CHECK {
            return;
        }
        self.idle_polls = 0;
        let now = Instant::now();
        let since = *self.stalled_since.get_or_insert(now);
        let s = self.ctrl.vfio.bar0().read32(reg::CSTS);
        if s & csts::CFS != 0 || s == u32::MAX {
            self.ctrl.fail(format!(
                "controller fatal status (CSTS {s:#x}) with {} request(s) in flight on queue {}",
                self.in_flight(),
                self.qid
            ));
        } else if now.duration_since(since) > self.timeout {
            self.ctrl.fail(format!(
                "I/O timeout: no completion on queue {} for {} ms with {} request(s) in flight (CSTS {s:#x})",
                self.qid,
                self.timeout.as_millis(),
                self.in_flight()
            ));
        }
    }
}

impl BlockDevice for NvmeQueue {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn queue_depth_max(&self) -> usize {
        self.ops.len()
    }

    fn in_flight(&self) -> usize {
        self.ops.len() - self.free.len()
    }

    fn submit(&mut self, req: IoRequest) -> Result<(), (Error, IoRequest)> {
        if self.ctrl.failed.load(Ordering::Acquire) {
            let reason = self.ctrl.failure().unwrap_or_default();
            return Err((
                Error::Nvme(format!("{}: controller failed: {reason}", self.info.name)),
                req,
            ));
        }
        if let Err(e) = validate(&self.info, &req) {
            return Err((e, req));
        }
        let iova = match req.buf.as_ref().map(|b| self.iova_of(b)) {
            Some(Err(e)) => return Err((e, req)),
            Some(Ok(i)) => i,
            None => 0,
        };
        let Some(slot) = self.free.pop() else {
            return Err((Error::Busy, req));
        };
        let facts = &self.ctrl.facts;
        let commands = match req.kind {
            IoKind::Flush | IoKind::Deallocate => 1,
            IoKind::WriteZeroes => req
                .len
                .div_ceil(io::ZEROES_BLOCKS_MAX << self.ctrl.lba_shift),
            _ => req.len.div_ceil(self.command_bytes_max),
        };
        let unsupported = match req.kind {
            IoKind::WriteZeroes => !facts.write_zeroes,
            IoKind::Deallocate => !facts.deallocate,
            _ => false,
        };
        if unsupported {
            self.free.push(slot);
            let e = Error::Unsupported(format!(
                "{}: the controller has no {:?}",
                self.info.name, req.kind
            ));
            return Err((e, req));
        }
        let op = &mut self.ops[usize::from(slot)];
        assert_eq!(op.remaining, 0, "a free slot has no commands");
        *op = Op {
            tag: req.tag,
            kind: Some(req.kind),
            offset: req.offset,
            len: req.len,
            iova,
            buf: req.buf,
            issued: 0,
            remaining: commands,
            error: None,
        };
        self.waiting.push_back(slot);
        self.issue_waiting();
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        if self.ctrl.failed.load(Ordering::Acquire) {
            return self.fail_all(done);
        }
        let bar = self.ctrl.vfio.bar0();
        if self.sq_pending {
            self.rings.ring_sq(bar);
            self.sq_pending = false;
        }
        let mut reaped = 0usize;
        let mut finished = 0usize;
        // Bounded: at most one pass over the completion queue per poll.
        while reaped < usize::from(self.rings.entries) {
            let Some(c) = self.rings.pop() else { break };
            reaped += 1;
            let slot = match self.cid_slot.get(usize::from(c.cid)) {
                Some(&s) if s != CID_FREE => s,
                _ => {
                    self.stray_completions += 1;
                    continue;
                }
            };
            self.cid_slot[usize::from(c.cid)] = CID_FREE;
            self.cid_free.push(c.cid);
            let op = &mut self.ops[usize::from(slot)];
            assert!(
                op.remaining > 0,
                "a command in use belongs to a request in flight"
            );
            if !c.ok() && op.error.is_none() {
                op.error = Some(Error::Nvme(format!(
                    "{}: command {} failed: {}",
                    self.info.name,
                    c.cid,
                    c.describe()
                )));
            }
            op.remaining -= 1;
            if op.remaining == 0 {
                done.push(IoCompletion {
                    tag: op.tag,
                    result: op.error.take().map_or(Ok(()), Err),
                    buf: op.buf.take(),
                });
                self.free.push(slot);
                finished += 1;
            }
        }
        if reaped > 0 {
            self.rings.ring_cq(bar);
            // Freed command ids let waiting requests go on; rung at the next poll.
            self.issue_waiting();
            self.idle_polls = 0;
            self.stalled_since = None;
        } else if self.in_flight() > 0 {
            self.check_timeout();
            if self.ctrl.failed.load(Ordering::Acquire) {
                return finished + self.fail_all(done);
            }
        }
        finished
    }
}

impl Drop for NvmeQueue {
    fn drop(&mut self) {
        // Buffers of commands still in flight go back to their pools below: stop the
        // device first so it cannot write into them after that.
        if self.in_flight() > 0 && !self.ctrl.failed.load(Ordering::Acquire) {
            self.ctrl.fail(format!(
                "queue {} closed with {} request(s) in flight",
                self.qid,
                self.in_flight()
            ));
        }
    }
}
