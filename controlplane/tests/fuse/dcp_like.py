#!/usr/bin/env python3
"""A stdlib-only stand-in for torch.distributed.checkpoint's FileSystemWriter.

It reproduces the I/O pattern DCP issues against a filesystem, because that pattern
is what a FUSE mount must get right:

* the coordinator does ``os.makedirs(step_dir, exist_ok=True)``;
* R rank processes, each with T writer threads; each thread writes one
  ``__{rank}_{i}.distcp`` through ``open(path, "wb")`` (a BufferedWriter) as records
  of odd sizes, then ``os.fsync(f.fileno())`` WITHOUT ``f.flush()`` and then closes:
  the BufferedWriter's tail reaches the filesystem only inside ``close()``, after the
  fsync, exactly as in DCP;
* after a barrier rank 0 writes ``.metadata.tmp`` (pickle, fsync without flush,
  close), unlinks an existing ``.metadata`` and renames the tmp file over it with
  ``Path.rename`` (no directory fsync, as in DCP).

Every file whose ``close()`` returned is appended to a log outside the mount (one
``os.write`` under ``flock``, then ``fsync``), followed by ``{"committed": N}`` once
the rename returned, so a crash test knows what the filesystem had acknowledged.

Commands:
  write      --dir D --step N --ranks R --threads T --seed S --log LOG
             [--records K] [--vary-records] [--payload-min B] [--payload-max B]
  verify     --dir D --step N
  verify-log --dir D --log LOG

Exit status: 0 OK, 1 verification (or write) failure, 2 usage error.
"""

import argparse
import fcntl
import hashlib
import json
import multiprocessing
import os
import pathlib
import pickle
import random
import re
import struct
import sys
import threading
import time
import traceback

HEADER_LEN = 64
MAGIC = b"SPOOLDCP"
READ_CHUNK = 4 << 20


def step_dir(root, step):
    return os.path.join(root, "step_%d" % step)


# ---------------------------------------------------------------------------- log


class Log:
    """Append-only JSON-lines log shared by all ranks and threads.

    One ``os.write`` per line on an O_APPEND fd under ``flock`` keeps lines whole
    across processes; the fsync makes a line durable before the writer moves on, so
    a line in the log means "close()/rename() had returned before this point".
    """

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def append(self, obj):
        line = (json.dumps(obj, sort_keys=True) + "\n").encode()
        with self.lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                os.write(self.fd, line)
                os.fsync(self.fd)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


def read_log(path, start=0):
    """Parsed log lines from byte `start`; a torn last line (writer killed mid-write)
    is ignored."""
    entries = []
    with open(path, "rb") as f:
        f.seek(start)
        lines = f.read().split(b"\n")
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            entries.append(json.loads(raw))
        except ValueError:
            if n == len(lines) - 1:
                print("note: ignoring torn last log line %r" % raw[:80], file=sys.stderr)
                continue
            raise
    return entries


# -------------------------------------------------------------------------- write


def make_pool(args, step, rank):
    """A rank's pool of seeded random bytes that payloads are sliced from.

    random.randbytes makes ~100 MB/s per core, which would make the writer, not the
    filesystem, the bottleneck. Slicing payloads at seeded random (odd) offsets out
    of one random pool is as fast as the fs, still reproducible, and still makes
    every file position's content distinct (the pool does not repeat), so misplaced
    or stale blocks cannot hash the same.
    """
    n = args.payload_max + max(args.payload_max, 1 << 20)
    return memoryview(random.Random("pool:%d:%d:%d" % (args.seed, step, rank)).randbytes(n))


def write_one_file(root, step, rank, i, args, log, pool):
    """Writes one .distcp file the way DCP does; returns (relname, size, sha256)."""
    name = "__%d_%d.distcp" % (rank, i)
    rel = "step_%d/%s" % (step, name)
    path = os.path.join(step_dir(root, step), name)
    # A str seed is hashed with sha512 by random.Random: reproducible across runs
    # and independent of PYTHONHASHSEED.
    rng = random.Random("%d:%d:%d:%d" % (args.seed, step, rank, i))
    h = hashlib.sha256()
    size = 0
    index = []
    # Files of different lengths finish at different times, so a crash mid-step
    # finds some files closed (and logged) and others still being written.
    nrec = rng.randint(1, args.records) if args.vary_records and args.records else args.records
    with open(path, "wb") as f:
        for rec in range(nrec):
            n = rng.randint(args.payload_min, args.payload_max) | 1  # odd: never aligned
            header = struct.pack("<8sIIIIQQ", MAGIC, step, rank, i, rec, n, size)
            header += b"\0" * (HEADER_LEN - len(header))
            off = rng.randint(0, len(pool) - n)
            payload = pool[off : off + n]
            # The 64-byte header lands in the BufferedWriter's buffer; the large
            # payload makes it flush that and write the payload straight through, so
            # the fs sees small unaligned writes interleaved with big ones.
            f.write(header)
            f.write(payload)
            h.update(header)
            h.update(payload)
            index.append((rec, size, n))
            size += HEADER_LEN + n
        # DCP ends a file with small items (its write-item index); a tail shorter
        # than the 8 KiB buffer stays in Python's buffer through the fsync below.
        trailer = json.dumps({"index": index}).encode()
        trailer += b"#" * rng.randint(1, 4000) + b"\n"
        f.write(trailer)
        h.update(trailer)
        size += len(trailer)
        # Exactly DCP: fsync without flush. The buffered tail is written by close().
        os.fsync(f.fileno())
    digest = h.hexdigest()
    log.append({"step": step, "file": rel, "size": size, "sha256": digest})
    return rel, size, digest


def rank_main(root, step, rank, args, barrier, results, log_path):
    log = Log(log_path)
    pool = make_pool(args, step, rank)
    out = [None] * args.threads
    errors = []

    def worker(i):
        try:
            out[i] = write_one_file(root, step, rank, i, args, log, pool)
        except BaseException as e:  # noqa: BLE001 - report whatever the fs raised
            errors.append("rank %d thread %d: %s: %s" % (rank, i, type(e).__name__, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for e in errors:
            print("write failed: " + e, file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    results.put((rank, out))
    try:
        barrier.wait(timeout=args.barrier_timeout)
    except threading.BrokenBarrierError:
        print("rank %d: barrier broken (another rank failed)" % rank, file=sys.stderr)
        os._exit(1)
    if rank != 0:
        return
    # Rank 0 is DCP's coordinator: gather the write results, then commit metadata.
    meta = {}
    for _ in range(args.ranks):
        _, files = results.get(timeout=args.barrier_timeout)
        for rel, size, digest in files:
            meta[os.path.basename(rel)] = (size, digest)
    sd = pathlib.Path(step_dir(root, step))
    tmp = sd / ".metadata.tmp"
    final = sd / ".metadata"
    with open(tmp, "wb") as f:
        pickle.dump(meta, f)
        os.fsync(f.fileno())  # no flush, as in DCP
    if os.path.exists(final):
        os.unlink(final)
    tmp.rename(final)
    log.append({"step": step, "committed": step})


def cmd_write(args):
    if args.payload_min < 0 or args.payload_max < args.payload_min:
        print("bad --payload-min/--payload-max", file=sys.stderr)
        return 2
    os.makedirs(step_dir(args.dir, args.step), exist_ok=True)
    # The summary counts only this run's log lines (the log may hold earlier runs).
    try:
        log_start = os.path.getsize(args.log)
    except FileNotFoundError:
        log_start = 0
    # fork: the script is self-contained and forking is what keeps it cheap; each
    # rank is still a separate process with its own fds, like torchrun's ranks.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(args.ranks)
    results = ctx.Queue()
    t0 = time.monotonic()
    procs = [
        ctx.Process(
            target=rank_main,
            args=(args.dir, args.step, r, args, barrier, results, args.log),
            name="rank%d" % r,
        )
        for r in range(args.ranks)
    ]
    for p in procs:
        p.start()
    failed = []
    pending = list(procs)
    while pending:
        for p in list(pending):
            p.join(timeout=0.05)
            if p.exitcode is None:
                continue
            pending.remove(p)
            if p.exitcode != 0:
                failed.append("%s exited with %d" % (p.name, p.exitcode))
                # Wake the ranks waiting at the barrier so they fail instead of hang.
                barrier.abort()
    secs = time.monotonic() - t0
    if failed:
        print("write step=%d FAILED: %s" % (args.step, "; ".join(failed)))
        return 1
    nfiles = 0
    nbytes = 0
    for e in read_log(args.log, log_start):
        if e.get("step") == args.step and "file" in e:
            nfiles += 1
            nbytes += e["size"]
    print(
        "write step=%d files=%d bytes=%d secs=%.3f GB/s=%.3f"
        % (args.step, nfiles, nbytes, secs, nbytes / secs / 1e9 if secs > 0 else 0.0)
    )
    return 0


# ------------------------------------------------------------------------- verify


def file_digest(path):
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(READ_CHUNK)
            if not b:
                break
            h.update(b)
            n += len(b)
    return n, h.hexdigest()


def check_file(path, size, digest):
    """None if `path` holds exactly `size` bytes hashing to `digest`, else why not."""
    try:
        st_size = os.stat(path).st_size
        n, got = file_digest(path)
    except OSError as e:
        return "%s: %s" % (path, e)
    if st_size != size:
        return "%s: stat size %d, expected %d" % (path, st_size, size)
    if n != size:
        return "%s: read %d bytes, expected %d (stat said %d)" % (path, n, size, st_size)
    if got != digest:
        return "%s: sha256 %s, expected %s" % (path, got, digest)
    return None


def verify_step(root, step):
    """(files, bytes, problems) for a step judged by its .metadata."""
    sd = step_dir(root, step)
    mpath = os.path.join(sd, ".metadata")
    try:
        with open(mpath, "rb") as f:
            meta = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - a torn pickle raises all sorts
        return 0, 0, ["%s: cannot load: %s: %s" % (mpath, type(e).__name__, e)]
    if not isinstance(meta, dict) or not meta:
        return 0, 0, ["%s: not a non-empty dict: %r" % (mpath, type(meta))]
    problems = []
    total = 0
    for name in sorted(meta):
        size, digest = meta[name]
        p = check_file(os.path.join(sd, name), size, digest)
        if p:
            problems.append(p)
        total += size
    return len(meta), total, problems


def cmd_verify(args):
    files, nbytes, problems = verify_step(args.dir, args.step)
    if problems:
        print("verify step=%d FAILED (%d problems):" % (args.step, len(problems)))
        for p in problems:
            print("  " + p)
        return 1
    print("verify step=%d files=%d bytes=%d OK" % (args.step, files, nbytes))
    return 0


def cmd_verify_log(args):
    try:
        entries = read_log(args.log)
    except OSError as e:
        print("verify-log FAILED: cannot read log: %s" % e)
        return 1
    logged = {}  # step -> {rel: (size, sha)}
    committed = set()
    for e in entries:
        if "committed" in e:
            committed.add(e["committed"])
        elif "file" in e:
            logged.setdefault(e["step"], {})[e["file"]] = (e["size"], e["sha256"])
    steps = set(logged) | committed
    if os.path.isdir(args.dir):
        for name in os.listdir(args.dir):
            m = re.fullmatch(r"step_(\d+)", name)
            if m:
                steps.add(int(m.group(1)))
    problems = []
    files = 0
    nbytes = 0
    summary = []
    for step in sorted(steps):
        sd = step_dir(args.dir, step)
        has_meta = os.path.exists(os.path.join(sd, ".metadata"))
        # Files whose close() returned must be intact whether or not the step
        # committed: that is what close-after-fsync promised the writer.
        for rel, (size, digest) in sorted(logged.get(step, {}).items()):
            p = check_file(os.path.join(args.dir, rel), size, digest)
            if p:
                problems.append("step %d logged file: %s" % (step, p))
            files += 1
            nbytes += size
        if has_meta:
            f, b, ps = verify_step(args.dir, step)
            problems.extend("step %d metadata: %s" % (step, p) for p in ps)
            # The committed metadata must agree with what the writers logged.
            try:
                with open(os.path.join(sd, ".metadata"), "rb") as mf:
                    meta = pickle.load(mf)
                for rel, want in logged.get(step, {}).items():
                    got = meta.get(os.path.basename(rel))
                    if got is not None and tuple(got) != tuple(want):
                        problems.append(
                            "step %d: .metadata says %s is %r, log says %r"
                            % (step, rel, got, want)
                        )
            except Exception:  # noqa: BLE001 - already reported by verify_step
                pass
            summary.append("step_%d=committed(%d files)" % (step, f))
        elif step in committed:
            problems.append("step %d: logged committed but %s/.metadata is missing" % (step, sd))
        else:
            summary.append("step_%d=uncommitted(%d logged files)" % (step, len(logged.get(step, {}))))
    if problems:
        print("verify-log FAILED (%d problems):" % len(problems))
        for p in problems:
            print("  " + p)
        return 1
    print("verify-log %s files=%d bytes=%d OK" % (" ".join(summary) or "no-steps", files, nbytes))
    return 0


# --------------------------------------------------------------------------- main


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("write")
    w.add_argument("--dir", required=True)
    w.add_argument("--step", type=int, required=True)
    w.add_argument("--ranks", type=int, default=4)
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--log", required=True)
    w.add_argument("--records", type=int, default=4, help="records per file")
    w.add_argument(
        "--vary-records",
        action="store_true",
        help="each file gets a seeded 1..RECORDS records instead of exactly RECORDS",
    )
    w.add_argument("--payload-min", type=int, default=512 << 10)
    w.add_argument("--payload-max", type=int, default=8 << 20)
    w.add_argument("--barrier-timeout", type=float, default=600.0)

    v = sub.add_parser("verify")
    v.add_argument("--dir", required=True)
    v.add_argument("--step", type=int, required=True)

    vl = sub.add_parser("verify-log")
    vl.add_argument("--dir", required=True)
    vl.add_argument("--log", required=True)

    args = ap.parse_args(argv)
    if args.cmd == "write":
        if args.ranks < 1 or args.threads < 1 or args.records < 0:
            print("--ranks/--threads must be >= 1, --records >= 0", file=sys.stderr)
            return 2
        return cmd_write(args)
    if args.cmd == "verify":
        return cmd_verify(args)
    return cmd_verify_log(args)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
