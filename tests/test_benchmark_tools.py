"""Benchmark helpers whose arithmetic the README quotes: checked on small inputs."""
import pytest

from benchmarks.gpu_roofline import analyse, floors
from benchmarks.speed_models import build, count_gflops


def test_roofline_counts_the_same_flops_as_the_conv_hooks_and_bounds_are_ordered():
    rows = analyse("lite0", batch=2, image_size=64)
    conv = sum(r["gflop"] for r in rows if r["op"] == "conv2d")
    assert conv / 2 == pytest.approx(count_gflops(build("lite0", 64), 64), rel=1e-3)
    f = floors(rows, 2, peak_tflops=100.0, bandwidth_tbs=1.0)
    # arithmetic only <= fused <= unfused: each step adds memory time, none removes work
    assert f["arithmetic_only_ms"] <= f["fused_ms"] <= f["unfused_ms"]
    assert f["unfused_images_per_s"] == pytest.approx(2e3 / f["unfused_ms"])
    slower = floors(rows, 2, peak_tflops=100.0, bandwidth_tbs=0.1)
    assert slower["unfused_ms"] > f["unfused_ms"]  # memory-bound operators slow down with the bandwidth


def test_families_model_specs_keep_the_commas_of_list_values():
    from benchmarks.families import parse_spec

    assert parse_spec("patchcore_lite") == ("patchcore_lite", {})
    assert parse_spec("patchcore_lite:global_gaussian=true,memory_size=1024") == (
        "patchcore_lite", {"global_gaussian": True, "memory_size": 1024})
    assert parse_spec("generalad_lite:graded_range=[0.2,8],graded_saturation=8") == (
        "generalad_lite", {"graded_range": [0.2, 8], "graded_saturation": 8})


def test_families_rows_say_whether_the_gaussian_was_switched_on():
    from benchmarks.families import gaussian_decision

    assert gaussian_decision({"gaussian": {"dim": 0}}) is None
    off = gaussian_decision({"gaussian": {"dim": 168, "estimator": "off", "layout": 0.004, "off_reason": "no layout"},
                             "score": {"puad_weight": 0.0}})
    assert off == {"on": False, "layout": 0.004, "off_reason": "no layout", "puad_weight": 0.0}
    on = gaussian_decision({"gaussian": {"dim": 168, "estimator": "ledoit_wolf", "layout": 0.3}, "score": {"puad_weight": 0.5}})
    assert on["on"] and on["puad_weight"] == 0.5
