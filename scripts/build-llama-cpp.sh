#!/usr/bin/env bash
# Build llama.cpp's bench tools, the yardstick of `bench speed --llama-bench` and
# `bench concurrency --llama-batched-bench` (docs/performance.md). Never a dependency of the
# project: the sources come from the llama-cpp-python sdist on PyPI (its vendor/llama.cpp), the
# build goes outside the project tree.
#
#   scripts/build-llama-cpp.sh DEST [--dry-run]
#
#   DEST        where the sdist is unpacked (DEST/src) and built (DEST/build); the binaries'
#               paths are printed last: llama-bench, llama-batched-bench, llama-server,
#               llama-quantize (DEST/build/bin/)
#   --dry-run   print the commands and change nothing
#
# Instruction sets are set explicitly from the CPU's flags, read at run time (GGML_NATIVE=OFF):
# a GGML_NATIVE build crashed on AMX instructions that a machine advertised but did not allow,
# so AMX is never on; AVX-512 (and its VNNI, BF16, VBMI) only where /proc/cpuinfo lists it.
# Environment: LLAMA_CPP_PYTHON_VERSION (the sdist, default 0.3.36), LLAMA_CPP_SDIST (a
# downloaded sdist .tar.gz instead of PyPI), CPUINFO (default /proc/cpuinfo), JOBS (default 2),
# PYTHON (the pip to download with, default python3).
set -euo pipefail

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CPUINFO=${CPUINFO:-/proc/cpuinfo}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python3}
TARGETS=(llama-bench llama-batched-bench llama-server llama-quantize)

dest="" dry=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build-llama-cpp: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) if [[ -n $dest ]]; then
               echo "build-llama-cpp: one DEST only (see --help)" >&2; exit 2
           fi
           dest=$arg ;;
    esac
done
if [[ -z $dest ]]; then
    echo "build-llama-cpp: DEST is missing (see --help)" >&2
    exit 2
fi
if [[ ! -r $CPUINFO ]]; then
    echo "build-llama-cpp: cannot read $CPUINFO" >&2
    exit 2
fi
dest=$(realpath -m "$dest")

# The instruction sets, from the CPU's flags (shared with scripts/install-llama-cpp-python.sh).
source "$(dirname "${BASH_SOURCE[0]}")/llama-cpp-flags.sh"
cmake_flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_OPENMP=ON
             # Nothing from the network at build time: no curl/HTTPS model downloads, no
             # prebuilt web UI fetched from Hugging Face for llama-server.
             -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
             -DLLAMA_BUILD_TESTS=OFF "${isa_flags[@]}")

src_dir=$dest/src
sdist=${LLAMA_CPP_SDIST:-$src_dir/llama_cpp_python-$VERSION.tar.gz}
source=$src_dir/$(basename "$sdist" .tar.gz)/vendor/llama.cpp
build=$dest/build

run() {
    echo "+ $*" >&2
    if (( ! dry )); then "$@"; fi
}

started=$SECONDS
if [[ ! -f $source/CMakeLists.txt ]]; then
    if [[ -z ${LLAMA_CPP_SDIST:-} && ! -f $sdist ]]; then
        run "$PYTHON" -m pip download --no-binary :all: --no-deps --dest "$src_dir" \
            "llama-cpp-python==$VERSION"
    fi
    run mkdir -p "$src_dir"
    run tar -xzf "$sdist" -C "$src_dir"
fi
run cmake -S "$source" -B "$build" "${cmake_flags[@]}"
run nice -n 10 cmake --build "$build" --parallel "$JOBS" --target "${TARGETS[@]}"
if (( ! dry )); then
    echo "build-llama-cpp: built in $(( SECONDS - started )) s" >&2
fi
for target in "${TARGETS[@]}"; do
    echo "$build/bin/$target"
done
