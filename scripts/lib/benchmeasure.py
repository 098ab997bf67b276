#!/usr/bin/python3
"""scripts/lib/benchmeasure.py: the measuring half of scripts/bench and scripts/soak, as plain functions.

The shell scripts start namespaces and VMs; every figure they report is read and computed here, from
/proc, KVM's debugfs, a tracefs histogram, iperf3's JSON and ping's output. The parsers take text and
are unit-tested (scripts/lib/test_benchmeasure.py, run by scripts/test); the readers around them only
open files.

Command line (used by scripts/lib/bench-run, scripts/lib/soak-long and scripts/lib/vm.sh):
  rss PID GUEST_MIB          KiB resident outside mappings at least as large as guest RAM
  snapshot PID KVM_DIR HIST GUEST_COUNTERS [HELPER_PID]
                             one line of counters (key=value): the guest's virtio interrupts and eth0
                             frames (GUEST_COUNTERS, the counters CGI's body), the VM's exits, the
                             VMM's QueueNotify writes, its CPU ticks outside the vCPUs, the host's
                             softirq ticks and its busy ticks outside guests; with HELPER_PID (a
                             vhost-user backend serving the VMM's NIC) that process's ticks, also
                             counted into the VMM's
  phase PHASE BEFORE AFTER IPERF_JSON
                             the figures of one iperf3 run (PHASE tcp_out, tcp_in, udp_out or udp_in)
                             from the snapshots around it, one `figure value` per line
  ping FILE                  `median p99` of the round trips in busybox/iputils ping output, in ms
  startup TRACE MARKER [EXE] ms from the trace marker MARKER, or from the first exec of a file named EXE
                             after it, to the first kvm_entry after that in a tracefs trace (the VMM's
                             start to its first vCPU entering the guest)
  guest-counters             stdin: the guest's counters CGI output -> "irqs frames"
"""

import json
import os
import re
import sys

# Where QEMU microvm's virtio-mmio windows end: the IOAPIC's page (0xfec00000). Tapir's transports are at
# 0xd0000000, QEMU's at 0xfeb00000; both 512-byte windows with QueueNotify at offset 0x50.
IOAPIC_BASE = 0xFEC00000
MMIO_WINDOW = 512
QUEUE_NOTIFY = 0x50

PHASES = ("tcp_out", "tcp_in", "udp_out", "udp_in")


class MeasureError(Exception):
    """A figure that cannot be computed from what was read (the message says which and why)."""


# --- parsers: text in, numbers out -------------------------------------------------------------------

def rss_outside_guest(smaps, guest_kib):
    """KiB resident in /proc/PID/smaps outside the mappings of at least guest_kib (guest RAM)."""
    total = guest = 0
    size = 0
    for line in smaps.splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
            total += rss
            if size >= guest_kib:
                guest += rss
    return total - guest


def task_stat(stat):
    """(comm, utime + stime in clock ticks) from one /proc/PID/task/TID/stat line. The name sits in
    parentheses and may hold spaces and parentheses of its own, so the fields count from the last ')'."""
    open_paren, close_paren = stat.find("("), stat.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise MeasureError(f"not a /proc stat line: {stat[:60]!r}")
    comm = stat[open_paren + 1:close_paren]
    fields = stat[close_paren + 1:].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15
    return comm, int(fields[11]) + int(fields[12])


def is_vcpu_thread(comm):
    """Whether a thread named comm runs a vCPU: Tapir's `tapir-vcpuN`, QEMU's `CPU N/KVM`."""
    return comm.startswith("tapir-vcpu") or (comm.startswith("CPU ") and comm.endswith("/KVM"))


def host_ticks(proc_stat):
    """(softirq, busy) over all CPUs from the `cpu` line of /proc/stat, in ticks: softirq is the time
    spent serving softirqs in any context (interrupt exit, ksoftirqd, or a task's local_bh_enable);
    busy is all time that is neither idle nor a guest's (user + nice + system + irq + softirq, less
    guest and guest_nice, which user and nice already hold)."""
    for line in proc_stat.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            v = [int(x) for x in parts[1:]] + [0] * 10
            user, nice, system, _idle, _iowait, irq, softirq, _steal, guest, guest_nice = v[:10]
            return softirq, user + nice + system + irq + softirq - guest - guest_nice
    raise MeasureError("no `cpu` line in /proc/stat")


_HIST_LINE = re.compile(r"common_pid:\s*(\d+)\D.*?gpa:\s*(0x[0-9a-fA-F]+|\d+).*?hitcount:\s*(\d+)")


def notify_writes(hist, tids):
    """QueueNotify writes by the threads tids in a kvm_mmio histogram (keys common_pid and gpa, writes
    only): hits at offset 0x50 of a 512-byte window below the IOAPIC."""
    n = 0
    for line in hist.splitlines():
        m = _HIST_LINE.search(line)
        if not m:
            continue
        pid, gpa, hits = int(m.group(1)), int(m.group(2), 0), int(m.group(3))
        if pid in tids and gpa % MMIO_WINDOW == QUEUE_NOTIFY and gpa < IOAPIC_BASE:
            n += hits
    return n


def iperf_received(doc, phase):
    """What the receiver got in one iperf3 -J run: Mbit/s for TCP, thousands of 64-byte datagrams per
    second for UDP."""
    try:
        s = json.loads(doc)["end"]["sum_received"] if isinstance(doc, str) else doc["end"]["sum_received"]
        if phase.startswith("tcp"):
            return s["bits_per_second"] / 1e6
        return s["bytes"] / 64 / s["seconds"] / 1e3
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise MeasureError(f"iperf3's JSON has no usable end.sum_received ({e.__class__.__name__}: {e})") from e


def iperf_error(doc):
    """iperf3's own error message in a -J run, or ''."""
    try:
        return str(json.loads(doc).get("error", ""))
    except ValueError:
        return ""


_PING_TIME = re.compile(r"time[=<]([0-9.]+) ?ms")


def ping_rtts(text):
    """Round trips (ms) of the replies in ping's output (busybox's or iputils')."""
    return [float(t) for t in _PING_TIME.findall(text)]


def median(values):
    v = sorted(values)
    if not v:
        raise MeasureError("no values")
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def percentile(values, p):
    """The nearest-rank p-th percentile (0 < p <= 100)."""
    v = sorted(values)
    if not v:
        raise MeasureError("no values")
    rank = max(1, -(-len(v) * p // 100))  # ceil(len * p / 100)
    return v[int(rank) - 1]


_TRACE_EVENT = re.compile(r"\s(\d+\.\d+):\s+([a-z_]+):\s?(.*)$")
_EXEC_FILENAME = re.compile(r"filename=(\S+)")


def first_entry_after_marker(trace, marker, exe=None):
    """Seconds to the first kvm_entry (a vCPU entering its guest: the first KVM_RUN doing its work)
    in a tracefs trace, counted from the trace marker `marker` (written just before the VMM is
    started) or, with exe, from the first sched_process_exec of a file named exe after that marker
    (the VMM's own exec, leaving out whatever ran before it, such as `ip netns exec`). Raises
    MeasureError when one of them is missing."""
    start = None
    marked = False
    for line in trace.splitlines():
        if line.startswith("#"):
            continue
        m = _TRACE_EVENT.search(line)
        if not m:
            continue
        ts, event, rest = float(m.group(1)), m.group(2), m.group(3)
        if not marked:
            if event == "tracing_mark_write" and rest.strip() == marker:
                marked = True
                start = None if exe else ts
        elif start is None:
            f = _EXEC_FILENAME.search(rest) if event == "sched_process_exec" else None
            if f and os.path.basename(f.group(1)) == exe:
                start = ts
        elif event == "kvm_entry":
            return ts - start
    if not marked:
        raise MeasureError(f"no trace marker {marker!r} in the trace")
    if start is None:
        raise MeasureError(f"no exec of {exe} after the trace marker")
    raise MeasureError("no kvm_entry after the start (the trace buffer full, or no vCPU ran)")


def guest_counters(text):
    """(virtio interrupts, eth0 frames received + sent) from the guest's counters CGI: three numbers,
    one per line (the HTTP body)."""
    nums = text.split()
    if len(nums) != 3 or not all(n.isdigit() for n in nums):
        raise MeasureError(f"the guest's counters are not three numbers: {text.strip()[:80]!r}")
    return int(nums[0]), int(nums[1]) + int(nums[2])


SNAPSHOT_KEYS = ("irqs", "frames", "exits", "notifies", "vmm_ticks", "helper_ticks", "softirq_ticks",
                 "host_ticks")


def parse_snapshot(line):
    """A snapshot line (`key=value ...`) -> {key: int}; every key of SNAPSHOT_KEYS must be there."""
    snap = {}
    for item in line.split():
        key, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise MeasureError(f"bad snapshot item {item!r}")
        snap[key] = int(value)
    missing = [k for k in SNAPSHOT_KEYS if k not in snap]
    if missing:
        raise MeasureError(f"snapshot lacks {', '.join(missing)}")
    return snap


def format_snapshot(snap):
    return " ".join(f"{k}={snap[k]}" for k in SNAPSHOT_KEYS)


def phase_figures(phase, before, after, iperf_json, clk_tck):
    """The figures of one iperf3 run, [(name, formatted value)], from the snapshots around it.
    Per-frame figures divide by the frames through the guest's eth0 in that time."""
    if phase not in PHASES:
        raise MeasureError(f"unknown phase {phase!r} ({', '.join(PHASES)})")
    frames = after["frames"] - before["frames"]
    if frames <= 0:
        raise MeasureError(f"no frames crossed the guest's eth0 during {phase}")

    def per_frame(key):
        return (after[key] - before[key]) / frames

    def ms_per_kframe(ticks):
        return ticks * 1000.0 / clk_tck / frames * 1000.0

    rate = iperf_received(iperf_json, phase)
    vmm = after["vmm_ticks"] - before["vmm_ticks"]
    helper = after["helper_ticks"] - before["helper_ticks"]
    softirq = after["softirq_ticks"] - before["softirq_ticks"]
    host = after["host_ticks"] - before["host_ticks"]
    return [
        (f"frames_{phase}", str(frames)),
        (f"{phase}_mbps" if phase.startswith("tcp") else f"{phase}_kpps", f"{rate:.3f}"),
        (f"irqs_per_pkt_{phase}", f"{per_frame('irqs'):.4f}"),
        (f"exits_per_pkt_{phase}", f"{per_frame('exits'):.4f}"),
        (f"notifies_per_pkt_{phase}", f"{per_frame('notifies'):.4f}"),
        (f"vmm_cpu_ms_per_kframe_{phase}", f"{ms_per_kframe(vmm):.4f}"),
        (f"helper_cpu_ms_per_kframe_{phase}", f"{ms_per_kframe(helper):.4f}"),
        (f"softirq_ms_per_kframe_{phase}", f"{ms_per_kframe(softirq):.4f}"),
        (f"host_cpu_ms_per_kframe_{phase}", f"{ms_per_kframe(host):.4f}"),
    ]


# --- readers: the files behind the parsers ------------------------------------------------------------

def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def vhost_workers(pid, proc="/proc"):
    """PIDs of the kernel's vhost worker threads for VMM pid (named vhost-PID)."""
    found = []
    for entry in os.listdir(proc):
        if entry.isdigit():
            try:
                if _read(f"{proc}/{entry}/comm").strip() == f"vhost-{pid}":
                    found.append(int(entry))
            except OSError:
                continue  # gone meanwhile
    return found


def vmm_cpu_ticks(pid, proc="/proc"):
    """CPU ticks of VMM pid's threads that are not vCPUs, plus its vhost workers': the VMM's own work."""
    total = 0
    tasks = [f"{proc}/{pid}/task/{t}" for t in os.listdir(f"{proc}/{pid}/task")]
    tasks += [f"{proc}/{w}" for w in vhost_workers(pid, proc)]
    for task in tasks:
        try:
            comm, ticks = task_stat(_read(f"{task}/stat"))
        except OSError:
            continue  # a thread that ended meanwhile
        if not is_vcpu_thread(comm):
            total += ticks
    return total


def process_ticks(pid, proc="/proc"):
    """CPU ticks of all of process pid's threads."""
    total = 0
    for t in os.listdir(f"{proc}/{pid}/task"):
        try:
            total += task_stat(_read(f"{proc}/{pid}/task/{t}/stat"))[1]
        except OSError:
            continue  # a thread that ended meanwhile
    return total


def snapshot(pid, kvm_dir, hist_path, guest, proc="/proc", helper=None):
    """All counters at one moment, as a dict with SNAPSHOT_KEYS. helper: the pid of a process that
    serves the VMM's NIC (a vhost-user backend), whose CPU counts as the VMM's too."""
    irqs, frames = guest_counters(guest)
    softirq, busy = host_ticks(_read(f"{proc}/stat"))
    tids = {int(t) for t in os.listdir(f"{proc}/{pid}/task")}
    helper_ticks = process_ticks(helper, proc) if helper is not None else 0
    return {
        "irqs": irqs,
        "frames": frames,
        "exits": int(_read(os.path.join(kvm_dir, "exits")).split()[0]),
        "notifies": notify_writes(_read(hist_path), tids),
        "vmm_ticks": vmm_cpu_ticks(pid, proc) + helper_ticks,
        "helper_ticks": helper_ticks,
        "softirq_ticks": softirq,
        "host_ticks": busy,
    }


def main(argv):
    usage = "usage: benchmeasure.py rss|snapshot|phase|ping|startup|guest-counters ARGS (see the module's docstring)"
    if not argv:
        sys.exit(usage)
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "rss" and len(args) == 2:
            print(rss_outside_guest(_read(f"/proc/{int(args[0])}/smaps"), int(args[1]) * 1024))
        elif cmd == "snapshot" and len(args) in (4, 5):
            helper = int(args[4]) if len(args) == 5 else None
            print(format_snapshot(snapshot(int(args[0]), args[1], args[2], args[3], helper=helper)))
        elif cmd == "phase" and len(args) == 4:
            phase, before, after, iperf = args
            clk_tck = os.sysconf("SC_CLK_TCK")
            for name, value in phase_figures(phase, parse_snapshot(before), parse_snapshot(after),
                                             _read(iperf), clk_tck):
                print(name, value)
        elif cmd == "ping" and len(args) == 1:
            rtts = ping_rtts(_read(args[0]))
            print(f"{median(rtts):.3f} {percentile(rtts, 99):.3f}")
        elif cmd == "startup" and len(args) in (2, 3):
            exe = args[2] if len(args) == 3 else None
            print(f"{first_entry_after_marker(_read(args[0]), args[1], exe) * 1000:.3f}")
        elif cmd == "guest-counters" and not args:
            print(*guest_counters(sys.stdin.read()))
        else:
            sys.exit(usage)
    except (MeasureError, OSError, ValueError) as e:
        sys.exit(f"benchmeasure {cmd}: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
