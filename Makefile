# edgead: two commands that work on a fresh machine.
#   make demo   install, then train -> export -> calibrate -> stream on a generated demo (no camera, no downloads)
#   make test   install, then run the tests (the same command CI runs), the native (C++) runtime's included
#   make native build the C++ runtime (edgead_stream, edgead_bench) into build/native; see docs/native.md
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the release that lies on this project's machines' disk (no multi-GB download)
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO := demo_out

.PHONY: demo test install runtime-only-check triton-server test-system-deps native clean

# ONNX Runtime for C++ (not in Debian): fetched once by native/fetch_onnxruntime.sh into this git-ignored folder;
# point it at your own (JetPack / NVIDIA build) with `make native ORT_ROOT=/path/to/onnxruntime`
ORT_ROOT ?= $(CURDIR)/.cache/onnxruntime
NATIVE_BUILD ?= build/native
# FFMPEG=lean: build edgead_stream against a lean FFmpeg (native/build_ffmpeg_lean.sh: Debian's FFmpeg source,
# only a line camera's demuxers/decoders, cached in FFMPEG_ROOT) instead of the system's: ~29 MB less resident
# memory for the streamer, the same frames; costs a few minutes of compiling once. Default: the system's.
FFMPEG ?= system
FFMPEG_ROOT ?= $(CURDIR)/.cache/ffmpeg-lean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' scikit-image
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m runtime.synthetic --out $(DEMO)/data --size 256 --train 150 --test-good 20 --per-defect 4
	$(BIN)/python -m train --model patchcore_lite --data $(DEMO)/data --out $(DEMO)/run --image-size 256
	$(BIN)/python -m export onnx $(DEMO)/run/checkpoint.pt --out $(DEMO)/model.onnx
	$(BIN)/python -m calibration fit --model $(DEMO)/model.onnx --good $(DEMO)/data/train/good
	$(BIN)/python -m calibration report --model $(DEMO)/model.onnx --good $(DEMO)/data/test/good --defects $(DEMO)/data/test/scratch $(DEMO)/data/test/spot $(DEMO)/data/test/crack --plot $(DEMO)/scores.png --json $(DEMO)/report.json
	$(BIN)/python -m runtime.stream --demo --demo-frames 120 --model $(DEMO)/model.onnx --headless --jsonl $(DEMO)/frames.jsonl --save-ng $(DEMO)/ng --summary $(DEMO)/summary.json
	@$(BIN)/python -c "import json; r = json.load(open('$(DEMO)/report.json')); print('demo verdict at the calibrated threshold (test parts the model never saw):', r['verdict'])"
	@echo "look at: $(DEMO)/scores.png (score histogram), $(DEMO)/ng/ (NG overlays), $(DEMO)/frames.jsonl, $(DEMO)/summary.json"
	@echo "live view: $(BIN)/python -m runtime.stream --demo --demo-frames 0 --model $(DEMO)/model.onnx --headless --serve 8080  (open http://127.0.0.1:8080/)"

# the real tritonserver for tests/test_triton.py: the nvidia-pytriton 0.7.0 wheel, downloaded once into
# .cache/triton/wheels (git-ignored) and unpacked there; without it those tests skip and say why
triton-server: install
	$(BIN)/python -c "from runtime.triton_local import server_dist, backend_dir, stub_env; \
	d = server_dist(); backend_dir(d); stub_env(d.parent); print('tritonserver ready:', d)" \
	|| echo "tritonserver unavailable here: tests/test_triton.py skips its server tests (reason in the test report)"

test: install runtime-only-check triton-server test-system-deps native
	ONNXRUNTIME_ROOT=$(ORT_ROOT) EDGEAD_NATIVE_BUILD=$(CURDIR)/$(NATIVE_BUILD) $(BIN)/python -m pytest -q tests

# the C++ runtime: Debian packages (installed when missing and root), ONNX Runtime (cached), CMake build
native:
	NEED_NPM=$$(test -f $(ORT_ROOT)/include/onnxruntime_cxx_api.h && echo 0 || echo 1) native/install_deps.sh
	test -f $(ORT_ROOT)/include/onnxruntime_cxx_api.h || native/fetch_onnxruntime.sh $(ORT_ROOT)
	if [ "$(FFMPEG)" = lean ]; then native/build_ffmpeg_lean.sh $(FFMPEG_ROOT) > /dev/null; fi
	cmake -S . -B $(NATIVE_BUILD) -DONNXRUNTIME_ROOT=$(ORT_ROOT) -DEDGEAD_FFMPEG_ROOT=$$(test "$(FFMPEG)" = lean && echo $(FFMPEG_ROOT)) > /dev/null
	cmake --build $(NATIVE_BUILD) -j$$(nproc)
	@echo "native runtime built: $(NATIVE_BUILD)/edgead_stream, $(NATIVE_BUILD)/edgead_bench (docs/native.md)"

# system programs the operator tests drive for real: a Mosquitto broker and a headless chromium (the web view).
# Installed with apt as root; otherwise those tests skip and say what to install.
test-system-deps:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then \
	  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get -o DPkg::Lock::Timeout=300 update -q && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q mosquitto chromium chromium-driver \
	  || echo "warning: apt-get could not install mosquitto/chromium: the MQTT and browser tests will skip"; \
	else echo "note: not root or no apt-get: install mosquitto, chromium and chromium-driver yourself, or the MQTT and browser tests skip"; fi

# the runtime must install and import with only its own extra (numpy, OpenCV, onnxruntime): no torch
runtime-only-check:
	$(PY) -m venv .venv-runtime
	.venv-runtime/bin/pip install -q -e '.[runtime]'
	.venv-runtime/bin/python -c "import sys, runtime.model, runtime.stream, runtime.bench, runtime.synthetic; \
	bad=[m for m in sys.modules if m.split('.')[0] in ('torch','timm','sklearn','starlette','uvicorn','paho')]; \
	assert not bad, bad; print('runtime-only environment OK: no torch')"
	.venv-runtime/bin/python -m runtime.stream --help > /dev/null

clean:
	rm -rf $(VENV) .venv-runtime $(DEMO) $(NATIVE_BUILD)
