# Run from a checkout of c9a829b (edgead 0.1): trains a 20-step 64 px EfficientAD-lite and exports it with the OLD exporter.
# Then run benchmarks/contract_identity_new_side.py from this checkout (edgead 0.2) to export the same checkpoint and compare.
import logging, shutil, sys
from pathlib import Path
sys.path.insert(0, "/tmp/oldcode")
logging.basicConfig(level=logging.WARNING)
from runtime.synthetic import write_dataset
root = Path("/tmp/identity"); shutil.rmtree(root, ignore_errors=True)
data = write_dataset(root / "parts", size=96, n_train=40, n_test_good=8, n_per_defect=2, seed=0)
from train.loop import TrainConfig, train
ck = train(TrainConfig(data=str(data), out=str(root / "run"), image_size=64, steps=20, seed=0, save_every=0))
from export.onnx_export import export_onnx
export_onnx(ck, root / "old.onnx")
print("old export done", ck)
