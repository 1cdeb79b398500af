"""Helpers shared by the benchmark scripts: machine description, timing, phase hooks.

Timing rules (docs/benchmarks.md): Python's cyclic GC is off inside timed regions (as ``timeit``
does); when several models are compared, their calls are interleaved round by round (the order
rotated every round) so that load from other processes falls on all of them alike, and the median
over rounds is reported.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time

import torch

import dcdit
from dcdit.utils import cpu_info

#: DC-DiT forward phases, in execution order, and the dcdit.flops components each one contains.
PHASES = {
    "encode": ("x_embedder", "t_embedder", "y_embedder", "encoder"),
    "router": ("router",),
    "plan+chunk": ("chunk",),
    "blocks": ("blocks",),
    "dechunk": ("dechunk",),
    "residual": ("residual_proj",),
    "decode": ("decoder", "final_layer"),
}
#: The dynamic machinery: what DC-DiT adds around the inner blocks besides its conv encoder / decoder.
DYNAMIC = ("router", "plan+chunk", "dechunk", "residual")


def machine_info(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    cpu = cpu_info()["model"]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "dcdit": getattr(dcdit, "__version__", "?"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def print_machine(info: dict) -> None:
    print(f"machine: {info['cpu']} | {info['logical_cores']} logical cores ({info['usable_cores']} usable) | "
          f"torch {info['torch']} | {info['torch_threads']} threads | device {info['device']} | {info['date']}")
    if info["load_average_at_start"]:
        la = info["load_average_at_start"]
        busy = " (!) other processes are using the CPU: times are inflated" if la[0] > 0.5 else ""
        print(f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}{busy}")


def in_execution(model, execution: str):
    """The same DC-DiT (shared parameters) running in another ``model.execution``: a shallow copy."""
    import copy

    other = copy.copy(model)
    other._modules = dict(model._modules)
    other.execution = execution
    return other


def make_sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def no_gc():
    """Collect garbage, then keep Python's cyclic GC off while timing (as ``timeit`` does): a gen-2
    collection landing inside one timed call otherwise adds ~0.1 s to it."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def timed(fn, repeats: int, warmup: int, sync) -> tuple[list[float], list]:
    """Run ``fn`` ``warmup`` times, then ``repeats`` timed times; return (seconds, outputs of the timed calls)."""
    for _ in range(warmup):
        fn()
    secs, outs = [], []
    with no_gc():
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            secs.append(time.perf_counter() - t0)
            outs.append(out)
    return secs, outs


def interleaved(fns: dict, repeats: int, warmup: int, sync=lambda: None) -> tuple[dict, dict]:
    """Time several callables round by round: every round calls each once, in an order rotated by one
    every round. Returns ({name: [seconds]}, {name: [outputs]})."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    secs = {n: [] for n in names}
    outs = {n: [] for n in names}
    with no_gc():
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                sync()
                t0 = time.perf_counter()
                out = fns[n]()
                sync()
                secs[n].append(time.perf_counter() - t0)
                outs[n].append(out)
    return secs, outs


class PhaseTimer:
    """Forward (pre-)hooks that timestamp the phase boundaries (:data:`PHASES`) of DCDiT forwards.

    Every call of the model appends one dict {phase: seconds} to ``runs``; ``sync`` makes the marks
    exact on a GPU."""

    def __init__(self, model, sync=lambda: None):
        self.sync = sync
        self.marks: list[tuple[str, float]] = []
        self.runs: list[dict[str, float]] = []
        self.handles = []

        def mark(name):
            def hook(*_args, **_kwargs):
                self.sync()
                self.marks.append((name, time.perf_counter()))
            return hook

        def end(*_args, **_kwargs):
            self.sync()
            self.marks.append(("end", time.perf_counter()))
            names = [n for n, _ in self.marks]
            times = [t for _, t in self.marks]
            self.runs.append({names[i]: times[i + 1] - times[i] for i in range(len(names) - 1)})
            self.marks = []

        pre = [(model, "encode"), (model.router, "router"), (model.dechunk, "dechunk"), (model.decoder, "decode")]
        if len(model.blocks):
            pre.append((model.blocks[0], "blocks"))
        for module, name in pre:
            self.handles.append(module.register_forward_pre_hook(mark(name)))
        self.handles.append(model.router.register_forward_hook(mark("plan+chunk")))
        self.handles.append(model.dechunk.register_forward_hook(mark("residual")))
        self.handles.append(model.register_forward_hook(end))

    def remove(self):
        for h in self.handles:
            h.remove()

    def median_seconds(self) -> dict[str, float]:
        return {name: median([r.get(name, 0.0) for r in self.runs]) for name in PHASES}


def phase_flops(components: dict[str, float]) -> dict[str, float]:
    """dcdit.flops components -> MACs per :data:`PHASES` entry."""
    out = {name: 0.0 for name in PHASES}
    for comp, macs in components.items():
        top = comp.split(".")[0]
        for name, members in PHASES.items():
            if top in members:
                out[name] += macs
                break
        else:
            raise KeyError(f"dcdit.flops component {comp!r} has no benchmark phase")
    return out


def mean_components(cfg, counts: list[int]) -> dict[str, float]:
    """Per-sample MACs per dcdit.flops component, averaged over samples with the given kept counts
    (each sample at its own count: the paper's convention). Without a forward pass's records the
    packed de-chunk is charged as the grid blur; :func:`record_components` charges what ran."""
    from dcdit.flops import dcdit_macs

    cache: dict[int, dict] = {}
    out: dict[str, float] = {}
    for m in counts:
        if m not in cache:
            cache[m] = dcdit_macs(cfg, m).components
        for k, v in cache[m].items():
            out[k] = out.get(k, 0.0) + v / len(counts)
    return out


def record_components(cfg, records: list) -> dict[str, float]:
    """Per-sample MACs per dcdit.flops component, averaged over every sample of the given forward
    passes' RoutingRecords, each charged as it ran (``dcdit.flops.record_macs``: its own kept count,
    the de-chunk form of its batch, DyDiT gates)."""
    from dcdit.flops import record_macs

    out: dict[str, float] = {}
    per_sample = [b for r in records for b in record_macs(cfg, r)]
    for b in per_sample:
        for k, v in b.components.items():
            out[k] = out.get(k, 0.0) + v / len(per_sample)
    return out
