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


def test_cli_help_lists_subcommands():
    out = subprocess.run([str(Path(sys.executable).parent / "exaggerate"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("stage", "explain", "params"):
        assert word in out.stdout


def test_cli_reports_bad_params_by_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("base:\n  num_bins: 1\n")
    out = subprocess.run([str(Path(sys.executable).parent / "exaggerate"), "params", "--params", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "base.num_bins: got 1, expected an integer >= 2" in out.stderr
