"""EfficientAD exports before (c9a829b) and after the family contract, from the SAME checkpoint: identical outputs?"""
import json, numpy as np
from pathlib import Path
import onnxruntime as ort
from export.onnx_export import export_onnx
root = Path("/tmp/identity")
export_onnx(root / "run" / "checkpoint.pt", root / "new.onnx")
rng = np.random.default_rng(0)
from runtime.dataset import list_images, read_image
from runtime.preprocess import batch_frames
frames = batch_frames([read_image(p) for p in list_images(root / "parts" / "test" / "good")] +
                      [read_image(p) for p in list_images(root / "parts" / "test" / "scratch")], 64, 64)
old = ort.InferenceSession(str(root / "old.onnx"), providers=["CPUExecutionProvider"])
new = ort.InferenceSession(str(root / "new.onnx"), providers=["CPUExecutionProvider"])
res = {}
for i in range(len(frames)):
    o = dict(zip([x.name for x in old.get_outputs()], old.run(None, {"frames": frames[i:i+1]})))
    n = dict(zip([x.name for x in new.get_outputs()], new.run(None, {"frames": frames[i:i+1]})))
    pairs = {"anomaly_map": "anomaly_map", "image_score": "image_score", "picturable_score": "map_score",
             "unpicturable_score": "gaussian_score", "features": "features"}
    for ok, nk in pairs.items():
        d = float(np.abs(o[ok] - n[nk]).max())
        res[ok] = max(res.get(ok, 0.0), d)
    d = float(np.abs(np.concatenate([o["map_st_raw"], o["map_ae_raw"]], 1) - n["raw_maps"]).max())
    res["raw_maps"] = max(res.get("raw_maps", 0.0), d)
old_sc = json.loads((root / "old.onnx.json").read_text()); new_sc = json.loads((root / "new.onnx.json").read_text())
print(json.dumps({"frames": len(frames), "max_abs_diff": res, "threshold_old": old_sc["thresholds"]["image"],
                  "threshold_new": new_sc["thresholds"]["image"]}, indent=1))
