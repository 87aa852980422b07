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
import copy
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Callable, Optional

import torch

REFERENCE = "lora"  # the method every ratio is taken to
METHODS = ("lora", "fourierft", "fastfourierft", "loca", "loca-locations", "s2ft")
SHAPES = ("minilm", "llama", "linear")
LABELS = {
    "base": "base model (head only)", "lora": "LoRA (stock PEFT)", "fourierft": "FourierFT (stock PEFT)",
    "fastfourierft": "FourierFT mode (ours)", "loca": "LoCA, coefficient phase", "loca-locations": "LoCA, location phase",
    "s2ft": "S2FT",
}


# ----------------------------------------------------------------------------------------------------------------
# models and batches


class _Workload:
    """A base model, a batch, the modules to adapt and the trainable head (None for the bare linear layer)."""

    def __init__(self, model, batch: dict, targets: list, head: Optional[str], loss: Callable):
        self.model, self.batch, self.targets, self.head, self.loss = model, batch, targets, head, loss


def _minilm(device, dtype, path: Optional[str] = None, random_weights: bool = False) -> _Workload:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .data import default_model_path

    path = path or default_model_path()
    if random_weights:  # the same architecture and so the same step time, without the weights file
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, num_labels=5))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    batch = {
        "input_ids": torch.randint(1000, 20000, (32, 128)),
        "attention_mask": torch.ones(32, 128, dtype=torch.long),
        "labels": torch.randint(0, 5, (32,)),
    }
    return _Workload(model.to(device, dtype), _to(batch, device), ["query", "value"], "classifier", _model_loss)


def _llama(device, dtype) -> _Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    # Realistic widths (TinyLlama's), two layers; a 1000-token vocabulary so that the output head does not
    # dominate a step that is meant to time the adapted projections.
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=1000, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 1000, (4, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return _Workload(model.to(device, dtype), _to(batch, device), targets, "lm_head", _model_loss)


class _Linear(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=False)

    def forward(self, x, **_):
        return self.proj(x)


def _linear(width: int, tokens: int, device, dtype) -> _Workload:
    model = _Linear(width)
    x = torch.randn(tokens, width)
    # the input needs a gradient, as a hidden layer's does (and a frozen base step then has something to do)
    batch = {"x": x.to(device, dtype).requires_grad_(True)}
    return _Workload(model.to(device, dtype), batch, ["proj"], None, lambda model, batch: model(**batch).float().pow(2).mean())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _model_loss(model, batch):
    return model(**batch).loss


def _build(method: str, work: _Workload, n: int, rank: int):
    """A fresh model for ``method`` sharing the frozen base weights with ``work.model`` (no copy of them)."""
    from peft import FourierFTConfig, LoraConfig, get_peft_model

    from . import FastFourierFTConfig, LocaConfig, S2FTConfig, prepare_s2ft
    from .loca.layer import LocaLinear

    base = work.model
    frozen = {id(p): p for name, p in base.named_parameters() if not (work.head and name.startswith(work.head))}
    model = copy.deepcopy(base, memo=frozen)  # shares frozen weights: a merged adapter would change them all
    for p in model.parameters():
        p.requires_grad_(False)
    head = {"modules_to_save": [work.head]} if work.head else {}
    common = dict(target_modules=work.targets, **head)
    if method == "base":
        if work.head:
            for p in model.get_submodule(work.head).parameters():
                p.requires_grad_(True)
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, **common))
    if method == "fourierft":
        return get_peft_model(model, FourierFTConfig(n_frequency=n, **common))
    if method == "fastfourierft":
        return get_peft_model(model, FastFourierFTConfig(n_frequency=n, **common))
    if method in ("loca", "loca-locations"):
        peft_model = get_peft_model(model, LocaConfig(n_frequency=n, **common))
        if method == "loca-locations":
            for layer in peft_model.modules():
                if isinstance(layer, LocaLinear):
                    layer.set_phase("default", train_coefficients=False, train_locations=True)
        return peft_model
    if method == "s2ft":
        config = S2FTConfig(n_frequency=n, prior="gradient", prior_batches=1, **common)
        return prepare_s2ft(model, config, [work.batch])
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(('base',) + METHODS)}")


# ----------------------------------------------------------------------------------------------------------------
# timing


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _interleaved(calls: dict, repeats: int, warmup: int, device, before: Optional[Callable[[], None]] = None) -> dict:
    """Seconds per call of each entry of ``calls``, measured A, B, C, A, B, C, ... after ``warmup`` rounds;
    ``before``, if given, runs untimed ahead of every call."""
    times = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            if before is not None:
                before()
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _summary(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _paired_ratio(times: list, reference: list) -> float:
    """Median over rounds of a time over the reference's time in the same round: an interleaved round runs every
    method within seconds, so a slow spell on a shared machine slows both sides of each ratio alike."""
    return statistics.median(a / b for a, b in zip(times, reference))


def _step_fn(model, work: _Workload, device, memory: dict, name: str):
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


def _inference_fn(model, work: _Workload):
    inputs = {k: v.detach() for k, v in work.batch.items() if k != "labels"}

    def infer():
        with torch.no_grad():
            model(**inputs)

    return infer


def measure(work: _Workload, methods: list, n: int, rank: int, repeats: int, warmup: int, device,
            inference: bool = True) -> dict:
    """Step time, overhead over the base model, (CUDA) peak step memory and inference time of each method."""
    names = ["base"] + [m for m in methods if m != "base"]
    models = {}
    for name in names:
        models[name] = _build(name, work, n, rank).train()
    memory: dict = {}
    steps = {name: _step_fn(models[name], work, device, memory, name) for name in names}
    step_times = _interleaved(steps, repeats, warmup, device)
    if torch.device(device).type == "cpu":
        memory = {name: [_peak_step_growth_cpu(step)] for name, step in steps.items()}
    # shared frozen weights, counted once per model as a user with one model has them
    base_bytes = _tensor_bytes(p for n_, p in work.model.named_parameters() if not (work.head and n_.startswith(work.head)))
    result = {"methods": {}}
    base_step = statistics.median(step_times["base"])
    for name in names:
        entry = {"step_s": _summary(step_times[name]), "overhead_s": statistics.median(step_times[name]) - base_step,
                 "trainable": sum(p.numel() for p in models[name].parameters() if p.requires_grad)}
        # peak = frozen weights + trainable parameters and their two AdamW moments + the step's peak growth
        # (activations kept for backward, gradients, temporaries)
        trainable = [p for p in models[name].parameters() if p.requires_grad]
        entry["peak_step_growth_bytes"] = max(memory[name])
        entry["peak_memory_bytes"] = base_bytes + 3 * _tensor_bytes(trainable) + entry["peak_step_growth_bytes"]
        if REFERENCE in step_times:
            entry["step_paired_ratio"] = _paired_ratio(step_times[name], step_times[REFERENCE])
        result["methods"][name] = entry
    if inference:
        for model in models.values():
            model.eval()
        unmerged = _interleaved({k: _inference_fn(m, work) for k, m in models.items()}, repeats, warmup, device)
        merged_calls = {}
        for name, model in models.items():
            if name != "base" and hasattr(model, "merge_adapter"):
                merged_calls[name] = _inference_fn(model, work)
        # merging changes the shared base weights, so each method is merged, timed and unmerged in turn
        merged = {}
        for name, call in merged_calls.items():
            models[name].merge_adapter()
            try:
                merged.update(_interleaved({name: call, "base": _inference_fn(models["base"], work)}, repeats, warmup, device))
                result["methods"][name]["merged_base_inference_s"] = _summary(merged.pop("base"))
            finally:
                models[name].unmerge_adapter()
            result["methods"][name]["merged_inference_s"] = _summary(merged[name])
        for name in names:
            result["methods"][name]["unmerged_inference_s"] = _summary(unmerged[name])
            if REFERENCE in unmerged:
                result["methods"][name]["unmerged_inference_paired_ratio"] = _paired_ratio(unmerged[name],
                                                                                          unmerged[REFERENCE])
    return result


def _peak_step_growth_cpu(step) -> int:
    """Peak growth of live tensor memory during one step on CPU, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


def _workload(shape: str, device, dtype, width: int = 1024, tokens: int = 1024, model: Optional[str] = None,
              random_weights: bool = False) -> _Workload:
    if shape == "minilm":
        return _minilm(device, dtype, model, random_weights)
    if shape == "llama":
        return _llama(device, dtype)
    return _linear(width, tokens, device, dtype)


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
    the median of the per-round ratios (:func:`_paired_ratio`)."""
    methods = result["methods"]
    ref = methods.get(reference)
    lines = ["| method | step ms (min..max) | / LoRA step | overhead ms | / LoRA overhead | peak memory MiB | "
             "/ LoRA memory | unmerged inference ms | / LoRA | merged inference ms (base alongside) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        step = m["step_s"]

        def ratio(key: str, paired_key: str) -> str:
            if not (ref and key in m and key in ref):
                return ""
            text = f"{m[key]['median'] / ref[key]['median']:.2f}"
            # the paired ratios are taken to REFERENCE only
            return text + (f" / {m[paired_key]:.2f}" if paired_key in m and reference == REFERENCE else "")
        over = f"{m['overhead_s'] / ref['overhead_s']:.2f}" if ref and name != "base" and ref["overhead_s"] > 0 else ""
        mem_key = "peak_memory_bytes"
        mem = f"{m[mem_key] / 2**20:.0f}" if m.get(mem_key) is not None else ""
        mem_ratio = f"{m[mem_key] / ref[mem_key]:.3f}" if ref and m.get(mem_key) and ref.get(mem_key) else ""
        unmerged = _ms(m["unmerged_inference_s"]["median"]) if "unmerged_inference_s" in m else ""
        merged = (f"{_ms(m['merged_inference_s']['median'])} ({_ms(m['merged_base_inference_s']['median'])})"
                  if "merged_inference_s" in m else "")
        lines.append(f"| {LABELS.get(name, name)} | {_ms(step['median'])} ({_ms(step['min'])}..{_ms(step['max'])}) | "
                     f"{ratio('step_s', 'step_paired_ratio')} | {_ms(m['overhead_s']) if name != 'base' else ''} | "
                     f"{over} | {mem} | {mem_ratio} | {unmerged} | "
                     f"{ratio('unmerged_inference_s', 'unmerged_inference_paired_ratio')} | {merged} |")
    return "\n".join(lines)


def plot_sweep(path: pathlib.Path, sweep: list) -> None:
    from .plots import _pyplot, _save

    plt = _pyplot()
    widths = sorted({row["width"] for row in sweep})
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 3.6), squeeze=False)
    for ax, width in zip(axes[0], widths):
        rows = [r for r in sweep if r["width"] == width]
        for method in sorted({r["method"] for r in rows}):
            # an overhead within the noise can come out at or below zero: drawn at the floor of the plot
            pts = sorted((r["n"], max(r["overhead_s"] * 1e3, 0.01)) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS.get(method, method))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{width} x {width}, 1024 tokens")
        ax.set_xlabel("n_frequency (LoRA: fixed rank)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("adapter overhead per step, ms")
    axes[0][0].legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# command line


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="base model dtype (adapter parameters stay float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sweep-widths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--sweep-n", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--model", default=None,
                        help="folder of the model for the minilm shape (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--random-weights", action="store_true",
                        help="minilm shape: build the architecture from its config.json only (same timings)")
    parser.add_argument("--output", default=None, help="folder for bench.json and bench.md (and sweep.png)")


def run_bench(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .finetune import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
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
        work = _workload(shape, args.device, dtype, model=args.model, random_weights=args.random_weights)
        result = measure(work, args.methods, args.n_frequency, args.rank, args.repeats, args.warmup, args.device)
        report["shapes"][shape] = result
        _print(f"\n{shape} ({args.device}, {args.dtype}, n={args.n_frequency}, LoRA r={args.rank})\n" + table(result))
    if args.output:
        from .finetune import write_json

        out = pathlib.Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "bench.json", report)
        md = [f"# spectral-peft bench\n\n{json.dumps(report['machine'])}\n"]
        for shape, result in report["shapes"].items():
            md.append(f"## {shape}\n\n{table(result)}\n")
        if report.get("sweep"):
            plot_sweep(out / "sweep.png", report["sweep"])
            md.append("## linear sweep\n\n" + _sweep_table(report["sweep"]) + "\n")
        tmp = out / "bench.md.tmp"
        tmp.write_text("\n".join(md))
        os.replace(tmp, out / "bench.md")
        _print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def _sweep(args, dtype) -> list:
    rows = []
    methods = [m for m in args.methods if m in ("lora", "fourierft", "fastfourierft", "loca")]
    for width in args.sweep_widths:
        for n in args.sweep_n:
            if n > width * width:
                continue
            work = _workload("linear", args.device, dtype, width=width)
            result = measure(work, methods, n, args.rank, args.repeats, args.warmup, args.device, inference=False)
            for name, m in result["methods"].items():
                if name != "base":
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
