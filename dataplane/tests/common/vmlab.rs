//! Running a test inside the VM lab's guest (deploy/vmlab): the test binary boots the
//! guest and runs itself there, filtered to the one test, with an emulated NVMe
//! controller attached. Inside the guest `in_guest` returns the controller's address.

use std::path::PathBuf;
use std::process::Command;

/// The NVMe controller's PCI address when running inside the guest, `None` on the host.
pub fn in_guest() -> Option<String> {
    if std::env::var("SPOOL_VMLAB_GUEST").as_deref() != Ok("1") {
        return None;
    }
    Some(std::env::var("SPOOL_VMLAB_NVME").expect("the VM lab attaches an NVMe controller"))
}

/// Boots the guest with an NVMe disk of `nvme_mib` MiB and runs test `name` of this
/// very binary there; panics with the guest's output if it fails. The VM lab is part
/// of CI: a missing qemu or guest is a failure, never a skip.
pub fn run_in_guest(name: &str, nvme_mib: u32) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("deploy/vmlab/run.sh");
    let exe = std::env::current_exe().expect("test binary path");
    let started = std::time::Instant::now();
    let out = Command::new(&script)
        .args(["--nvme", &nvme_mib.to_string(), "--timeout", "900", "--"])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "---- guest output ({:.1} s) ----\n{text}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "test {name} failed in the VM lab ({}):\n{text}",
        out.status
    );
    // The filter must have matched: libtest prints "1 passed" for the one test.
    assert!(
        text.contains("1 passed"),
        "test {name} did not run in the guest:\n{text}"
    );
}

/// In the guest: loads soft-RoCE and adds rxe0 on the loopback interface (once).
#[allow(dead_code)] // Included by test binaries that use no RDMA, too.
pub fn add_rxe() {
    let run = |cmd: &[&str]| {
        let st = Command::new(cmd[0]).args(&cmd[1..]).status().unwrap();
        assert!(st.success(), "{cmd:?}: {st}");
    };
    if std::path::Path::new("/sys/class/infiniband/rxe0").exists() {
        return;
    }
    // rxe needs a crc32 driver to create a link.
    run(&[
        "modprobe",
        "-d",
        "/tmp/vmlab-root",
        "-a",
        "crc32_generic",
        "rdma_rxe",
        "ib_uverbs",
    ]);
    run(&["ip", "link", "set", "lo", "up"]);
    run(&["rdma", "link", "add", "rxe0", "type", "rxe", "netdev", "lo"]);
}
