//! Reliable-connected queue pairs over verbs, with the rules in the types:
//! - A `Domain` (a device context) is shared through an `Arc`; a `ProtectionDomain` holds
//!   one, and every memory region and queue pair holds its protection domain, so each
//!   outlives what was made in it. Only queue pairs of the same protection domain can
//!   reach a region: one per link keeps a peer out of every other link's memory.
//! - A `MemoryRegion` registers a whole `DmaPool` with the least access it needs and
//!   holds the pool's `Arc` until it is deregistered, so the NIC never reaches freed
//!   memory. A queue pair holds the regions its work may use, so they are deregistered
//!   only after it is destroyed.
//! - Posting takes the `DmaBuf` by value; only a completion gives it back. A queue pair
//!   dropped with work outstanding is moved to the error state and drained first; work
//!   that does not flush in time keeps its buffers forever (leaked) rather than hand
//!   them back while the NIC may still write them.
//! - One completion queue per queue pair, polled by its owner, with a completion
//!   channel whose fd turns readable when a completion arrives after `arm`.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spool_hugepages::{DmaBuf, DmaPool};

use super::sys;
use crate::Error;

fn os(what: &'static str) -> Error {
    Error::last_os(what)
}

fn set_nonblocking(fd: RawFd) -> Result<(), Error> {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(os("fcntl(O_NONBLOCK) on a completion channel"));
    }
    Ok(())
}

/// A work request's scatter list: its one entry, or none when it has no buffer.
fn scatter(sge: &mut sys::ibv_sge, has_buf: bool) -> (*mut sys::ibv_sge, i32) {
    match has_buf {
        true => (sge, 1),
        false => (std::ptr::null_mut(), 0),
    }
}

/// An open device context.
#[derive(Debug)]
pub struct Domain {
    name: String,
    ctx: *mut sys::ibv_context,
    /// Port 1's active MTU (IBV_MTU_*).
    active_mtu: u32,
}

// SAFETY: verbs objects may be used from any thread, and the Domain never changes
// after open; its context stays valid until Drop, which runs after every protection
// domain holding its Arc is gone.
unsafe impl Send for Domain {}
// SAFETY: shared use only reads the pointer (allocating protection domains and
// creating CQs is thread-safe in libibverbs).
unsafe impl Sync for Domain {}

/// A protection domain: regions and queue pairs made in it reach only each other.
#[derive(Debug)]
pub struct ProtectionDomain {
    pd: *mut sys::ibv_pd,
    domain: Arc<Domain>,
}

// SAFETY: as for Domain: the pointer never changes and is released once, in Drop,
// after every region and queue pair holding this Arc is gone.
unsafe impl Send for ProtectionDomain {}
// SAFETY: shared use only reads the pointer (registering memory and creating QPs is
// thread-safe in libibverbs).
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    pub fn new(domain: &Arc<Domain>) -> Result<Arc<Self>, Error> {
        // SAFETY: the context is open while the Domain lives, which it does.
        let pd = unsafe { sys::ibv_alloc_pd(domain.ctx) };
        if pd.is_null() {
            return Err(os("ibv_alloc_pd"));
        }
        Ok(Arc::new(ProtectionDomain {
            pd,
            domain: Arc::clone(domain),
        }))
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: pd came from ibv_alloc_pd and is released once; every region and
        // queue pair made in it holds this Arc, so none is alive here.
        unsafe { sys::ibv_dealloc_pd(self.pd) };
    }
}

/// What a peer may do with a memory region (local access is always allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Only this side's work uses it (sources of writes, sinks of reads).
    Local,
    /// Peers may write into it (a receive ring).
    RemoteWrite,
    /// Peers may write into it and read from it.
    RemoteReadWrite,
}

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
    pub fn open(name: &str) -> Result<Arc<Domain>, Error> {
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
        let ctx = super::Context(ctx);
        let mut pa = sys::ibv_port_attr::default();
        // SAFETY: ctx is open, pa is a live local of the full, current struct.
        if unsafe { sys::___ibv_query_port(ctx.0, 1, &mut pa) } != 0 {
            return Err(os("ibv_query_port"));
        }
        if pa.state != sys::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(Error::Unsupported(format!(
                "RDMA device {name} port 1 is not active (is its network interface up?)"
            )));
        }
        let ctx = std::mem::ManuallyDrop::new(ctx);
        Ok(Arc::new(Domain {
            name: name.to_owned(),
            ctx: ctx.0,
            active_mtu: pa.active_mtu.0,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
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
        // SAFETY: ctx came from ibv_open_device and is closed once; every protection
        // domain and queue pair holds the Domain's Arc, so none is alive here.
        unsafe { sys::ibv_close_device(self.ctx) };
    }
}

/// A whole `DmaPool` registered for local access and remote reads and writes.
#[derive(Debug)]
pub struct MemoryRegion {
    mr: *mut sys::ibv_mr,
    pool: Arc<DmaPool>,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: the registration never changes after creation and is released once, in Drop.
unsafe impl Send for MemoryRegion {}
// SAFETY: shared use only reads the keys.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    pub fn register(
        pd: &Arc<ProtectionDomain>,
        pool: &Arc<DmaPool>,
        access: Access,
    ) -> Result<Arc<Self>, Error> {
        use sys::ibv_access_flags as A;
        let r = pool.region();
        let flags = match access {
            Access::Local => A::IBV_ACCESS_LOCAL_WRITE,
            Access::RemoteWrite => A::IBV_ACCESS_LOCAL_WRITE | A::IBV_ACCESS_REMOTE_WRITE,
            Access::RemoteReadWrite => {
                A::IBV_ACCESS_LOCAL_WRITE | A::IBV_ACCESS_REMOTE_WRITE | A::IBV_ACCESS_REMOTE_READ
            }
        };
        // SAFETY: the region is the pool's live mapping; the MemoryRegion keeps the
        // pool's Arc until ibv_dereg_mr in Drop, so the memory outlives the registration.
        let mr = unsafe { sys::ibv_reg_mr(pd.pd, r.addr as *mut _, r.len, flags.0 as i32) };
        if mr.is_null() {
            return Err(os("ibv_reg_mr"));
        }
        Ok(Arc::new(MemoryRegion {
            mr,
            pool: Arc::clone(pool),
            pd: Arc::clone(pd),
        }))
    }

    /// The whole region, for a peer.
    pub fn remote(&self) -> RemoteRegion {
        let r = self.pool.region();
        RemoteRegion {
            addr: r.addr as u64,
            len: r.len as u64,
            // SAFETY: mr is valid until Drop.
            rkey: unsafe { (*self.mr).rkey },
        }
    }

    /// One buffer of the region, for a peer.
    pub fn remote_of(&self, buf: &DmaBuf) -> Result<RemoteRegion, Error> {
        self.covers(buf)?;
        Ok(RemoteRegion {
            addr: buf.addr() as u64,
            len: buf.capacity() as u64,
            rkey: self.remote().rkey,
        })
    }

    fn covers(&self, buf: &DmaBuf) -> Result<(), Error> {
        if buf.pool_id() != self.pool.id() {
            return Err(Error::Unsupported(format!(
                "buffer of pool '{}' is not in region '{}'",
                buf.pool().name(),
                self.pool.name()
            )));
        }
        Ok(())
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: mr came from ibv_reg_mr and is deregistered once; queue pairs hold
        // the regions they use, so none is alive here.
        unsafe { sys::ibv_dereg_mr(self.mr) };
    }
}

/// What a completion reports.
#[derive(Debug)]
pub struct Completion {
    pub wr_id: u64,
    /// None on success, else libibverbs' description of the status.
    pub error: Option<String>,
    /// A receive (SEND or RDMA WRITE with immediate from the peer), not our own work.
    pub recv: bool,
    /// Bytes received (receives) or written into our memory (RDMA WRITE with imm).
    pub byte_len: u32,
    /// The peer's immediate value (host order), when it sent one.
    pub imm: Option<u32>,
    pub buf: Option<DmaBuf>,
}

/// What a send-queue work request does.
#[derive(Clone, Copy, Debug)]
pub enum SendOp {
    /// A message into the peer's next posted receive.
    Send,
    /// Written into the peer's memory at (region, offset); no receive consumed.
    Write(RemoteRegion, u64),
    /// Read from the peer's memory at (region, offset) into our buffer.
    Read(RemoteRegion, u64),
}

/// Work posted and refused: the error, and the buffer back (the NIC never saw it).
pub type Refused = (Error, Option<DmaBuf>);

#[derive(Debug)]
enum Slot {
    Free,
    /// A send-queue request (`send`) or a receive, with its buffer.
    Posted {
        buf: Option<DmaBuf>,
        send: bool,
    },
}

/// One RC queue pair with its own completion queue and completion channel.
#[derive(Debug)]
pub struct QueuePair {
    channel: *mut sys::ibv_comp_channel,
    cq: *mut sys::ibv_cq,
    qp: *mut sys::ibv_qp,
    psn: u32,
    gid_index: u8,
    depth: u32,
    /// Work by wr_id (the slot index), holding its buffer until its completion.
    slots: Vec<Slot>,
    free: VecDeque<usize>,
    sends: u32,
    /// Set on the copy a closing thread drains: wait for the flushes right here.
    drain_here: bool,
    // Dropped after the queue pair is destroyed (fields drop after Drop::drop).
    regions: Vec<Arc<MemoryRegion>>,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: a queue pair is used by one owner at a time (&mut for every operation).
unsafe impl Send for QueuePair {}

const CQ_POLL_BATCH: usize = 16;

impl QueuePair {
    /// Creates a queue pair for up to `depth` outstanding sends and receives each, whose
    /// work may use buffers of `regions`, and moves it to INIT (receives may be posted
    /// from now on). `gid_index` selects the local GID (RoCE v2: the IPv4-mapped one).
    pub fn new(
        pd: &Arc<ProtectionDomain>,
        regions: Vec<Arc<MemoryRegion>>,
        depth: u32,
        gid_index: u8,
        psn: u32,
    ) -> Result<Self, Error> {
        assert!(depth > 0, "queue pair depth");
        let domain = &pd.domain;
        // SAFETY: ctx is open.
        let channel = unsafe { sys::ibv_create_comp_channel(domain.ctx) };
        if channel.is_null() {
            return Err(os("ibv_create_comp_channel"));
        }
        // SAFETY: channel is live; its fd stays open until ibv_destroy_comp_channel.
        let fd = unsafe { (*channel).fd };
        let nonblocking = set_nonblocking(fd);
        // SAFETY: ctx is open; the channel is live.
        let cq = unsafe {
            sys::ibv_create_cq(
                domain.ctx,
                (2 * depth) as i32,
                std::ptr::null_mut(),
                channel,
                0,
            )
        };
        if nonblocking.is_err() || cq.is_null() {
            let e = match nonblocking {
                Err(e) => e,
                Ok(()) => os("ibv_create_cq"),
            };
            if !cq.is_null() {
                // SAFETY: the CQ has no queue pair and no events.
                unsafe { sys::ibv_destroy_cq(cq) };
            }
            // SAFETY: no CQ uses the channel any more.
            unsafe { sys::ibv_destroy_comp_channel(channel) };
            return Err(e);
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
        let qp = unsafe { sys::ibv_create_qp(pd.pd, &mut init) };
        if qp.is_null() {
            let e = os("ibv_create_qp");
            // SAFETY: the CQ has no queue pair and no events; then nothing uses the channel.
            unsafe {
                sys::ibv_destroy_cq(cq);
                sys::ibv_destroy_comp_channel(channel);
            }
            return Err(e);
        }
        let slots = (2 * depth) as usize;
        let mut me = QueuePair {
            channel,
            cq,
            qp,
            psn: psn & 0xff_ffff,
            gid_index,
            depth,
            slots: (0..slots).map(|_| Slot::Free).collect(),
            free: (0..slots).collect(),
            sends: 0,
            drain_here: false,
            regions,
            pd: Arc::clone(pd),
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

    /// Lets this queue pair's work use buffers of `region` too (of its protection
    /// domain).
    pub fn add_region(&mut self, region: Arc<MemoryRegion>) -> Result<(), Error> {
        if !Arc::ptr_eq(&region.pd, &self.pd) {
            return Err(Error::Unsupported(
                "a memory region of another protection domain".into(),
            ));
        }
        self.regions.push(region);
        Ok(())
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
            gid: self.pd.domain.gid(i32::from(self.gid_index))?,
            mtu: self.pd.domain.active_mtu,
        })
    }

    /// Connects to the peer's queue pair: INIT -> RTR -> RTS.
    pub fn connect(&mut self, peer: &Endpoint) -> Result<(), Error> {
        if !(1..=5).contains(&peer.mtu) {
            return Err(Error::Unsupported(format!("peer MTU code {}", peer.mtu)));
        }
        let mut attr = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: sys::ibv_mtu(peer.mtu.min(self.pd.domain.active_mtu)),
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

    /// The completion channel's fd (non-blocking): readable once a completion arrives
    /// after `arm`.
    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is live until Drop.
        unsafe { (*self.channel).fd }
    }

    /// Asks for an event at the next completion, leaving events already raised on the
    /// channel (its fd stays readable for whoever waits on them). Poll after: a
    /// completion that came before raises no event.
    pub fn notify(&mut self) -> Result<(), Error> {
        // SAFETY: cq is live.
        let rc = unsafe { sys::ibv_req_notify_cq(self.cq, 0) };
        if rc != 0 {
            return Err(Error::Os {
                what: "ibv_req_notify_cq",
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        Ok(())
    }

    /// Consumes the channel's pending events and asks for one at the next completion.
    /// Poll after arming: a completion that came before it raises no event.
    pub fn arm(&mut self) -> Result<(), Error> {
        loop {
            let mut cq = std::ptr::null_mut();
            let mut ctx = std::ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; cq and ctx are live locals.
            if unsafe { sys::ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(Error::Os {
                    what: "ibv_get_cq_event",
                    source: e,
                });
            }
            // SAFETY: the event was for our only CQ; acked at once, so none is pending
            // when the CQ is destroyed.
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
        }
        self.notify()
    }

    fn lkey(&self, buf: &DmaBuf) -> Result<u32, Error> {
        let region = self
            .regions
            .iter()
            .find(|r| r.pool.id() == buf.pool_id())
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "pool '{}' is not registered for this queue pair on {}",
                    buf.pool().name(),
                    self.pd.domain.name
                ))
            })?;
        // SAFETY: the region's mr is valid while the region lives, which it does.
        Ok(unsafe { (*region.mr).lkey })
    }

    /// Takes a work-request slot for `buf`: (wr_id, address, lkey).
    fn take_slot(&mut self, buf: Option<DmaBuf>, send: bool) -> Result<(u64, u64, u32), Refused> {
        let (addr, lkey) = match &buf {
            Some(b) => match self.lkey(b) {
                Ok(k) => (b.addr() as u64, k),
                Err(e) => return Err((e, buf)),
            },
            None => (0, 0),
        };
        let Some(slot) = self.free.pop_front() else {
            let outstanding = self.slots.len();
            return Err((Error::QueuePairFull { outstanding }, buf));
        };
        self.slots[slot] = Slot::Posted { buf, send };
        Ok((slot as u64, addr, lkey))
    }

    /// The outcome of posting work request `wr_id`: refused (`rc` != 0) gives its
    /// buffer back, since the NIC never saw it.
    fn posted(&mut self, wr_id: u64, rc: i32, what: &'static str) -> Result<u64, Refused> {
        if rc == 0 {
            return Ok(wr_id);
        }
        let slot = std::mem::replace(&mut self.slots[wr_id as usize], Slot::Free);
        let Slot::Posted { buf, .. } = slot else {
            unreachable!("a posted work request holds its slot");
        };
        self.free.push_back(wr_id as usize);
        let source = std::io::Error::from_raw_os_error(rc);
        Err((Error::Os { what, source }, buf))
    }

    /// Posts a receive into `buf` (its whole capacity), or with no buffer (`None`) one
    /// that takes only an RDMA WRITE with immediate or an empty message. Returns the
    /// work request id.
    pub fn post_recv(&mut self, buf: Option<DmaBuf>) -> Result<u64, Refused> {
        let cap = buf.as_ref().map_or(0, |b| b.capacity() as u32);
        let has_buf = buf.is_some();
        let (wr_id, addr, lkey) = self.take_slot(buf, false)?;
        let mut sge = sys::ibv_sge {
            addr,
            length: cap,
            lkey,
        };
        let (sg_list, num_sge) = scatter(&mut sge, has_buf);
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            sg_list,
            num_sge,
            ..Default::default()
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: qp is live; wr and sge are live locals; the buffer stays in `slots`
        // (owned here) until its completion is polled.
        let rc = unsafe { sys::ibv_post_recv(self.qp, &mut wr, &mut bad) };
        self.posted(wr_id, rc, "ibv_post_recv")
    }

    /// Sends the first `len` bytes of `buf` (to read: `len` bytes into it), as `op`
    /// says. With `imm`, a SEND or WRITE also completes a receive at the peer that
    /// carries the value. A `None` buffer posts an empty message (`len` 0). Returns
    /// the work request id.
    pub fn post_send(
        &mut self,
        buf: Option<DmaBuf>,
        len: u32,
        op: SendOp,
        imm: Option<u32>,
    ) -> Result<u64, Refused> {
        let cap = buf.as_ref().map_or(0, DmaBuf::capacity);
        if len as usize > cap {
            return Err((Error::BufferTooSmall { len, capacity: cap }, buf));
        }
        let remote = match op {
            SendOp::Send => None,
            SendOp::Write(r, off) | SendOp::Read(r, off) => Some((r, off)),
        };
        if let Some((r, off)) = remote {
            let end = off.checked_add(u64::from(len));
            if end.is_none_or(|end| end > r.len || r.addr.checked_add(end).is_none()) {
                let e = Error::Unsupported(format!(
                    "RDMA access of {len} bytes at {off} outside the peer's {}-byte region",
                    r.len
                ));
                return Err((e, buf));
            }
        }
        if matches!(op, SendOp::Read(..)) && (imm.is_some() || len == 0) {
            // Zero-length reads crash some soft-RoCE kernels; reads carry no immediate.
            let e = Error::Unsupported("an RDMA read needs a length and no immediate".into());
            return Err((e, buf));
        }
        if self.sends >= self.depth {
            let outstanding = self.sends as usize;
            return Err((Error::QueuePairFull { outstanding }, buf));
        }
        let has_buf = buf.is_some();
        let (wr_id, addr, lkey) = self.take_slot(buf, true)?;
        let mut sge = sys::ibv_sge {
            addr,
            length: len,
            lkey,
        };
        use sys::ibv_wr_opcode as Op;
        let opcode = match (op, imm.is_some()) {
            (SendOp::Send, false) => Op::IBV_WR_SEND,
            (SendOp::Send, true) => Op::IBV_WR_SEND_WITH_IMM,
            (SendOp::Write(..), false) => Op::IBV_WR_RDMA_WRITE,
            (SendOp::Write(..), true) => Op::IBV_WR_RDMA_WRITE_WITH_IMM,
            (SendOp::Read(..), _) => Op::IBV_WR_RDMA_READ,
        };
        let (sg_list, num_sge) = scatter(&mut sge, has_buf);
        let mut wr = sys::ibv_send_wr {
            wr_id,
            sg_list,
            num_sge,
            opcode,
            send_flags: sys::ibv_send_flags::IBV_SEND_SIGNALED.0,
            ..Default::default()
        };
        if let Some(v) = imm {
            wr.__bindgen_anon_1.imm_data = v.to_be();
        }
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
        let r = self.posted(wr_id, rc, "ibv_post_send");
        if r.is_ok() {
            self.sends += 1;
        }
        r
    }

    /// Appends finished work (with its buffer) to `out`; returns how many. Never blocks.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut wcs = [sys::ibv_wc::default(); CQ_POLL_BATCH];
        // SAFETY: cq is live; wcs holds CQ_POLL_BATCH entries.
        let n = unsafe { sys::ibv_poll_cq(self.cq, CQ_POLL_BATCH as i32, wcs.as_mut_ptr()) };
        let n = usize::try_from(n).unwrap_or(0);
        for wc in &wcs[..n] {
            let slot = wc.wr_id as usize;
            let mut buf = None;
            // On error only wr_id, status and vendor_err are valid: the kind comes from
            // what was posted in the slot.
            let mut recv = false;
            if let Some(s) = self.slots.get_mut(slot) {
                if let Slot::Posted { buf: b, send } = std::mem::replace(s, Slot::Free) {
                    buf = b;
                    recv = !send;
                    if send {
                        self.sends -= 1;
                    }
                    self.free.push_back(slot);
                }
            }
            let ok = wc.status == sys::ibv_wc_status::IBV_WC_SUCCESS;
            let error = (!ok).then(|| {
                // SAFETY: returns a static string for any status value.
                let s = unsafe { std::ffi::CStr::from_ptr(sys::ibv_wc_status_str(wc.status)) };
                format!(
                    "{} (status {}, vendor error {:#x})",
                    s.to_string_lossy(),
                    wc.status.0,
                    wc.vendor_err
                )
            });
            let with_imm = wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            out.push(Completion {
                wr_id: wc.wr_id,
                error,
                recv,
                byte_len: wc.byte_len,
                // SAFETY: both union members are plain u32s.
                imm: (ok && with_imm)
                    .then(|| u32::from_be(unsafe { wc.__bindgen_anon_1.imm_data })),
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

impl Drop for QueuePair {
    fn drop(&mut self) {
        if self.qp.is_null() {
            return; // handed to a closing thread
        }
        if self.outstanding() > 0 && !self.drain_here {
            // The error state stops the queue pair (no more incoming writes) and
            // flushes every outstanding request. Waiting for the flushes, so that no
            // buffer goes back to its pool while the NIC may still use it, is left to
            // a thread: the owner (the transport's polled thread) does not stall on a
            // device that is slow to flush.
            let mut attr = sys::ibv_qp_attr {
                qp_state: sys::ibv_qp_state::IBV_QPS_ERR,
                ..Default::default()
            };
            let _ = self.modify(
                &mut attr,
                sys::ibv_qp_attr_mask::IBV_QP_STATE,
                "modify QP to ERR",
            );
            let closing = QueuePair {
                channel: std::mem::replace(&mut self.channel, std::ptr::null_mut()),
                cq: std::mem::replace(&mut self.cq, std::ptr::null_mut()),
                qp: std::mem::replace(&mut self.qp, std::ptr::null_mut()),
                psn: self.psn,
                gid_index: self.gid_index,
                depth: self.depth,
                slots: std::mem::take(&mut self.slots),
                free: std::mem::take(&mut self.free),
                sends: self.sends,
                drain_here: true,
                regions: std::mem::take(&mut self.regions),
                pd: Arc::clone(&self.pd),
            };
            // If no thread can be made, the closure (and so `closing`) is dropped
            // here, which drains inline.
            let _ = std::thread::Builder::new()
                .name("spool-qp-close".into())
                .spawn(move || drop(closing));
            return;
        }
        if self.outstanding() > 0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut out = Vec::new();
            while self.outstanding() > 0 && Instant::now() < deadline {
                self.poll(&mut out);
                out.clear();
            }
            if self.outstanding() > 0 {
                tracing::error!(
                    device = self.pd.domain.name,
                    outstanding = self.outstanding(),
                    "RDMA work did not flush: leaking its buffers"
                );
                for s in &mut self.slots {
                    if let Slot::Posted { buf: Some(b), .. } = std::mem::replace(s, Slot::Free) {
                        std::mem::forget(b);
                    }
                }
            }
        }
        // Events already consumed were acked by `arm`; ack none twice.
        // SAFETY: qp, cq and channel came from create and are destroyed once, in this
        // order (a CQ before its channel).
        unsafe {
            sys::ibv_destroy_qp(self.qp);
            sys::ibv_destroy_cq(self.cq);
            sys::ibv_destroy_comp_channel(self.channel);
        }
    }
}
