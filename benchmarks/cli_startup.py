"""Wall time of ``mimkit --help`` (median of a few runs), next to a bare interpreter start.

    python benchmarks/cli_startup.py [--runs 7]

A benchmark, not a test: the numbers depend on the machine and its load. ``mimkit --help``
must not import torch (that is what tests/test_cli.py checks); this shows what it costs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_seconds(cmd: list[str], runs: int) -> tuple[float, float]:
    """(median, min) wall seconds of ``cmd`` over ``runs`` runs, after one untimed warm-up."""
    subprocess.run(cmd, check=True, capture_output=True)  # warm the file cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    for name, cmd in (("python -c pass", [sys.executable, "-c", "pass"]),
                      ("mimkit --help", [sys.executable, "-m", "mimkit", "--help"]),
                      ("mimkit --version", [sys.executable, "-m", "mimkit", "--version"])):
        med, best = median_seconds(cmd, args.runs)
        print(f"{name:<18} median {med:.3f} s  (min {best:.3f} s, {args.runs} runs)")


if __name__ == "__main__":
    main()
