"""Shared fixtures: a small synthetic dataset, a briefly trained model and its ONNX export.

Everything is generated here (no downloads, no real data) and sized for 2 CPU cores.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from runtime.synthetic import write_dataset

    root = tmp_path_factory.mktemp("data") / "parts"
    return write_dataset(root, size=96, n_train=48, n_test_good=12, n_per_defect=4, seed=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthetic_root) -> Path:
    """checkpoint.pt of a 150-step run (enough for plumbing and ordering checks, not accuracy)."""
    logging.getLogger("train").setLevel(logging.WARNING)
    from train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(data=str(synthetic_root), out=str(out), image_size=IMAGE_SIZE, steps=150, seed=0, save_every=0)
    return train(cfg)


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory, trained) -> Path:
    from export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_onnx(trained, out)


@pytest.fixture()
def model_copy(tmp_path, onnx_model) -> Path:
    """A private copy of the exported artifact (for tests that rewrite it)."""
    import shutil

    from runtime.artifact import sidecar_path

    dst = tmp_path / "model.onnx"
    shutil.copy2(onnx_model, dst)
    shutil.copy2(sidecar_path(onnx_model), sidecar_path(dst))
    return dst
