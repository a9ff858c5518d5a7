"""CPU time of one pre-training sample as a DataLoader worker computes it (``pil`` or ``device`` decode).

    python benchmarks/worker_cpu.py fmnist_demo [data.decode=pil] [--calls 2000] [--repeats 3]

Builds the preset's pre-training set (:func:`mimkit.data.build.pretrain_dataset`) and times
``dataset[i]`` with ``process_time`` (CPU seconds of this process, so other load on the box
matters less than for wall time) while ``get_worker_info`` reports a worker, as inside a
DataLoader worker: the per-sample seeding takes the worker's path. Prints the best and median
milliseconds per image over the repeats. A benchmark, not a test: the numbers depend on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a preset name or a config file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.decode=pil")
    parser.add_argument("--calls", type=int, default=2000, help="__getitem__ calls per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from mimkit.config import load_config
    from mimkit.data import datasets
    from mimkit.data.build import pretrain_dataset

    torch.set_num_threads(1)  # a worker runs one thread
    cfg = load_config(args.config, args.overrides)
    ds = pretrain_dataset(cfg)
    n = min(args.calls, len(ds))
    per_image = []
    # SeededDataset only asks whether it runs in a worker (get_worker_info() is not None)
    with mock.patch.object(datasets, "get_worker_info", return_value=object()):
        ds[0]  # warm caches (file pages, lazy imports)
        for _ in range(args.repeats):
            t0 = time.process_time()
            for i in range(n):
                ds[i]
            per_image.append((time.process_time() - t0) / n * 1e3)
    print(f"{args.config} data.decode={cfg.data.decode}: worker CPU per image {min(per_image):.3f} ms best, "
          f"{statistics.median(per_image):.3f} ms median ({args.repeats} x {n} calls)")


if __name__ == "__main__":
    main()
