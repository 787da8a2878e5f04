"""The native streamer (C++) vs the Python streamer on the same artifact, the same 1080p frames, in one run.

    python -m benchmarks.native_vs_python --model /tmp/native_run/model.onnx [--frames 150 --rounds 5]
        [--variant native_w2 "--workers 2"] [--threads N]

Both programs score the same MJPG video of 1920x1080 conveyor frames (every frame, "block" policy) at
batch 1, launched alternately (Python, C++, Python, C++, ...; each round starts with the next program, so
none always runs first) so machine noise hits both alike, after one untimed launch of each (disk cache).
Both use the same ONNX Runtime thread count: its default (one per core) or --threads N (EDGEAD_THREADS for
both). Per run (also the CPU time per frame, which load hardly changes):
end-to-end fps and latency p50/p99 (from each streamer's own summary: capture -> decode -> fit -> infer ->
decision), mean model time, peak RSS of the program (VmHWM, read after every JSON line; wait4 rusage kept as peak_rss_mb_rusage), and start-up time from process launch
to the first JSON line (the first decision). Target on 2 CPU cores: C++ fps >= 1.2x Python, lower p99,
less than half the RSS. Writes benchmarks/results/native_vs_python.json (machine, command, date, the load
average at the start and end and before each launch inside). Medians over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from benchmarks.common import write_result
from runtime.artifact import read_sidecar
from runtime.synthetic import conveyor_frames

ROOT = Path(__file__).resolve().parents[1]


def write_video(path: Path, n: int, size: tuple[int, int] = (1920, 1080)) -> Path:
    """n conveyor frames at camera size as MJPG (decoded by OpenCV's FFmpeg in both programs)."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    if not w.isOpened():
        raise SystemExit(f"cannot write {path}: OpenCV lacks the MJPG writer")
    for frame, _ in conveyor_frames(n, size=256, seed=7, frame_size=size):
        w.write(frame)
    w.release()
    return path


def _private_mb(pid: int) -> float:
    """Private (unshared) resident memory of a process now, MB: what it costs beyond shared library pages."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    kb = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean:", "Private_Dirty:")))
    return kb / 1024


def _hwm_mb(pid: int) -> float:
    """Peak resident memory of the program the process runs now (VmHWM of its own address space), MB.

    Why not wait4's ru_maxrss: Linux carries the address space's peak across exec, and subprocess starts the
    child with vfork/fork from this harness, so ru_maxrss is never below this Python process's own RSS (~99 MB
    here, with cv2 and numpy loaded): a program that peaks lower reads as ~99 MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_once(cmd: list[str], summary: Path, env: dict[str, str]) -> dict:
    """Launch, time the first JSON line, collect the summary, the peak RSS and the peak private memory."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    first = p.stdout.readline()
    t_first = time.perf_counter() - t0
    lines, private, hwm = 1, _private_mb(p.pid), _hwm_mb(p.pid)
    for _ in p.stdout:  # one line per frame: sample the private memory (and the running peak) as frames are scored
        lines += 1
        private = max(private, _private_mb(p.pid))
        hwm = max(hwm, _hwm_mb(p.pid))
    _, status, rusage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0 or not first:
        raise SystemExit(f"{cmd[0]} failed (exit {p.returncode}); run it by hand: {' '.join(cmd)}")
    s = json.loads(summary.read_text())
    return {"fps": s["fps"], "latency_ms_p50": s["latency_ms_p50"], "latency_ms_p99": s["latency_ms_p99"],
            "model_ms_mean": s["model_ms_mean"], "frames_scored": s["frames_scored"], "json_lines": lines,
            # the program's own peak (VmHWM, read after every line: the kernel's exact high-water mark so far)
            "peak_rss_mb": round(hwm, 1),
            "peak_rss_mb_rusage": round(rusage.ru_maxrss / 1024, 1),  # floored by the harness's RSS (_hwm_mb)
            # CPU time of the whole process (start-up included) per scored frame: how much work each program
            # does, which machine load hardly changes (fps under load mostly measures the CPU share it got)
            "cpu_ms_per_frame": round((rusage.ru_utime + rusage.ru_stime) * 1e3 / max(1, s["frames_scored"]), 2),
            "peak_private_mb_sampled": round(private, 1), "startup_to_first_decision_s": round(t_first, 3),
            "process_wall_s": round(wall, 3), "provider": s["provider"], "load_average_1min_before": round(load, 2)}


def _native_ort(binary: str) -> str:
    """The libonnxruntime the native binary loads (ldd), for the record."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.split("=>")[1].split("(")[0].strip() for line in out.splitlines() if "libonnxruntime" in line),
                "unknown")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.native_vs_python", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model.onnx (sidecar next to it); the real-time model at 256 px")
    p.add_argument("--native", default=str(ROOT / "build" / "native" / "edgead_stream"), help="edgead_stream binary")
    p.add_argument("--also", nargs=2, action="append", default=[], metavar=("LABEL", "BINARY"),
                   help="another edgead_stream build to run in the same alternation (e.g. linked to another ONNX Runtime)")
    p.add_argument("--variant", nargs=2, action="append", default=[], metavar=("LABEL", "ARGS"),
                   help="the native binary again with extra arguments, e.g. native_w2 \"--workers 2\"")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads for both programs (EDGEAD_THREADS); 0 = its default, one per core")
    p.add_argument("--frames", type=int, default=150, help="1080p frames in the video")
    p.add_argument("--rounds", type=int, default=5, help="alternating Python / C++ launches, each")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first launch of each program")
    p.add_argument("--out", default="native_vs_python.json", help="file name in benchmarks/results/")
    args = p.parse_args(argv)
    if not Path(args.native).is_file():
        print(f"error: {args.native} not found; run `make native` first", file=sys.stderr)
        return 2
    sc = read_sidecar(args.model)
    load0 = os.getloadavg()  # the machine is shared: say how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        video = write_video(Path(tmp) / "line_1080p.avi", args.frames)
        summary = Path(tmp) / "summary.json"
        cmds = {"python": [sys.executable, "-m", "runtime.stream", "--video", str(video), "--model", args.model,
                           "--headless", "--summary", str(summary)],
                "native": [args.native, "--video", str(video), "--model", args.model, "--summary", str(summary)]}
        for label, binary in args.also:
            cmds[label] = [binary] + cmds["native"][1:]
        for label, extra in args.variant:
            cmds[label] = cmds["native"] + extra.split()
        env = dict(os.environ)
        env.pop("EDGEAD_THREADS", None)
        if args.threads:
            env["EDGEAD_THREADS"] = str(args.threads)
        names = list(cmds)
        if not args.no_warmup:  # model file and video in the page cache, for every program alike
            for name in names:
                run_once(cmds[name], summary, env)
        runs: dict[str, list[dict]] = {name: [] for name in cmds}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                runs[name].append(run_once(cmds[name], summary, env))
                print(f"round {r + 1} {name}: {json.dumps(runs[name][-1])}", file=sys.stderr)
    keys = ("fps", "latency_ms_p50", "latency_ms_p99", "model_ms_mean", "peak_rss_mb", "peak_private_mb_sampled",
            "startup_to_first_decision_s", "cpu_ms_per_frame")
    med = {name: {k: round(statistics.median(x[k] for x in rs), 3) for k in keys} for name, rs in runs.items()}
    ratios = {name: {"fps": round(med[name]["fps"] / med["python"]["fps"], 3),
                     "p99": round(med[name]["latency_ms_p99"] / med["python"]["latency_ms_p99"], 3),
                     "rss": round(med[name]["peak_rss_mb"] / med["python"]["peak_rss_mb"], 3),
                     "private": round(med[name]["peak_private_mb_sampled"] / med["python"]["peak_private_mb_sampled"], 3),
                     "cpu_per_frame": round(med[name]["cpu_ms_per_frame"] / med["python"]["cpu_ms_per_frame"], 3),
                     "startup": round(med[name]["startup_to_first_decision_s"]
                                      / med["python"]["startup_to_first_decision_s"], 3)}
              for name in cmds if name != "python"}
    targets = {name: {"fps_ratio_at_least_1.2": r["fps"] >= 1.2, "p99_lower": r["p99"] < 1.0,
                      "rss_under_half": r["rss"] < 0.5} for name, r in ratios.items()}
    payload = {"model": args.model, "model_name": sc.model_name, "input": {"height": sc.input.height,
               "width": sc.input.width, "resize": sc.input.resize, "fit": sc.input.fit},
               "frames": {"count": args.frames, "size": [1080, 1920], "source": "MJPG video, --video, block policy, batch 1"},
               "rounds": args.rounds, "commands": {k: " ".join(map(str, v)) for k, v in cmds.items()},
               "onnxruntime_threads": args.threads or "default (one per core), both programs",
               "native_onnxruntime": _native_ort(args.native),
               "load_average_at_start": list(load0), "median": med, "ratios_vs_python": ratios, "targets_met": targets,
               "load_average_at_end": list(os.getloadavg()), "runs": runs}
    path = write_result(args.out, payload)
    print(json.dumps({"median": med, "ratios_vs_python": ratios, "targets_met": targets}, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
