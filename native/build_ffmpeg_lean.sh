#!/usr/bin/env bash
# Build a lean FFmpeg for edgead_stream's video reader and print its root (optional; see docs/native.md).
#
#   native/build_ffmpeg_lean.sh [DEST]      (default: .cache/ffmpeg-lean next to this repository's root)
#   cmake -S . -B build/native -DONNXRUNTIME_ROOT=... -DEDGEAD_FFMPEG_ROOT=<DEST>
#
# Why: Debian's FFmpeg libraries pull in ~100 other libraries (codecs, TLS, SSH, SRT, SVG, ...) that cost every
# process linking them ~26 MB of resident memory (an empty program: 26 MB; with this build: ~7 MB). This is the
# same FFmpeg release as the system's (Debian's source package, with its patches, via `apt-get source` from a
# private source list: the system's apt configuration is not touched), built with only what a line camera
# needs: AVI/MOV/MKV/MPEG-TS/raw demuxers, RTSP/RTP over TCP/UDP, MJPEG/H.264/HEVC/MPEG-4/raw decoders, swscale,
# with the same x86 assembly (nasm), so frames decode to the same bytes. Libraries get the suffix "_edgead"
# (libavcodec_edgead.so.59): they never clash with the system's FFmpeg that OpenCV's videoio loads.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$here/.cache/ffmpeg-lean}"
suffix=_edgead
if [ -f "$dest/lib/pkgconfig/libavcodec$suffix.pc" ]; then
    echo "$dest"
    exit 0
fi
for tool in apt-get dpkg-source make cc nasm pkg-config; do
    if ! command -v "$tool" > /dev/null; then
        echo "error: $tool not found; on Debian/Ubuntu: apt-get install -y dpkg-dev build-essential nasm pkg-config" >&2
        exit 2
    fi
done
version="$(dpkg-query -W -f='${Version}' libavcodec-dev 2> /dev/null || true)"
if [ -z "$version" ]; then
    echo "error: libavcodec-dev is not installed; run native/install_deps.sh first (the lean build matches its version)" >&2
    exit 2
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/edgead-ffmpeg.XXXXXX")"
trap 'rm -rf "$work"' EXIT
. /etc/os-release
mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial" "$work/src"
{
    echo "deb-src http://deb.debian.org/debian $VERSION_CODENAME main"
    echo "deb-src http://deb.debian.org/debian-security $VERSION_CODENAME-security main"
    echo "deb-src http://deb.debian.org/debian $VERSION_CODENAME-updates main"
} > "$work/apt/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
          -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache::Archives=$work/apt/archives")
echo "fetching the source of ffmpeg $version ..." >&2
apt-get "${apt_opts[@]}" update -qq >&2
(cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only -qq "ffmpeg=$version" >&2)
(cd "$work/src" && dpkg-source -x --no-check ffmpeg_*.dsc ff > /dev/null)
cd "$work/src/ff"
echo "configuring and building (a few minutes) ..." >&2
./configure --prefix="$work/install" --build-suffix="$suffix" --enable-shared --disable-static --enable-pic \
    --disable-programs --disable-doc --disable-everything --disable-autodetect --disable-avdevice --disable-avfilter \
    --disable-swresample --disable-postproc --enable-network --enable-swscale \
    --enable-demuxer=avi,mov,matroska,mjpeg,h264,hevc,rtsp,sdp,rtp,mpegts,m4v,image2 \
    --enable-decoder=mjpeg,h264,hevc,mpeg4,rawvideo \
    --enable-parser=h264,hevc,mjpeg,mpeg4video \
    --enable-protocol=file,tcp,udp,rtp > "$work/configure.log" 2>&1 || { tail -20 "$work/configure.log" >&2; exit 1; }
make -j"$(nproc)" > "$work/make.log" 2>&1 || { tail -30 "$work/make.log" >&2; exit 1; }
make install > /dev/null
# pkg-config files name the install prefix: point them at DEST before moving the tree there in one rename
sed -i "s|$work/install|$dest|g" "$work/install/lib/pkgconfig/"*.pc
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
mv "$work/install" "$dest.partial"
mv "$dest.partial" "$dest"
echo "$dest"
