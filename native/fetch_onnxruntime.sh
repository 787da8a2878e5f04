#!/usr/bin/env bash
# Fetch ONNX Runtime for C++ (library + headers) into a git-ignored cache folder and print its root.
#
#   native/fetch_onnxruntime.sh [DEST]      (default: .cache/onnxruntime next to this repository's root)
#
# ONNX Runtime's C++ SDK is not packaged by Debian. The npm package com.github.asus4.onnxruntime@0.4.9
# (Unity plug-in, ~150 MB) carries ONNX Runtime 1.29.0 for Linux x64 (Plugins/Linux/x64/libonnxruntime.so)
# and its C/C++ headers (inside the iOS xcframework; headers are platform-independent). We extract those
# two folders into DEST/{lib,include} and add the soname link libonnxruntime.so.1.
# On a Jetson or line PC with its own ONNX Runtime (JetPack / NVIDIA builds) skip this script and pass
# -DONNXRUNTIME_ROOT=/path/to/onnxruntime to CMake instead.
set -euo pipefail
PKG="com.github.asus4.onnxruntime@0.4.9"
HEADERS="package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers"
LIBDIR="package/Plugins/Linux/x64"
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$here/.cache/onnxruntime}"

if [ -f "$dest/lib/libonnxruntime.so" ] && [ -f "$dest/include/onnxruntime_cxx_api.h" ]; then
    echo "$dest"
    exit 0
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "error: this recipe only carries ONNX Runtime for Linux x86_64; on $(uname -s)-$(uname -m) install ONNX Runtime (JetPack / NVIDIA build) and pass -DONNXRUNTIME_ROOT=<its folder> to cmake" >&2
    exit 2
fi
if ! command -v npm > /dev/null; then
    echo "error: npm not found; install it (apt-get install -y npm) or pass -DONNXRUNTIME_ROOT=<an ONNX Runtime folder> to cmake" >&2
    exit 2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching ONNX Runtime 1.29.0 ($PKG, ~150 MB) into $dest" >&2
(cd "$work" && npm pack --silent "$PKG" > /dev/null)
tgz="$(ls "$work"/*.tgz)"
tar -xzf "$tgz" -C "$work" "$LIBDIR/libonnxruntime.so" "$HEADERS"
tmp="$dest.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/lib" "$tmp/include"
cp "$work/$LIBDIR/libonnxruntime.so" "$tmp/lib/"
cp "$work/$HEADERS"/*.h "$tmp/include/"
ln -s libonnxruntime.so "$tmp/lib/libonnxruntime.so.1"
grep -q "ORT_API_VERSION" "$tmp/include/onnxruntime_c_api.h" || { echo "error: $PKG did not contain the expected headers" >&2; exit 2; }
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"  # the cache appears complete or not at all
echo "$dest"
