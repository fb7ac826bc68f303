"""Wall time of `qlora plan` (the whole command, fresh process each run) on the published configs.

    python benchmarks/plan_time.py                 # 5 runs of each command: median, min, max
    N=3 python benchmarks/plan_time.py 70B         # only the commands whose label contains "70B"

The issue's target: Llama-3.1-70B at --memory 24GiB (all five configurations) in under 10 s on
2 CPU cores. Run it on idle cores (`uptime`): a second job on the same cores doubles every number.
BENCHMARKS.md "Planner time" has the figures.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "70B 24GiB (5 configurations)": ["--model", "docs/configs/llama-3.1-70b.json", "--memory", "24GiB"],
    "70B 48GiB --configs qlora-ckpt": ["--model", "docs/configs/llama-3.1-70b.json", "--memory", "48GiB",
                                       "--configs", "qlora-ckpt"],
    "8B 24GiB (5 configurations)": ["--model", "docs/configs/llama-3.1-8b.json", "--memory", "24GiB"],
}


def main() -> int:
    runs = int(os.environ.get("N", 5))
    qlora = shutil.which("qlora") or os.path.join(os.path.dirname(sys.executable), "qlora")
    only = sys.argv[1:]
    for label, args in COMMANDS.items():
        if only and not any(o in label for o in only):
            continue
        seconds = []
        for _ in range(runs):
            t0 = time.perf_counter()
            done = subprocess.run([qlora, "plan", *args], capture_output=True, text=True)
            seconds.append(time.perf_counter() - t0)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
        print(f"| `qlora plan {' '.join(args)}` | {statistics.median(seconds):.1f} s | {min(seconds):.1f}-"
              f"{max(seconds):.1f} s | {runs} |", flush=True)
        print(f"    {done.stdout.strip().splitlines()[-1][:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
