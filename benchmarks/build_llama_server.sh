#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the CPU peer of benchmarks/serve_vs_transformers.py) from the llama.cpp sources
# vendored in the llama-cpp-python sdist on PyPI. Idempotent: skips every step whose result is already there, and
# does nothing at all when the binary exists. Not part of CI (about 35 minutes on 2 cores).
#
#   benchmarks/build_llama_server.sh            # prints the binary's path when done
#   PEERS_DIR=/elsewhere JOBS=4 benchmarks/build_llama_server.sh
set -euo pipefail

PEERS_DIR="${PEERS_DIR:-$HOME/.cache/fitserve-peers}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
SRC="$PEERS_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$PEERS_DIR/llama-build"
BIN="$BUILD/bin/llama-server"

if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$PEERS_DIR/sdist"
SDIST="$PEERS_DIR/sdist/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: --dest "$PEERS_DIR/sdist" "llama-cpp-python==$VERSION" >&2
fi
if [[ ! -d "$SRC" ]]; then
    tar -xzf "$SDIST" -C "$PEERS_DIR"
fi
if [[ ! -f "$BUILD/build.ninja" ]]; then
    cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >"$PEERS_DIR/cmake.log" 2>&1
fi
# ninja resumes an interrupted build where it stopped
cmake --build "$BUILD" --target llama-server -j "$JOBS" >"$PEERS_DIR/build.log" 2>&1 \
    || { echo "build failed; see $PEERS_DIR/build.log" >&2; exit 1; }
echo "$BIN"
