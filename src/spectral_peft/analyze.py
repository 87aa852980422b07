"""``spectral-peft analyze``: the spectrum of real weight changes, and the papers' claims measured on it.

For each target matrix the weight change ``dW`` (tuned minus base, or an adapter's ``get_delta_weight``) is
measured: the share of its energy in the top-k coefficients of the 2-D DCT and DFT in the original order, under
a random permutation of rows and columns (control), under the S2FT ordering computed from ``dW`` itself (oracle)
and under the ordering computed from a gradient prior (what S2FT can do before training); the spectral flatness;
and the relative Frobenius error ``||dW - A||_F / ||dW||_F`` of the best approximation ``A`` at equal parameter
budgets. With an adapter and a fully tuned reference, the adapter's locations are compared with the top-energy
cells of the full ``dW``. Writes analysis.md, analysis.json, energy.png and errors.png to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from collections import defaultdict
from typing import Optional

import torch

from .analysis import cumulative_shares, flatness_of, power_spectrum
from .errors import UsageError

# shares of a matrix's entries at which the energy curves are read
FRACTIONS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
# parameter budgets P = r (M + N): what a rank-r factorisation costs
RANKS = (1, 2, 4, 8, 16, 32, 64)
ORDERINGS = ("original", "random", "self", "prior")
TRANSFORMS = ("dct", "dft")
# approximations compared at each budget P, in table order
APPROXIMATIONS = {
    "svd": "best rank r (SVD), P = r(M+N)",
    "dct_top": "top-P DCT coefficients",
    "dct_top_3n": "top-P/3 DCT coefficients (each pays 2 location indices)",
    "dct_random": "P random DCT locations, optimal coefficients",
    "dct_s2ft_self": "top-P DCT after the S2FT ordering from dW itself",
    "dct_s2ft_prior": "top-P DCT after the S2FT ordering from the gradient prior",
    "dft_top": "top-P DFT coefficients",
}
REPORT_FILE, JSON_FILE, ENERGY_PLOT, ERROR_PLOT = "analysis.md", "analysis.json", "energy.png", "errors.png"


# ---------------------------------------------------------------------------------------------------------------
# metrics of one matrix


def svd_errors(matrix: torch.Tensor, ranks) -> list[float]:
    """Relative Frobenius error of the best rank-r approximation (Eckart-Young), for each r."""
    s2 = torch.linalg.svdvals(matrix.double()).pow(2)
    cumulative = s2.cumsum(0) / s2.sum()
    return [math.sqrt(max(0.0, 1.0 - float(cumulative[min(r, s2.numel()) - 1]))) if r else 1.0 for r in ranks]


def error_from_share(share: float) -> float:
    """Relative Frobenius error of keeping coefficients that hold ``share`` of the energy of an orthonormal
    transform (the best coefficients for a fixed support are the true ones there; the rest is the error)."""
    return math.sqrt(max(0.0, 1.0 - share))


def share_at(power: torch.Tensor, cells: torch.Tensor) -> float:
    """Share of the total of ``power`` (M x N) at ``cells`` ((2, n) rows and columns)."""
    total = power.sum()
    return float(power[cells[0], cells[1]].sum() / total) if total > 0 else 0.0


def top_cells(power: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` cells of largest ``power`` as (2, n) long."""
    flat = torch.topk(power.flatten(), n).indices
    return torch.stack([flat // power.shape[1], flat % power.shape[1]])


def overlap(cells: torch.Tensor, reference: torch.Tensor, n_cols: int) -> int:
    """How many of ``cells`` are also in ``reference`` (both (2, n), distinct cells)."""
    return int(torch.isin(cells[0] * n_cols + cells[1], reference[0] * n_cols + reference[1]).sum())


def mean_distance(cells: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean Euclidean distance, in cells, from each of ``cells`` to the nearest of ``reference``."""
    return float(torch.cdist(cells.T.double(), reference.T.double()).min(dim=1).values.mean())


def orderings(matrix: torch.Tensor, prior: Optional[torch.Tensor], seed: int, refine_passes: int = 3) -> dict:
    """Row and column orders: identity, a seeded random permutation, S2FT's chain on ``matrix``, and on ``prior``."""
    from .s2ft.ordering import nearest_neighbor_order

    m, n = matrix.shape
    generator = torch.Generator().manual_seed(seed)
    orders = {
        "original": (None, None),
        "random": (torch.randperm(m, generator=generator), torch.randperm(n, generator=generator)),
        "self": (nearest_neighbor_order(matrix, refine_passes=refine_passes),
                 nearest_neighbor_order(matrix.T, refine_passes=refine_passes)),
    }
    if prior is not None:
        orders["prior"] = (nearest_neighbor_order(prior, refine_passes=refine_passes),
                           nearest_neighbor_order(prior.T, refine_passes=refine_passes))
    return orders


def budget_ks(shape: tuple, fractions=FRACTIONS) -> list[int]:
    return [max(1, round(f * shape[0] * shape[1])) for f in fractions]


def analyze_matrix(dw: torch.Tensor, prior: Optional[torch.Tensor] = None, seed: int = 0, fractions=FRACTIONS,
                   ranks=RANKS) -> dict:
    """Every measure of one weight change ``dW`` (M x N); ``prior`` (same shape) adds the prior ordering."""
    dw = dw.detach().double().cpu()
    if prior is not None and tuple(prior.shape) != tuple(dw.shape):
        raise ValueError(f"prior shape {tuple(prior.shape)} differs from dW {tuple(dw.shape)}")
    m, n = dw.shape
    entries = m * n
    ks = budget_ks((m, n), fractions)
    orders = orderings(dw, prior.double().cpu() if prior is not None else None, seed)
    energy, flatness, cumulative = {}, {}, {}
    for transform in TRANSFORMS:
        energy[transform], flatness[transform] = {}, {}
        for name, (rows, cols) in orders.items():
            power = power_spectrum(dw, transform, rows, cols)
            cumulative[transform, name] = cumulative_shares(power)
            energy[transform][name] = [float(cumulative[transform, name][k - 1]) for k in ks]
            flatness[transform][name] = flatness_of(power)
    original_dct = power_spectrum(dw, "dct")
    generator = torch.Generator().manual_seed(seed + 1)

    def top(transform: str, ordering: str, count: int) -> Optional[float]:
        if (transform, ordering) not in cumulative:
            return None
        return error_from_share(float(cumulative[transform, ordering][count - 1])) if count else 1.0

    errors = []
    usable = [r for r in ranks if r <= min(m, n)]
    for r, svd in zip(usable, svd_errors(dw, usable)):
        budget = min(r * (m + n), entries)
        flat = torch.randperm(entries, generator=generator)[:budget]
        random_cells = torch.stack([flat // n, flat % n])
        errors.append({
            "rank": r, "budget": budget, "svd": svd,
            "dct_top": top("dct", "original", budget),
            "dct_top_3n": top("dct", "original", budget // 3),
            "dct_random": error_from_share(share_at(original_dct, random_cells)),
            "dct_s2ft_self": top("dct", "self", budget),
            "dct_s2ft_prior": top("dct", "prior", budget),
            "dft_top": top("dft", "original", budget),
        })
    return {
        "shape": [m, n],
        "norm": float(dw.norm()),
        "ks": ks,
        "energy": energy,
        "flatness": flatness,
        "errors": errors,
        "prior_cosine": float(torch.nn.functional.cosine_similarity(dw.flatten(), prior.double().flatten(), dim=0))
        if prior is not None else None,
    }


def white_noise_reference(shape: tuple, seed: int = 0, fractions=FRACTIONS) -> dict:
    """Energy curves and flatness of an i.i.d. Gaussian matrix of ``shape``: what a truly flat spectrum gives; and
    after the S2FT ordering computed from the noise itself (the gain an ordering finds where there is no structure)."""
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ks = budget_ks(shape, fractions)
    orders = orderings(noise, None, seed)
    result = {}
    for transform in TRANSFORMS:
        result[transform] = {}
        for name in ("original", "self"):
            power = power_spectrum(noise, transform, *orders[name])
            cumulative = cumulative_shares(power)
            result[transform][name] = {"energy": [float(cumulative[k - 1]) for k in ks], "flatness": flatness_of(power)}
    return result


def compare_locations(layer, adapter_name: str, reference_dw: torch.Tensor, config=None) -> Optional[dict]:
    """Where a spectral adapter put its coefficients, against the top-n energy cells of a reference ``dW`` (the
    full fine-tuning change of the same matrix), in the adapter's own domain (its row/column orders applied).

    DCT adapters only (a DFT location also covers its conjugate cell). For LoCA the initial (random) locations,
    re-drawn from the ``location_seed`` in ``config`` (the adapter's PEFT config), are measured too: where
    learning started.
    """
    from .loca import LocaLinear

    spectrum = layer.spectrum(adapter_name)
    if spectrum.transform != "dct":
        return None
    cells = spectrum.cells.detach().long().cpu()
    n = cells.shape[1]
    m, n_cols = reference_dw.shape
    power = power_spectrum(reference_dw.double().cpu(), "dct",
                           spectrum.row_order.cpu() if spectrum.row_order is not None else None,
                           spectrum.col_order.cpu() if spectrum.col_order is not None else None)
    best = top_cells(power, n)
    result = {
        "n": n,
        "overlap": overlap(cells, best, n_cols) / n,
        "expected_random_overlap": n / (m * n_cols),
        "energy_share": share_at(power, cells),
        "top_n_energy_share": share_at(power, best),
        "mean_distance": mean_distance(cells, best),
    }
    if isinstance(layer, LocaLinear) and getattr(config, "location_seed", None) is not None:  # else not redrawable
        initial = layer.initial_cells(adapter_name, n, config).long().cpu()
        result.update({
            "initial_overlap": overlap(initial, best, n_cols) / n,
            "initial_energy_share": share_at(power, initial),
            "initial_mean_distance": mean_distance(initial, best),
            "moved": 1.0 - overlap(cells, initial, n_cols) / n,
        })
    return result


def layer_type(name: str) -> str:
    """'bert.encoder.layer.3.attention.self.query' -> 'attention.self.query': the name after the block index."""
    parts = name.split(".")
    index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[index + 1:]) if 0 <= index < len(parts) - 1 else name


# ---------------------------------------------------------------------------------------------------------------
# summaries


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(matrices: list[dict]) -> dict:
    """Means over matrices, per layer type and over all ('all'): energy curves, flatness, errors by rank."""
    groups = defaultdict(list)
    for record in matrices:
        groups[record["type"]].append(record)
    groups["all"] = list(matrices)  # last: after the layer types, in the order they came
    summary = {}
    for group, records in groups.items():
        energy = {t: {o: [_mean(r["energy"][t][o][i] if o in r["energy"][t] else None for r in records)
                          for i in range(len(FRACTIONS))]
                      for o in ORDERINGS} for t in TRANSFORMS}
        flatness = {t: {o: _mean(r["flatness"][t].get(o) for r in records) for o in ORDERINGS} for t in TRANSFORMS}
        errors = []
        for rank in RANKS:
            rows = [e for r in records for e in r["errors"] if e["rank"] == rank]
            if rows:
                errors.append({"rank": rank, "matrices": len(rows),
                               **{key: _mean(e[key] for e in rows) for key in APPROXIMATIONS}})
        summary[group] = {"matrices": len(records), "energy": energy, "flatness": flatness, "errors": errors}
    return summary


def verdict_counts(matrices: list[dict]) -> dict:
    """How often each claim holds over (matrix, budget) pairs or matrices: the raw counts behind the verdicts."""
    pairs = [e for r in matrices for e in r["errors"]]
    one_percent = FRACTIONS.index(1e-2)

    def share(r, transform, ordering):
        return r["energy"][transform].get(ordering, [None] * len(FRACTIONS))[one_percent]

    with_prior = [r for r in matrices if "prior" in r["energy"]["dct"]]
    return {
        "pairs": len(pairs),
        "dct_top_beats_svd": sum(e["dct_top"] < e["svd"] for e in pairs),
        "dct_top_3n_beats_svd": sum(e["dct_top_3n"] < e["svd"] for e in pairs),
        "dct_random_worse_than_svd": sum(e["dct_random"] > e["svd"] for e in pairs),
        "dct_s2ft_prior_beats_svd": sum(e["dct_s2ft_prior"] is not None and e["dct_s2ft_prior"] < e["svd"]
                                        for e in pairs),
        "dct_s2ft_self_beats_svd": sum(e["dct_s2ft_self"] < e["svd"] for e in pairs),
        "matrices": len(matrices),
        "self_ordering_raises_1pct": sum(share(r, "dct", "self") > share(r, "dct", "original") for r in matrices),
        "prior_ordering_raises_1pct": sum(share(r, "dct", "prior") > share(r, "dct", "original") for r in with_prior),
        "prior_ordering_beats_random_1pct": sum(share(r, "dct", "prior") > share(r, "dct", "random")
                                                for r in with_prior),
        "matrices_with_prior": len(with_prior),
        "dct_beats_dft_1pct": sum(share(r, "dct", "original") > share(r, "dft", "original") for r in matrices),
    }


# ---------------------------------------------------------------------------------------------------------------
# the report


def _pct(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(result: dict) -> str:
    inputs, summary, counts = result["inputs"], result["summary"], result["counts"]
    lines = ["# Spectrum of the weight change", ""]
    lines.append(f"- base: `{inputs['base']}`")
    if inputs.get("tuned"):
        lines.append(f"- tuned: `{inputs['tuned']}`")
    if inputs.get("adapter"):
        lines.append(f"- adapter: `{inputs['adapter']}` ({inputs.get('adapter_type')})")
    lines.append(f"- analysed: dW of {inputs['source']}, {len(result['matrices'])} matrices")
    prior = result["settings"]["prior"]
    lines.append(f"- prior: {prior}" + (f" ({result['settings']['prior_batches']} batches of "
                                        f"{result['settings']['batch_size']} from `{result['settings']['task']}`, "
                                        f"max length {result['settings']['max_length']}, seed "
                                        f"{result['settings']['seed']})" if prior == "gradient" else ""))
    lines.append(f"- command: `{result['command']}`")
    lines += ["", "Energy share: the share of ||dW||_F^2 in the k largest-magnitude coefficients of the orthonormal "
              "2-D transform, k a share of the M x N entries. Orderings: original; random (a random permutation of "
              "rows and columns, the control); self (S2FT's nearest-neighbour chain computed from dW itself: an "
              "oracle); prior (the chain computed from the gradient prior, which S2FT can use before training). "
              "White noise: an i.i.d. Gaussian matrix of the same shape (a flat spectrum; its 'self' row is the "
              "gain an ordering finds where there is no structure at all).", ""]
    shown = [FRACTIONS.index(f) for f in (1e-3, 1e-2, 1e-1)]
    header = "| layer type | matrices | transform | ordering | " + " | ".join(
        f"top {FRACTIONS[i] * 100:g}%" for i in shown) + " | flatness |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for group, data in summary.items():
        for transform in TRANSFORMS:
            for ordering in ORDERINGS:
                values = data["energy"][transform][ordering]
                if values[0] is None:
                    continue
                lines.append(f"| {group} | {data['matrices']} | {transform.upper()} | {ordering} | "
                             + " | ".join(_pct(values[i]) for i in shown)
                             + f" | {_num(data['flatness'][transform][ordering])} |")
    for shape, noise in result["white_noise"].items():
        for transform in TRANSFORMS:
            for ordering, data in noise[transform].items():
                lines.append(f"| white noise {shape} | 1 | {transform.upper()} | {ordering} | "
                             + " | ".join(_pct(data["energy"][i]) for i in shown) + f" | {_num(data['flatness'])} |")
    lines += ["", "Spectral flatness: geometric over arithmetic mean of the power spectrum (1: flat; 0: some "
              "coefficient is zero; white noise gives about 0.28 with the DCT and 0.56 with the DFT).", ""]
    lines += ["## Approximation error at equal parameter budgets", "",
              "Relative Frobenius error ||dW - A||_F / ||dW||_F of the best approximation A with P parameters, "
              "mean over all matrices. With an orthonormal transform the best coefficients on a fixed set of "
              "locations are dW's own there, so a spectral error is sqrt(1 - energy share kept). The S2FT "
              "permutations are not counted in P (S2FT derives them from the prior).", ""]
    keys = list(APPROXIMATIONS)
    lines += ["| rank r | P = r(M+N) (mean) | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for row in summary["all"]["errors"]:
        budget = _mean(e["budget"] for r in result["matrices"] for e in r["errors"] if e["rank"] == row["rank"])
        lines.append(f"| {row['rank']} | {budget:,.0f} | " + " | ".join(_num(row[k]) for k in keys) + " |")
    lines += [""] + [f"- `{key}`: {text}" for key, text in APPROXIMATIONS.items()]
    lines += ["", "## The claims, counted", ""]
    pairs, mats = counts["pairs"], counts["matrices"]
    lines += [
        f"- LoCA: top-P DCT beats rank-r SVD at equal budget in {counts['dct_top_beats_svd']} of {pairs} "
        f"(matrix, budget) pairs; counting 2 location indices per coefficient (P/3 coefficients) in "
        f"{counts['dct_top_3n_beats_svd']} of {pairs}.",
        f"- LoCA: random DCT locations are worse than rank-r SVD in {counts['dct_random_worse_than_svd']} of "
        f"{pairs} pairs.",
        f"- S2FT: the ordering from dW itself raises the top-1% DCT energy in {counts['self_ordering_raises_1pct']}"
        f" of {mats} matrices; the ordering from the prior in {counts['prior_ordering_raises_1pct']} of "
        f"{counts['matrices_with_prior']}, and beats the random-permutation control in "
        f"{counts['prior_ordering_beats_random_1pct']} of {counts['matrices_with_prior']}.",
        f"- S2FT after ordering vs SVD at equal budget: from dW itself better in {counts['dct_s2ft_self_beats_svd']} "
        f"of {pairs} pairs, from the prior in {counts['dct_s2ft_prior_beats_svd']} of {pairs}.",
        f"- DCT vs DFT: the top-1% DCT energy exceeds the DFT's in {counts['dct_beats_dft_1pct']} of {mats} "
        "matrices.",
    ]
    locations = [r for r in result["matrices"] if r.get("locations")]
    if locations:
        lines += ["", "## Adapter locations against the full fine-tuning dW", "",
                  "For each adapted matrix: of the adapter's n locations, the share that are among the n "
                  "largest-energy cells of the full dW's DCT (in the adapter's domain: S2FT's orders applied), the "
                  "share of the full dW's energy at the adapter's locations (the best n cells hold 'top-n'), and the "
                  "mean distance in cells from each location to the nearest top-n cell. 'initial': LoCA's random "
                  "starting locations (from the saved seed); 'moved': share of locations not on an initial cell.",
                  ""]
        loca = any("initial_overlap" in r["locations"] for r in locations)
        head = "| matrix | n | overlap | random overlap | energy at locations | top-n energy | distance |"
        if loca:
            head += " initial overlap | initial energy | initial distance | moved |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        keys = ("n", "overlap", "expected_random_overlap", "energy_share", "top_n_energy_share", "mean_distance",
                "initial_overlap", "initial_energy_share", "initial_mean_distance", "moved")
        mean = {"name": "mean", "locations": {k: _mean(r["locations"].get(k) for r in locations) for k in keys}}
        for r in locations + [mean]:
            loc = r["locations"]
            row = (f"| {r['name']} | {loc['n']:.0f} | {_pct(loc['overlap'])} | "
                   f"{_pct(loc['expected_random_overlap'], 2)} "
                   f"| {_pct(loc['energy_share'])} | {_pct(loc['top_n_energy_share'])} | "
                   f"{_num(loc['mean_distance'], 1)} |")
            if loca:
                row += (f" {_pct(loc.get('initial_overlap'))} | {_pct(loc.get('initial_energy_share'))} | "
                        f"{_num(loc.get('initial_mean_distance'), 1)} | {_pct(loc.get('moved'))} |")
            lines.append(row)
    elif inputs.get("adapter") and not inputs.get("tuned"):
        lines += ["", "Adapter locations are compared with a full fine-tuning dW only when `--tuned` is given too."]
    lines += ["", "## Per matrix", "", "| matrix | shape | ||dW||_F | DCT top 1% | random | self | prior | "
              "flatness DCT | prior cosine |", "|---|---|---|---|---|---|---|---|---|"]
    one = FRACTIONS.index(1e-2)
    for r in result["matrices"]:
        e = r["energy"]["dct"]
        lines.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['norm']:.4g} | {_pct(e['original'][one])} "
                     f"| {_pct(e['random'][one])} | {_pct(e['self'][one])} | "
                     f"{_pct(e['prior'][one]) if 'prior' in e else '-'} | {_num(r['flatness']['dct']['original'])} | "
                     f"{_num(r['prior_cosine'])} |")
    lines += ["", f"Plots: [{ENERGY_PLOT}]({ENERGY_PLOT}) (energy curves per layer type), [{ERROR_PLOT}]({ERROR_PLOT})"
              " (error against budget).", ""]
    return "\n".join(lines)


def _write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# the command


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to analyse")
    what.add_argument("--base", default=None,
                      help="the pretrained model: local Hugging Face folder or hub id; default the offline "
                           "all-MiniLM-L6-v2")
    what.add_argument("--tuned", default=None,
                      help="the fully fine-tuned model (folder or hub id; e.g. a finetune --method full output)")
    what.add_argument("--adapter", default=None,
                      help="a PEFT adapter folder (e.g. a finetune output); with --tuned as well, its locations are "
                           "compared with the full fine-tuning dW")
    what.add_argument("--target-modules", default=None,
                      help="with --tuned: comma list of module names (a name or the end of one, as PEFT matches); "
                           "default every Linear weight that changed, the head excluded")
    prior = parser.add_argument_group("gradient prior (S2FT's ordering before training)")
    prior.add_argument("--prior", choices=("auto", "gradient", "none"), default="auto",
                       help="gradient: minus the summed gradient over --prior-batches training batches; none: skip "
                            "it (no data needed); auto (default): gradient when the data is known (--task, the "
                            "run.json of --tuned/--adapter, or the default model's BBC News), else none")
    prior.add_argument("--prior-batches", type=int, default=4, help="batches for the prior (default 4)")
    prior.add_argument("--task", default=None,
                       help="as finetune's --task; default the run.json of --tuned/--adapter, else bbc-news")
    prior.add_argument("--max-length", type=int, default=None, help="as finetune's; default run.json's, else 128")
    prior.add_argument("--batch-size", type=int, default=None, help="as finetune's; default run.json's, else 16")
    prior.add_argument("--seed", type=int, default=None,
                       help="split, head initialisation, batches and the random control; default run.json's, else 0")
    prior.add_argument("--val-fraction", type=float, default=None, help="as finetune's (default run.json's, else 0.1)")
    prior.add_argument("--test-fraction", type=float, default=None,
                       help="as finetune's (default run.json's, else 0.2)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True,
                     help="folder for analysis.md, analysis.json, energy.png and errors.png (created; an earlier "
                          "analysis there is replaced)")
    out.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_json(folder: Optional[str]) -> dict:
    if folder is None:
        return {}
    path = pathlib.Path(folder).expanduser() / "run.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None


def _saved_head_labels(folder: str) -> Optional[int]:
    """Outputs of the classification head saved with an adapter (modules_to_save), if it has one."""
    from safetensors import safe_open

    from .finetune import HEAD_NAMES

    path = pathlib.Path(folder).expanduser() / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if any(key.endswith(f".{head}.weight") or key.endswith(f".{head}.modules_to_save.default.weight")
                   for head in HEAD_NAMES):
                return int(f.get_slice(key).get_shape()[0])
    return None


def _settings(args: argparse.Namespace) -> dict:
    """The data options: given ones, else the run.json of --tuned (then --adapter), else finetune's defaults."""
    runs = [r for r in (_run_json(args.tuned), _run_json(args.adapter)) if r]
    run = runs[0] if runs else {}
    recorded = {**run.get("settings", {}), **run}
    defaults = {"task": "bbc-news", "max_length": 128, "batch_size": 16, "seed": 0, "val_fraction": 0.1,
                "test_fraction": 0.2}
    settings = {}
    for key, default in defaults.items():
        given = getattr(args, key)
        settings[key] = given if given is not None else recorded.get(key, default)
    known_data = args.task is not None or "task" in recorded or args.base is None
    settings["prior"] = args.prior if args.prior != "auto" else "gradient" if known_data else "none"
    settings["prior_batches"] = args.prior_batches
    return settings


def _check_arguments(args: argparse.Namespace) -> None:
    if args.tuned is None and args.adapter is None:
        raise UsageError("give --tuned (a fully fine-tuned model) or --adapter (a PEFT adapter folder), or both")
    for key in ("prior_batches", "max_length", "batch_size", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {value}")
    if args.adapter is not None:
        folder = pathlib.Path(args.adapter).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--adapter folder not found: {args.adapter}")
        if not (folder / "adapter_config.json").is_file():
            raise UsageError(f"--adapter {args.adapter} has no adapter_config.json; it is not a PEFT adapter folder"
                             + (" (it holds a whole model: pass it as --tuned)" if (folder / "config.json").is_file()
                                else ""))
    if args.target_modules is not None and args.tuned is None:
        raise UsageError("--target-modules applies to --tuned; an adapter's targets are its own")
    output = pathlib.Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / JSON_FILE).exists():
        raise UsageError(f"--output {output} is not empty and holds no earlier analysis; use another folder")


def _linear_weights(model) -> dict:
    """Every Linear / Conv1D of ``model`` but the classification head: name -> (module, transposed)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from .finetune import head_name

    head = head_name(model)
    found = {}
    for name, module in model.named_modules():
        if head is not None and (name == head or name.startswith(head + ".")):
            continue  # the base's head is a fresh random initialisation, not a pretrained weight
        if isinstance(module, (nn.Linear, Conv1D)) and module.weight.dim() == 2:
            found[name] = (module, isinstance(module, Conv1D))
    return found


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def tuned_deltas(base, tuned, targets: Optional[list[str]], tuned_arg: str) -> dict:
    """name -> dW (out x in, float32) for the Linear weights that differ between ``tuned`` and ``base``."""
    if base.config.model_type != tuned.config.model_type:
        raise UsageError(f"--tuned {tuned_arg} is a {tuned.config.model_type} model but --base is a "
                         f"{base.config.model_type}: different architectures")
    mine, theirs = _linear_weights(base), _linear_weights(tuned)
    if targets is not None:
        for target in targets:
            if not any(_matches(name, [target]) for name in mine):
                raise UsageError(f"--target-modules: '{target}' matches no Linear module of --base")
        mine = {name: v for name, v in mine.items() if _matches(name, targets)}
    deltas = {}
    for name, (module, transposed) in mine.items():
        if name not in theirs:
            raise UsageError(f"--tuned {tuned_arg} has no module '{name}' of --base: different architectures")
        other = theirs[name][0].weight
        if other.shape != module.weight.shape:
            raise UsageError(f"module '{name}' is {tuple(module.weight.shape)} in --base but {tuple(other.shape)} in "
                             f"--tuned {tuned_arg}: different architectures")
        dw = (other.detach().float() - module.weight.detach().float())
        if torch.any(dw != 0):
            deltas[name] = dw.T if transposed else dw
    if not deltas:
        raise UsageError(f"no {'target ' if targets else ''}Linear weight differs between --base and --tuned "
                         f"{tuned_arg}")
    return deltas


def adapter_layers(peft_model) -> dict:
    """name (relative to the transformers model) -> the adapter layer, for every layer with a dW."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = peft_model.base_model.model
    return {name: module for name, module in inner.named_modules()
            if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight")}


@torch.no_grad()
def adapter_delta(layer, adapter_name: str = "default") -> torch.Tensor:
    """An adapter layer's dW as out x in float32 (stock PEFT layers give it in the weight's layout)."""
    from peft.utils.other import transpose

    from .layer import SpectralLinear

    dw = layer.get_delta_weight(adapter_name).detach().float().cpu()
    if isinstance(layer, SpectralLinear):
        return dw
    return transpose(dw, getattr(layer, "fan_in_fan_out", False))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_analyze(args: argparse.Namespace) -> int:
    """``spectral-peft analyze``; raises UsageError for bad input."""
    from tqdm.auto import tqdm

    from .finetune import (BatchStream, ModelInfo, check_compatible, load_base_model, load_tokenizer,
                           quiet_libraries, write_json)
    from .layer import SpectralLinear
    from .tasks import CLASSIFICATION, LANGUAGE_MODELING, encode_task, load_task

    _check_arguments(args)
    settings = _settings(args)
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)

    # ---- every input read and checked before anything is written
    base_info = _resolve("--base", args.base)
    tokenizer = load_tokenizer(base_info)
    task = None
    if settings["prior"] == "gradient":
        task = load_task(settings["task"], settings["seed"], settings["val_fraction"], settings["test_fraction"])
        check_compatible(base_info, task)
        kind, num_labels, label_names = task.kind, task.num_labels, task.label_names
    else:
        kind = LANGUAGE_MODELING if base_info.decoder else CLASSIFICATION
        # no task: the head as the base checkpoint has it (its weights are not analysed)
        num_labels = getattr(base_info.config, "num_labels", 2) if kind == CLASSIFICATION else None
        label_names = None
    if args.adapter is not None and kind == CLASSIFICATION:
        # the adapter's saved head must fit the base's: its run.json, else the saved head's own size
        adapter_run = _run_json(args.adapter)
        if adapter_run.get("num_labels"):
            num_labels, label_names = adapter_run["num_labels"], adapter_run.get("label_names")
        elif _saved_head_labels(args.adapter) is not None:
            num_labels, label_names = _saved_head_labels(args.adapter), None
    torch.manual_seed(settings["seed"])  # the head's initialisation, as finetune draws it
    # the head is never analysed: one of another size than the checkpoint's is drawn fresh
    base = load_base_model(base_info, kind, num_labels, tokenizer, label_names, fresh_head=True)

    deltas, layers, config, adapter_type = {}, {}, None, None
    if args.tuned is not None:
        tuned_info = _resolve("--tuned", args.tuned)
        tuned_labels = getattr(tuned_info.config, "num_labels", None) if kind == CLASSIFICATION else None
        tuned = load_base_model(ModelInfo(arg=args.tuned, path=tuned_info.path, config=tuned_info.config,
                                          decoder=tuned_info.decoder, local_only=tuned_info.local_only),
                                kind, tuned_labels, tokenizer)
        targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
        if args.target_modules is not None and not targets:
            raise UsageError("--target-modules is empty")
        deltas = tuned_deltas(base, tuned, targets, args.tuned)
        del tuned
    if args.adapter is not None:
        import copy

        from peft import PeftConfig, PeftModel

        try:
            config = PeftConfig.from_pretrained(args.adapter)
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), args.adapter)
        except Exception as error:  # noqa: BLE001  (PEFT raises many kinds for an adapter that does not fit)
            raise UsageError(f"--adapter {args.adapter} does not fit --base {base_info.arg or base_info.path}: "
                             f"{_first_line(error)}") from None
        adapter_type = str(getattr(config.peft_type, "value", config.peft_type))
        layers = adapter_layers(peft_model)
        if not layers:
            raise UsageError(f"--adapter {args.adapter} adapts no layer of --base")
        if not deltas:
            deltas = {name: adapter_delta(layer) for name, layer in layers.items()}
            deltas = {name: dw for name, dw in deltas.items() if torch.any(dw != 0)}
            if not deltas:
                raise UsageError(f"the adapter in {args.adapter} is all zero: nothing to analyse")
        elif not set(layers) <= set(deltas):
            missing = sorted(set(layers) - set(deltas))
            raise UsageError(f"{missing[0]}, a target of --adapter {args.adapter}, is not among the analysed "
                             f"changes of --tuned {args.tuned} (unchanged, or left out by --target-modules)"
                             + (f"; {len(missing) - 1} more" if len(missing) > 1 else ""))

    priors = {}
    if settings["prior"] == "gradient":
        from .s2ft.prepare import summed_gradients

        encoded = encode_task(task, tokenizer, settings["max_length"], settings["seed"], settings["val_fraction"],
                              settings["test_fraction"])
        stream = BatchStream(encoded["train"], settings["batch_size"], settings["seed"])
        linear = _linear_weights(base)
        weights = {name: (linear[name][0].weight, linear[name][1]) for name in deltas}
        batches = (stream.batch(i) for i in range(settings["prior_batches"]))
        priors = summed_gradients(base, weights, batches, settings["prior_batches"], desc="gradient prior",
                                  quiet=args.quiet)

    output = pathlib.Path(args.output).expanduser()
    matrices = []
    progress = tqdm(deltas.items(), total=len(deltas), desc="analyze", unit="matrix", disable=True if args.quiet
                    else None, dynamic_ncols=True, file=sys.stderr)
    for name, dw in progress:
        progress.set_postfix_str(name, refresh=False)
        record = {"name": name, "type": layer_type(name),
                  **analyze_matrix(dw, priors.get(name), seed=settings["seed"])}
        record["relative_norm"] = float(dw.norm() / base.get_submodule(name).weight.detach().float().norm())
        if args.tuned is not None and isinstance(layers.get(name), SpectralLinear):
            record["locations"] = compare_locations(layers[name], "default", dw, config)
        matrices.append(record)
    progress.close()
    shapes = sorted({tuple(r["shape"]) for r in matrices})
    result = {
        "command": "spectral-peft analyze " + _describe_args(args),
        "inputs": {"base": base_info.arg or base_info.path, "tuned": args.tuned, "adapter": args.adapter,
                   "adapter_type": adapter_type, "source": "--tuned minus --base" if args.tuned else "the adapter"},
        "settings": settings,
        "fractions": list(FRACTIONS),
        "ranks": list(RANKS),
        "approximations": APPROXIMATIONS,
        "error_measure": "relative Frobenius error ||dW - A||_F / ||dW||_F",
        "matrices": matrices,
        "summary": summarize(matrices),
        "counts": verdict_counts(matrices),
        "white_noise": {f"{m}x{n}": white_noise_reference((m, n), settings["seed"]) for m, n in shapes},
    }
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / JSON_FILE, result)
    _write_text(output / REPORT_FILE, render_markdown(result))
    from .plots import plot_energy_curves, plot_errors

    plot_energy_curves(output / ENERGY_PLOT, result)
    plot_errors(output / ERROR_PLOT, result)
    counts = result["counts"]
    print(f"analysed {len(matrices)} matrices; top-P DCT beats rank-r SVD in {counts['dct_top_beats_svd']} of "
          f"{counts['pairs']} (matrix, budget) pairs; written to {output}")
    return 0


def _resolve(flag: str, name: Optional[str]):
    """finetune's model lookup, its errors naming the option (and saying when a folder holds an adapter)."""
    from .finetune import resolve_model

    try:
        return resolve_model(name)
    except UsageError as error:
        hint = ""
        if name is not None and (pathlib.Path(name).expanduser() / "adapter_config.json").is_file():
            hint = " (it holds a PEFT adapter: pass it as --adapter)"
        raise UsageError(f"{flag}: {error}{hint}") from None


def _describe_args(args: argparse.Namespace) -> str:
    parts = []
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)
