#!/usr/bin/env bash
# Install llama-cpp-python, the library of the local engine's llama.cpp runtime
# (STREAMING_LLM_RUNTIME; docs/engines.md), built from its PyPI sdist for this machine's CPU.
#
#   scripts/install-llama-cpp-python.sh PYTHON [--dry-run]
#
#   PYTHON      the interpreter whose environment gets it (make install: .venv/bin/python)
#   --dry-run   print the build's cmake flags and the wheel's cache folder; change nothing
#
# Never a downloaded binary: the wheel is built here, with the instruction sets this CPU lists
# (scripts/llama-cpp-flags.sh; never GGML_NATIVE, never AMX), without OpenMP (ggml's own thread
# pool, so no second OpenMP runtime beside torch's in the server process). A build takes
# minutes on 2 cores, so the wheel is kept in a folder named for the version and the flags,
# ${STREAMING_LLM_WHEELS:-~/.cache/streaming-llm/wheels}/llama-cpp-python-<version>-<key>/: a
# machine with other instruction sets builds its own. Environment: LLAMA_CPP_PYTHON_VERSION
# (default 0.3.36), CPUINFO (default /proc/cpuinfo), JOBS (default: the CPUs).
set -euo pipefail

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
WHEELS=${STREAMING_LLM_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/streaming-llm/wheels}

python="" dry=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "install-llama-cpp-python: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) python=$arg ;;
    esac
done
if [[ -z $python ]]; then
    echo "install-llama-cpp-python: PYTHON is missing (see --help)" >&2
    exit 2
fi
CPUINFO=${CPUINFO:-/proc/cpuinfo}
if [[ ! -r $CPUINFO ]]; then
    echo "install-llama-cpp-python: cannot read $CPUINFO" >&2
    exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/llama-cpp-flags.sh"
cmake_flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF
             -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
             -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF
             "${isa_flags[@]}")
abi=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
key=$(printf '%s\n' "$VERSION" "$abi" "${cmake_flags[@]}" | sha256sum | cut -c1-16)
folder=$WHEELS/llama-cpp-python-$VERSION-$key

echo "install-llama-cpp-python: cmake flags ${cmake_flags[*]}" >&2
echo "install-llama-cpp-python: wheel folder $folder" >&2
if (( dry )); then
    exit 0
fi
wheel=$(ls "$folder"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [[ -z $wheel ]]; then
    echo "install-llama-cpp-python: building llama-cpp-python $VERSION from its sdist" \
         "(minutes, once per machine kind)" >&2
    started=$SECONDS
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    CMAKE_ARGS="${cmake_flags[*]}" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        "$python" -m pip wheel --quiet --no-deps --no-cache-dir \
        --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$tmp"
    mkdir -p "$folder"
    built=$(ls "$tmp"/llama_cpp_python-*.whl)
    mv "$built" "$folder/"
    wheel=$folder/$(basename "$built")
    echo "install-llama-cpp-python: built in $(( SECONDS - started )) s" >&2
fi
# This build, even over an installed llama-cpp-python of the same version (another build of
# it); then its dependencies.
"$python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
"$python" -m pip install --quiet "$wheel"
