#!/usr/bin/env python3
"""What ran on the cores while checks were slow.

Reads a latency log of `bench_access --latency-log DIR` (one row per answered check: scheduled
send time in Unix seconds, latency in µs) and a scheduler recording of the same minutes, and
prints the clusters of slow checks with the CPU time each process took inside each cluster.

Recording (root, while the latency phases run):

    perf record -k mono -e sched:sched_switch -a -o sched.data -- sleep 23
    perf script -i sched.data -F comm,pid,tid,cpu,time,event,trace > sched.txt
    scripts/latency-stalls.py DIR/latency-warm-<start>.csv sched.txt

perf stamps events with CLOCK_MONOTONIC (`-k mono`); the log has Unix time. This script maps
one onto the other with the offset between the two clocks read when it runs, so run it on the
same machine, without a reboot in between (the offset moves only with clock adjustments).
"""

import argparse
import bisect
import collections
import re
import signal
import time

SWITCH = re.compile(
    r"^\s*(?P<comm>.+?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<t>[\d.]+):"
    r"\s+sched:sched_switch:"
)


def read_checks(path, offset):
    """(monotonic send time, latency in seconds) per answered check, in send order."""
    checks = []
    with open(path) as f:
        next(f)
        for line in f:
            sent, us = line.strip().split(",")
            checks.append((float(sent) - offset, int(us) / 1e6))
    return checks


def read_runs(path):
    """The intervals each process ran on some core, (start, end, pid) sorted by start, and a
    name per pid."""
    runs, names, current = [], {}, {}
    with open(path) as f:
        for line in f:
            m = SWITCH.match(line)
            if not m:
                continue
            cpu, t, pid = m["cpu"], float(m["t"]), int(m["pid"])
            # A process is named by its main thread when that thread shows up.
            if m["tid"] == m["pid"] or pid not in names:
                names[pid] = m["comm"]
            if cpu in current:
                runs.append((current[cpu], t, pid))
            current[cpu] = t
    runs.sort()
    return runs, names


def clusters(checks, slow, gap):
    """Groups of slow checks whose send times are at most `gap` apart."""
    groups = []
    for sent, lat in checks:
        if lat < slow:
            continue
        if groups and sent - groups[-1][-1][0] <= gap:
            groups[-1].append((sent, lat))
        else:
            groups.append([(sent, lat)])
    return groups


def cpu_by_process(runs, starts, a, b):
    """CPU seconds per pid within [a, b]."""
    used = collections.Counter()
    # Runs are sorted by start; one that began more than 10 s before the window (an idle core's
    # swapper, at most) is not counted.
    for s, e, pid in runs[max(0, bisect.bisect_left(starts, a - 10.0)):]:
        if s > b:
            break
        if e > a:
            used[pid] += min(e, b) - max(s, a)
    return used


def main():
    # Piped into `head`, stop quietly.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("latency_csv")
    p.add_argument("perf_script")
    p.add_argument("--slow-ms", type=float, default=3.0, help="a slow check (default 3 ms)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="sends apart within one cluster")
    p.add_argument("--top", type=int, default=6, help="processes shown per cluster")
    args = p.parse_args()

    offset = time.time() - time.monotonic()
    checks = read_checks(args.latency_csv, offset)
    runs, names = read_runs(args.perf_script)
    starts = [r[0] for r in runs]
    if not checks or not runs:
        raise SystemExit("no checks or no sched_switch events read")
    if checks[0][0] > runs[-1][1] or checks[-1][0] < runs[0][0]:
        raise SystemExit("the recording does not cover the checks (another boot, or other minutes?)")

    lat = sorted(l for _, l in checks)
    print(f"{len(checks)} checks, p50 {lat[len(lat) // 2] * 1e3:.2f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms")
    outside = 0
    for group in clusters(checks, args.slow_ms / 1e3, args.gap_ms / 1e3):
        a = group[0][0] - 0.010
        b = max(s + l for s, l in group)
        if a < runs[0][0] or b > runs[-1][1]:
            outside += 1
            continue
        used = cpu_by_process(runs, starts, a, b)
        top = ", ".join(
            f"{'idle' if pid == 0 else names.get(pid, '?')}({pid}) {sec * 1e3:.1f}"
            for pid, sec in used.most_common(args.top)
        )
        print(f"{a:.3f}–{b:.3f} s: {len(group)} slow, max {max(l for _, l in group) * 1e3:.1f} ms"
              f" | CPU ms: {top}")
    if outside:
        print(f"{outside} cluster(s) outside the recording, not shown")


if __name__ == "__main__":
    main()
