#!/usr/bin/env bash
# Make sure the native build's system packages are present (Debian / Ubuntu); install the missing ones when root.
#   cmake g++ pkg-config libopencv-dev libavformat-dev libavcodec-dev libswscale-dev nlohmann-json3-dev libgtest-dev
#   (+ npm to fetch ONNX Runtime)
set -euo pipefail
PKGS=(cmake g++ pkg-config libopencv-dev libavformat-dev libavcodec-dev libswscale-dev nlohmann-json3-dev libgtest-dev npm)
NEED_NPM="${NEED_NPM:-1}"
missing=()
for p in "${PKGS[@]}"; do
    if [ "$p" = npm ]; then
        [ "$NEED_NPM" = 1 ] && ! command -v npm > /dev/null && missing+=(npm)
        continue
    fi
    if command -v dpkg-query > /dev/null; then
        dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "install ok installed" || missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get > /dev/null; then
    echo "error: missing ${missing[*]} and no apt-get here; install CMake >= 3.18, a C++17 compiler, pkg-config, OpenCV, FFmpeg (libavformat, libavcodec, libswscale), nlohmann-json and GoogleTest with your package manager" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    if command -v sudo > /dev/null && sudo -n true 2> /dev/null; then
        SUDO=sudo
    else
        echo "error: missing Debian packages ${missing[*]}; run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 2
    fi
else
    SUDO=
fi
echo "installing ${missing[*]} (apt-get)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
