"""Unit tests of scripts/lib/benchmeasure.py (run by scripts/test:
python3 -m unittest discover -s scripts/lib -p 'test_*.py')."""

import json
import os
import tempfile
import unittest

import benchmeasure as bm

SMAPS = """\
55d0c0a00000-55d0c0b00000 r-xp 00000000 08:01 123 /usr/bin/tapir
Size:               1024 kB
Rss:                 900 kB
Pss:                 900 kB
7f0000000000-7f0020000000 rw-p 00000000 00:00 0
Size:             524288 kB
Rss:              480000 kB
7f0030000000-7f0030100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 100 kB
"""

HIST = """\
# event histogram
#
# trigger info: hist:keys=common_pid,gpa:vals=hitcount:sort=hitcount:size=4096 if type == 2 [active]
#

{ common_pid:        812, gpa: 3489661008 } hitcount:        150
{ common_pid:        812, gpa: 3489661520 } hitcount:         20
{ common_pid:        812, gpa: 3489660992 } hitcount:          7
{ common_pid:        813, gpa: 4272947280 } hitcount:         11
{ common_pid:        999, gpa: 3489661008 } hitcount:       1000
{ common_pid:        813, gpa: 4273995856 } hitcount:          5

Totals:
    Hits: 1193
    Entries: 6
    Dropped: 0
"""

PROC_STAT = """\
cpu  10132153 290696 3084719 46828483 16683 0 25195 0 0 0
cpu0 1393280 32966 572056 13343292 6080 0 17875 0 0 0
intr 1462898 0 9
"""


def iperf_doc(bps=None, nbytes=None, seconds=None):
    s = {}
    if bps is not None:
        s["bits_per_second"] = bps
    if nbytes is not None:
        s["bytes"] = nbytes
    if seconds is not None:
        s["seconds"] = seconds
    return json.dumps({"start": {}, "end": {"sum_received": s}})


def snap(**kw):
    base = {k: 0 for k in bm.SNAPSHOT_KEYS}
    base.update(kw)
    return base


class Parsers(unittest.TestCase):
    def test_rss_leaves_out_mappings_as_large_as_guest_ram(self):
        self.assertEqual(bm.rss_outside_guest(SMAPS, 512 * 1024), 1000)
        # a smaller guest: the 1 MiB mapping counts as guest RAM too
        self.assertEqual(bm.rss_outside_guest(SMAPS, 1024), 0)

    def test_task_stat_counts_fields_after_the_last_parenthesis(self):
        stat = "4242 (CPU 0/KVM) S 1 2 3 4 5 6 7 8 9 10 300 45 0 0 20 0 1 0 99 100 200"
        self.assertEqual(bm.task_stat(stat), ("CPU 0/KVM", 345))
        tricky = "77 (a) b (c)) R 1 2 3 4 5 6 7 8 9 10 1 2 0 0"
        self.assertEqual(bm.task_stat(tricky), ("a) b (c)", 3))
        with self.assertRaises(bm.MeasureError):
            bm.task_stat("garbage")

    def test_vcpu_threads_of_both_vmms(self):
        for comm in ["tapir-vcpu0", "tapir-vcpu12", "CPU 0/KVM", "CPU 3/KVM"]:
            self.assertTrue(bm.is_vcpu_thread(comm), comm)
        for comm in ["tapir", "tapir-dev", "qemu-system-x86", "vhost-812", "IO mon_iothread", "CPU"]:
            self.assertFalse(bm.is_vcpu_thread(comm), comm)

    def test_host_ticks_from_the_cpu_line(self):
        # busy: user + nice + system + irq + softirq, less guest and guest_nice
        self.assertEqual(bm.host_ticks(PROC_STAT), (25195, 10132153 + 290696 + 3084719 + 0 + 25195 - 0 - 0))
        with_guest = "cpu  1000 10 200 5000 3 7 40 0 600 5\n"
        self.assertEqual(bm.host_ticks(with_guest), (40, 1000 + 10 + 200 + 7 + 40 - 600 - 5))
        # an old kernel's shorter line
        self.assertEqual(bm.host_ticks("cpu 1 2 3 4\n"), (0, 6))
        with self.assertRaises(bm.MeasureError):
            bm.host_ticks("cpu0 1 2 3\n")

    def test_notify_writes_counts_queue_notify_of_the_vmm_threads_only(self):
        # 3489661008 = 0xd0000050 (Tapir's first window), 3489661520 = 0xd0000250 (second window),
        # 3489660992 = 0xd0000040 (not QueueNotify), 4272947280 = 0xfeb00050 (QEMU microvm),
        # 4273995856 = 0xfec00050 (the IOAPIC's page: not a virtio window); pid 999 is someone else
        self.assertEqual(bm.notify_writes(HIST, {812, 813}), 150 + 20 + 11)
        self.assertEqual(bm.notify_writes(HIST, {813}), 11)
        self.assertEqual(bm.notify_writes(HIST, set()), 0)
        hex_keys = "{ common_pid: 5, gpa: 0xd0000050 } hitcount: 3\n"
        self.assertEqual(bm.notify_writes(hex_keys, {5}), 3)

    def test_iperf_received(self):
        self.assertAlmostEqual(bm.iperf_received(iperf_doc(bps=941.5e6), "tcp_in"), 941.5)
        # 64-byte datagrams: 6.4 MB in 2 s is 50 thousand per second
        self.assertAlmostEqual(bm.iperf_received(iperf_doc(nbytes=6_400_000, seconds=2.0), "udp_out"), 50.0)
        for bad in ["{}", "not json", iperf_doc(bps=1.0), iperf_doc(nbytes=10, seconds=0)]:
            with self.assertRaises(bm.MeasureError, msg=bad):
                bm.iperf_received(bad, "udp_in")
        self.assertEqual(bm.iperf_error('{"error": "unable to connect"}'), "unable to connect")
        self.assertEqual(bm.iperf_error("]"), "")

    def test_ping_rtts_from_busybox_and_iputils(self):
        text = """PING 10.77.0.2 (10.77.0.2): 56 data bytes
64 bytes from 10.77.0.2: seq=0 ttl=64 time=0.912 ms
64 bytes from 10.77.0.2: seq=1 ttl=64 time=1.204 ms
64 bytes from 10.77.0.2: icmp_seq=3 ttl=64 time=0.5 ms
64 bytes from 10.77.0.2: icmp_seq=4 ttl=64 time<1 ms
round-trip min/avg/max = 0.912/1.058/1.204 ms
"""
        self.assertEqual(bm.ping_rtts(text), [0.912, 1.204, 0.5, 1.0])
        self.assertEqual(bm.ping_rtts("no answer"), [])

    def test_median_and_percentile(self):
        self.assertEqual(bm.median([3, 1, 2]), 2)
        self.assertEqual(bm.median([4, 1, 2, 3]), 2.5)
        values = list(range(1, 101))
        self.assertEqual(bm.percentile(values, 99), 99)
        self.assertEqual(bm.percentile(values, 50), 50)
        self.assertEqual(bm.percentile([7], 99), 7)
        self.assertEqual(bm.percentile([1, 2, 3, 4, 100], 99), 100)
        for f in (bm.median, lambda v: bm.percentile(v, 99)):
            with self.assertRaises(bm.MeasureError):
                f([])

    def test_guest_counters(self):
        self.assertEqual(bm.guest_counters("12\n300\n400\n"), (12, 700))
        for bad in ["", "1\n2\n", "1\nx\n3\n", "<html>error</html>"]:
            with self.assertRaises(bm.MeasureError, msg=bad):
                bm.guest_counters(bad)

    def test_snapshot_lines_round_trip(self):
        s = snap(irqs=1, frames=2, exits=3, notifies=4, vmm_ticks=5, helper_ticks=1, softirq_ticks=6,
                 host_ticks=7)
        self.assertEqual(bm.parse_snapshot(bm.format_snapshot(s)), s)
        with self.assertRaises(bm.MeasureError):
            bm.parse_snapshot("irqs=1 frames=2")
        with self.assertRaises(bm.MeasureError):
            bm.parse_snapshot("irqs=x frames=2 exits=3 notifies=4 vmm_ticks=5 helper_ticks=0 softirq_ticks=6 "
                              "host_ticks=7")


TRACE = """\
# tracer: nop
#
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
     CPU 0/KVM-900     [001] d..1.    99.000000: kvm_entry: vcpu 0, rip 0x100000
            bash-1234    [000] .....   100.000100: tracing_mark_write: tapir-bench start 2
            bash-1234    [000] .....   100.000200: tracing_mark_write: tapir-bench start 1
              ip-1239    [000] .....   100.001000: sched_process_exec: filename=/usr/bin/ip pid=1239 old_pid=1239
 qemu-system-x86-1239    [000] .....   100.020000: sched_process_exec: filename=/usr/bin/qemu-system-x86_64 pid=1239 old_pid=1239
 qemu-system-x86-1240    [000] .....   100.010000: kvm_mmio: mmio write len 4 gpa 0xfeb00050 val 0x0
     CPU 0/KVM-1250    [001] d..1.   100.052300: kvm_entry: vcpu 0, rip 0xfff0
     CPU 0/KVM-1250    [001] d..1.   100.060000: kvm_entry: vcpu 0, rip 0x1000
"""


class Startup(unittest.TestCase):
    def test_first_entry_after_the_marker(self):
        self.assertAlmostEqual(bm.first_entry_after_marker(TRACE, "tapir-bench start 1"), 0.0521, places=6)
        # an entry before the marker (another VM) does not count; an earlier marker's run starts earlier
        self.assertAlmostEqual(bm.first_entry_after_marker(TRACE, "tapir-bench start 2"), 0.0522, places=6)

    def test_from_the_vmm_s_own_exec(self):
        self.assertAlmostEqual(bm.first_entry_after_marker(TRACE, "tapir-bench start 1", "qemu-system-x86_64"),
                               0.0323, places=6)
        self.assertAlmostEqual(bm.first_entry_after_marker(TRACE, "tapir-bench start 1", "ip"), 0.0513, places=6)
        with self.assertRaisesRegex(bm.MeasureError, "no exec of tapir"):
            bm.first_entry_after_marker(TRACE, "tapir-bench start 1", "tapir")

    def test_missing_marker_or_entry(self):
        with self.assertRaisesRegex(bm.MeasureError, "no trace marker"):
            bm.first_entry_after_marker(TRACE, "tapir-bench start 3")
        no_entry = "\n".join(line for line in TRACE.splitlines() if "100.05" not in line and "100.06" not in line)
        with self.assertRaisesRegex(bm.MeasureError, "no kvm_entry"):
            bm.first_entry_after_marker(no_entry, "tapir-bench start 1")


class PhaseFigures(unittest.TestCase):
    def test_per_frame_figures(self):
        before = snap(irqs=100, frames=1000, exits=50, notifies=10, vmm_ticks=200, helper_ticks=100,
                      softirq_ticks=1000, host_ticks=5000)
        after = snap(irqs=600, frames=11000, exits=2050, notifies=510, vmm_ticks=250, helper_ticks=120,
                     softirq_ticks=1030, host_ticks=5120)
        figures = dict(bm.phase_figures("udp_in", before, after, iperf_doc(nbytes=6_400_000, seconds=2), 100))
        self.assertEqual(figures["frames_udp_in"], "10000")
        self.assertEqual(figures["udp_in_kpps"], "50.000")
        self.assertEqual(figures["irqs_per_pkt_udp_in"], "0.0500")
        self.assertEqual(figures["exits_per_pkt_udp_in"], "0.2000")
        self.assertEqual(figures["notifies_per_pkt_udp_in"], "0.0500")
        # 50 ticks of 10 ms over 10 000 frames: 50 ms per 1000 frames
        self.assertEqual(figures["vmm_cpu_ms_per_kframe_udp_in"], "50.0000")
        self.assertEqual(figures["helper_cpu_ms_per_kframe_udp_in"], "20.0000")
        self.assertEqual(figures["softirq_ms_per_kframe_udp_in"], "30.0000")
        self.assertEqual(figures["host_cpu_ms_per_kframe_udp_in"], "120.0000")

    def test_tcp_reports_mbit(self):
        figures = dict(bm.phase_figures("tcp_out", snap(), snap(frames=10), iperf_doc(bps=2e9), 100))
        self.assertEqual(figures["tcp_out_mbps"], "2000.000")
        self.assertNotIn("tcp_out_kpps", figures)

    def test_no_frames_or_unknown_phase_is_an_error(self):
        with self.assertRaisesRegex(bm.MeasureError, "no frames"):
            bm.phase_figures("tcp_in", snap(frames=5), snap(frames=5), iperf_doc(bps=1), 100)
        with self.assertRaisesRegex(bm.MeasureError, "unknown phase"):
            bm.phase_figures("sctp", snap(), snap(frames=5), iperf_doc(bps=1), 100)


class Readers(unittest.TestCase):
    """The readers on a fake /proc: a VMM with a vCPU thread, a device thread, and a vhost worker."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.proc = self.dir.name

        def write(path, text):
            full = os.path.join(self.proc, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as f:
                f.write(text)

        def stat(pid, comm, utime, stime):
            return f"{pid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 1 1 1\n"

        write("812/comm", "qemu-system-x86\n")
        write("812/task/812/stat", stat(812, "qemu-system-x86", 10, 5))
        write("812/task/813/stat", stat(813, "CPU 0/KVM", 1000, 900))
        write("812/task/814/stat", stat(814, "IO iothread", 1, 2))
        write("900/comm", "vhost-812\n")
        write("900/stat", stat(900, "vhost-812", 0, 40))
        write("901/comm", "vhost-555\n")
        write("901/stat", stat(901, "vhost-555", 0, 99))
        write("stat", PROC_STAT)
        write("kvm/exits", "4242\n")
        write("hist", HIST.replace("812", "813", 1))
        write("not-a-pid/comm", "x\n")
        write("700/task/700/stat", stat(700, "tapir", 3, 4))
        write("700/task/701/stat", stat(701, "tapir-vu-p0", 30, 70))

    def tearDown(self):
        self.dir.cleanup()

    def test_vmm_cpu_leaves_out_vcpus_and_adds_its_own_vhost_worker(self):
        self.assertEqual(bm.vhost_workers(812, self.proc), [900])
        self.assertEqual(bm.vmm_cpu_ticks(812, self.proc), 15 + 3 + 40)

    def test_snapshot(self):
        s = bm.snapshot(812, os.path.join(self.proc, "kvm"), os.path.join(self.proc, "hist"), "1\n2\n3\n",
                        self.proc)
        # the hist's first line now belongs to 813 (a thread of 812): 150; 812's own lines: 20 + 7(not
        # QueueNotify); 813's QEMU window: 11
        self.assertEqual(s, {"irqs": 1, "frames": 5, "exits": 4242, "notifies": 150 + 20 + 11,
                             "vmm_ticks": 58, "helper_ticks": 0, "softirq_ticks": 25195,
                             "host_ticks": 10132153 + 290696 + 3084719 + 25195})

    def test_a_helper_process_counts_whole_and_into_the_vmm(self):
        s = bm.snapshot(812, os.path.join(self.proc, "kvm"), os.path.join(self.proc, "hist"), "1\n2\n3\n",
                        self.proc, helper=700)
        self.assertEqual((s["helper_ticks"], s["vmm_ticks"]), (107, 58 + 107))


if __name__ == "__main__":
    unittest.main()
