"""Run code in a fresh interpreter where torch cannot be imported: what a line PC without torch sees."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# An import hook that refuses torch, and a check at exit that nothing imported it. Not
# ``sys.modules['torch'] = None``: libraries that look torch up in sys.modules (scipy's array-API
# helpers) then find a key where a torch-free machine has none, and fail where a real one would not.
BLOCK_TORCH = """\
import sys, atexit
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked here: this code must run without it")
        return None
sys.meta_path.insert(0, _NoTorch())
atexit.register(lambda: [m for m in sys.modules if m.split(".")[0] == "torch"] and sys.exit(3))
"""


def run_torch_free(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``code`` with torch unimportable; exit status 3 if anything imported it anyway."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
