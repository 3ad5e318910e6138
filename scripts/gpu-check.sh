#!/usr/bin/env bash
# The CUDA path on one GPU machine: the CUDA tests, then `bench speed` and `bench concurrency` on
# random-weight Llama models of two real shapes, in bfloat16, eager and compiled (CUDA graphs),
# and one table. See docs/performance.md, "GPU".
#
#   scripts/gpu-check.sh --fetch [--print]   here (with PyPI): download the wheels the GPU image
#                                            lacks into .gpu-wheels/ (--print: only list them)
#   scripts/gpu-check.sh                     there (no network): install them into .gpu-site/,
#                                            run everything, print the table (< 8 min on an H100)
#   scripts/gpu-check.sh --dry-run           here: the same stages on CPU, tiny shapes, few steps,
#                                            with the Python that has the project installed
#
# The GPU image has python3 with torch, transformers, accelerate, safetensors, aiohttp, numpy;
# the rest (starlette, uvicorn, SQLAlchemy, msgspec, ..., pytest) comes from .gpu-wheels, which
# the device tool carries along (`carry: [".gpu-wheels"]`). Results (JSON per stage, the logs,
# the table) go to $OUT when set (the device tool brings it back), else .gpu-check/results.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=.gpu-wheels
# The GPU image's Python version is not known here: wheels for each of these (compiled ones
# differ per version; pure-Python ones are shared).
FETCH_PYTHONS=${GPU_CHECK_PYTHONS:-"3.11 3.12 3.13"}

mode=gpu
print_only=0
for arg in "$@"; do
    case "$arg" in
        --fetch) mode=fetch ;;
        --print) print_only=1 ;;
        --dry-run) mode=dry ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

# --- here: the wheels --------------------------------------------------------------------------
if [[ $mode == fetch ]]; then
    # At the versions installed here: the GPU run tests what the tests here pass with.
    requirements=$("$PYTHON" scripts/gpu_check.py requirements --pinned)
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64)
    for version in $FETCH_PYTHONS; do
        abi=cp${version/./}
        command=("$PYTHON" -m pip download --quiet --dest "$WHEELS" --only-binary=:all:
                 --python-version "$version" --implementation cp --abi "$abi" "${platforms[@]}")
        if (( print_only )); then
            echo "${command[*]} $(tr '\n' ' ' <<<"$requirements")"
        else
            echo "gpu-check: wheels for Python $version" >&2
            # shellcheck disable=SC2086  # one requirement a word
            "${command[@]}" $requirements
        fi
    done
    if (( print_only )); then
        echo "requirements:"
        echo "$requirements"
    else
        du -sh "$WHEELS"
    fi
    exit 0
fi

# --- the stages --------------------------------------------------------------------------------
# budget: seconds for everything from here on (the install included), so that the run ends
# within 8 minutes on the GPU machine. The dry run leaves compiled steps out by default: on
# this project's 2-core CPU each graph compiles for 20-60 s.
if [[ $mode == dry ]]; then
    device=cpu dtype=float32 shapes="tiny-a tiny-b" steps=4 repeats=1
    conversations=1,2 max_new=8 budget=${GPU_CHECK_BUDGET_S:-240} modes=${GPU_CHECK_MODES:-eager}
    test_s=60 build_s=60 speed_s=60 together_s=60
else
    device=cuda dtype=bfloat16 shapes="smollm2-135m llama-1b" steps=64 repeats=3
    conversations=1,8 max_new=64 budget=${GPU_CHECK_BUDGET_S:-420}
    modes=${GPU_CHECK_MODES:-eager compiled}
    test_s=90 build_s=60 speed_s=75 together_s=150
fi
work=.gpu-check
results=${OUT:-$work/results}
mkdir -p "$work/models" "$results"
: >"$results/status"
echo "$conversations" >"$results/conversations"
started=$SECONDS

# stage NAME SECONDS COMMAND...: run COMMAND under `timeout`, its stdout to NAME.out and its log
# to NAME.log in the results, and record its exit code; a failed stage does not end the run. No
# stage gets more than what is left of the budget, so the whole run stays inside it.
stage() {
    local name=$1 limit=$2 left code=0
    shift 2
    left=$(( budget - (SECONDS - started) ))
    if (( limit > left )); then limit=$left; fi
    if (( limit < 5 )); then
        echo "gpu-check: $name: no time left in the ${budget} s budget" >&2
        echo "$name 124" >>"$results/status"
        return 0
    fi
    echo "gpu-check: $name (at most ${limit} s)" >&2
    local at=$SECONDS
    timeout --kill-after=15 "$limit" "$@" >"$results/$name.out" 2>"$results/$name.log" || code=$?
    echo "$name $code" >>"$results/status"
    echo "gpu-check: $name: exit $code after $(( SECONDS - at )) s" >&2
    if (( code != 0 )); then
        echo "gpu-check: $name: the end of its log:" >&2
        tail -n 15 "$results/$name.log" >&2
    fi
}

if [[ $mode == gpu ]]; then
    if [[ $(uname -m) != x86_64 ]]; then
        echo "gpu-check: the wheels in $WHEELS are for x86_64, this is $(uname -m)" >&2
        exit 1
    fi
    version=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    if ! ls "$WHEELS"/msgspec-*-"$version"-*.whl >/dev/null 2>&1; then
        echo "gpu-check: no wheels for $version in $WHEELS: run scripts/gpu-check.sh --fetch" \
             "here and carry $WHEELS (GPU_CHECK_PYTHONS=\"${version:2:1}.${version:3}\")" >&2
        exit 1
    fi
    # Into a folder of their own, never over the image's packages (torch, transformers): no
    # venv module or root needed, and the image stays as it was.
    echo "gpu-check: installing from $WHEELS into .gpu-site" >&2
    # shellcheck disable=SC2046  # one requirement a word
    timeout 120 "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" \
        --target .gpu-site --upgrade $("$PYTHON" scripts/gpu_check.py requirements)
    export PYTHONPATH=$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}
    nvidia-smi || echo "gpu-check: no nvidia-smi" >&2
fi
GPU_CHECK_MODE=$mode "$PYTHON" - <<'EOF'
import os, sys
import torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
elif os.environ["GPU_CHECK_MODE"] == "gpu":
    sys.exit("gpu-check: torch sees no CUDA device (see nvidia-smi above); nothing to check")
else:
    print("no CUDA device: the CUDA tests skip, the benches run on the CPU")
EOF

# shellcheck disable=SC2086  # one shape a word
stage build "$build_s" "$PYTHON" scripts/gpu_check.py build "$work/models" $shapes \
    --device "$device" --dtype "$dtype"

# The CUDA tests live in the files that use the mark; collecting only those keeps the other
# test files' imports (hypothesis, schemathesis, ...) off the GPU machine.
mapfile -t cuda_files < <(grep -rl --include='test_*.py' 'pytest.mark.cuda' tests)
stage cuda-tests "$test_s" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider "${cuda_files[@]}"
tail -n 3 "$results/cuda-tests.out" >&2

# The figures that matter most first; compiled serving last, with what is left of the budget: it
# compiles a graph per batch bucket while the conversations join, the least predictable stage.
for shape in $shapes; do
    stage "$shape-speed" "$speed_s" "$PYTHON" -m streaming_llm bench speed \
        --model "$work/models/$shape" --modes "${modes// /,}" --device "$device" --dtype "$dtype" \
        --steps "$steps" --repeats "$repeats" --threads "$(nproc)" --json
done
for step in $modes; do
    flags=(--compile false)
    if [[ $step == compiled ]]; then flags=(--compile true); fi
    for shape in $shapes; do
        stage "$shape-$step-concurrency" "$together_s" "$PYTHON" -m streaming_llm bench \
            concurrency --model "$work/models/$shape" --device "$device" --dtype "$dtype" \
            "${flags[@]}" --conversations "$conversations" --max-new-tokens "$max_new" \
            --max-batch 8 --json
    done
done

"$PYTHON" scripts/gpu_check.py table "$results" | tee "$results/table.md"
echo "gpu-check: done in $(( SECONDS - started )) s; results in $results" >&2
