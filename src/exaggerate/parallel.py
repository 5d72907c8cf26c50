"""Run a DVC pipeline's stages several at a time: `exaggerate benchmark --jobs N`,
`exaggerate audit run --jobs N`.

`dvc repro` runs one stage at a time, so the benchmark's explainer runs, independent of each
other, would wait in line on a machine that can hold several (a GPU, or CPU cores that one
small training run does not use well). Here the stages `dvc status` reports, and every stage
downstream of them, are scheduled over the graph of the dvc.yaml (a stage depends on another
when one of its deps is, lies under or holds one of the other's outputs). A stage starts when none
of its upstream stages is still to run, runs the command the dvc.yaml gives it with its share of
the CPU threads, and once it succeeds `dvc commit` records it in dvc.lock and the cache exactly
as `dvc repro` would have; a stage whose inputs turn out unchanged is skipped. When a stage
fails no new stage starts: those running finish and are recorded, and the failed one is named
with its log, so a rerun resumes from there. Ctrl-C or a SIGTERM stops the running stages and
records none of them. Each stage's output goes to its own log file.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ExaggerateError


class PipelineError(ExaggerateError):
    """A dvc.yaml this scheduler cannot run, or a dvc command that failed."""


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    wdir: Path
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    # The outputs DVC caches (not `cache: false`): git must ignore them, as dvc repro arranges.
    cached: tuple[str, ...] = ()


def load_stages(dvcfile: Path) -> dict[str, Stage]:
    """The stages of a dvc.yaml as DVC resolves them (foreach and matrix stages expanded, each
    named as `dvc status` names it, e.g. "explainer@biased-0"; ${...} filled in from vars and
    params), their paths relative to the current folder."""
    from dvc.dependency.param import ParamsDependency
    from dvc.dvcfile import load_file
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    rel = os.path.relpath
    try:
        with Repo(str(Path(dvcfile).parent)) as repo:
            resolved = dict(load_file(repo, str(dvcfile)).stages)
            out = {}
            for name, st in resolved.items():
                cmd = " && ".join(st.cmd) if isinstance(st.cmd, list) else st.cmd
                deps = tuple(rel(d.fs_path) for d in st.deps if not isinstance(d, ParamsDependency))
                out[name] = Stage(name, cmd, Path(rel(st.wdir)), deps, tuple(rel(o.fs_path) for o in st.outs),
                                  tuple(rel(o.fs_path) for o in st.outs if o.use_cache))
    except DvcException as exc:
        raise PipelineError(f"{dvcfile}: cannot read the pipeline: {exc}") from exc
    if not out:
        raise PipelineError(f"{dvcfile}: no stages")
    return out


def _under(path: str, out: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def upstream(stages: dict[str, Stage]) -> dict[str, set[str]]:
    """For each stage, the stages producing any of its deps: an output that is the dep, lies under
    it (a dep on a folder holding other stages' outputs) or holds it, as DVC links them."""
    return {s.name: {o.name for o in stages.values() if o.name != s.name
                     and any(_under(d, out) or _under(out, d) for d in s.deps for out in o.outs)}
            for s in stages.values()}


def ignore_outputs(stage: Stage) -> None:
    """Add the stage's cached outputs to the .gitignore beside each, in DVC's form ("/name"):
    `dvc commit` records a stage without doing so, which `dvc repro` does."""
    for path in stage.cached:
        out = Path(path)
        gitignore = out.parent / ".gitignore"
        entry = "/" + out.name
        text = gitignore.read_text() if gitignore.exists() else ""
        if entry not in text.splitlines():
            # A file whose last line lacks its newline keeps that line whole.
            gitignore.write_text(text + ("\n" if text and not text.endswith("\n") else "") + entry + "\n")


def _dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], capture_output=True, text=True)


def changed(dvcfile: Path, stage: Optional[str] = None) -> set[str]:
    """Names of the stages of dvcfile that `dvc status` finds out of date (all, or the one given)."""
    target = str(dvcfile) + (f":{stage}" if stage else "")
    res = _dvc("status", target, "--json")
    if res.returncode != 0:
        raise PipelineError(f"dvc status {target} failed: {res.stderr.strip() or res.stdout.strip()}")
    report = json.loads(res.stdout or "{}")
    prefix = f"{dvcfile}:"
    return {key[len(prefix):] for key in report if key.startswith(prefix)}


def downstream(names: set[str], ups: dict[str, set[str]]) -> set[str]:
    todo, seen = list(names), set(names)
    while todo:
        n = todo.pop()
        for s, us in ups.items():
            if n in us and s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


def plan(dvcfile: str | Path) -> list[str]:
    """The stages a run of dvcfile would run, upstream first: those `dvc status` finds out of date
    and every stage downstream of them (`dvc repro --dry` names only the first)."""
    dvcfile = Path(dvcfile)
    ups = upstream(load_stages(dvcfile))
    todo, order = downstream(changed(dvcfile), ups), []
    while todo:
        ready = sorted(n for n in todo if not ups[n] & todo)
        order += ready
        todo -= set(ready)
    return order


def run_parallel(dvcfile: str | Path, jobs: int, threads: int = 0, log_dir: str | Path = "",
                 cores: Optional[int] = None, poll_s: float = 0.5) -> int:
    """Run the out-of-date stages of dvcfile, at most `jobs` at once; 0 when all succeeded.
    threads: each stage's CPU threads (OMP_NUM_THREADS; 0: the cores shared out by jobs)."""
    if jobs < 1:
        raise PipelineError(f"--jobs {jobs}: expected an integer >= 1")
    dvcfile = Path(dvcfile)
    stages = load_stages(dvcfile)
    ups = upstream(stages)
    todo = downstream(changed(dvcfile), ups)
    if not todo:
        print(f"{dvcfile}: every stage is up to date", flush=True)
        return 0
    log_dir = Path(log_dir) if log_dir else dvcfile.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cores = cores or os.cpu_count() or 1
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads or max(1, cores // jobs))
    total, done, failed = len(todo), 0, []
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    print(f"{dvcfile}: {total} stage(s) to run, {jobs} at a time, {env['OMP_NUM_THREADS']} thread(s) each; "
          f"logs in {log_dir}/", flush=True)
    def terminated(signum, frame):  # `kill` or a scheduler's stop: the same as Ctrl-C
        raise KeyboardInterrupt(f"signal {signum}")

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated) if on_main_thread else None
    try:
        while todo or running:
            # Collect the stages that finished and record them.
            for name, (proc, start, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                minutes = (time.monotonic() - start) / 60
                if proc.returncode != 0:
                    failed.append(name)
                    print(f"FAILED {name} (exit {proc.returncode}, {minutes:.1f} min): see {log_dir / (name + '.log')}",
                          flush=True)
                    continue
                res = _dvc("commit", "--force", f"{dvcfile}:{name}")
                if res.returncode != 0:
                    failed.append(name)
                    print(f"FAILED {name}: dvc commit: {res.stderr.strip()}", flush=True)
                    continue
                ignore_outputs(stages[name])
                done += 1
                print(f"[{done}/{total}] {name} done in {minutes:.1f} min", flush=True)
            if failed:
                todo.clear()  # start nothing new; wait for the running stages
            # Start what is ready.
            for name in sorted(todo):
                if len(running) >= jobs:
                    break
                if ups[name] & (todo | set(running)):
                    continue
                todo.discard(name)
                if not changed(dvcfile, name):  # its upstream stages reproduced the same outputs
                    done += 1
                    print(f"[{done}/{total}] {name} unchanged, skipped", flush=True)
                    continue
                st = stages[name]
                log = open(log_dir / f"{name}.log", "w")
                proc = subprocess.Popen(st.cmd, shell=True, cwd=st.wdir, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                running[name] = (proc, time.monotonic(), log)
                print(f"started {name}: {st.cmd}", flush=True)
            if running:
                time.sleep(poll_s)
    except BaseException:  # Ctrl-C, or a dvc command that broke: stop the stages, record nothing half-done
        for name, (proc, _, log) in running.items():
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the shell and the command it started
            except ProcessLookupError:
                pass
            proc.wait()
            log.close()
            print(f"stopped {name}: not recorded; a rerun starts it again", file=sys.stderr, flush=True)
        raise
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if failed:
        print(f"{dvcfile}: {len(failed)} stage(s) failed: {', '.join(failed)}; the others are recorded, "
              "a rerun resumes", file=sys.stderr, flush=True)
        return 1
    print(f"{dvcfile}: all {total} stage(s) done", flush=True)
    return 0


def check_repro_args(dvc_args: tuple[str, ...], jobs: int, dry_run: bool) -> None:
    """dvc repro's own arguments go only to dvc repro (jobs 1, not a dry run)."""
    if (jobs > 1 or dry_run) and dvc_args:
        what = "--dry-run" if dry_run else f"--jobs {jobs}"
        raise PipelineError(f"{what}: dvc repro arguments ({' '.join(dvc_args)}) apply only to a run with --jobs 1")


def repro(dvcfile: str | Path, dvc_args: tuple[str, ...] = (), jobs: int = 1, threads: int = 0,
          dry_run: bool = False, label: str = "") -> int:
    """Run dvcfile: with dvc repro (jobs 1; dvc_args passed on), with jobs > 1 through
    run_parallel, or (dry_run) only print the stages a run would run. label prefixes what it prints."""
    label = label or str(dvcfile)
    check_repro_args(dvc_args, jobs, dry_run)
    if dry_run:
        stages = plan(dvcfile)
        print(f"{label}: {len(stages)} stage(s) would run" + "".join(f"\n  {name}" for name in stages), flush=True)
        return 0
    if jobs > 1:
        from .tracking import prepare_store

        prepare_store()  # before stages open a new store side by side
        return run_parallel(dvcfile, jobs, threads)
    cmd = ["dvc", "repro", str(dvcfile), *dvc_args]
    print(f"{label}: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)
