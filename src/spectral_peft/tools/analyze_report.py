"""The report of ``spectral-peft analyze``: means per layer type, the papers' claims counted, and analysis.md."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

from spectral_peft.analysis import FRACTIONS, ORDERINGS, RANKS
from spectral_peft.spectral import TRANSFORMS

REPORT_FILE, JSON_FILE, ENERGY_PLOT, ERROR_PLOT = "analysis.md", "analysis.json", "energy.png", "errors.png"

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
# analysis.md


def _pct(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(result: dict) -> str:
    """analysis.md: the inputs, the energy and error tables, the claims counted, adapter locations, each matrix."""
    sections = (_inputs_section, _energy_section, _errors_section, _claims_section, _locations_section,
                _matrices_section)
    return "\n".join(line for section in sections for line in section(result))


def _inputs_section(result: dict) -> list[str]:
    inputs, settings = result["inputs"], result["settings"]
    lines = ["# Spectrum of the weight change", ""]
    lines.append(f"- base: `{inputs['base']}`")
    if inputs.get("tuned"):
        lines.append(f"- tuned: `{inputs['tuned']}`")
    if inputs.get("adapter"):
        lines.append(f"- adapter: `{inputs['adapter']}` ({inputs.get('adapter_type')})")
    lines.append(f"- analysed: dW of {inputs['source']}, {len(result['matrices'])} matrices")
    prior = settings["prior"]
    lines.append(f"- prior: {prior}" + (f" ({settings['prior_batches']} batches of {settings['batch_size']} from "
                                        f"`{settings['task']}`, max length {settings['max_length']}, seed "
                                        f"{settings['seed']})" if prior == "gradient" else ""))
    lines.append(f"- command: `{result['command']}`")
    return lines


def _energy_section(result: dict) -> list[str]:
    lines = ["", "Energy share: the share of ||dW||_F^2 in the k largest-magnitude coefficients of the orthonormal "
             "2-D transform, k a share of the M x N entries. Orderings: original; random (a random permutation of "
             "rows and columns, the control); self (S2FT's nearest-neighbour chain computed from dW itself: an "
             "oracle); prior (the chain computed from the gradient prior, which S2FT can use before training). "
             "White noise: an i.i.d. Gaussian matrix of the same shape (a flat spectrum; its 'self' row is the "
             "gain an ordering finds where there is no structure at all).", ""]
    shown = [FRACTIONS.index(f) for f in (1e-3, 1e-2, 1e-1)]
    header = "| layer type | matrices | transform | ordering | " + " | ".join(
        f"top {FRACTIONS[i] * 100:g}%" for i in shown) + " | flatness |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for group, data in result["summary"].items():
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
    return lines


def _errors_section(result: dict) -> list[str]:
    lines = ["## Approximation error at equal parameter budgets", "",
             "Relative Frobenius error ||dW - A||_F / ||dW||_F of the best approximation A with P parameters, "
             "mean over all matrices. With an orthonormal transform the best coefficients on a fixed set of "
             "locations are dW's own there, so a spectral error is sqrt(1 - energy share kept). The S2FT "
             "permutations are not counted in P (S2FT derives them from the prior).", ""]
    keys = list(APPROXIMATIONS)
    lines += ["| rank r | P = r(M+N) (mean) | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for row in result["summary"]["all"]["errors"]:
        budget = _mean(e["budget"] for r in result["matrices"] for e in r["errors"] if e["rank"] == row["rank"])
        lines.append(f"| {row['rank']} | {budget:,.0f} | " + " | ".join(_num(row[k]) for k in keys) + " |")
    return lines + [""] + [f"- `{key}`: {text}" for key, text in APPROXIMATIONS.items()]


def _claims_section(result: dict) -> list[str]:
    counts = result["counts"]
    pairs, mats = counts["pairs"], counts["matrices"]
    return [
        "", "## The claims, counted", "",
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


def _locations_section(result: dict) -> list[str]:
    inputs = result["inputs"]
    locations = [r for r in result["matrices"] if r.get("locations")]
    if not locations:
        if inputs.get("adapter") and not inputs.get("tuned"):
            return ["", "Adapter locations are compared with a full fine-tuning dW only when `--tuned` is given too."]
        return []
    lines = ["", "## Adapter locations against the full fine-tuning dW", "",
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
    return lines


def _matrices_section(result: dict) -> list[str]:
    lines = ["", "## Per matrix", "", "| matrix | shape | ||dW||_F | DCT top 1% | random | self | prior | "
             "flatness DCT | prior cosine |", "|---|---|---|---|---|---|---|---|---|"]
    one = FRACTIONS.index(1e-2)
    for r in result["matrices"]:
        e = r["energy"]["dct"]
        lines.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['norm']:.4g} | {_pct(e['original'][one])} "
                     f"| {_pct(e['random'][one])} | {_pct(e['self'][one])} | "
                     f"{_pct(e['prior'][one]) if 'prior' in e else '-'} | {_num(r['flatness']['dct']['original'])} | "
                     f"{_num(r['prior_cosine'])} |")
    return lines + ["", f"Plots: [{ENERGY_PLOT}]({ENERGY_PLOT}) (energy curves per layer type), "
                    f"[{ERROR_PLOT}]({ERROR_PLOT}) (error against budget).", ""]
