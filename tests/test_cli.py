"""Every command-line entry point starts, and the bench and train CLIs run end to end on tiny inputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["train", "export", "calibration", "runtime.stream", "runtime.bench",
                                    "runtime.synthetic"])
def test_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr


def test_bench_writes_json(onnx_model, tmp_path):
    from runtime.bench import main

    out = tmp_path / "bench.json"
    assert main(["--model", str(onnx_model), "--iters", "3", "--batch", "1", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for b in ("1", "2"):
        r = res["batches"][b]
        assert r["end_to_end"]["p50_ms"] >= r["model_only"]["p50_ms"] > 0


def test_train_cli_reports_bad_data(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                        "--steps", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr


def test_export_cli_reports_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "export", "onnx", str(tmp_path / "c.pt"), "--out", str(tmp_path / "m.onnx")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr
