"""The benchmark's report (benchmark/report/): per task the mean and range of each metric over
the explainer seeds, the issue's acceptance checks on the means, each seed's main figures with a
warning where the seeds split or a seed does not keep the query, and every run's series grid;
logged to MLflow as one run.

Only the report stage depends on this module (exaggerate.benchmark.dvc_yaml), so changing how
results are tabulated never invalidates a finished run."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .benchmark import REPORT, Spec, run_dir, task_dir
from .evaluate import ORACLE_READS_SHARE, QUERY_KEPT_SHARE
from .io import read_json, write_json, write_text
from .report import QUERY_LOST, reconstruction_text

# (column, metrics.json key path, label)
COLUMNS = (
    ("mae", ("explainer", "compatibility_mae"), "MAE"),
    ("monotone", ("explainer", "monotonic_share"), "monotone"),
    ("flip", ("explainer", "flip_rate"), "flip"),
    ("agreement", ("explainer", "oracle_agreement"), "oracle agreement"),
    ("real_agreement", ("real_images", "oracle_agreement"), "real images' agreement"),
    ("paper_mae", ("explainer_paper_series", "compatibility_mae"), "paper series MAE"),
    ("paper_agreement", ("explainer_paper_series", "oracle_agreement"), "paper series agreement"),
    ("fid", ("explainer", "fid_oracle"), "fid_oracle"),
    ("baseline_fid", ("baseline", "fid_oracle"), "baseline fid_oracle"),
    ("kid", ("explainer", "kid_oracle"), "KID_oracle"),
    ("baseline_kid", ("baseline", "kid_oracle"), "baseline KID_oracle"),
    ("recon", ("explainer", "reconstruction_l1"), "recon L1"),
    ("speedup", ("speedup_explainer_vs_baseline",), "speed-up"),
    ("oracle_task_accuracy", ("oracle_task_accuracy",), "oracle task acc."),
)


# What the speed-up is made of (evaluate.series_cost), mean over seeds: (column, key path, label).
COST = (
    ("explainer_ms", ("explainer_on_baseline_queries", "seconds_per_series"), "explainer ms per series"),
    ("baseline_ms", ("baseline", "seconds_per_series"), "baseline ms per series"),
    ("g_images", ("cost_per_series", "explainer", "generator_images"), "G images per series"),
    ("f_images", ("cost_per_series", "explainer", "classifier_images"), "explainer's f images"),
    ("b_images", ("cost_per_series", "baseline", "classifier_images"), "baseline's f images"),
    ("b_steps", ("cost_per_series", "baseline", "steps_per_image"), "baseline steps per image"),
    ("g_mflops", ("cost_per_series", "generator_mflops_per_image"), "G MFLOPs"),
    ("f_mflops", ("cost_per_series", "classifier_mflops_per_image"), "f MFLOPs"),
    ("flops_ratio", ("cost_per_series", "flops_ratio"), "FLOP ratio"),
    ("e_rate", ("cost_per_series", "explainer", "gflop_per_s"), "explainer GFLOP/s"),
    ("b_rate", ("cost_per_series", "baseline", "gflop_per_s"), "baseline GFLOP/s"),
)


# Columns shown seed by seed below the means, and when seeds count as split: their oracle
# agreements differ by more than this share of the real images' agreement (a mean over two
# seeds, one plausible and one adversarial, would otherwise read as one middling result).
PER_SEED = ("agreement", "mae", "recon", "fid")
SEED_SPLIT = 0.25


def _get(d: dict, keys: tuple) -> Optional[float]:
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return float(d)


def checks(row: dict) -> dict[str, Optional[bool]]:
    """The issue's acceptance criteria on a task's means (None when a figure is absent)."""
    def cmp(a, b, fn):
        return None if a is None or b is None else bool(fn(a, b))
    m = {k: (v["mean"] if v else None) for k, v in row.items()}
    return {
        "MAE <= 0.05": cmp(m["mae"], 0.05, lambda a, b: a <= b),
        "monotone >= 0.95": cmp(m["monotone"], 0.95, lambda a, b: a >= b),
        f"agreement >= {ORACLE_READS_SHARE:g} x real": cmp(m["agreement"], m["real_agreement"],
                                                           lambda a, b: a >= ORACLE_READS_SHARE * b),
        "recon L1 <= 0.05": cmp(m["recon"], 0.05, lambda a, b: a <= b),
        "fid_oracle < baseline": cmp(m["fid"], m["baseline_fid"], lambda a, b: a < b),
        "oracle gate": cmp(m["oracle_task_accuracy"], 0.9, lambda a, b: a >= b),
        "speed-up >= 100x": cmp(m["speedup"], 100, lambda a, b: a >= b),
    }


def summarise(spec: Spec) -> dict:
    out = {"split": spec.split, "seeds": spec.seeds, "tasks": {}}
    for task in spec.tasks:
        per_seed = {}
        for seed in spec.seeds:
            path = run_dir(task, seed) / "evaluate" / "metrics.json"
            if path.is_file():
                per_seed[seed] = read_json(path)
        row, cost = {}, {}
        for columns, into in ((COLUMNS, row), (COST, cost)):
            for col, keys, _ in columns:
                vals = [v for v in (_get(m, keys) for m in per_seed.values()) if v is not None]
                into[col] = {"mean": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals)),
                             "n": len(vals)} if vals else None
        by_seed = {seed: {col: _get(m, keys) for col, keys, _ in COLUMNS if col in PER_SEED}
                   | {"median_image_l1": _get(m, ("explainer", "median_image_l1"))}
                   for seed, m in sorted(per_seed.items())}
        bins = task_dir(task) / "bin" / "metrics.json"
        out["tasks"][task] = {"seeds": sorted(per_seed), "metrics": row, "cost": cost, "checks": checks(row),
                              "bin_images": ([int(b["selected"]) for b in read_json(bins)["bins"]]
                                             if bins.is_file() else None),
                              "per_seed": by_seed, "seeds_split": seeds_split(row),
                              "query_lost": [seed for seed, m in sorted(per_seed.items())
                                             if m.get("explainer", {}).get("query_kept") is False],
                              "overrides": {k: v for k, v in spec.tasks[task].items()}}
    return out


def seeds_split(row: dict) -> Optional[bool]:
    """Whether the seeds' oracle agreements differ by more than SEED_SPLIT x the real images'
    (None with fewer than two seeds or no reference)."""
    a, real = row.get("agreement"), row.get("real_agreement")
    if not a or not real or a["n"] < 2 or real["mean"] <= 0:
        return None
    return bool(a["max"] - a["min"] > SEED_SPLIT * real["mean"])


def table(summary: dict) -> str:
    def cell(v, col):
        if v is None:
            return "absent"
        fmt = "{:.0f}" if col == "speedup" else ("{:.3g}" if col in ("fid", "baseline_fid") else "{:.3f}")
        if col in ("kid", "baseline_kid"):
            fmt = "{:.4f}"
        text = fmt.format(v["mean"])
        return text if v["n"] < 2 or v["min"] == v["max"] else f"{text} [{fmt.format(v['min'])}, {fmt.format(v['max'])}]"
    lines = ["| task | seeds | " + " | ".join(label for _, _, label in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for task, t in summary["tasks"].items():
        lines.append(f"| {task} | {len(t['seeds'])} | " + " | ".join(cell(t["metrics"][c], c) for c, _, _ in COLUMNS)
                     + " |")
    lines += ["", f"Mean [min, max] over explainer seeds {summary['seeds']}, {summary['split']} split. "
              "Acceptance checks on the means (yes / no / absent):", ""]
    names = list(next(iter(summary["tasks"].values()))["checks"]) if summary["tasks"] else []
    lines += ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task, t in summary["tasks"].items():
        lines.append(f"| {task} | " + " | ".join({True: "yes", False: "NO", None: "absent"}[t["checks"][n]]
                                                for n in names) + " |")
    return "\n".join(lines + per_seed_table(summary) + bins_table(summary) + cost_table(summary)) + "\n"


def bins_text(bins: list[int]) -> str:
    """'bin 3', 'bins 1-8' or 'bins 1-3 and 6': runs of consecutive bins joined."""
    runs: list[list[int]] = []
    for k in bins:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    parts = [f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs]
    words = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return ("bin " if len(bins) == 1 else "bins ") + words


def bins_table(summary: dict) -> list[str]:
    """Each task's training images per posterior bin (its bin stage): the only real images of a bin
    that D sees, since training pairs are drawn from them. A task with empty bins is named."""
    rows = {task: t["bin_images"] for task, t in summary["tasks"].items() if t.get("bin_images")}
    if not rows:
        return []
    n = max(len(c) for c in rows.values())
    lines = ["", "Training images per posterior bin (the explainer's real images of each bin; D sees no others):",
             "", "| task | " + " | ".join(f"bin {k}" for k in range(n)) + " |", "|---|" + "---|" * n]
    lines += [f"| {task} | " + " | ".join(str(c) for c in counts) + " |" for task, counts in rows.items()]
    for task, counts in rows.items():
        empty = [k for k, c in enumerate(counts) if c == 0]
        if empty:
            lines += ["", f"**{task}: {bins_text(empty)} hold{'s' if len(empty) == 1 else ''} no training image.** "
                      "The bin stage kept none: f puts none of its training images there, or too few of "
                      "the two classes to match the bin's share of positives (the task's bin/metrics.json "
                      f"has both counts). So D never sees a real image of {'that bin' if len(empty) == 1 else 'those bins'}: "
                      "what G draws there answers to f's loss and to what D learnt of the other bins. "
                      "Look at the grid."]
    return lines


def cost_table(summary: dict) -> list[str]:
    """What each task's speed-up is made of, and what holds it below 100x where it is."""
    formats = {"explainer_ms": "{:.3g}", "baseline_ms": "{:.0f}", "g_images": "{:.1f}", "f_images": "{:.1f}",
               "g_mflops": "{:.3g}", "f_mflops": "{:.3g}", "e_rate": "{:.3g}", "b_rate": "{:.3g}"}

    def cell(v, col):
        if v is None:
            return "absent"
        return formats.get(col, "{:.0f}").format(v["mean"] * (1000 if col.endswith("_ms") else 1))
    lines = ["", "What a series costs each method (means over seeds; images and steps counted untimed on each "
             "run's first queries, FLOPs from torch.utils.flop_counter, the baseline's backward taken as twice its "
             "forward; the speed-up is the FLOP ratio times the quotient of the two FLOP rates):", "",
             "| task | " + " | ".join(label for _, _, label in COST) + " |", "|---|" + "---|" * len(COST)]
    for task, t in summary["tasks"].items():
        c = t.get("cost") or {}
        lines.append(f"| {task} | " + " | ".join(cell(c.get(col), col) for col, _, _ in COST) + " |")
    short = False
    for task, t in summary["tasks"].items():
        why = speedup_limit(task, t)
        if why:
            lines += ["", why]
            short = short or why.endswith(FLOPS_SHORT)
    if short:
        lines += ["", "Where the FLOPs fall short: the baseline's search is short and G costs several times f "
                  "per image. A classifier that costs more per image raises the ratio (the baseline pays for f "
                  "at every step, the explainer only at its probes)."]
    return lines


FLOPS_SHORT = "The FLOPs fall short."


def speedup_limit(task: str, t: dict) -> Optional[str]:
    """What holds a task's speed-up below 100x (None at 100x or above, or when the runs predate
    the cost figures). The time ratio is the FLOP ratio times the quotient of the FLOP rates the
    two methods ran at; the sentence says which of the two falls short."""
    speedup = (t["metrics"].get("speedup") or {}).get("mean")
    c = {k: (v or {}).get("mean") for k, v in (t.get("cost") or {}).items()}
    needed = ("flops_ratio", "e_rate", "b_rate", "b_steps", "b_images", "g_images", "g_mflops", "f_mflops")
    if speedup is None or speedup >= 100 or any(c.get(k) is None for k in needed):
        return None
    text = (f"**{task}: {speedup:.0f}x**, made of a FLOP ratio of {c['flops_ratio']:.0f} and FLOP rates of "
            f"{c['e_rate']:.3g} (explainer) against {c['b_rate']:.3g} GFLOP/s (baseline). The baseline reaches its "
            f"bins in {c['b_steps']:.0f} Adam steps per image ({c['b_images']:.0f} f passes per series); the "
            f"explainer's series is {c['g_images']:.1f} passes of a G that costs {c['g_mflops'] / c['f_mflops']:.1f}x "
            f"f per image ({c['g_mflops']:.3g} against {c['f_mflops']:.3g} MFLOPs).")
    if c["flops_ratio"] < 100:
        return f"{text} {FLOPS_SHORT}"
    return text + (f" The FLOPs would allow {c['flops_ratio']:.0f}x; the explainer's FLOP rate, "
                   f"{c['e_rate'] / c['b_rate']:.2g}x the baseline's, takes it below 100x.")


def per_seed_table(summary: dict) -> list[str]:
    """Each seed's figures, and a warning for every task whose seeds split."""
    labels = {col: label for col, _, label in COLUMNS}
    lines = ["", "Seed by seed (agreement as a share of the real images'):", "",
             "| task | seed | " + " | ".join(labels[c] for c in PER_SEED) + " |", "|---|---|" + "---|" * len(PER_SEED)]
    for task, t in summary["tasks"].items():
        real = (t["metrics"].get("real_agreement") or {}).get("mean")
        for seed, vals in t.get("per_seed", {}).items():
            cells = []
            for col in PER_SEED:
                v = vals.get(col)
                text = "absent" if v is None else ("{:.3g}" if col == "fid" else "{:.3f}").format(v)
                if col == "agreement" and v is not None and real:
                    text += f" ({v / real:.2f}x)"
                cells.append(text)
            lines.append(f"| {task} | {seed} | " + " | ".join(cells) + " |")
    for task, t in summary["tasks"].items():
        if t.get("seeds_split"):
            a, real = t["metrics"]["agreement"], t["metrics"]["real_agreement"]["mean"]
            lines += ["", f"**{task}: the seeds split.** Their oracle agreement spans {a['min']:.3f} to "
                      f"{a['max']:.3f}, more than {SEED_SPLIT:g} x the real images' {real:.3f}: the mean "
                      "stands for no seed; look at each seed's grid."]
        for seed in t.get("query_lost", []):
            vals = t["per_seed"].get(str(seed)) or t["per_seed"][seed]  # str keys once read back from JSON
            lines += ["", f"**{task}: seed {seed} does not keep the query.** "
                      f"{reconstruction_text(vals['recon'], vals['median_image_l1'])}, at or above "
                      f"{QUERY_KEPT_SHARE:g}: {QUERY_LOST} Do not average it in."]
    return lines


def grid_name(task: str, seed: int, seeds: list[int]) -> str:
    """The first seed's grid is <task>.png, the others' <task>_s<seed>.png."""
    return f"{task}.png" if seed == seeds[0] else f"{task}_s{seed}.png"


def report(spec: Spec) -> dict:
    import shutil

    from .tracking import benchmark_run

    summary = summarise(spec)
    text = table(summary)
    grids = REPORT / "grids"
    if grids.exists():
        shutil.rmtree(grids)
    grids.mkdir(parents=True)
    links = []
    for task in spec.tasks:
        for k, seed in enumerate(spec.seeds):
            grid, name = run_dir(task, seed) / "series_grid.png", grid_name(task, seed, spec.seeds)
            if grid.is_file():
                shutil.copy(grid, grids / name)
                links.append(f"[{task} seed {seed}](grids/{name})")
    body = ["# Benchmark report", "", text, "Series grids: " + ", ".join(links), ""]
    write_text(REPORT / "report.md", "\n".join(body))
    write_json(REPORT / "summary.json", summary)
    with benchmark_run(spec.split, spec.seeds, list(spec.tasks)) as tracker:
        for task, t in summary["tasks"].items():
            tracker.metrics({f"{task}.{col}": v["mean"] for col, v in t["metrics"].items() if v is not None})
        tracker.artifact(REPORT / "report.md")
        tracker.artifact(REPORT / "summary.json")
        for png in sorted(grids.glob("*.png")):
            tracker.artifact(png, "grids")
    print(text, end="")
    print(f"benchmark report: {REPORT / 'report.md'}")
    return summary
