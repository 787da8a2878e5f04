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


def test_train_cli_builds_the_stride4_model(tmp_path, synthetic_root):
    import torch

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "train", "--data", str(synthetic_root), "--out", str(out), "--steps", "2",
                        "--image-size", "64", "--student-stride", "4", "--teacher-stages", "1", "2", "3",
                        "--teacher-pool", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["config"]
    assert cfg["student_stride"] == 4 and tuple(cfg["teacher_out_indices"]) == (1, 2, 3) and cfg["teacher_pool"] == 1
    r = subprocess.run([sys.executable, "-m", "train", "--data", str(synthetic_root), "--out", str(tmp_path / "o2"),
                        "--size", "s", "--student-stride", "4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--student-stride is for --size lite" in r.stderr
    r = subprocess.run([sys.executable, "-m", "train", "--data", str(synthetic_root), "--out", str(tmp_path / "o3"),
                        "--teacher-pool", "0", "--steps", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "teacher pooling window 0" in r.stderr  # not silently the default 3


def test_train_cli_takes_each_familys_schedule_unless_told():
    """Without --steps / --batch-size a family trains on its own schedule, not EfficientAD's 70,000 x 1 (which
    would run GeneralAD's discriminator for hours); given values always win."""
    from train.cli import training_schedule
    from train.loop import PAPER_STEPS

    assert training_schedule("efficientad_lite", None, None) == (PAPER_STEPS, 1)
    assert training_schedule("generalad_lite", None, None) == (600, 8)
    assert training_schedule("crossclass_lite", None, None)[0] == 300
    assert training_schedule("generalad_lite", 50, None) == (50, 8)
    assert training_schedule("efficientad_lite", 10, 4) == (10, 4)
    assert training_schedule("uniad", None, None, n_classes=7) == (7000, 8)  # UniAD's steps are per class
    assert training_schedule("uniad", 50, None, n_classes=7) == (50, 8)
    assert training_schedule("generalad_lite", None, None, n_classes=7) == (600, 8)


def test_export_cli_reports_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "export", "onnx", str(tmp_path / "c.pt"), "--out", str(tmp_path / "m.onnx")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr
