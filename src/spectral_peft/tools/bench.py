"""`spectral-peft bench`: training-step time, adapter overhead, peak memory and inference time of the spectral
adapters against stock PEFT LoRA and FourierFT, measured side by side in one process.

Configurations are interleaved (A, B, C, A, B, C, ...) after warm-up, so machine noise hits all alike; each figure
is the median over the repetitions with its spread (min..max). Ratios are to stock LoRA measured in the same run.

Shapes: ``minilm`` (the offline all-MiniLM-L6-v2, query and value, batch 32 x 128), ``llama`` (a Llama-style
model with realistic widths, hidden 2048, intermediate 5632, 2 layers, random weights, every projection, batch
4 x 256) and ``linear`` (one square linear layer, widths x n_frequency sweep, 1024 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Optional

import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None

from .files import write_json, write_text
from .methods import BASE, REFERENCE
from .workloads import LABELS, LOCATION_PHASE, Workload, build_variant, method_of, workload

# ----------------------------------------------------------------------------------------------------------------
# timing


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def page_faults() -> Optional[int]:
    """This process's minor page faults so far (None where the OS does not count them): each is a page of memory
    the kernel hands out afresh, zeroed, on its first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


def interleaved(calls: dict, repeats: int, warmup: int, device, faults: Optional[dict] = None) -> dict:
    """Seconds per call of each entry of ``calls``, measured A, B, C, A, B, C, ... after ``warmup`` rounds; the
    page faults of each call go into ``faults`` (name -> list) if given."""
    times = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            _sync(device)
            faults_before, start = page_faults(), time.perf_counter()
            call()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
                if faults is not None and faults_before is not None:
                    faults.setdefault(name, []).append(page_faults() - faults_before)
    return times


def _summary(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired_ratio(times: list, reference: list) -> float:
    """Median over rounds of a time over the reference's time in the same round: an interleaved round runs every
    method within seconds, so a slow spell on a shared machine slows both sides of each ratio alike."""
    return statistics.median(a / b for a, b in zip(times, reference))


def _step_fn(model, work: Workload, device, memory: dict, name: str):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None  # the bare layer's base has none
    cuda = torch.device(device).type == "cuda"

    def step():
        if cuda:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        work.loss(model, work.batch).backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            memory.setdefault(name, []).append(torch.cuda.max_memory_allocated() - before)

    return step


def inference_fn(model, work: Workload):
    inputs = {k: v.detach() for k, v in work.batch.items() if k != "labels"}

    def infer():
        with torch.no_grad():
            model(**inputs)

    return infer


def measure(work: Workload, methods: list, n: int, rank: int, repeats: int, warmup: int, device,
            inference: bool = True) -> dict:
    """Step time, overhead over the base model, (CUDA) peak step memory and inference time of each method."""
    names = [BASE] + [m for m in methods if m != BASE]
    models = {name: build_variant(name, work, n, rank).train() for name in names}
    memory: dict = {}
    steps = {name: _step_fn(models[name], work, device, memory, name) for name in names}
    faults: dict = {}
    step_times = interleaved(steps, repeats, warmup, device, faults)
    if torch.device(device).type == "cpu":
        memory = {name: [_peak_step_growth_cpu(step)] for name, step in steps.items()}
    # shared frozen weights, counted once per model as a user with one model has them
    base_bytes = _tensor_bytes(work.frozen_parameters())
    result = {"methods": {}}
    base_step = statistics.median(step_times[BASE])
    for name in names:
        trainable = [(n_, p) for n_, p in models[name].named_parameters() if p.requires_grad]
        locations = sum(p.numel() for n_, p in trainable if "loca_locations" in n_)
        entry = {"step_s": _summary(step_times[name]), "overhead_s": statistics.median(step_times[name]) - base_step,
                 # the one parameter count (training.count_parameters): weights; LoCA's locations apart
                 "trainable": sum(p.numel() for _, p in trainable) - locations, "location_params": locations,
                 "page_faults_per_step": statistics.median(faults[name]) if name in faults else None}
        # peak = frozen weights + trainable parameters and their two AdamW moments + the step's peak growth
        # (activations kept for backward, gradients, temporaries)
        entry["peak_step_growth_bytes"] = max(memory[name])
        entry["peak_memory_bytes"] = (base_bytes + 3 * _tensor_bytes(p for _, p in trainable)
                                      + entry["peak_step_growth_bytes"])
        if REFERENCE in step_times:
            entry["step_paired_ratio"] = paired_ratio(step_times[name], step_times[REFERENCE])
        result["methods"][name] = entry
    if inference:
        for model in models.values():
            model.eval()
        unmerged = interleaved({k: inference_fn(m, work) for k, m in models.items()}, repeats, warmup, device)
        merged_calls = {}
        for name, model in models.items():
            if name != BASE and hasattr(model, "merge_adapter"):
                merged_calls[name] = inference_fn(model, work)
        # merging changes the shared base weights, so each method is merged, timed and unmerged in turn
        merged = {}
        for name, call in merged_calls.items():
            models[name].merge_adapter()
            try:
                merged.update(interleaved({name: call, BASE: inference_fn(models[BASE], work)}, repeats, warmup, device))
                result["methods"][name]["merged_base_inference_s"] = _summary(merged.pop(BASE))
            finally:
                models[name].unmerge_adapter()
            result["methods"][name]["merged_inference_s"] = _summary(merged[name])
        for name in names:
            result["methods"][name]["unmerged_inference_s"] = _summary(unmerged[name])
            if REFERENCE in unmerged:
                result["methods"][name]["unmerged_inference_paired_ratio"] = paired_ratio(unmerged[name],
                                                                                          unmerged[REFERENCE])
    return result


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null: the profiler's native library logs two lines at every start and stop,
    which would bury the bench's own output. Python's exceptions still surface after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _peak_step_growth_cpu(step) -> int:
    """Peak growth of live tensor memory during one step on CPU, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # each op's own net allocation at its start, and frees that no op claims ("[memory]"), in time order
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------------------------
# report


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if names:
            info["cpu"], info["cpu_count"] = names[0], len(names)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def table(result: dict, reference: str = REFERENCE) -> str:
    """Markdown table of ``measure``'s result. A ratio to LoRA reads ``a / b``: a, the ratio of the medians; b,
    the median of the per-round ratios (:func:`paired_ratio`)."""
    methods = result["methods"]
    ref = methods.get(reference)
    lines = ["| method | step ms (min..max) | / LoRA step | page faults / step | overhead ms | / LoRA overhead | "
             "peak memory MiB | / LoRA memory | unmerged inference ms | / LoRA | merged inference ms (base alongside) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        step = m["step_s"]

        def ratio(key: str, paired_key: str) -> str:
            if not (ref and key in m and key in ref):
                return ""
            text = f"{m[key]['median'] / ref[key]['median']:.2f}"
            # the paired ratios are taken to REFERENCE only
            return text + (f" / {m[paired_key]:.2f}" if paired_key in m and reference == REFERENCE else "")
        over = f"{m['overhead_s'] / ref['overhead_s']:.2f}" if ref and name != BASE and ref["overhead_s"] > 0 else ""
        mem_key = "peak_memory_bytes"
        mem = f"{m[mem_key] / 2**20:.0f}" if m.get(mem_key) is not None else ""
        mem_ratio = f"{m[mem_key] / ref[mem_key]:.3f}" if ref and m.get(mem_key) and ref.get(mem_key) else ""
        faults = f"{m['page_faults_per_step']:,.0f}" if m.get("page_faults_per_step") is not None else ""
        unmerged = _ms(m["unmerged_inference_s"]["median"]) if "unmerged_inference_s" in m else ""
        merged = (f"{_ms(m['merged_inference_s']['median'])} ({_ms(m['merged_base_inference_s']['median'])})"
                  if "merged_inference_s" in m else "")
        lines.append(f"| {LABELS.get(name, name)} | {_ms(step['median'])} ({_ms(step['min'])}..{_ms(step['max'])}) | "
                     f"{ratio('step_s', 'step_paired_ratio')} | {faults} | "
                     f"{_ms(m['overhead_s']) if name != 'base' else ''} | "
                     f"{over} | {mem} | {mem_ratio} | {unmerged} | "
                     f"{ratio('unmerged_inference_s', 'unmerged_inference_paired_ratio')} | {merged} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# command line


def run_bench(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .models import quiet_libraries

    quiet_libraries(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    if args.n_frequency <= 0 or args.repeats <= 0 or args.warmup < 0:
        raise UsageError("--n-frequency and --repeats must be positive, --warmup non-negative")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    options = {k: v for k, v in vars(args).items() if k != "func"}
    report = {"machine": machine(), "args": options, "shapes": {}}
    for shape in args.shapes:
        if shape == "linear":
            report["sweep"] = _sweep(args, dtype)
            _print(f"linear sweep: {len(report['sweep'])} points")
            continue
        work = workload(shape, args.device, dtype, model=args.model, random_weights=args.random_weights)
        result = measure(work, args.methods, args.n_frequency, args.rank, args.repeats, args.warmup, args.device)
        report["shapes"][shape] = result
        _print(f"\n{shape} ({args.device}, {args.dtype}, n={args.n_frequency}, LoRA r={args.rank})\n" + table(result))
    if args.output:
        _write_report(pathlib.Path(args.output), report)
    return 0


def _write_report(out: pathlib.Path, report: dict) -> None:
    """bench.json, bench.md, and the sweep's plot."""
    from .plots import plot_sweep

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", report)
    md = [f"# spectral-peft bench\n\n{json.dumps(report['machine'])}\n"]
    for shape, result in report["shapes"].items():
        md.append(f"## {shape}\n\n{table(result)}\n")
    if report.get("sweep"):
        plot_sweep(out / "sweep.png", report["sweep"], LABELS)
        md.append("## linear sweep\n\n" + _sweep_table(report["sweep"]) + "\n")
    write_text(out / "bench.md", "\n".join(md))
    _print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


def _sweep(args, dtype) -> list:
    """The adapters' overhead on one square linear layer, for each width and n_frequency."""
    rows = []
    # S2FT's prior needs a model that returns a loss, and LoCA's location phase is timed on the models
    methods = [m for m in args.methods if m != LOCATION_PHASE and not method_of(m).uses_prior]
    for width in args.sweep_widths:
        for n in args.sweep_n:
            if n > width * width:
                continue
            work = workload("linear", args.device, dtype, width=width)
            result = measure(work, methods, n, args.rank, args.repeats, args.warmup, args.device, inference=False)
            for name, m in result["methods"].items():
                if name != BASE:
                    rows.append({"width": width, "n": n, "method": name, "step_s": m["step_s"]["median"],
                                 "overhead_s": m["overhead_s"]})
    return rows


def _sweep_table(rows: list) -> str:
    methods = sorted({r["method"] for r in rows})
    lines = ["| width | n | " + " | ".join(f"{LABELS.get(m, m)} overhead ms" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for width, n in sorted({(r["width"], r["n"]) for r in rows}):
        cells = {r["method"]: r["overhead_s"] for r in rows if r["width"] == width and r["n"] == n}
        lines.append(f"| {width} | {n} | " + " | ".join(_ms(cells[m]) if m in cells else "" for m in methods) + " |")
    return "\n".join(lines)


def _print(message: str) -> None:
    print(message, flush=True)
