//! What the NVMe base specification (2.0) fixes: controller registers, queue entry
//! layouts, opcodes and the identify fields Spool reads. Only data and pure functions
//! live here, so every layout is checked by unit tests and const assertions.

/// Controller registers (offsets into BAR0).
pub mod reg {
    /// Capabilities (64-bit).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Controller configuration.
    pub const CC: usize = 0x14;
    /// Controller status.
    pub const CSTS: usize = 0x1c;
    /// Admin queue attributes.
    pub const AQA: usize = 0x24;
    /// Admin submission queue base (64-bit).
    pub const ASQ: usize = 0x28;
    /// Admin completion queue base (64-bit).
    pub const ACQ: usize = 0x30;
    /// First doorbell; queue y's SQ tail is at 0x1000 + 2y * stride, its CQ head at
    /// 0x1000 + (2y + 1) * stride.
    pub const DOORBELLS: usize = 0x1000;
}

/// CC fields.
pub mod cc {
    pub const EN: u32 = 1;
    /// 64-byte submission entries (2^6) and 16-byte completion entries (2^4), memory
    /// page size 4 KiB (MPS = 0), NVM command set (CSS = 0), round robin arbitration.
    pub const IO_QUEUE_ENTRY_SIZES: u32 = (6 << 16) | (4 << 20);
    /// Normal shutdown notification.
    pub const SHN_NORMAL: u32 = 1 << 14;
    pub const SHN_MASK: u32 = 3 << 14;
}

/// CSTS fields.
pub mod csts {
    pub const RDY: u32 = 1;
    /// Controller fatal status.
    pub const CFS: u32 = 1 << 1;
    pub const SHST_MASK: u32 = 3 << 2;
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

/// The capabilities register, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Largest queue an I/O queue may have, in entries (MQES + 1).
    pub queue_entries_max: u32,
    /// Queues must be physically contiguous (always true for Spool's queues).
    pub contiguous_required: bool,
    /// Worst-case time to become ready or not ready.
    pub ready_timeout_ms: u64,
    /// Bytes between doorbells.
    pub doorbell_stride_bytes: usize,
    /// Supports the NVM command set.
    pub nvm_command_set: bool,
    /// Smallest memory page size, in bytes.
    pub page_size_min_bytes: u64,
}

impl Cap {
    pub fn decode(cap: u64) -> Cap {
        Cap {
            queue_entries_max: (cap & 0xffff) as u32 + 1,
            contiguous_required: cap & (1 << 16) != 0,
            ready_timeout_ms: ((cap >> 24) & 0xff) * 500,
            doorbell_stride_bytes: 4 << ((cap >> 32) & 0xf),
            nvm_command_set: (cap >> 37) & 1 != 0,
            page_size_min_bytes: 1 << (12 + ((cap >> 48) & 0xf)),
        }
    }
}

/// Admin opcodes.
pub mod admin {
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const SET_FEATURES: u8 = 0x09;
    /// Identify CNS values.
    pub const CNS_NAMESPACE: u32 = 0x00;
    pub const CNS_CONTROLLER: u32 = 0x01;
    /// Set Features feature id: number of queues.
    pub const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;
}

/// NVM command set opcodes.
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    /// Dataset Management CDW11: the ranges are to be deallocated.
    pub const DSM_DEALLOCATE: u32 = 1 << 2;
    /// Write Zeroes and Dataset Management ranges cover at most this many blocks per
    /// command (Write Zeroes' NLB is 16 bits).
    pub const ZEROES_BLOCKS_MAX: u32 = 65536;
    /// Force unit access, CDW12 bit 30: the write completes once it is durable.
    pub const FUA: u32 = 1 << 30;
}

/// One submission queue entry (64 bytes), as 16 little-endian dwords.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    pub dw: [u32; 16],
}

pub const SQE_BYTES: usize = 64;
pub const CQE_BYTES: usize = 16;
const _: () = assert!(std::mem::size_of::<Sqe>() == SQE_BYTES);

impl Sqe {
    /// Opcode, command id and namespace; PRP data pointers (PSDT = 0).
    pub fn new(opcode: u8, cid: u16, nsid: u32) -> Sqe {
        let mut s = Sqe::default();
        s.dw[0] = u32::from(opcode) | (u32::from(cid) << 16);
        s.dw[1] = nsid;
        s
    }
    pub fn prp(mut self, prp1: u64, prp2: u64) -> Sqe {
        self.dw[6] = prp1 as u32;
        self.dw[7] = (prp1 >> 32) as u32;
        self.dw[8] = prp2 as u32;
        self.dw[9] = (prp2 >> 32) as u32;
        self
    }
    /// Command dword 10..=15.
    pub fn cdw(mut self, n: usize, value: u32) -> Sqe {
        assert!((10..=15).contains(&n), "command dword {n} is not 10..=15");
        self.dw[n] = value;
        self
    }
    pub fn cid(&self) -> u16 {
        (self.dw[0] >> 16) as u16
    }
    pub fn opcode(&self) -> u8 {
        self.dw[0] as u8
    }
}

/// A read or write of `blocks` logical blocks at `lba` (blocks >= 1, at most 65536).
pub fn rw_command(opcode: u8, cid: u16, nsid: u32, lba: u64, blocks: u32, fua: bool) -> Sqe {
    assert!(
        (1..=65536).contains(&blocks),
        "NLB {blocks} out of 1..=65536"
    );
    let mut cdw12 = blocks - 1;
    if fua {
        cdw12 |= io::FUA;
    }
    Sqe::new(opcode, cid, nsid)
        .cdw(10, lba as u32)
        .cdw(11, (lba >> 32) as u32)
        .cdw(12, cdw12)
}

/// One completion queue entry, decoded from its four dwords.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    /// Command-specific result (dword 0).
    pub result: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    pub phase: bool,
    /// Status field without the phase bit: SC in bits 0..8, SCT in 8..11, DNR bit 14.
    pub status: u16,
}

impl Cqe {
    pub fn decode(dw: [u32; 4]) -> Cqe {
        Cqe {
            result: dw[0],
            sq_head: dw[2] as u16,
            sq_id: (dw[2] >> 16) as u16,
            cid: dw[3] as u16,
            phase: dw[3] & (1 << 16) != 0,
            status: (dw[3] >> 17) as u16,
        }
    }
    pub fn ok(&self) -> bool {
        self.status & 0x7ff == 0
    }
    /// "status code type X, status code Y", with the names of the common ones.
    pub fn describe(&self) -> String {
        let (sct, sc) = ((self.status >> 8) & 7, self.status & 0xff);
        let name = match (sct, sc) {
            (0, 0x01) => " (invalid opcode)",
            (0, 0x02) => " (invalid field)",
            (0, 0x04) => " (data transfer error)",
            (0, 0x06) => " (internal error)",
            (0, 0x07) => " (aborted by request)",
            (0, 0x0b) => " (invalid namespace)",
            (0, 0x80) => " (LBA out of range)",
            (0, 0x81) => " (capacity exceeded)",
            (2, 0x80) => " (write fault)",
            (2, 0x81) => " (unrecovered read error)",
            (2, 0x86) => " (access denied)",
            _ => "",
        };
        format!("status code type {sct}, status code {sc:#04x}{name}")
    }
}

/// Identify Controller fields Spool uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyController {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Largest transfer, in units of the minimum page size, as a power of two (0: none).
    pub mdts: u8,
    /// Number of namespaces.
    pub namespaces: u32,
    /// A volatile write cache is present (flush matters).
    pub volatile_write_cache: bool,
    /// Optional NVM commands (ONCS): bit 2 Dataset Management, bit 3 Write Zeroes.
    pub oncs: u16,
}

/// ONCS bits.
pub const ONCS_DSM: u16 = 1 << 2;
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

impl IdentifyController {
    pub fn decode(d: &[u8]) -> IdentifyController {
        assert!(d.len() >= 4096, "identify data is 4096 bytes");
        IdentifyController {
            serial: ascii(&d[4..24]),
            model: ascii(&d[24..64]),
            firmware: ascii(&d[64..72]),
            mdts: d[77],
            namespaces: u32::from_le_bytes(d[516..520].try_into().expect("4 bytes")),
            volatile_write_cache: d[525] & 1 != 0,
            oncs: u16::from_le_bytes([d[520], d[521]]),
        }
    }
}

/// Identify Namespace fields Spool uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Size in logical blocks.
    pub blocks: u64,
    /// log2 of the logical block size of the format in use.
    pub lba_shift: u32,
    /// Metadata bytes per block of the format in use.
    pub metadata_bytes: u16,
}

impl IdentifyNamespace {
    pub fn decode(d: &[u8]) -> IdentifyNamespace {
        assert!(d.len() >= 4096, "identify data is 4096 bytes");
        let format = usize::from(d[26] & 0xf);
        let lbaf = u32::from_le_bytes(
            d[128 + 4 * format..132 + 4 * format]
                .try_into()
                .expect("4 bytes"),
        );
        IdentifyNamespace {
            blocks: u64::from_le_bytes(d[0..8].try_into().expect("8 bytes")),
            lba_shift: (lbaf >> 16) & 0xff,
            metadata_bytes: lbaf as u16,
        }
    }
}

/// PRP entries for a transfer of `pages` 4 KiB pages starting at bus address `iova`
/// (page-aligned, contiguous): (PRP1, PRP2) and how many list entries PRP2 points to.
/// One page: PRP2 unused; two: PRP2 is the second page; more: PRP2 is `list_iova`, whose
/// page must then hold `iova + 4096 * i` for i in 1..pages.
pub fn prp_pair(iova: u64, pages: u32, list_iova: u64) -> (u64, u64) {
    assert!(
        iova % 4096 == 0 && pages >= 1,
        "PRP transfer is page-aligned and non-empty"
    );
    assert!(
        pages - 1 <= PRP_LIST_ENTRIES,
        "PRP list of {} entries exceeds one page",
        pages - 1
    );
    match pages {
        1 => (iova, 0),
        2 => (iova, iova + 4096),
        _ => (iova, list_iova),
    }
}

/// Entries in one PRP list page (8 bytes each, no chaining is used).
pub const PRP_LIST_ENTRIES: u32 = 512;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_decodes_qemu_defaults() {
        // QEMU's nvme: MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMIN 0.
        let cap = 0x7ff | (1 << 16) | (0xf << 24) | (1 << 37);
        let c = Cap::decode(cap);
        assert_eq!(c.queue_entries_max, 2048);
        assert!(c.contiguous_required && c.nvm_command_set);
        assert_eq!(c.ready_timeout_ms, 7500);
        assert_eq!(c.doorbell_stride_bytes, 4);
        assert_eq!(c.page_size_min_bytes, 4096);
        assert_eq!(Cap::decode(2 << 32).doorbell_stride_bytes, 16);
    }

    #[test]
    fn read_write_commands_put_fields_where_the_spec_says() {
        let s = rw_command(io::WRITE, 0x1234, 1, 0x1_0000_0002, 8, true)
            .prp(0xdead_b000, 0x1_0000_1000);
        assert_eq!(s.dw[0], 0x1234_0001);
        assert_eq!(s.cid(), 0x1234);
        assert_eq!(s.opcode(), io::WRITE);
        assert_eq!(s.dw[1], 1);
        assert_eq!(
            (s.dw[6], s.dw[7], s.dw[8], s.dw[9]),
            (0xdead_b000, 0, 0x1000, 1)
        );
        assert_eq!((s.dw[10], s.dw[11]), (2, 1));
        assert_eq!(s.dw[12], 7 | (1 << 30));
        let r = rw_command(io::READ, 1, 1, 0, 1, false);
        assert_eq!(r.dw[12], 0);
    }

    #[test]
    fn completion_entries_decode_phase_and_status() {
        // cid 7, phase 1, SCT 0 SC 0x80 (LBA out of range), DNR.
        let status: u32 = 0x80 | (1 << 14);
        let c = Cqe::decode([0xabc, 0, (1 << 16) | 5, 7 | (1 << 16) | (status << 17)]);
        assert_eq!((c.result, c.sq_head, c.sq_id, c.cid), (0xabc, 5, 1, 7));
        assert!(c.phase);
        assert!(!c.ok());
        assert!(
            c.describe().contains("LBA out of range"),
            "{}",
            c.describe()
        );
        let ok = Cqe::decode([0, 0, 0, 3]);
        assert!(ok.ok() && !ok.phase);
    }

    #[test]
    fn identify_fields() {
        let mut d = vec![0u8; 4096];
        d[4..10].copy_from_slice(b"SER123");
        d[10..24].fill(b' ');
        d[24..28].copy_from_slice(b"QEMU");
        d[77] = 7;
        d[516..520].copy_from_slice(&256u32.to_le_bytes());
        d[525] = 1;
        d[520] = 0x0c;
        let c = IdentifyController::decode(&d);
        assert_eq!(
            c.oncs & (ONCS_DSM | ONCS_WRITE_ZEROES),
            ONCS_DSM | ONCS_WRITE_ZEROES
        );
        assert_eq!(
            (c.serial.as_str(), c.model.as_str(), c.mdts, c.namespaces),
            ("SER123", "QEMU", 7, 256)
        );
        assert!(c.volatile_write_cache);

        let mut n = vec![0u8; 4096];
        n[0..8].copy_from_slice(&1000u64.to_le_bytes());
        n[26] = 1; // format 1
        n[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let ns = IdentifyNamespace::decode(&n);
        assert_eq!((ns.blocks, ns.lba_shift, ns.metadata_bytes), (1000, 12, 0));
    }

    #[test]
    fn prp_pairs() {
        assert_eq!(prp_pair(0x10000, 1, 0x9000), (0x10000, 0));
        assert_eq!(prp_pair(0x10000, 2, 0x9000), (0x10000, 0x11000));
        assert_eq!(prp_pair(0x10000, 3, 0x9000), (0x10000, 0x9000));
        assert!(std::panic::catch_unwind(|| prp_pair(0x10000, 514, 0x9000)).is_err());
    }
}
