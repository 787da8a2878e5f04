"""K simulated cameras through one Triton server (dynamic batching) vs K independent local ONNX Runtime processes.

    nice -n 10 python -m benchmarks.serving [--model model.onnx] [--cameras 1 2 4 8] [--frames 150]

Each camera is a video file (MJPG: JPEG decoded on the client side, as with an IP camera) scored by its
own ``python -m runtime.stream`` process with ``--policy block`` (every frame scored). Local: each process
runs the ONNX itself (ORT threads = cores / K). Triton: each process prepares frames and sends them to one
``tritonserver`` (the nvidia-pytriton wheel, python-backend variant: ONNX Runtime inside Triton; one model
instance per core, each with cores // instances threads) that batches the K streams; each client keeps
``--inflight`` batches in flight (the stream's default with ``--server``). Total frames/s = all frames / the
longest stream's wall time; latency is the stream's own (capture -> decision, including the wait in its
4-frame buffer). Without ``--model``, a 256 px model is trained for a few steps on synthetic parts (speed,
not accuracy) and exported with a dynamic batch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import write_result

log = logging.getLogger("benchmarks.serving")


def make_model(work: Path, image_size: int) -> Path:
    """A real-architecture model at ``image_size`` (a few training steps: speed only), dynamic batch."""
    from export.onnx_export import export_onnx
    from runtime.synthetic import write_dataset
    from train.loop import TrainConfig, train

    root = write_dataset(work / "parts", size=image_size, n_train=40, n_test_good=4, n_per_defect=2, seed=0)
    ckpt = train(TrainConfig(data=str(root), out=str(work / "run"), image_size=image_size, steps=4, seed=0,
                             save_every=0))
    return export_onnx(ckpt, work / "model.onnx", batch="dynamic")


def make_videos(work: Path, k: int, n: int, size: int) -> list[Path]:
    """k MJPG videos of n distinct frames (synthetic conveyor parts at size x size)."""
    from runtime.synthetic import conveyor_frames

    paths = []
    for c in range(k):
        p = work / f"camera_{c}.avi"
        if not p.is_file():
            vw = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), 30, (size, size))
            for frame, _ in conveyor_frames(n, size, seed=100 + c, frame_size=(size, size)):
                vw.write(np.ascontiguousarray(cv2.resize(frame, (size, size))))
            vw.release()
        paths.append(p)
    return paths


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group (Linux /proc)."""
    hz, total = os.sysconf("SC_CLK_TCK"), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:
                total += (int(fields[11]) + int(fields[12])) / hz
        except (OSError, ValueError):  # gone meanwhile
            pass
    return total


def batch_counts(http_url: str, model: str) -> dict[int, int]:
    """Executions per batch size so far (Triton's statistics endpoint): how the server batched the requests."""
    import urllib.request

    with urllib.request.urlopen(f"{http_url}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def warm_up(url: str, model: str, instances: int, size: int, rounds: int = 3) -> None:
    """A few requests to every server instance before timing (a fresh ONNX Runtime session's first runs are
    slow); each local client warms its own session up the same way (``Model(warmup=2)``)."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.backends.triton_backend import TritonBackend

    backend = TritonBackend(url, model)
    x = np.zeros((1, size, size, 3), np.uint8)
    with ThreadPoolExecutor(instances) as pool:  # concurrent requests: each instance gets some
        list(pool.map(lambda _: backend.infer(x), range(rounds * instances)))
    backend.close()


def run_clients(cmds: list[list[str]], env: dict, work: Path, tag: str, server_pgid: int | None = None) -> dict:
    summaries = [work / f"{tag}_{i}.json" for i in range(len(cmds))]
    server_cpu = group_cpu_seconds(server_pgid) if server_pgid else 0.0
    procs = [subprocess.Popen(cmd + ["--summary", str(s)], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / f"{tag}_{i}.log", "w")) for i, (cmd, s) in enumerate(zip(cmds, summaries))]
    rcs = [p.wait() for p in procs]
    server_cpu = group_cpu_seconds(server_pgid) - server_cpu if server_pgid else 0.0
    if any(rcs):
        raise RuntimeError(f"{tag}: client exit codes {rcs}; see {work}/{tag}_*.log")
    rows = [json.loads(s.read_text()) for s in summaries]
    frames = sum(r["frames_scored"] for r in rows)
    wall = max(r["wall_seconds"] for r in rows)
    return {"total_fps": round(frames / wall, 2), "frames_scored": frames,
            "frames_dropped": sum(r["frames_dropped"] for r in rows), "wall_s": wall,
            "latency_ms_p50": round(float(np.median([r["latency_ms_p50"] for r in rows])), 2),
            "latency_ms_p99": round(float(max(r["latency_ms_p99"] for r in rows)), 2),
            "per_client_fps": [r["fps"] for r in rows],
            # CPU time per frame, clients' streaming (decode, prepare, scoring or requests) + the server's (with
            # its python-backend stubs): what a frame costs the machine, less sensitive to other jobs than fps
            "cpu_ms_per_frame": {"clients": round(sum(r["cpu_seconds"] for r in rows) * 1e3 / frames, 2),
                                 "server": round(server_cpu * 1e3 / frames, 2),
                                 "total": round((sum(r["cpu_seconds"] for r in rows) + server_cpu) * 1e3 / frames, 2)}, "errors": [r["error"] for r in rows if r["error"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a dynamic-batch .onnx artifact (default: make a 256 px one)")
    p.add_argument("--image-size", type=int, default=256, help="size of the model made without --model")
    p.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--frames", type=int, default=150, help="frames per camera")
    p.add_argument("--frame-size", type=int, default=480, help="camera frame size (square), JPEG in the video")
    p.add_argument("--max-batch", type=int, default=2, help="server max_batch_size (CPU instances: batching "
                   "buys nothing per frame; small batches spread the requests over the instances)")
    p.add_argument("--queue-delay-us", type=int, default=0, help="dynamic batching "
                   "max_queue_delay_microseconds (0: batch what is queued, never wait for more)")
    p.add_argument("--instances", type=int, help="server model instances (default: one per core, each with "
                   "cores // instances ONNX Runtime threads)")
    p.add_argument("--inflight", type=int, help="batches each Triton client keeps in flight (default: the "
                   "stream's own default with --server)")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--repeats", type=int, default=1, help="local/Triton pairs per K; the pair with the median "
                   "ratio is reported (a loaded machine: 3 or 5)")
    p.add_argument("--out", default="serving.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from export.triton_repo import write_repository
    from runtime.artifact import read_sidecar
    from runtime.stream import DEFAULT_INFLIGHT_REMOTE
    from runtime.triton_local import LocalTriton

    work = Path(args.work or tempfile.mkdtemp(prefix="edgead_serving_"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else (work / "model.onnx" if (work / "model.onnx").is_file()
                                                 else make_model(work, args.image_size))
    videos = make_videos(work, max(args.cameras), args.frames, args.frame_size)
    cores = os.cpu_count() or 1
    repo = work / "repo"
    instances = args.instances or cores
    write_repository(model, repo, name="served", backend="python", max_batch=args.max_batch,
                     queue_delay_us=args.queue_delay_us, instances=instances, kind="KIND_CPU")
    inflight = ["--inflight", str(args.inflight)] if args.inflight else []
    stream = [sys.executable, "-m", "runtime.stream", "--policy", "block", "--headless", "-q"]
    results = []
    load_before = os.getloadavg()
    with LocalTriton(repo, work / "server.log", models=["served"]) as server:
        warm_up(server.grpc_url, "served", instances, read_sidecar(model).input.height)
        for k in args.cameras:
            env = {**os.environ, "EDGEAD_THREADS": str(max(1, cores // k))}
            runs = []
            for rep in range(args.repeats):  # local and Triton alternate, so a burst of other load hits both
                run = {"local": run_clients([stream + ["--video", str(v), "--model", str(model)] for v in videos[:k]],
                                            env, work, f"local_k{k}")}
                before = batch_counts(server.http_url, "served")
                run["triton"] = run_clients([stream + ["--video", str(v), "--server", server.grpc_url, "--model-name",
                                                       "served", *inflight] for v in videos[:k]], dict(os.environ),
                                            work, f"triton_k{k}", server_pgid=server.proc.pid)
                after = batch_counts(server.http_url, "served")
                run["triton"]["server_batches"] = {str(b): n - before.get(b, 0) for b, n in sorted(after.items())
                                                   if n - before.get(b, 0)}
                run["triton_over_local"] = round(run["triton"]["total_fps"] / run["local"]["total_fps"], 3)
                log.info("K=%d local %.1f fps, triton %.1f fps (x%.2f); CPU ms/frame local %.1f, triton %.1f; "
                         "server batches (size: count) %s", k, run["local"]["total_fps"], run["triton"]["total_fps"],
                         run["triton_over_local"], run["local"]["cpu_ms_per_frame"]["total"],
                         run["triton"]["cpu_ms_per_frame"]["total"], run["triton"]["server_batches"])
                runs.append(run)
            mid = sorted(runs, key=lambda r: r["triton_over_local"])[(len(runs) - 1) // 2]  # the median pair
            row = {"cameras": k, **mid}
            if len(runs) > 1:
                row["ratios_of_all_repeats"] = [r["triton_over_local"] for r in runs]
            results.append(row)
    cfg = (repo / "served" / "config.pbtxt").read_text().split("parameters")[0]
    out = write_result(args.out, {
        "model": str(model), "model_input": f"{args.image_size if not args.model else 'see sidecar'}",
        "frames_per_camera": args.frames, "frame_size": args.frame_size, "server": "tritonserver 2.51.0 "
        "(nvidia-pytriton 0.7.0 wheel), python backend running ONNX Runtime CPU on the same machine, loopback gRPC",
        "local_threads_per_process": "cores // K (EDGEAD_THREADS)",
        "server_instances": instances, "server_threads_per_instance": max(1, cores // instances),
        "repeats": args.repeats,
        "client_inflight": args.inflight or DEFAULT_INFLIGHT_REMOTE,
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in os.getloadavg()]}, "triton_config": cfg, "results": results,
        "targets": {"K=4 triton/local >= 0.9": next((r["triton_over_local"] >= 0.9 for r in results
                                                      if r["cameras"] == 4), None),
                    "K=1 triton/local >= 0.8": next((r["triton_over_local"] >= 0.8 for r in results
                                                      if r["cameras"] == 1), None)}})
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
