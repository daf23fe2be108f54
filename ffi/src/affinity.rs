//! CPU pinning for dataplane threads: hwloc first (it knows the topology and is what
//! the rest of the stack will use for NUMA placement), plain `sched_setaffinity` when
//! hwloc cannot load or bind.

use hwloc2::{CpuBindFlags, CpuSet, Topology};

use crate::Error;

/// How a thread ended up pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinMethod {
    Hwloc,
    SchedSetaffinity,
}

/// The CPUs this process may run on (its affinity mask, e.g. as narrowed by `taskset`
/// or a cgroup cpuset), in increasing order.
pub fn allowed_cpus() -> Result<Vec<usize>, Error> {
    let mut set = empty_cpu_set();
    // SAFETY: the pointer and size describe a live, writable cpu_set_t; pid 0 is the
    // calling thread (at start-up, the process's mask).
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(Error::last_os("sched_getaffinity"));
    }
    // SAFETY: every index is below CPU_SETSIZE, the bit count of cpu_set_t.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Pins the calling thread to `cpu` (an OS CPU index as in `allowed_cpus`).
pub fn pin_current_thread(cpu: usize) -> Result<PinMethod, Error> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(Error::Unsupported(format!("cpu {cpu} beyond CPU_SETSIZE")));
    }
    if pin_with_hwloc(cpu) {
        return Ok(PinMethod::Hwloc);
    }
    pin_with_sched_setaffinity(cpu)?;
    Ok(PinMethod::SchedSetaffinity)
}

/// The CPU the calling thread is running on right now.
pub fn current_cpu() -> Result<usize, Error> {
    // SAFETY: sched_getcpu has no arguments and no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).map_err(|_| Error::last_os("sched_getcpu"))
}

fn pin_with_hwloc(cpu: usize) -> bool {
    let Ok(index) = u32::try_from(cpu) else {
        return false;
    };
    let Some(mut topo) = Topology::new() else {
        return false;
    };
    topo.set_cpubind(CpuSet::from(index), CpuBindFlags::CPUBIND_THREAD)
        .is_ok()
}

fn pin_with_sched_setaffinity(cpu: usize) -> Result<(), Error> {
    let mut set = empty_cpu_set();
    // SAFETY: the caller checked cpu < CPU_SETSIZE, so the bit is inside the set.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the pointer and size describe a live cpu_set_t; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::last_os("sched_setaffinity"));
    }
    Ok(())
}

fn empty_cpu_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each test runs on its own thread, so pinning it does not affect the others.

    #[test]
    fn pin_to_first_allowed_cpu() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        let method = pin_current_thread(cpus[0]).unwrap();
        println!("pinned with {method:?}");
        assert_eq!(current_cpu().unwrap(), cpus[0]);
    }

    #[test]
    fn fallback_pins_too() {
        let cpus = allowed_cpus().unwrap();
        let last = *cpus.last().unwrap();
        pin_with_sched_setaffinity(last).unwrap();
        assert_eq!(current_cpu().unwrap(), last);
    }

    #[test]
    fn bad_cpu_is_an_error() {
        assert!(pin_current_thread(1 << 20).is_err());
        // Inside CPU_SETSIZE but (almost certainly) not present: both methods fail.
        assert!(pin_current_thread(libc::CPU_SETSIZE as usize - 1).is_err());
    }
}
