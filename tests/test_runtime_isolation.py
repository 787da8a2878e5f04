"""runtime/ must install and import on a Jetson without torch."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_imports_without_torch():
    code = ("import sys, runtime, runtime.model, runtime.stream, runtime.bench, runtime.sources, runtime.synthetic, "
            "runtime.dataset, runtime.backends.onnxruntime_backend, runtime.backends.tensorrt_backend, "
            "runtime.backends.torch_backend, runtime.backends.triton_backend, runtime.triton_local; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'sklearn', 'train', 'export', 'calibration', 'tritonclient')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runtime_has_no_module_level_heavy_imports():
    """Static check: only numpy/cv2/stdlib/runtime at module level anywhere under runtime/."""
    heavy = {"torch", "timm", "sklearn", "train", "export", "calibration", "tensorrt", "pycuda", "tritonclient"}
    for path in (ROOT / "runtime").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; lazy imports inside functions are allowed
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in heavy, f"{path.relative_to(ROOT)} imports {n} at module level"


def test_layering_calibration_does_not_import_torch():
    code = ("import sys, calibration.field, calibration.fitting, calibration.metrics, calibration.report, calibration.cli; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','timm','train','export')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
