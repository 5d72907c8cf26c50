import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_as_cpu_smoke_test():
    out = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--image-size", "32",
                          "--widths", "8", "16", "--steps", "1", "--warmup", "1", "--cpu-bf16", "--channels-last"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "iterations/s at 32x32" in out.stdout and "last losses finite: True" in out.stdout
    assert "bf16 autocast, channels-last:" in out.stdout and "bf16 / float32 speed ratio" in out.stdout
    gflop = float(re.search(r"FLOPs per iteration \(forward and backward of G, D and f\): ([\d.]+) GFLOP",
                            out.stdout).group(1))
    assert gflop > 0 and "TFLOP/s" in out.stdout and "MFU" not in out.stdout  # no known peak on a CPU
    assert "GPU memory" not in out.stdout  # nothing to report on a CPU
    # A peak given: MFU, and the compiled networks (G and f) train too.
    out = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--image-size", "32",
                          "--widths", "8", "16", "--steps", "1", "--warmup", "1", "--compile",
                          "--peak-tflops", "1", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "float32, compiled (g f):" in out.stdout and "compiled / eager speed ratio, float32:" in out.stdout
    assert re.search(r"MFU [\d.]+% of 1\b", out.stdout) and "last losses finite: False" not in out.stdout


def test_cli_help_lists_subcommands():
    out = subprocess.run([str(Path(sys.executable).parent / "exaggerate"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("stage", "explain", "params", "sweep", "tune"):
        assert word in out.stdout


def test_cli_reports_bad_params_by_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("base:\n  num_bins: 1\n")
    out = subprocess.run([str(Path(sys.executable).parent / "exaggerate"), "params", "--params", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "base.num_bins: got 1, expected an integer >= 2" in out.stderr


def test_bench_series_times_every_setting_against_float32(tmp_path):
    # Run outside the repository: no trained outputs there, so random weights and queries.
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_series.py"), "--params",
                          str(REPO / "params.yaml"), "--queries", "2", "--repeats", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if "ms/series" in line]
    assert [r.split("  ")[0].strip() for r in rows] == ["float32", "float32 channels_last", "bf16 autocast",
                                                         "bf16 autocast channels_last"]
    assert "x 1.00 vs float32" in rows[0] and "random weights" in out.stdout


def test_bench_training_step_times_both_ops_in_turns():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_training_step.py"), "--params",
                          str(REPO / "params.yaml"), "--widths", "8", "16", "--rounds", "1", "--steps", "1",
                          "--warmup", "1", "--threads", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    best = dict(re.findall(r"^(plain ops|folded \(default\)): best ([\d.]+) s/step", out.stdout, re.M))
    assert set(best) == {"plain ops", "folded (default)"} and all(float(v) > 0 for v in best.values())
    ratio = float(re.search(r"plain / folded time per step \(best rounds\): ([\d.]+)", out.stdout).group(1))
    assert ratio == pytest.approx(float(best["plain ops"]) / float(best["folded (default)"]), rel=0.05)
    assert "G widths [8, 16]" in out.stdout and "1 threads" in out.stdout
