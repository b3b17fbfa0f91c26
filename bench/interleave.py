#!/usr/bin/env python3
"""Times commands against one another, run in turn (A B C A B C ...) rather than one after the
other, so that a machine that gets busier or quieter during the run moves every command's
figures alike. Each run is timed from spawn to exit, as hyperfine -N does.

Usage: interleave.py RUNS OUT.json NAME=COMMAND...
Writes {"results": [{"command": NAME, "times": [seconds...]}]} (hyperfine's layout) to OUT.json
and prints each command's median and spread.
"""

import json
import os
import shlex
import statistics
import sys
import time


def run(argv):
    start = time.perf_counter()
    # Nothing on stdin: `upstream exec` reads a pipe there to its end.
    pid = os.posix_spawnp(
        argv[0],
        argv,
        os.environ,
        file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
    )
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"interleave: `{shlex.join(argv)}` failed (status {status})")
    return elapsed


def main():
    runs = int(sys.argv[1])
    out = sys.argv[2]
    commands = []
    for spec in sys.argv[3:]:
        name, _, command = spec.partition("=")
        commands.append((name, shlex.split(command)))
    # Quiet stdout and stderr: the commands' own output is not what is measured.
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(1), os.dup(2)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    times = {name: [] for name, _ in commands}
    try:
        for i in range(runs + 5):
            # The first rounds warm caches and are not counted.
            for name, argv in commands if i % 2 else reversed(commands):
                t = run(argv)
                if i >= 5:
                    times[name].append(t)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
    with open(out, "w") as f:
        json.dump({"results": [{"command": n, "times": t} for n, t in times.items()]}, f)
    for name, t in times.items():
        ms = sorted(x * 1000 for x in t)
        print(
            f"  {name:12s} median {statistics.median(ms):7.2f} ms"
            f"  (p10 {ms[len(ms) // 10]:.2f}, p90 {ms[len(ms) * 9 // 10]:.2f}, {len(ms)} runs)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
