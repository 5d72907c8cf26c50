"""exaggerate.parallel (`exaggerate benchmark --jobs N`): independent stages run at the same time,
each is recorded in dvc.lock as dvc repro would record it, a rerun runs only what changed, and a
failure stops new stages without losing the finished ones."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exaggerate.parallel import PipelineError, load_stages, plan, run_parallel, upstream

PY = sys.executable
BIN = Path(PY).parent


def _py(code: str) -> str:
    """A stage command running code, kept in a script of its own under the repository's steps/."""
    steps = Path("steps")
    steps.mkdir(exist_ok=True)
    path = steps / f"step{len(list(steps.iterdir()))}.py"
    path.write_text(code)
    return f"{PY} {path}"


# a waits for b to have started: with one stage at a time it would give up and fail.
WAIT_FOR_B = ("import pathlib, time\n"
              "m = pathlib.Path('markers/b_started')\n"
              "t = time.time()\n"
              "while not m.exists() and time.time() - t < 30: time.sleep(0.05)\n"
              "assert m.exists(), 'b never started while a ran'\n"
              "open('markers/runs', 'a').write('a\\n')\n"
              "pathlib.Path('out/a').mkdir(parents=True, exist_ok=True)\n"
              "pathlib.Path('out/a/a.txt').write_text('a')\n")
B = ("import pathlib\n"
     "pathlib.Path('markers/b_started').touch()\n"
     "open('markers/runs', 'a').write('b\\n')\n"
     "pathlib.Path('out').mkdir(exist_ok=True)\n"
     "pathlib.Path('out/b.txt').write_text(pathlib.Path('in.txt').read_text())\n")
C = ("import pathlib\n"
     "open('markers/runs', 'a').write('c\\n')\n"
     "pathlib.Path('out/c.txt').write_text(pathlib.Path('out/a/a.txt').read_text() + pathlib.Path('out/b.txt').read_text())\n")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ.get('PATH', '')}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True)
    (tmp_path / "markers").mkdir()
    (tmp_path / "in.txt").write_text("b")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    stages = {
        "a": {"wdir": "..", "cmd": _py(WAIT_FOR_B), "outs": ["out/a"]},
        "b": {"wdir": "..", "cmd": _py(B), "deps": ["in.txt"], "outs": ["out/b.txt"]},
        "c": {"wdir": "..", "cmd": _py(C), "deps": ["out/a/a.txt", "out/b.txt"], "outs": [{"out/c.txt": {"cache": False}}]},
    }
    (pipe / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return tmp_path


def _runs(repo: Path) -> list[str]:
    path = repo / "markers" / "runs"
    return path.read_text().split() if path.exists() else []


def _status(target: str) -> dict:
    out = subprocess.run(["dvc", "status", target, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "{}")


def test_the_graph_links_a_dep_to_the_output_folder_holding_it(repo):
    stages = load_stages(Path("pipe/dvc.yaml"))
    assert stages["c"].deps == ("out/a/a.txt", "out/b.txt")
    assert upstream(stages) == {"a": set(), "b": set(), "c": {"a", "b"}}


def test_independent_stages_run_together_and_are_recorded_then_a_rerun_runs_what_changed(repo, capsys):
    assert plan("pipe/dvc.yaml") == ["a", "b", "c"]  # what a run would run, upstream first
    assert run_parallel("pipe/dvc.yaml", jobs=2, threads=1) == 0
    assert (repo / "out" / "c.txt").read_text() == "ab"
    assert sorted(_runs(repo)) == ["a", "b", "c"] and _runs(repo)[-1] == "c"
    assert _status("pipe/dvc.yaml") == {}  # dvc repro would find nothing to do
    lock = yaml.safe_load((repo / "pipe" / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b", "c"}
    assert (repo / "pipe" / "logs" / "a.log").exists()
    # Cached outputs are ignored by git, as dvc repro leaves them; `cache: false` ones are not.
    ignored = lambda p: subprocess.run(["git", "check-ignore", "-q", p]).returncode == 0  # noqa: E731
    assert ignored("out/b.txt") and ignored("out/a") and not ignored("out/c.txt")

    assert run_parallel("pipe/dvc.yaml", jobs=2) == 0
    assert "every stage is up to date" in capsys.readouterr().out
    assert len(_runs(repo)) == 3

    (repo / "out" / ".gitignore").write_text((repo / "out" / ".gitignore").read_text().replace("/b.txt\n", "") + "/x")
    (repo / "in.txt").write_text("B")  # b's input: b and c rerun, a does not
    (repo / "markers" / "b_started").unlink()
    assert plan("pipe/dvc.yaml") == ["b", "c"]  # c is not out of date yet, but downstream of b
    assert _runs(repo)[3:] == []  # planning runs nothing
    assert run_parallel("pipe/dvc.yaml", jobs=2) == 0
    assert _runs(repo)[3:] == ["b", "c"]
    assert (repo / "out" / "c.txt").read_text() == "aB"
    # b's entry, removed above behind a last line without its newline, is back on its own line, once
    assert (repo / "out" / ".gitignore").read_text().splitlines().count("/b.txt") == 1
    assert "/x" in (repo / "out" / ".gitignore").read_text().splitlines()
    assert _status("pipe/dvc.yaml") == {}


def test_a_failed_stage_stops_what_depends_on_it_and_keeps_what_finished(repo, capsys):
    dvcfile = repo / "pipe" / "dvc.yaml"
    raw = yaml.safe_load(dvcfile.read_text())
    raw["stages"]["b"]["cmd"] = _py("import sys; print('b broke on purpose'); sys.exit(3)")
    raw["stages"]["a"]["cmd"] = _py(WAIT_FOR_B.replace("'markers/b_started'", "'in.txt'"))
    dvcfile.write_text(yaml.safe_dump(raw))
    assert run_parallel("pipe/dvc.yaml", jobs=2, threads=1) == 1
    out = capsys.readouterr().out
    assert "FAILED b (exit 3" in out and "b.log" in out
    assert "b broke on purpose" in (repo / "pipe" / "logs" / "b.log").read_text()
    assert "c" not in _runs(repo)  # c never started
    assert set(_status("pipe/dvc.yaml")) == {"pipe/dvc.yaml:b", "pipe/dvc.yaml:c"}  # a is recorded


def _make_b_slow(repo):
    """Stage b writes out/b.txt only after 5 s: it is still running when the runner is stopped."""
    dvcfile = repo / "pipe" / "dvc.yaml"
    raw = yaml.safe_load(dvcfile.read_text())
    raw["stages"]["b"]["cmd"] = _py("import pathlib, time\ntime.sleep(5)\npathlib.Path('out').mkdir(exist_ok=True)\n"
                                    "pathlib.Path('out/b.txt').write_text('late')\n")
    dvcfile.write_text(yaml.safe_dump(raw))


def test_an_interrupt_stops_the_running_stages_and_records_none_of_them(repo, monkeypatch):
    import exaggerate.parallel as parallel

    _make_b_slow(repo)

    def interrupt(_):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(parallel.time, "sleep", interrupt)  # Ctrl-C at the first wait
        run_parallel("pipe/dvc.yaml", jobs=2, threads=1)
    parallel.time.sleep(6)
    assert not (repo / "out" / "b.txt").exists()  # b was stopped, not left running
    assert "pipe/dvc.yaml:b" in _status("pipe/dvc.yaml")
    assert not (repo / "pipe" / "dvc.lock").exists()


def test_a_terminate_signal_stops_the_running_stages_like_an_interrupt(repo, monkeypatch):
    # `kill PID` (SIGTERM) of the runner must not leave its stages running unrecorded: each runs
    # in its own session, so nothing else would stop them.
    import os
    import signal

    import exaggerate.parallel as parallel

    _make_b_slow(repo)
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(parallel.time, "sleep", lambda _: os.kill(os.getpid(), signal.SIGTERM))
        run_parallel("pipe/dvc.yaml", jobs=2, threads=1)
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
    parallel.time.sleep(6)
    assert not (repo / "out" / "b.txt").exists()
    assert "pipe/dvc.yaml:b" in _status("pipe/dvc.yaml")


def test_bad_jobs_and_a_pipeline_without_stages_are_refused(repo):
    with pytest.raises(PipelineError, match="--jobs 0"):
        run_parallel("pipe/dvc.yaml", jobs=0)
    (repo / "empty").mkdir()
    (repo / "empty" / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(PipelineError, match="empty/dvc.yaml: no stages"):
        load_stages(Path("empty/dvc.yaml"))
    with pytest.raises(PipelineError, match="missing/dvc.yaml: cannot read the pipeline: .*does not exist"):
        load_stages(Path("missing/dvc.yaml"))


def test_the_benchmark_refuses_dvc_repro_arguments_with_jobs_or_a_dry_run():
    from exaggerate.benchmark import run_benchmark

    spec = Path(__file__).resolve().parents[1] / "benchmark" / "params.yaml"
    with pytest.raises(PipelineError, match="--jobs 2: .*apply only to a run with --jobs 1"):
        run_benchmark(spec, ("--keep-going",), jobs=2)
    with pytest.raises(PipelineError, match="--dry-run: .*apply only to a run with --jobs 1"):
        run_benchmark(spec, ("--keep-going",), dry_run=True)


# The audit's shape: foreach and matrix stages filled in from vars, and a report whose dep is the
# folder that holds the per-arm stages' outputs.
ARM = ("import pathlib, sys\n"
       "arm, seed = sys.argv[1], sys.argv[2]\n"
       "open('markers/runs', 'a').write(f'{arm}-{seed}\\n')\n"
       "pathlib.Path(f'res/{arm}/seed{seed}').mkdir(parents=True, exist_ok=True)\n"
       "pathlib.Path(f'res/{arm}/seed{seed}/x.txt').write_text(arm + seed)\n")
REPORT = ("import pathlib\n"
          "open('markers/runs', 'a').write('report\\n')\n"
          "found = sorted(str(p) for p in pathlib.Path('res').rglob('x.txt'))\n"
          "pathlib.Path('report.txt').write_text(' '.join(found))\n")


def test_foreach_and_matrix_stages_run_side_by_side_as_dvc_names_them(repo):
    (repo / "params.yaml").write_text(yaml.safe_dump({"audit": {"seeds": [0, 1]}}))
    (repo / "aud").mkdir()
    arm_cmd = _py(ARM)
    (repo / "aud" / "dvc.yaml").write_text(yaml.safe_dump({
        "vars": ["../params.yaml:audit"],
        "stages": {
            "explainer": {"matrix": {"arm": ["biased", "clean"], "seed": "${audit.seeds}"}, "wdir": "..",
                          "cmd": arm_cmd + " ${item.arm} ${item.seed}", "outs": ["res/${item.arm}/seed${item.seed}"]},
            "extra": {"foreach": ["biased"], "do": {"wdir": "..", "cmd": arm_cmd + " ${item} 9",
                                                     "outs": ["res/${item}/seed9"]}},
            "report": {"wdir": "..", "cmd": _py(REPORT), "deps": ["res/biased", "res/clean"],
                       "outs": [{"report.txt": {"cache": False}}]},
        }}))
    stages = load_stages(Path("aud/dvc.yaml"))
    assert set(stages) == {"explainer@biased-0", "explainer@biased-1", "explainer@clean-0", "explainer@clean-1",
                           "extra@biased", "report"}
    assert stages["explainer@clean-1"].cmd.endswith(" clean 1")
    assert stages["explainer@clean-1"].outs == ("res/clean/seed1",)
    # the report's dep holds the explainers' outputs: it waits for all of them
    assert upstream(stages)["report"] == set(stages) - {"report"}
    assert plan("aud/dvc.yaml")[-1] == "report"
    assert run_parallel("aud/dvc.yaml", jobs=3, threads=1) == 0
    assert _runs(repo)[-1] == "report" and len(_runs(repo)) == 6
    assert len((repo / "report.txt").read_text().split()) == 5
    assert _status("aud/dvc.yaml") == {}  # each recorded under the name dvc repro gives it
    lock = yaml.safe_load((repo / "aud" / "dvc.lock").read_text())
    assert {"explainer@biased-0", "extra@biased", "report"} <= set(lock["stages"])


def test_the_audit_command_refuses_dvc_repro_arguments_with_jobs_in_one_line(capsys):
    from exaggerate.cli import main

    assert main(["audit", "run", "--jobs", "2", "--", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exaggerate: error: --jobs 2: dvc repro arguments (--force)") and "Traceback" not in err
