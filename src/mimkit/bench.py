"""``mimkit bench``: time pre-training steps of mimkit beside transformers' and lightly's MAE.

One *step* is what the trainer does per batch: forward (masking from the given noise, encoder,
decoder, norm-pix loss), backward, AdamW step (the trainer's: betas 0.9/0.95, weight decay 0.05
except 1-D parameters and biases, fused kernels on CUDA and CPU), ``zero_grad``. Data loading is not
timed: every implementation gets the same pre-made batch and masking noise, already on the
device.

Every implementation starts from the same weights: mimkit builds the model with a fixed seed
and the others receive copies (:func:`mimkit.interop.hf.to_hf_model`,
:meth:`mimkit.interop.lightly.LightlyMAE.from_mimkit`), so their first losses agree; the table
shows them. Each implementation runs in a fresh subprocess, so peak-memory readings and
allocator caches do not mix.

* **Peak memory.** CUDA: ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps
  (absolute: weights + gradients + optimizer state + activations). CPU: the high-water mark of
  the resident set (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``
  after set-up and ``malloc_trim``) minus the resident set after set-up — what the steps add on
  top of weights and inputs: gradients, optimizer state, activations, allocator slack.
  Because allocator readings are noisy, the table also gives **saved activations**: the bytes of
  the distinct tensors autograd keeps for backward (:class:`SavedTensorMeter`), which are exact.
* **FLOPs** are counted by :class:`torch.utils.flop_counter.FlopCounterMode` over one eager
  forward + backward of each implementation (matrix products, convolutions, attention;
  element-wise work is not counted). Equal counts show that the implementations do the same
  work. Achieved FLOP/s = counted FLOPs / median step time; on a GPU also as a fraction of
  the chip's dense bf16 peak (:data:`PEAK_TFLOPS`, or ``--peak-tflops``).

torch is imported inside the functions so that ``mimkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

IMPLEMENTATIONS = ("mimkit", "hf", "lightly")
# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets), matched against the GPU name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
               "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}
_RESULT_TAG = "MIMKIT_BENCH_RESULT "


@dataclass
class BenchSpec:
    """What to time: one architecture, method, batch, device and precision."""

    arch: str = "vit_base_patch16"
    img_size: int = 224
    in_chans: int = 3
    patch_size: int | None = None
    method: str = "mae"
    overrides: list[str] = field(default_factory=list)  # further key=value config overrides
    batch_size: int = 8
    device: str = "cpu"  # cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False
    warmup: int = 2
    iters: int = 5
    threads: int | None = None  # CPU threads (torch.set_num_threads); None: every core
    seed: int = 0
    profile: int = 0  # > 0: after timing, this many steps under torch.profiler (phase breakdown)

    def config_overrides(self) -> list[str]:
        """``key=value`` overrides that turn the spec into a mimkit :class:`~mimkit.config.Config`."""
        out = [f"method={self.method}", f"model.arch={self.arch}", f"model.img_size={self.img_size}",
               f"model.in_chans={self.in_chans}", f"train.batch_size={self.batch_size}"]
        if self.patch_size is not None:
            out.append(f"model.patch_size={self.patch_size}")
        return out + list(self.overrides)


# --------------------------------------------------------------------------------------------
# The implementations: a module to optimise and ``loss = call(module, imgs, noise)``
# --------------------------------------------------------------------------------------------


@dataclass
class Built:
    """One implementation, ready to train. ``call`` also accepts the compiled ``module``."""

    module: Any  # nn.Module
    call: Callable[[Any, Any, Any], Any]  # (module, imgs, noise) -> scalar loss
    after_step: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)


def _mimkit_model(spec: BenchSpec):
    import torch

    from mimkit.config import load_config
    from mimkit.models import model_from_config

    cfg = load_config(None, spec.config_overrides())
    torch.manual_seed(spec.seed)
    return cfg, model_from_config(cfg)


def build_mimkit(spec: BenchSpec) -> Built:
    """The objective the trainer would build for ``spec.method`` (new methods work unchanged)."""
    from mimkit.objectives import build_objective

    cfg, model = _mimkit_model(spec)
    objective = build_objective(cfg, model)
    return Built(
        objective,
        lambda m, imgs, noise: m(imgs, noise, 0.0).loss,
        lambda: objective.after_step(0.0),  # e.g. RC-MAE's EMA update is part of a step
        {"module": f"{type(objective).__module__}.{type(objective).__name__}"},
    )


def build_hf(spec: BenchSpec) -> Built:
    """``transformers.ViTMAEForPreTraining`` with mimkit's architecture and weights."""
    import transformers

    from mimkit.interop.hf import to_hf_model

    _, model = _mimkit_model(spec)
    # A freshly built transformers 5.x ViTMAE has all-zero position tables (only
    # from_pretrained fills them); to_hf_model copies ours, so the weights are identical.
    hf = to_hf_model(model).train()
    return Built(
        hf,
        lambda m, imgs, noise: m(pixel_values=imgs, noise=noise).loss,
        info={"module": "transformers.ViTMAEForPreTraining", "version": transformers.__version__,
              "attn_implementation": getattr(hf.config, "_attn_implementation", None)},
    )


def build_lightly(spec: BenchSpec) -> Built:
    """lightly's MAE modules with mimkit's architecture and weights."""
    import lightly

    from mimkit.interop.lightly import LightlyMAE

    _, model = _mimkit_model(spec)
    return Built(
        LightlyMAE.from_mimkit(model).train(),
        lambda m, imgs, noise: m(imgs, noise)["loss"],
        info={"module": "lightly MaskedVisionTransformerTIMM + MaskedVisionTransformerDecoderTIMM",
              "version": lightly.__version__},
    )


BUILDERS: dict[str, Callable[[BenchSpec], Built]] = {
    "mimkit": build_mimkit, "hf": build_hf, "lightly": build_lightly,
}


def skip_reason(impl: str, spec: BenchSpec) -> str | None:
    """Why ``impl`` cannot run ``spec`` (checked before spawning its process), or None."""
    if impl == "mimkit":
        return None
    if spec.method != "mae":
        return f"{impl} implements plain MAE only (method={spec.method})"
    package = {"hf": "transformers", "lightly": "lightly"}[impl]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install {package})"
    return None


# --------------------------------------------------------------------------------------------
# Measuring one implementation (inside its own process)
# --------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (less sensitive to a busy machine)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so the resident set is live memory only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reading keeps some allocator slack
        pass


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def flop_counter():
    """A FlopCounterMode that also counts CPU SDPA (missing from torch's registry)."""
    import torch
    from torch.utils import flop_counter as fc

    aten, extra = torch.ops.aten, {}
    same_as = {"_scaled_dot_product_flash_attention_for_cpu": aten._scaled_dot_product_flash_attention,
               "_scaled_dot_product_flash_attention_for_cpu_backward":
                   aten._scaled_dot_product_flash_attention_backward}
    for name, known in same_as.items():
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry and known in fc.flop_registry:
            formula = fc.flop_registry[known]  # same leading (q, k, v) / (grad, q, k, v) arguments

            def counted(*args, _formula=formula, **kwargs):
                return _formula(*args, **kwargs)

            counted._get_raw = True  # already takes tensors, not shapes
            extra[op] = counted
    return fc.FlopCounterMode(display=False, custom_mapping=extra)


class SavedTensorMeter:
    """Bytes of the distinct storages autograd keeps for backward (activation memory).

    Parameters, buffers and inputs are not counted. Allocator-independent, so it compares
    implementations exactly where resident-set readings are noisy. Use as a context manager
    around a forward pass.
    """

    def __init__(self, exclude) -> None:
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._sizes: dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        # saved tensors stay alive until backward, so their storages cannot be reused meanwhile
        if storage.data_ptr() not in self._skip:
            self._sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())


def gpu_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a GPU from its name (longest matching key), or None if unknown."""
    hits = [k for k in PEAK_TFLOPS if k in name]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def _patch_size(spec: BenchSpec) -> int:
    from mimkit.models.mae import ARCHS

    return spec.patch_size or ARCHS[spec.arch]["patch_size"]


def run_worker(spec: BenchSpec, impl: str) -> dict[str, Any]:
    """Build ``impl`` for ``spec``, time it, and return its result row (in this process)."""
    import torch
    from timm.optim import param_groups_weight_decay

    from mimkit.engine.precision import adamw_kernel

    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    threads = spec.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)

    t0 = time.perf_counter()
    built = BUILDERS[impl](spec)
    module = built.module.to(device).train()
    # Identical inputs in every process: drawn on the CPU from a fixed seed, then moved.
    g = torch.Generator().manual_seed(spec.seed + 1)
    num_patches = (spec.img_size // _patch_size(spec)) ** 2
    imgs = torch.randn(spec.batch_size, spec.in_chans, spec.img_size, spec.img_size, generator=g).to(device)
    noise = torch.rand(spec.batch_size, num_patches, generator=g).to(device)
    optimizer = torch.optim.AdamW(  # the trainer's optimizer, for every implementation
        param_groups_weight_decay(module, 0.05), lr=1e-4, betas=(0.9, 0.95), **adamw_kernel(device)
    )
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if spec.dtype == "bf16" else nullcontext()
    runner = torch.compile(module) if spec.compile else module
    setup_s = time.perf_counter() - t0

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(ranges: bool = False) -> torch.Tensor:
        phase = torch.profiler.record_function if ranges else (lambda name: nullcontext())
        with phase("forward"), autocast:
            loss = built.call(runner, imgs, noise)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            built.after_step()
        return loss.detach()

    # FLOPs and saved activations of one eager forward + backward (untimed; gradients dropped).
    meter = SavedTensorMeter([*module.parameters(), *module.buffers(), imgs, noise])
    with flop_counter() as counter:
        with autocast, meter:
            loss = built.call(module, imgs, noise)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops, first_loss = counter.get_total_flops(), float(loss.detach())
    del loss
    sync()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem_base = torch.cuda.memory_allocated(device)
    _release_free_memory()  # else the FLOP pass's freed gradients hide in the baseline
    rss_base = _proc_status_kib("VmRSS")
    peak_reset = _reset_peak_rss()

    t_warm = time.perf_counter()
    for _ in range(spec.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t_warm

    losses = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(spec.iters)]
        t_start = time.perf_counter()
        for start, end in events:
            start.record()
            losses.append(step())
            end.record()
        sync()
        total_s = time.perf_counter() - t_start
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        cpu_start = _cpu_seconds()
        t_start = time.perf_counter()
        for _ in range(spec.iters):
            t = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t)
        total_s = time.perf_counter() - t_start
        cpu_s = _cpu_seconds() - cpu_start

    row: dict[str, Any] = {"impl": impl, **built.info, "trainable_params": trainable}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row.update(peak_mem_mib=peak / 2**20, peak_mem_delta_mib=(peak - mem_base) / 2**20,
                   mem_method="torch.cuda.max_memory_allocated", device_name=torch.cuda.get_device_name(device))
    else:
        hwm = _proc_status_kib("VmHWM")
        known = hwm is not None and rss_base is not None
        row.update(peak_mem_mib=(hwm - rss_base) / 1024 if known else None,
                   peak_rss_mib=hwm / 1024 if hwm is not None else None,
                   mem_method="VmHWM - VmRSS after set-up" + ("" if peak_reset else " (VmHWM could not be reset)"),
                   cpu_s_per_step=cpu_s / spec.iters,
                   device_name=platform.processor() or platform.machine())
    if spec.profile:
        row["profile"] = profile_steps(module, lambda: step(ranges=True), sync, device, spec.profile)
    median = statistics.median(times)
    row.update(
        ms_per_step=median * 1e3, ms_per_step_mean=total_s / spec.iters * 1e3, ms_per_step_min=min(times) * 1e3,
        images_per_s=spec.batch_size / median, step_times_ms=[t * 1e3 for t in times],
        flops_per_step=flops, achieved_tflops=flops / median / 1e12, first_loss=first_loss,
        saved_activations_mib=meter.bytes / 2**20,
        last_loss=float(losses[-1]), setup_s=setup_s, warmup_s=warmup_s, threads=threads,
    )
    return row


# --------------------------------------------------------------------------------------------
# Orchestration: one subprocess per implementation and round
# --------------------------------------------------------------------------------------------


def _phase_modules(module: Any) -> dict[str, tuple[Any, Any]]:
    """(first, last) submodule of each forward phase: mimkit's MAE (inside any objective) or
    transformers' ViTMAE. The encoder includes the patch embedding and masking gather."""
    model = getattr(module, "model", module)
    if hasattr(model, "decoder_pred"):  # mimkit MaskedAutoencoderViT
        return {"forward: encoder": (model.patch_embed, model.norm),
                "forward: decoder": (model.decoder_embed, model.decoder_pred)}
    if hasattr(model, "vit") and hasattr(model, "decoder"):  # transformers ViTMAEForPreTraining
        return {"forward: encoder": (model.vit, model.vit), "forward: decoder": (model.decoder, model.decoder)}
    return {}


def profile_steps(module: Any, step: Callable[[], Any], sync: Callable[[], None], device: Any,
                  steps: int) -> dict[str, Any]:
    """``steps`` optimizer steps under ``torch.profiler``: time per step in each phase (forward's
    encoder and decoder, the rest of forward = masking, targets and loss; backward; optimizer) and
    the top operators by self time. Device time on CUDA, CPU time otherwise."""
    from torch.profiler import ProfilerActivity, profile, record_function

    open_ranges: dict[str, Any] = {}
    handles = []
    for name, (first, last) in _phase_modules(module).items():
        def enter(*_, name=name):
            open_ranges[name] = record_function(name).__enter__()

        def leave(*_, name=name):
            open_ranges.pop(name).__exit__(None, None, None)

        handles += [first.register_forward_pre_hook(enter), last.register_forward_hook(leave)]
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync()
    finally:
        for h in handles:
            h.remove()

    def total(e) -> float:  # microseconds
        if cuda:
            return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0))
        return float(e.cpu_time_total)

    def self_time(e) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    events = {e.key: e for e in prof.key_averages()}
    ms = {k: total(events[k]) / steps / 1e3 for k in ("forward", "forward: encoder", "forward: decoder",
                                                         "backward", "optimizer") if k in events}
    if "forward" in ms:
        ms["forward: masking, targets, loss"] = ms["forward"] - ms.get("forward: encoder", 0.0) \
            - ms.get("forward: decoder", 0.0)
    ops = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")), key=self_time, reverse=True)
    gather = sum(self_time(e) for e in ops if any(w in e.key for w in ("gather", "scatter", "index")))
    return {"steps": steps, "clock": "device" if cuda else "cpu", "ms_per_step": ms,
            "gather_scatter_index_ms": gather / steps / 1e3,
            "top_ops": [{"op": e.key, "self_ms_per_step": self_time(e) / steps / 1e3} for e in ops[:12]]}


def format_profile(row: dict[str, Any]) -> str:
    """Markdown: one implementation's phase breakdown and top operators."""
    prof = row["profile"]
    ms = prof["ms_per_step"]
    step = ms.get("forward", 0.0) + ms.get("backward", 0.0) + ms.get("optimizer", 0.0)
    lines = [f"{row['impl']}: {prof['clock']} time per step, {prof['steps']} profiled steps", "",
             "| phase | ms / step | share |", "|---|---|---|"]
    for key in ("forward: encoder", "forward: decoder", "forward: masking, targets, loss", "backward",
                "optimizer"):
        if key in ms:
            lines.append(f"| {key} | {ms[key]:.2f} | {ms[key] / step:.1%} |")
    lines += [f"| (gather / scatter / index ops, all phases) | {prof['gather_scatter_index_ms']:.2f} "
              f"| {prof['gather_scatter_index_ms'] / step:.1%} |", "",
              "| operator | self ms / step |", "|---|---|"]
    lines += [f"| {o['op']} | {o['self_ms_per_step']:.2f} |" for o in prof["top_ops"]]
    return "\n".join(lines)


def _spawn(spec: BenchSpec, impl: str, timeout: float | None) -> dict[str, Any]:
    """Run :func:`run_worker` in a fresh interpreter; a failure becomes a row with ``error``."""
    cmd = [sys.executable, "-m", "mimkit.bench", "--worker", impl, json.dumps(asdict(spec))]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])  # works from a source checkout too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"impl": impl, "error": f"exit code {proc.returncode}: {tail}"}


def _in_process(spec: BenchSpec, impl: str) -> dict[str, Any]:
    try:
        return run_worker(spec, impl)
    except Exception as e:  # same contract as _spawn: a failure becomes a row with ``error``
        return {"impl": impl, "error": f"{type(e).__name__}: {e}"}


def variant_label(overrides: list[str]) -> str:
    """The row name of a mimkit variant: ``'mimkit decoder.predict_ratio=0.25'``."""
    return " ".join(["mimkit", *overrides])


def run_bench(spec: BenchSpec, impls: tuple[str, ...] = IMPLEMENTATIONS, rounds: int = 1,
              peak_tflops: float | None = None, timeout: float | None = None,
              log: Callable[[str], None] = print, in_process: bool = False,
              variants: list[list[str]] = ()) -> dict[str, Any]:
    """Time every implementation in ``impls``; returns the JSON-ready report.

    With ``rounds > 1`` the implementations alternate (A, B, C, A, B, C, ...) and each one's
    fastest round (lowest median step time) is reported, which tames a noisy, shared machine.
    ``in_process`` runs them all in this process (quick, for tests; peak memory then mixes).
    ``variants``: mimkit again with further ``key=value`` overrides each (for example
    ``decoder.predict_ratio=0.25``), timed in the same rounds and reported against plain mimkit.
    """
    import timm
    import torch

    rows: dict[str, dict] = {}
    runs: list[dict] = []
    skipped: dict[str, str] = {}
    for impl in impls:
        reason = skip_reason(impl, spec)
        if reason:
            skipped[impl] = reason
            log(f"skipping {impl}: {reason}")
    # (row name, implementation, spec): the variants are mimkit with their overrides appended
    todo = [(i, i, spec) for i in impls if i not in skipped]
    todo += [(variant_label(v), "mimkit", replace(spec, overrides=[*spec.overrides, *v])) for v in variants]
    for r in range(rounds):
        for label, impl, run_spec in todo:
            log(f"round {r + 1}/{rounds}: {label} ...")
            row = _in_process(run_spec, impl) if in_process else _spawn(run_spec, impl, timeout)
            row.update(impl=label, round=r)
            runs.append(row)
            if "error" in row:
                log(f"  {label} failed: {row['error']}")
                skipped.setdefault(label, row["error"])
                continue
            log(f"  {row['ms_per_step']:.1f} ms/step, {row['images_per_s']:.1f} images/s")
            if label not in rows or row["ms_per_step"] < rows[label]["ms_per_step"]:
                rows[label] = row
    for label in rows:
        skipped.pop(label, None)
    labels = [i for i in impls if i in rows] + [variant_label(v) for v in variants if variant_label(v) in rows]

    peak = peak_tflops
    if peak is None and spec.device == "cuda" and rows:
        peak = gpu_peak_tflops(next(iter(rows.values())).get("device_name", ""))
    for row in rows.values():
        row["fraction_of_peak"] = row["achieved_tflops"] / peak if peak else None

    ratios, speedups = {}, {}
    if "mimkit" in rows:
        ours = rows["mimkit"]
        for impl, row in rows.items():
            if impl not in IMPLEMENTATIONS:  # a variant: its speed-up over plain mimkit
                cpu = row.get("cpu_s_per_step"), ours.get("cpu_s_per_step")
                speedups[impl] = {
                    "throughput": row["images_per_s"] / ours["images_per_s"],
                    "cpu_time": cpu[1] / cpu[0] if all(cpu) else None,
                    "flops": row["flops_per_step"] / ours["flops_per_step"],
                    "saved_activations": row["saved_activations_mib"] / ours["saved_activations_mib"],
                    "peak_mem": (row["peak_mem_mib"] / ours["peak_mem_mib"]
                                 if ours.get("peak_mem_mib") and row.get("peak_mem_mib") else None),
                }
            elif impl != "mimkit":
                ratios[impl] = {
                    "throughput": ours["images_per_s"] / row["images_per_s"],
                    "peak_mem": (ours["peak_mem_mib"] / row["peak_mem_mib"]
                                 if ours.get("peak_mem_mib") and row.get("peak_mem_mib") else None),
                }
    return {
        "spec": asdict(spec),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cuda": torch.version.cuda if spec.device == "cuda" else None,
            "peak_tflops": peak,
        },
        "results": [rows[label] for label in labels],
        "skipped": skipped,
        "ratios_mimkit_over": ratios,
        "variants_over_mimkit": speedups,
        "rounds": runs,
        "rounds_rule": "fastest round (lowest median step time) per implementation",
        "isolation": "in-process" if in_process else "one subprocess per implementation and round",
    }


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of ``report`` plus the mimkit/other ratios and skip reasons."""
    spec = report["spec"]
    cuda = spec["device"] == "cuda"
    mem_head = "peak mem MiB" if cuda else "peak RSS Δ MiB"
    head = ["impl", "ms/step", "images/s", mem_head, "saved act. MiB", "GFLOP/step", "TFLOP/s"]
    head.append("% of peak" if cuda else "CPU s/step")
    head += ["first loss", "mimkit ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = report["ratios_mimkit_over"]
    for row in report["results"]:
        mem = row.get("peak_mem_mib")
        cells = [row["impl"], f"{row['ms_per_step']:.1f}", f"{row['images_per_s']:.2f}",
                 f"{mem:.0f}" if mem is not None else "n/a", f"{row['saved_activations_mib']:.1f}",
                 f"{row['flops_per_step'] / 1e9:.1f}",
                 f"{row['achieved_tflops']:.3f}"]
        if cuda:
            frac = row.get("fraction_of_peak")
            cells.append(f"{100 * frac:.1f}" if frac is not None else "n/a")
        else:
            cells.append(f"{row['cpu_s_per_step']:.3f}")
        ratio = ratios.get(row["impl"], {}).get("throughput")
        cells += [f"{row['first_loss']:.5f}", f"{ratio:.2f}" if ratio else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for impl, r in ratios.items():
        mem = f", peak memory ×{r['peak_mem']:.2f}" if r["peak_mem"] else ""
        notes.append(f"mimkit/{impl}: throughput ×{r['throughput']:.2f}{mem}")
    for label, r in report.get("variants_over_mimkit", {}).items():
        extra = "".join(f", {name} ×{r[key]:.2f}" for key, name in
                        (("cpu_time", "CPU time speed-up"), ("peak_mem", "peak memory"))
                        if r.get(key) is not None)
        notes.append(f"{label} vs mimkit: throughput ×{r['throughput']:.2f}{extra}, FLOPs ×{r['flops']:.2f}, "
                     f"saved activations ×{r['saved_activations']:.2f}")
    notes += [f"skipped {impl}: {why}" for impl, why in report["skipped"].items()]
    return "\n".join(lines + ([""] + notes if notes else []))


def describe(spec: BenchSpec) -> str:
    """One line naming what was timed."""
    patch = f" patch {spec.patch_size}" if spec.patch_size else ""
    extra = f" {' '.join(spec.overrides)}" if spec.overrides else ""
    return (f"{spec.method} {spec.arch}{patch} {spec.img_size}px×{spec.in_chans}ch{extra}, batch "
            f"{spec.batch_size}, {spec.device} {spec.dtype}{' compiled' if spec.compile else ''}, "
            f"{spec.warmup} warm-up + {spec.iters} timed steps")


# --------------------------------------------------------------------------------------------
# Real JPEGs: decode + augmentation throughput per CPU core
# --------------------------------------------------------------------------------------------


def _pink_field(rng, shape: tuple[int, int], octaves: range, channels: int):
    """Sum of random fields at octave scales (bicubic-upsampled), equal weight per octave: an
    amplitude spectrum falling as 1/f, as in photographs; zero mean, unit variance."""
    import numpy as np
    from PIL import Image

    h, w = shape
    out = np.zeros((h, w, channels), np.float32)
    for octave in octaves:
        cells = rng.random((max(2, 2**octave * h // w), 2**octave, channels), dtype=np.float32)
        for c in range(channels):
            up = Image.fromarray((cells[..., c] * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
            out[..., c] += np.asarray(up, np.float32)
    return (out - out.mean()) / out.std()


def write_jpeg_folder(root: str | Path, count: int, size: tuple[int, int] = (500, 375),
                      quality: int = 90, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of about ImageNet's size and file size, with natural-looking content.

    Content: a 1/f luminance texture (octaves from 4 to 512 cells), a low-frequency colour
    cast and a few flat shapes for sharp edges. Random pixels would compress far worse than
    photos and flat images far better; this lands near ImageNet's ~110 KB average at 500×375,
    quality 90. Landscape and portrait alternate.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = size if i % 2 == 0 else size[::-1]
        img = 120 + 60 * _pink_field(rng, (h, w), range(2, 10), 1) + 40 * _pink_field(rng, (h, w), range(1, 4), 3)
        pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = [x0, y0, x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3))]
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        path = root / f"img_{i:05d}.jpg"
        pil.save(path, quality=quality)
        paths.append(path)
    return paths


def jpeg_pipelines(img_size: int, device: str | None = None, batch: int = 256,
                   ) -> dict[str, tuple[Callable[[list[Path]], Any], Callable[[list[Path]], Any]]]:
    """name -> (decode only, decode + RandomResizedCrop + flip + normalise) over a list of paths:
    the library's ``data.decode`` paths (:mod:`mimkit.data.decode`), file reading included.

    ``pil`` and ``torchvision`` are the per-image worker transforms; ``device`` (when ``device``
    is given) reads the files and draws the boxes as a worker does, then decodes and augments
    batches of ``batch`` on ``device`` (waiting for the device at the end).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from mimkit.data.datasets import EncodedFile, load_image
    from mimkit.data.decode import DeviceAugment, DeviceBatch, DeviceCrop, TensorCrop, decode_bytes
    from mimkit.data.transforms import pretrain_transform

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pil_aug = pretrain_transform(img_size, mean, std, 3)
    tv_aug = TensorCrop(img_size, mean, std, 3)

    def file(path: Path) -> EncodedFile:
        return EncodedFile(path.read_bytes(), str(path))

    def each(fn: Callable[[Path], Any]) -> Callable[[list[Path]], Any]:
        return lambda paths: [fn(p) for p in paths]

    out = {"pil": (each(lambda p: load_image(p, "RGB")), each(lambda p: pil_aug(load_image(p, "RGB")))),
           "torchvision": (each(lambda p: decode_bytes(file(p), 3)), each(lambda p: tv_aug(file(p))))}
    if device is not None:
        dev = torch.device(device)
        crop = DeviceCrop(3)
        aug = DeviceAugment(img_size, mean, std, 3, num_patches=(img_size // 16) ** 2, seed=0)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def chunks(paths: list[Path]):
            return (paths[i:i + batch] for i in range(0, len(paths), batch))

        def dev_decode(paths: list[Path]):
            for part in chunks(paths):
                datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in part]
                decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev)
            sync()

        def samples(part: list[Path]):  # what DeviceDataset hands the loader (index, epoch 0)
            out = [crop(file(p)) for p in part]
            for i, sample in enumerate(out):
                sample.index = i
            return out

        def dev_augment(paths: list[Path]):
            for part in chunks(paths):
                aug(DeviceBatch.of(samples(part)), dev)
            sync()

        out["device"] = (dev_decode, dev_augment)
    return out


def run_jpeg_bench(root: str | Path | None = None, count: int = 128, img_size: int = 224, rounds: int = 3,
                   threads: int = 1, seed: int = 0, log: Callable[[str], None] = print,
                   device: str | None = None) -> dict[str, Any]:
    """Images/s of each :func:`jpeg_pipelines` path over a folder of JPEGs, on ``threads`` threads
    (and, with ``device``, the ``data.decode=device`` path on that device).

    Writes ``count`` JPEGs to ``root`` (a temporary folder when None) unless it already holds
    JPEGs. Every (path, stage) pass is repeated ``rounds`` times, alternating, and the fastest
    is kept; images per CPU-second (user + system time of this process) is the per-core rate,
    which busy neighbours change less than the wall rate.
    """
    import tempfile

    import torch
    import torchvision
    from PIL import __version__ as pil_version

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(root) if root is not None else Path(tmp)
        paths = sorted(folder.glob("*.jpg"))
        if not paths:
            log(f"writing {count} JPEGs to {folder} ...")
            paths = write_jpeg_folder(folder, count, seed=seed)
        sizes = [p.stat().st_size for p in paths]
        for p in paths:  # the page cache holds them: decoding is timed, not the disk
            p.read_bytes()
        pipelines = jpeg_pipelines(img_size, device)
        if device is not None:  # first use of the device (context, nvJPEG handles) is not timed
            pipelines["device"][1](paths[:2])
        best: dict[tuple[str, str], dict] = {}
        for r in range(rounds):
            for name, stages in pipelines.items():
                for stage, fn in zip(("decode", "decode+augment"), stages, strict=True):
                    torch.manual_seed(seed + r)
                    cpu0, t0 = _cpu_seconds(), time.perf_counter()
                    fn(paths)
                    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
                    row = {"path": name, "stage": stage, "images_per_s": len(paths) / wall,
                           "images_per_cpu_s": len(paths) / cpu, "round": r}
                    log(f"round {r + 1}/{rounds}: {name} {stage}: {row['images_per_s']:.1f} images/s")
                    key = (name, stage)
                    if key not in best or row["images_per_s"] > best[key]["images_per_s"]:
                        best[key] = row
    return {
        "images": len(paths), "mean_kib": sum(sizes) / len(sizes) / 1024, "img_size": img_size,
        "threads": threads, "rounds": rounds, "rounds_rule": "fastest round per path and stage",
        "device": device,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "torchvision": torchvision.__version__, "pillow": pil_version,
                        "platform": platform.platform(), "cpu": platform.processor() or platform.machine()},
        "results": list(best.values()),
    }


def format_jpeg_table(report: dict[str, Any]) -> str:
    """A Markdown table of :func:`run_jpeg_bench`'s report, torchvision against PIL."""
    rows = {(r["path"], r["stage"]): r for r in report["results"]}
    lines = ["| path | stage | images/s | images per CPU-s | × PIL (CPU) |", "|---|---|---|---|---|"]
    for (path, stage), r in rows.items():
        pil = rows.get(("pil", stage))
        ratio = r["images_per_cpu_s"] / pil["images_per_cpu_s"] if pil else None
        lines.append(f"| {path} | {stage} | {r['images_per_s']:.1f} | {r['images_per_cpu_s']:.1f} | "
                     + (f"{ratio:.2f} |" if ratio else "— |"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------



# --------------------------------------------------------------------------------------------
# The trainer against the bench: the real loop (data, logging) vs one step on ready tensors
# --------------------------------------------------------------------------------------------

# Config keys that change what one step computes (everything else: data, schedule, bookkeeping).
_STEP_KEYS = ("method", "mask_ratio", "norm_pix_loss", "model.", "decoder.", "emae.", "teacher.", "mixedae.",
              "train.grad_checkpointing")


def spec_for_config(cfg: Any, warmup: int, iters: int) -> BenchSpec:
    """The bench step of ``cfg``'s model, method and batch on its device, precision and compile."""
    import torch

    from mimkit.config import Config, flat_dict, to_dict
    from mimkit.engine.precision import resolve_amp

    default = flat_dict(to_dict(Config()))
    own = ("method", "model.arch", "model.img_size", "model.in_chans", "model.patch_size")  # BenchSpec fields
    step_keys = {k: v for k, v in flat_dict(to_dict(cfg)).items()
                 if k.startswith(_STEP_KEYS) and k not in own and v != default.get(k)}
    device = "cuda" if cfg.train.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    t, m = cfg.train, cfg.model
    return BenchSpec(arch=m.arch, img_size=m.img_size, in_chans=m.in_chans, patch_size=m.patch_size,
                     method=cfg.method, batch_size=t.batch_size, device=device,
                     dtype="bf16" if resolve_amp(t.amp, torch.device(device)) == "bf16" else "fp32",
                     compile=t.compile, warmup=warmup, iters=iters,
                     overrides=[f"{k}={json.dumps(v)}" for k, v in step_keys.items()])


def run_trainer_bench(cfg: Any, warmup: int = 5, iters: int = 20, log: Callable[[str], None] = print) -> dict:
    """Time :func:`mimkit.engine.trainer.pretrain` itself on ``cfg`` (its data, workers, logging)
    for ``warmup`` + ``iters`` optimizer steps in a temporary folder, and the bench's step on
    tensors already in memory for the same model, method and batch (:func:`run_worker`).

    Each of the trainer's steps is logged (``train.log_every=1``); its time covers data and
    compute since the previous step. The first ``warmup`` steps (loader workers starting) and the
    final checkpoint and picture are left out. Returns both rates, their ratio and the share of
    the trainer's step spent waiting for data.
    """
    import copy
    import tempfile

    from mimkit.config import validate
    from mimkit.engine.logging import read_metrics
    from mimkit.engine.trainer import pretrain

    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.max_steps, t.log_every, t.checkpoint_every = warmup + iters, 1, warmup + iters
    t.knn_every, t.vis_every = 0, 0
    validate(cfg)
    spec = spec_for_config(cfg, warmup=2, iters=iters)
    log(f"bench step: {describe(spec)}")
    step_row = run_worker(spec, "mimkit")
    log(f"trainer: {warmup} + {iters} steps")
    with tempfile.TemporaryDirectory(prefix="mimkit-bench-trainer-") as tmp:
        run = pretrain(cfg, Path(tmp) / "run")
        rows = [r for r in read_metrics(run) if isinstance(r.get("images_per_s"), float)]
    eff_batch = t.batch_size * t.accum_iter
    timed = [r for r in rows if r["step"] > warmup]
    step_s = [eff_batch / r["images_per_s"] for r in timed]
    data_s = sum(r.get("data_time", 0.0) for r in timed)
    trainer_ips = eff_batch / statistics.median(step_s)
    return {
        "config": {"method": cfg.method, "arch": cfg.model.arch, "img_size": cfg.model.img_size,
                   "data": cfg.data.name, "num_workers": cfg.data.num_workers, "batch_size": eff_batch,
                   "loggers": list(t.loggers)},
        "warmup": warmup, "iters": len(timed),
        "trainer_images_per_s": trainer_ips,
        "trainer_images_per_s_mean": eff_batch * len(step_s) / sum(step_s),
        "trainer_data_share": data_s / sum(step_s),
        "bench_images_per_s": step_row["images_per_s"],
        "trainer_vs_bench": trainer_ips / step_row["images_per_s"],
        "bench": step_row,
    }


def format_trainer_table(report: dict[str, Any]) -> str:
    """Markdown: the trainer's rate against the bench step's."""
    c = report["config"]
    return "\n".join([
        "| what | images/s (median step) | vs bench |",
        "|---|---|---|",
        f"| bench: one step on tensors in memory | {report['bench_images_per_s']:.1f} | 1.00 |",
        f"| trainer: `{c['data']}`, {c['num_workers']} workers, loggers {c['loggers'] or 'none'} "
        f"| {report['trainer_images_per_s']:.1f} (mean {report['trainer_images_per_s_mean']:.1f}) "
        f"| {report['trainer_vs_bench']:.3f} |",
        "",
        f"{report['iters']} timed trainer steps after {report['warmup']} warm-up steps; "
        f"{report['trainer_data_share']:.1%} of the trainer's step time waited for data.",
    ])

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``mimkit bench`` options (also used by ``python -m mimkit.bench``)."""
    p.add_argument("overrides", nargs="*", help="further key=value config overrides (e.g. model.depth=6)")
    p.add_argument("--arch", default=None, help="a preset in mimkit.models.mae.ARCHS (default vit_base_patch16)")
    p.add_argument("--img-size", type=int, default=None, help="default 224")
    p.add_argument("--in-chans", type=int, default=None, help="default 3")
    p.add_argument("--patch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--method", default=None, help="mae | emae | rcmae | mixedae (only mae compares; default mae)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8, or the --config's")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default cpu, or the --config's")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="bf16: autocast (default fp32, or the --config's train.amp)")
    p.add_argument("--compile", action="store_true", help="torch.compile each implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation happens here)")
    p.add_argument("--iters", type=int, default=5, help="timed steps")
    p.add_argument("--rounds", type=int, default=1, help="alternate implementations this often; keep the best")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: all cores); on a shared machine use 1 and "
                        "compare 'CPU s/step', which busy neighbours barely change")
    p.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="also time mimkit with these overrides, against plain mimkit (repeatable; "
                        "e.g. --variant decoder.predict_ratio=0.25 --variant train.grad_checkpointing=true)")
    p.add_argument("--peak-tflops", type=float, default=None, help="chip peak for the %% column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="seconds per implementation run")
    p.add_argument("--json", default=None, help="also write the full report here")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps: encoder, decoder, loss, backward, optimizer")
    p.add_argument("--trainer", action="store_true",
                   help="time the real trainer loop (--config, its data and workers) against the bench step")
    p.add_argument("--config", default=None,
                   help="a preset or YAML file whose model, method and batch to time (key=value overrides "
                        "apply); --trainer: the run to time (default fmnist_tiny)")
    p.add_argument("--jpeg", action="store_true",
                   help="instead: time JPEG decoding + augmentation per core (PIL vs torchvision.io)")
    p.add_argument("--jpeg-dir", default=None, help="--jpeg: folder of .jpg files (default: write a temporary one)")
    p.add_argument("--jpeg-count", type=int, default=128, help="--jpeg: how many JPEGs to write")
    p.add_argument("--jpeg-device", default=None,
                   help="--jpeg: also time data.decode=device on this device (cuda; cpu works, for a check)")
    p.add_argument("--in-process", action="store_true",
                   help="no subprocesses (quick checks; peak-memory readings then mix)")


_MODEL_FLAGS = {"arch": "--arch", "img_size": "--img-size", "in_chans": "--in-chans",
                "patch_size": "--patch-size", "method": "--method"}


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    """The spec of ``mimkit bench``'s flags; with ``--config``, that config's model, method, batch,
    device and precision (what the flags set explicitly replaces the config's batch, device, dtype)."""
    from mimkit.config import ConfigError, load_config

    names = {f.name for f in fields(BenchSpec)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.config is None:
        return BenchSpec(**given)
    clash = [flag for key, flag in _MODEL_FLAGS.items() if key in given]
    if clash:
        raise ConfigError(f"bench: {', '.join(clash)} and --config both describe the model; drop "
                          f"{'it' if len(clash) == 1 else 'them'} and pass key=value overrides instead "
                          f"(e.g. model.img_size=64 method=emae)")
    base = spec_for_config(load_config(args.config, args.overrides), args.warmup, args.iters)
    keep = {k: v for k, v in given.items() if k not in ("overrides", "compile")}
    return replace(base, **keep, compile=base.compile or bool(args.compile))


def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed ``mimkit bench`` arguments and print the table."""
    from mimkit.config import load_config

    if args.jpeg:
        return main_jpeg(args)
    if args.trainer:
        return main_trainer(args)
    spec = spec_from_args(args)
    if spec.warmup < 1 and spec.compile:
        print("note: --compile with no warm-up step times the compilation", file=sys.stderr)
    if spec.iters < 1:
        raise ValueError("--iters must be at least 1")
    load_config(None, spec.config_overrides())  # fail early, naming a bad key
    for variant in args.variant:
        load_config(None, [*spec.config_overrides(), *variant])
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - progress goes to stderr
    report = run_bench(spec, tuple(args.impl), args.rounds, args.peak_tflops, args.timeout, log,
                       in_process=args.in_process, variants=args.variant)
    print(describe(spec))
    print(format_table(report))
    for row in report["results"]:
        if "profile" in row:
            print()
            print(format_profile(row))
    return _save_json(report, args.json)


def main_jpeg(args: argparse.Namespace) -> dict[str, Any]:
    """``mimkit bench --jpeg``: decode + augmentation rates, printed and optionally saved."""
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - progress goes to stderr
    report = run_jpeg_bench(args.jpeg_dir, args.jpeg_count, args.img_size, max(args.rounds, 1),
                            args.threads or 1, args.seed, log, device=args.jpeg_device)
    print(f"{report['images']} JPEGs (mean {report['mean_kib']:.0f} KiB) -> {report['img_size']} px crops, "
          f"{report['threads']} thread(s), fastest of {report['rounds']} rounds")
    print(format_jpeg_table(report))
    return _save_json(report, args.json)


def main_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """``mimkit bench --trainer``: the trainer loop against the bench step, printed and saved."""
    from mimkit.config import load_config

    cfg = load_config(args.config or "fmnist_tiny", args.overrides)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - progress goes to stderr
    report = run_trainer_bench(cfg, max(args.warmup, 1), args.iters, log)
    print(format_trainer_table(report))
    return _save_json(report, args.json)


def _save_json(report: dict[str, Any], path: str | None) -> dict[str, Any]:
    """Write ``report`` to ``path`` (if given) and return it."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return report


def _worker_main(impl: str, spec_json: str) -> None:
    row = run_worker(BenchSpec(**json.loads(spec_json)), impl)
    print(_RESULT_TAG + json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2], sys.argv[3])
    else:
        parser = argparse.ArgumentParser(prog="python -m mimkit.bench", description=__doc__)
        add_arguments(parser)
        main_from_args(parser.parse_args())
