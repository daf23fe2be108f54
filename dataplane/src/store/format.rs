//! The superblock and the device geometry.
//!
//! ```text
//! 0            superblock (4 KiB), then zero padding to 1 MiB
//! 1 MiB        shard 0: [snapshot A][snapshot B][WAL ring][extent 0][extent 1]...
//! +shard_size  shard 1: ...
//! ```
//! Every shard is an independent store (own snapshots, WAL and extents) owned by one
//! dataplane core, so cores share nothing. The shard count is fixed at format time; a
//! core may own several shards.

use super::codec::{crc, Reader, Writer};
use crate::Error;

pub const MAGIC: &[u8; 8] = b"SPOOLDEV";
pub const FORMAT_VERSION: u32 = 1;
pub const BLOCK_SIZE: u32 = 4096;
pub const SUPERBLOCK_SIZE: usize = 4096;
/// Shard areas start here, so they are 1 MiB-aligned on the device.
pub const DATA_START: u64 = 1 << 20;
/// Sub-areas inside a shard are aligned to this.
pub const AREA_ALIGN: u64 = 64 << 10;
pub const CHUNK_SIZE_MIN: u32 = 64 << 10;
pub const CHUNK_SIZE_MAX: u32 = 64 << 20;
pub const SHARDS_MAX: u32 = 256;
pub const WAL_SIZE_MIN: u64 = 1 << 20;
/// Snapshot entry: chunk id (12), extent (4), len (4), version (8), then a bitmap of
/// present blocks and one crc32c per present block.
pub const SNAP_ENTRY_FIXED: usize = 28;
pub const SNAP_HEADER_SIZE: usize = 64;

/// Where everything is on a formatted device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Identifies this format of the device (from the superblock uuid); WAL batches
    /// and snapshots carry it. 0 until formatted.
    pub store_id: u64,
    pub device_size: u64,
    pub chunk_size: u32,
    pub shard_count: u32,
    pub shard_size: u64,
    pub snapshot_slot_size: u64,
    pub wal_size: u64,
    pub extents_per_shard: u32,
}

impl Geometry {
    /// Lays out a device of `device_size` bytes. `wal_size` 0 picks a default.
    pub fn compute(
        device_size: u64,
        chunk_size: u32,
        shard_count: u32,
        wal_size: u64,
    ) -> Result<Self, Error> {
        let bad = |m: String| Error::BadRequest(m);
        if !chunk_size.is_power_of_two() || !(CHUNK_SIZE_MIN..=CHUNK_SIZE_MAX).contains(&chunk_size)
        {
            return Err(bad(format!(
                "chunk size {chunk_size} must be a power of two between {CHUNK_SIZE_MIN} and {CHUNK_SIZE_MAX}"
            )));
        }
        if shard_count == 0 || shard_count > SHARDS_MAX {
            return Err(bad(format!(
                "shard count {shard_count} must be between 1 and {SHARDS_MAX}"
            )));
        }
        let shard_size =
            device_size.saturating_sub(DATA_START) / u64::from(shard_count) / AREA_ALIGN
                * AREA_ALIGN;
        let wal_size = if wal_size == 0 {
            // 1/256 of the shard, at least 1 MiB, at most 64 MiB: the WAL only holds
            // records since the last snapshot.
            (shard_size / 256).clamp(WAL_SIZE_MIN, 64 << 20) / AREA_ALIGN * AREA_ALIGN
        } else {
            wal_size.div_ceil(AREA_ALIGN) * AREA_ALIGN
        };
        let cs = u64::from(chunk_size);
        let upper = shard_size / cs;
        let snap = snapshot_slot_size(upper, chunk_size);
        let fixed = 2 * snap + wal_size;
        let extents = shard_size.saturating_sub(fixed) / cs;
        if extents < 2 {
            return Err(bad(format!(
                "device of {device_size} bytes is too small for {shard_count} shard(s) of {chunk_size}-byte chunks \
                 (each shard needs room for metadata of {fixed} bytes and at least 2 chunks)"
            )));
        }
        let extents = u32::try_from(extents)
            .map_err(|_| bad("too many chunks per shard; use more shards".into()))?;
        let g = Geometry {
            store_id: 0,
            device_size,
            chunk_size,
            shard_count,
            shard_size,
            snapshot_slot_size: snapshot_slot_size(u64::from(extents), chunk_size),
            wal_size,
            extents_per_shard: extents,
        };
        g.check()?;
        Ok(g)
    }

    /// The invariants a geometry read from a device must satisfy.
    pub fn check(&self) -> Result<(), Error> {
        let c = |ok: bool, m: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Corrupt {
                    what: "superblock geometry",
                    detail: m.into(),
                })
            }
        };
        c(
            self.chunk_size.is_power_of_two()
                && (CHUNK_SIZE_MIN..=CHUNK_SIZE_MAX).contains(&self.chunk_size),
            "chunk size",
        )?;
        c(
            self.shard_count >= 1 && self.shard_count <= SHARDS_MAX,
            "shard count",
        )?;
        c(
            self.shard_size % AREA_ALIGN == 0
                && self.wal_size % AREA_ALIGN == 0
                && self.snapshot_slot_size % AREA_ALIGN == 0,
            "alignment",
        )?;
        c(self.wal_size >= WAL_SIZE_MIN, "wal size")?;
        c(self.extents_per_shard >= 2, "extent count")?;
        c(
            self.snapshot_slot_size
                >= snapshot_slot_size(u64::from(self.extents_per_shard), self.chunk_size),
            "snapshot slot too small",
        )?;
        // Checked arithmetic: a corrupt superblock may hold any values, and every
        // offset computed later must then fit (they are sums bounded by this one).
        let used = self
            .snapshot_slot_size
            .checked_mul(2)
            .and_then(|x| x.checked_add(self.wal_size))
            .and_then(|x| {
                x.checked_add(u64::from(self.extents_per_shard) * u64::from(self.chunk_size))
            });
        c(
            used.is_some_and(|u| u <= self.shard_size),
            "extents overflow the shard",
        )?;
        let end = u64::from(self.shard_count)
            .checked_mul(self.shard_size)
            .and_then(|s| s.checked_add(DATA_START));
        c(
            end.is_some_and(|e| e <= self.device_size),
            "shards overflow the device",
        )?;
        Ok(())
    }

    pub fn blocks_per_chunk(&self) -> u32 {
        self.chunk_size / BLOCK_SIZE
    }
    pub fn shard_base(&self, shard: u32) -> u64 {
        DATA_START + u64::from(shard) * self.shard_size
    }
    pub fn snapshot_slot(&self, shard: u32, slot: u32) -> u64 {
        self.shard_base(shard) + u64::from(slot % 2) * self.snapshot_slot_size
    }
    pub fn wal_base(&self, shard: u32) -> u64 {
        self.shard_base(shard) + 2 * self.snapshot_slot_size
    }
    pub fn extents_base(&self, shard: u32) -> u64 {
        self.wal_base(shard) + self.wal_size
    }
    pub fn extent_offset(&self, shard: u32, extent: u32) -> u64 {
        assert!(
            extent < self.extents_per_shard,
            "extent {extent} out of range"
        );
        self.extents_base(shard) + u64::from(extent) * u64::from(self.chunk_size)
    }
    /// Bytes of chunk data the whole device holds.
    pub fn capacity_bytes(&self) -> u64 {
        u64::from(self.shard_count) * u64::from(self.extents_per_shard) * u64::from(self.chunk_size)
    }
}

/// The store id a superblock uuid gives (its first 8 bytes).
pub fn store_id_of(uuid: &[u8; 16]) -> u64 {
    u64::from_le_bytes(uuid[..8].try_into().expect("8 bytes"))
}

/// The largest snapshot of a shard with `extents` chunks.
pub fn snapshot_slot_size(extents: u64, chunk_size: u32) -> u64 {
    let bpc = u64::from(chunk_size / BLOCK_SIZE);
    let entry = SNAP_ENTRY_FIXED as u64 + bpc.div_ceil(8) + 4 * bpc;
    (SNAP_HEADER_SIZE as u64 + extents * entry).div_ceil(AREA_ALIGN) * AREA_ALIGN
}

/// The first block of a Spool device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub uuid: [u8; 16],
    pub created_unix_s: u64,
    pub geometry: Geometry,
}

impl Superblock {
    pub fn encode(&self, out: &mut [u8]) {
        assert!(out.len() >= SUPERBLOCK_SIZE, "superblock buffer too small");
        let out = &mut out[..SUPERBLOCK_SIZE];
        out.fill(0);
        let g = &self.geometry;
        let mut w = Writer::new(out);
        w.bytes(MAGIC);
        w.u32(self.version);
        w.bytes(&self.uuid);
        w.u64(self.created_unix_s);
        w.u64(g.device_size);
        w.u32(BLOCK_SIZE);
        w.u32(g.chunk_size);
        w.u32(g.shard_count);
        w.u64(g.shard_size);
        w.u64(g.snapshot_slot_size);
        w.u64(g.wal_size);
        w.u32(g.extents_per_shard);
        let c = crc(&out[..SUPERBLOCK_SIZE - 4]);
        out[SUPERBLOCK_SIZE - 4..].copy_from_slice(&c.to_le_bytes());
    }

    /// Decodes and verifies a superblock. Wrong magic, a bad checksum, a future version
    /// or an impossible geometry are errors that say which.
    pub fn decode(buf: &[u8]) -> Result<Self, Error> {
        if buf.len() < SUPERBLOCK_SIZE {
            return Err(Error::Corrupt {
                what: "superblock",
                detail: format!("{} bytes, need {SUPERBLOCK_SIZE}", buf.len()),
            });
        }
        let buf = &buf[..SUPERBLOCK_SIZE];
        if &buf[..8] != MAGIC {
            return Err(Error::NotSpool(match probe_signature(buf) {
                Some(other) => format!("it holds {other}"),
                None => "no Spool superblock (run `spool format`)".into(),
            }));
        }
        let mut r = Reader::new(buf, "superblock");
        r.bytes(8)?;
        let version = r.u32()?;
        if version > FORMAT_VERSION {
            return Err(Error::FutureVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let stored = u32::from_le_bytes(buf[SUPERBLOCK_SIZE - 4..].try_into().expect("4 bytes"));
        let computed = crc(&buf[..SUPERBLOCK_SIZE - 4]);
        if stored != computed {
            return Err(r.corrupt(format!(
                "checksum {stored:#010x} != computed {computed:#010x}"
            )));
        }
        if version == 0 {
            return Err(r.corrupt("format version 0"));
        }
        let uuid: [u8; 16] = r.bytes(16)?.try_into().expect("16 bytes");
        let created_unix_s = r.u64()?;
        let device_size = r.u64()?;
        let block_size = r.u32()?;
        if block_size != BLOCK_SIZE {
            return Err(r.corrupt(format!("block size {block_size}, expected {BLOCK_SIZE}")));
        }
        let geometry = Geometry {
            store_id: store_id_of(&uuid),
            device_size,
            chunk_size: r.u32()?,
            shard_count: r.u32()?,
            shard_size: r.u64()?,
            snapshot_slot_size: r.u64()?,
            wal_size: r.u64()?,
            extents_per_shard: r.u32()?,
        };
        geometry.check()?;
        Ok(Superblock {
            version,
            uuid,
            created_unix_s,
            geometry,
        })
    }
}

/// Recognizes what else may be on a device, so `spool format` does not destroy it.
/// `head` is the first 64 KiB or more of the device (shorter input checks less).
pub fn probe_signature(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, sig: &[u8]| {
        head.len() >= off + sig.len() && &head[off..off + sig.len()] == sig
    };
    if at(0, MAGIC) {
        return Some("a Spool device");
    }
    if at(1080, &[0x53, 0xef]) {
        return Some("an ext2/3/4 filesystem");
    }
    if at(0, b"XFSB") {
        return Some("an XFS filesystem");
    }
    if at(65600, b"_BHRfS_M") {
        return Some("a btrfs filesystem");
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return Some("a swap area");
    }
    if at(0, b"LUKS\xba\xbe") {
        return Some("a LUKS volume");
    }
    if at(512, b"EFI PART") {
        return Some("a GPT partition table");
    }
    if at(3, b"NTFS    ") {
        return Some("an NTFS filesystem");
    }
    if at(54, b"FAT") || at(82, b"FAT32") {
        return Some("a FAT filesystem");
    }
    if at(510, &[0x55, 0xaa]) {
        return Some("an MBR partition table");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            uuid: [7; 16],
            created_unix_s: 1,
            geometry: Geometry {
                store_id: store_id_of(&[7; 16]),
                ..Geometry::compute(1 << 30, 4 << 20, 2, 0).unwrap()
            },
        }
    }

    #[test]
    fn geometry_fits_and_is_aligned() {
        for (size, cs, shards) in [
            (64u64 << 20, 64u32 << 10, 1u32),
            (1 << 30, 4 << 20, 2),
            (100 << 30, 4 << 20, 8),
            (8 << 30, 1 << 20, 3),
        ] {
            let g = Geometry::compute(size, cs, shards, 0).unwrap();
            g.check().unwrap();
            let last = g.extent_offset(shards - 1, g.extents_per_shard - 1) + u64::from(cs);
            assert!(last <= size);
            assert_eq!(g.extents_base(0) % AREA_ALIGN, 0);
        }
        assert!(Geometry::compute(2 << 20, 4 << 20, 1, 0).is_err());
        assert!(Geometry::compute(1 << 30, 3 << 20, 1, 0).is_err());
        assert!(Geometry::compute(1 << 30, 4 << 20, 0, 0).is_err());
    }

    #[test]
    fn superblock_round_trip_and_damage() {
        let mut buf = vec![0u8; SUPERBLOCK_SIZE];
        sb().encode(&mut buf);
        assert_eq!(Superblock::decode(&buf).unwrap(), sb());
        let mut bad = buf.clone();
        bad[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&bad),
            Err(Error::Corrupt { .. })
        ));
        let mut future = buf.clone();
        future[8..12].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            Superblock::decode(&future),
            Err(Error::FutureVersion { found: 99, .. })
        ));
        assert!(matches!(
            Superblock::decode(&[0u8; 4096]),
            Err(Error::NotSpool(_))
        ));
        assert!(Superblock::decode(&buf[..100]).is_err());
    }

    #[test]
    fn probes_other_filesystems() {
        let mut head = vec![0u8; 70000];
        assert_eq!(probe_signature(&head), None);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(probe_signature(&head), Some("an ext2/3/4 filesystem"));
    }
}
