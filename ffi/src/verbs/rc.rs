//! Reliable-connected queue pairs over verbs, with the rules in the types:
//! - A `Domain` (device context + protection domain) registers whole `DmaPool`s as
//!   memory regions and keeps each pool's `Arc` until the region is deregistered, so
//!   the NIC never reaches freed memory.
//! - Posting takes the `DmaBuf` by value; only a completion gives it back. A queue pair
//!   dropped with work outstanding is moved to the error state and drained first; work
//!   that does not flush in time keeps its buffers forever (leaked) rather than hand
//!   them back while the NIC may still write them.
//! - One completion queue per queue pair, polled by its owner (a dataplane core).

use std::collections::VecDeque;
use std::ffi::CString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spool_hugepages::{DmaBuf, DmaPool};

use super::sys;
use crate::Error;

fn os(what: &'static str) -> Error {
    Error::last_os(what)
}

/// The device's context and one protection domain, with the pools registered in it.
#[derive(Debug)]
pub struct Domain {
    name: String,
    ctx: *mut sys::ibv_context,
    pd: *mut sys::ibv_pd,
    regions: Vec<Region>,
}

#[derive(Debug)]
struct Region {
    mr: *mut sys::ibv_mr,
    pool: Arc<DmaPool>,
}

// SAFETY: verbs objects may be used from any thread; the Domain is only mutated through
// &mut (registration), and its pointers stay valid until Drop.
unsafe impl Send for Domain {}
// SAFETY: shared use only reads the pointers (creating CQs and QPs is thread-safe in
// libibverbs).
unsafe impl Sync for Domain {}

/// Where a peer may write or read: a registered region's bus address, length and key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

/// What a peer needs to connect to a queue pair (exchanged over TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    /// IBV_MTU_* (1 = 256 B .. 5 = 4096 B).
    pub mtu: u32,
}

impl Domain {
    /// Opens RDMA device `name` (e.g. "rxe0") and allocates a protection domain.
    pub fn open(name: &str) -> Result<Domain, Error> {
        let mut n = 0;
        // SAFETY: n is a live local the call writes the count to.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(os("ibv_get_device_list"));
        }
        let list = super::DeviceList(list);
        let want = CString::new(name)
            .map_err(|_| Error::Unsupported(format!("bad RDMA device name {name:?}")))?;
        let mut ctx = std::ptr::null_mut();
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: the list holds n device pointers, i < n; names are NUL-terminated.
            let dev = unsafe { *list.0.add(i) };
            // SAFETY: dev belongs to the live list.
            let dev_name = unsafe { std::ffi::CStr::from_ptr(sys::ibv_get_device_name(dev)) };
            if dev_name == want.as_c_str() {
                // SAFETY: dev belongs to the live list; the context outlives the list.
                ctx = unsafe { sys::ibv_open_device(dev) };
                if ctx.is_null() {
                    return Err(os("ibv_open_device"));
                }
                break;
            }
        }
        if ctx.is_null() {
            return Err(Error::Unsupported(format!(
                "no RDMA device {name} (see `rdma link`)"
            )));
        }
        // SAFETY: ctx is open.
        let pd = unsafe { sys::ibv_alloc_pd(ctx) };
        if pd.is_null() {
            let e = os("ibv_alloc_pd");
            // SAFETY: ctx is open and nothing else uses it.
            unsafe { sys::ibv_close_device(ctx) };
            return Err(e);
        }
        Ok(Domain {
            name: name.to_owned(),
            ctx,
            pd,
            regions: Vec::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Registers all of `pool` for local access and remote reads and writes.
    pub fn register(&mut self, pool: &Arc<DmaPool>) -> Result<RemoteRegion, Error> {
        let r = pool.region();
        let access = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        // SAFETY: the region is the pool's live mapping; `self.regions` keeps the pool's
        // Arc until ibv_dereg_mr in Drop, so the memory outlives the registration.
        let mr = unsafe { sys::ibv_reg_mr(self.pd, r.addr as *mut _, r.len, access.0 as i32) };
        if mr.is_null() {
            return Err(os("ibv_reg_mr"));
        }
        self.regions.push(Region {
            mr,
            pool: Arc::clone(pool),
        });
        // SAFETY: mr was just returned non-null and stays valid until Drop.
        let rkey = unsafe { (*mr).rkey };
        Ok(RemoteRegion {
            addr: r.addr as u64,
            len: r.len as u64,
            rkey,
        })
    }

    /// The local key covering `buf`.
    fn lkey(&self, buf: &DmaBuf) -> Result<u32, Error> {
        let region = self
            .regions
            .iter()
            .find(|r| r.pool.id() == buf.pool_id())
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "pool '{}' is not registered with {}",
                    buf.pool().name(),
                    self.name
                ))
            })?;
        // SAFETY: the region's mr is valid until Drop.
        Ok(unsafe { (*region.mr).lkey })
    }

    /// The GID at `index` of port 1.
    pub fn gid(&self, index: i32) -> Result<[u8; 16], Error> {
        let mut gid = sys::ibv_gid::default();
        // SAFETY: ctx is open; gid is a live local.
        if unsafe { sys::ibv_query_gid(self.ctx, 1, index, &mut gid) } != 0 {
            return Err(os("ibv_query_gid"));
        }
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        Ok(unsafe { gid.raw })
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        for r in self.regions.drain(..) {
            // SAFETY: mr came from ibv_reg_mr and is deregistered once; queue pairs
            // borrow the Domain, so none is alive here.
            unsafe { sys::ibv_dereg_mr(r.mr) };
        }
        // SAFETY: pd and ctx came from alloc/open and are released once, pd first.
        unsafe {
            sys::ibv_dealloc_pd(self.pd);
            sys::ibv_close_device(self.ctx);
        }
    }
}

/// What a completion reports.
#[derive(Debug)]
pub struct Completion {
    pub wr_id: u64,
    /// None on success, else libibverbs' description of the status.
    pub error: Option<String>,
    /// Bytes received (receives).
    pub byte_len: u32,
    pub buf: Option<DmaBuf>,
}

/// One RC queue pair with its own completion queue.
#[derive(Debug)]
pub struct QueuePair<'d> {
    domain: &'d Domain,
    cq: *mut sys::ibv_cq,
    qp: *mut sys::ibv_qp,
    psn: u32,
    gid_index: u8,
    /// Buffers of posted work, by wr_id (the slot index).
    slots: Vec<Option<DmaBuf>>,
    free: VecDeque<usize>,
}

// SAFETY: a queue pair is used by one owner at a time (&mut for every operation).
unsafe impl Send for QueuePair<'_> {}

const CQ_POLL_BATCH: usize = 16;

impl<'d> QueuePair<'d> {
    /// Creates a queue pair for up to `depth` outstanding sends and receives each, and
    /// moves it to INIT (receives may be posted from now on). `gid_index` selects the
    /// local GID (RoCE v2: the IPv4-mapped one).
    pub fn new(domain: &'d Domain, depth: u32, gid_index: u8, psn: u32) -> Result<Self, Error> {
        // SAFETY: ctx is open; no channel, no context.
        let cq = unsafe {
            sys::ibv_create_cq(
                domain.ctx,
                (2 * depth) as i32,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(os("ibv_create_cq"));
        }
        let mut init = sys::ibv_qp_init_attr {
            send_cq: cq,
            recv_cq: cq,
            cap: sys::ibv_qp_cap {
                max_send_wr: depth,
                max_recv_wr: depth,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: sys::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 1,
            ..Default::default()
        };
        // SAFETY: pd is live, init is a live local naming a live CQ.
        let qp = unsafe { sys::ibv_create_qp(domain.pd, &mut init) };
        if qp.is_null() {
            let e = os("ibv_create_qp");
            // SAFETY: the CQ has no queue pair and no events.
            unsafe { sys::ibv_destroy_cq(cq) };
            return Err(e);
        }
        let slots = (2 * depth) as usize;
        let mut me = QueuePair {
            domain,
            cq,
            qp,
            psn: psn & 0xff_ffff,
            gid_index,
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots).collect(),
        };
        let mut attr = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: 1,
            qp_access_flags: (sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ)
                .0,
            ..Default::default()
        };
        let mask = sys::ibv_qp_attr_mask::IBV_QP_STATE
            | sys::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | sys::ibv_qp_attr_mask::IBV_QP_PORT
            | sys::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        me.modify(&mut attr, mask, "modify QP to INIT")?;
        Ok(me)
    }

    fn modify(
        &mut self,
        attr: &mut sys::ibv_qp_attr,
        mask: sys::ibv_qp_attr_mask,
        what: &'static str,
    ) -> Result<(), Error> {
        // SAFETY: qp is live; attr is a live exclusive reference for the call.
        let rc = unsafe { sys::ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(Error::Os {
                what,
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        Ok(())
    }

    /// What the peer needs to connect to this queue pair.
    pub fn endpoint(&self) -> Result<Endpoint, Error> {
        Ok(Endpoint {
            // SAFETY: qp is live.
            qpn: unsafe { (*self.qp).qp_num },
            psn: self.psn,
            gid: self.domain.gid(i32::from(self.gid_index))?,
            mtu: sys::ibv_mtu::IBV_MTU_1024.0,
        })
    }

    /// Connects to the peer's queue pair: INIT -> RTR -> RTS.
    pub fn connect(&mut self, peer: &Endpoint) -> Result<(), Error> {
        let mut attr = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: sys::ibv_mtu(peer.mtu.min(sys::ibv_mtu::IBV_MTU_1024.0)),
            dest_qp_num: peer.qpn,
            rq_psn: peer.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: sys::ibv_ah_attr {
                is_global: 1,
                port_num: 1,
                grh: sys::ibv_global_route {
                    dgid: sys::ibv_gid { raw: peer.gid },
                    sgid_index: self.gid_index,
                    hop_limit: 1,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let m = sys::ibv_qp_attr_mask::IBV_QP_STATE
            | sys::ibv_qp_attr_mask::IBV_QP_AV
            | sys::ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | sys::ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | sys::ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | sys::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | sys::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, m, "modify QP to RTR")?;
        let mut attr = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: self.psn,
            // 4.096 us * 2^14 = 67 ms per try; a dead peer becomes an error completion
            // after retry_cnt tries instead of retrying forever.
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 6,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let m = sys::ibv_qp_attr_mask::IBV_QP_STATE
            | sys::ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | sys::ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | sys::ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | sys::ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | sys::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, m, "modify QP to RTS")
    }

    fn take_slot(&mut self, buf: DmaBuf) -> Result<(u64, u64, u32), (Error, DmaBuf)> {
        let lkey = match self.domain.lkey(&buf) {
            Ok(k) => k,
            Err(e) => return Err((e, buf)),
        };
        let Some(slot) = self.free.pop_front() else {
            return Err((
                Error::QueuePairFull {
                    outstanding: self.slots.len(),
                },
                buf,
            ));
        };
        let addr = buf.addr() as u64;
        self.slots[slot] = Some(buf);
        Ok((slot as u64, addr, lkey))
    }

    /// The outcome of posting work request `wr_id`: refused (`rc` != 0) gives its
    /// buffer back, since the NIC never saw it.
    fn posted(&mut self, wr_id: u64, rc: i32, what: &'static str) -> Result<u64, (Error, DmaBuf)> {
        if rc == 0 {
            return Ok(wr_id);
        }
        let buf = self.slots[wr_id as usize]
            .take()
            .expect("a posted slot holds its buffer");
        self.free.push_back(wr_id as usize);
        let source = std::io::Error::from_raw_os_error(rc);
        Err((Error::Os { what, source }, buf))
    }

    /// Posts a receive into `buf` (its whole capacity). Returns the work request id.
    pub fn post_recv(&mut self, buf: DmaBuf) -> Result<u64, (Error, DmaBuf)> {
        let cap = buf.capacity() as u32;
        let (wr_id, addr, lkey) = self.take_slot(buf)?;
        let mut sge = sys::ibv_sge {
            addr,
            length: cap,
            lkey,
        };
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            sg_list: &mut sge,
            num_sge: 1,
            ..Default::default()
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: qp is live; wr and sge are live locals; the buffer stays in `slots`
        // (owned here) until its completion is polled.
        let rc = unsafe { sys::ibv_post_recv(self.qp, &mut wr, &mut bad) };
        self.posted(wr_id, rc, "ibv_post_recv")
    }

    /// Sends the first `len` bytes of `buf`: as a message into the peer's next posted
    /// receive, or (with `remote`) written straight into the peer's memory at
    /// `remote.addr` (RDMA WRITE, no receive consumed). Returns the work request id.
    pub fn post_send(
        &mut self,
        buf: DmaBuf,
        len: u32,
        remote: Option<(RemoteRegion, u64)>,
    ) -> Result<u64, (Error, DmaBuf)> {
        if len as usize > buf.capacity() {
            let cap = buf.capacity();
            return Err((Error::BufferTooSmall { len, capacity: cap }, buf));
        }
        if let Some((r, off)) = remote {
            if off
                .checked_add(u64::from(len))
                .is_none_or(|end| end > r.len)
            {
                return Err((
                    Error::Unsupported(format!(
                        "RDMA write of {len} bytes at {off} outside the peer's {}-byte region",
                        r.len
                    )),
                    buf,
                ));
            }
        }
        let (wr_id, addr, lkey) = self.take_slot(buf)?;
        let mut sge = sys::ibv_sge {
            addr,
            length: len,
            lkey,
        };
        let mut wr = sys::ibv_send_wr {
            wr_id,
            sg_list: &mut sge,
            num_sge: 1,
            opcode: if remote.is_some() {
                sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE
            } else {
                sys::ibv_wr_opcode::IBV_WR_SEND
            },
            send_flags: sys::ibv_send_flags::IBV_SEND_SIGNALED.0,
            ..Default::default()
        };
        if let Some((r, off)) = remote {
            wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                remote_addr: r.addr + off,
                rkey: r.rkey,
            };
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: qp is live; wr and sge are live locals; the buffer stays in `slots`
        // until its completion is polled.
        let rc = unsafe { sys::ibv_post_send(self.qp, &mut wr, &mut bad) };
        self.posted(wr_id, rc, "ibv_post_send")
    }

    /// Appends finished work (with its buffer) to `out`; returns how many. Never blocks.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut wcs = [sys::ibv_wc::default(); CQ_POLL_BATCH];
        // SAFETY: cq is live; wcs holds CQ_POLL_BATCH entries.
        let n = unsafe { sys::ibv_poll_cq(self.cq, CQ_POLL_BATCH as i32, wcs.as_mut_ptr()) };
        let n = usize::try_from(n).unwrap_or(0);
        for wc in &wcs[..n] {
            let slot = wc.wr_id as usize;
            let buf = self.slots.get_mut(slot).and_then(Option::take);
            if buf.is_some() {
                self.free.push_back(slot);
            }
            let error = (wc.status != sys::ibv_wc_status::IBV_WC_SUCCESS).then(|| {
                // SAFETY: returns a static string for any status value.
                let s = unsafe { std::ffi::CStr::from_ptr(sys::ibv_wc_status_str(wc.status)) };
                format!(
                    "{} (status {}, vendor error {:#x})",
                    s.to_string_lossy(),
                    wc.status.0,
                    wc.vendor_err
                )
            });
            out.push(Completion {
                wr_id: wc.wr_id,
                error,
                byte_len: wc.byte_len,
                buf,
            });
        }
        n
    }

    /// Work posted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl Drop for QueuePair<'_> {
    fn drop(&mut self) {
        if self.outstanding() > 0 {
            // The error state flushes every outstanding request; wait for the flushes
            // so no buffer goes back to its pool while the NIC may still use it.
            let mut attr = sys::ibv_qp_attr {
                qp_state: sys::ibv_qp_state::IBV_QPS_ERR,
                ..Default::default()
            };
            let _ = self.modify(
                &mut attr,
                sys::ibv_qp_attr_mask::IBV_QP_STATE,
                "modify QP to ERR",
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut out = Vec::new();
            while self.outstanding() > 0 && Instant::now() < deadline {
                self.poll(&mut out);
                out.clear();
            }
            if self.outstanding() > 0 {
                tracing::error!(
                    device = self.domain.name,
                    outstanding = self.outstanding(),
                    "RDMA work did not flush: leaking its buffers"
                );
                for b in self.slots.iter_mut().filter_map(Option::take) {
                    std::mem::forget(b);
                }
            }
        }
        // SAFETY: qp and cq came from create and are destroyed once, the QP first.
        unsafe {
            sys::ibv_destroy_qp(self.qp);
            sys::ibv_destroy_cq(self.cq);
        }
    }
}
