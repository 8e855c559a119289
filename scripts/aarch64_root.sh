#!/usr/bin/env bash
# Build an aarch64 root that runs onnxforge's TVM artifacts on an x86 machine under qemu user-mode emulation:
# Debian's arm64 Python 3.11 and the few libraries it loads, plus aarch64 wheels of numpy and the TVM runtime.
#
#   scripts/aarch64_root.sh ~/.cache/onnxforge/aarch64-root
#
# Needs Debian (bookworm: its python3.11), root or sudo for `dpkg --add-architecture arm64` and `apt-get update`
# (done once), and a Python 3 with pip. Running it again with a finished root does nothing; a root made from
# another package list is rebuilt. Outputs under emulation can be checked for correctness; their timings say
# nothing about a real ARM board.
set -euo pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
    echo "usage: $0 ROOT   (e.g. ~/.cache/onnxforge/aarch64-root)" >&2
    exit 2
fi
ROOT=$(realpath -m "$1")
PYTHON=${PYTHON:-python3}  # the host Python whose pip fetches the aarch64 wheels

# What the loader needs: the interpreter and its standard library, the C and C++ runtimes, and the libraries of
# the standard library's extension modules that it can import (ctypes, hashlib, bz2, lzma, uuid, crypt).
DEBS=(
    python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
    libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libcrypt1 libuuid1
)
# The TVM runtime of the version that compiles the artifacts; tvm_ffi imports typing_extensions. The wheels of
# these releases are tagged manylinux_2_24 to _2_28 (bookworm's glibc is 2.36), so manylinux2014 alone finds none.
WHEELS=(numpy==2.4.6 apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 typing_extensions==4.16.0)
PLATFORMS=(manylinux2014_aarch64 manylinux_2_28_aarch64)
SPEC="${DEBS[*]} | ${WHEELS[*]}"
MARKER=.onnxforge-aarch64-root

usage_lines() {
    echo "run a program in it (qemu-user-static, no binfmt needed; -s keeps the host's ~/.local packages out):"
    echo "  PYTHONPATH=$ROOT/site qemu-aarch64-static -L $ROOT $ROOT/usr/bin/python3.11 -s PROGRAM.py ARGS..."
    echo "tests: ONNXFORGE_AARCH64_ROOT=$ROOT pytest tests/test_tvm_aarch64.py"
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "error: '$*' needs root; run it once as root, then this script again" >&2
        exit 1
    fi
}

if [[ -f $ROOT/$MARKER && $(cat "$ROOT/$MARKER") == "$SPEC" ]]; then
    echo "$ROOT is already built ($(du -sh "$ROOT" | cut -f1))"
    usage_lines
    exit 0
fi
if [[ -e $ROOT && ! -f $ROOT/$MARKER && -n $(ls -A "$ROOT" 2>/dev/null) ]]; then
    echo "error: $ROOT exists and was not made by this script; name an empty or new folder" >&2
    exit 1
fi

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    as_root dpkg --add-architecture arm64
fi
if ! apt-cache show python3.11-minimal:arm64 >/dev/null 2>&1; then
    as_root apt-get update -qq
fi

# Built beside the root and moved into place at the end: a failed run leaves no half-made root behind.
WORK=$ROOT.partial
rm -rf "$WORK"
mkdir -p "$WORK/.debs"
trap 'rm -rf "$WORK"' EXIT

sandbox=()
[[ $(id -u) -eq 0 ]] && sandbox=(-o APT::Sandbox::User=root)  # _apt cannot write to root's folders
download() { (cd "$WORK/.debs" && apt-get download -qq "${sandbox[@]}" "${DEBS[@]/%/:arm64}"); }
download || { as_root apt-get update -qq && download; }  # stale lists name versions the mirror has dropped
for deb in "$WORK"/.debs/*.deb; do
    dpkg -x "$deb" "$WORK"
done
rm -rf "$WORK/.debs" "$WORK"/usr/share/{doc,man,info,lintian,locale}

"$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore --target "$WORK/site" \
    "${PLATFORMS[@]/#/--platform=}" --only-binary=:all: --no-deps --python-version 3.11 --implementation cp \
    "${WHEELS[@]}"
# Runtime only: the compiler library is 240 MB and the sources and headers serve only to build against TVM.
rm -rf "$WORK"/site/tvm/lib/libtvm_compiler.so "$WORK"/site/tvm/{3rdparty,src,include} "$WORK/site/bin"

if command -v qemu-aarch64-static >/dev/null; then
    PYTHONPATH=$WORK/site qemu-aarch64-static -L "$WORK" "$WORK/usr/bin/python3.11" -s -c \
        'import platform, numpy, tvm; from tvm.runtime.vm import VirtualMachine
print("checked:", platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__,
      "tvm", tvm.__version__)'
else
    echo "qemu-aarch64-static is not installed (Debian: qemu-user-static): the root is built but unchecked" >&2
fi

echo "$SPEC" >"$WORK/$MARKER"
rm -rf "$ROOT"
mv "$WORK" "$ROOT"
trap - EXIT
echo "built $ROOT ($(du -sh "$ROOT" | cut -f1))"
usage_lines
