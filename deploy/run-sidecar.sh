#!/usr/bin/env bash
# Run streaming-llm as a sidecar next to a web app, from a checkout of this repository.
#
#   deploy/run-sidecar.sh            (from anywhere inside the repository, or by absolute path)
#
# 1. finds the repository root from this script's own location;
# 2. loads .env.sidecar at the root (or $STREAMING_LLM_ENV_FILE) when present; variables already
#    set in the environment win, and the file is only read, never written or copied over;
# 3. installs the Python dependencies into the virtual environment ($STREAMING_LLM_VENV, default
#    .venv) with the Makefile's install target, torch pinned exactly by $TORCH_SPEC, unless
#    STREAMING_LLM_BOOTSTRAP_DEPS=0;
# 4. brings the database to the latest migration (`streaming-llm migrate`);
# 5. execs the server on $STREAMING_LLM_HOST:$STREAMING_LLM_PORT, so SIGTERM reaches it directly
#    (graceful shutdown, exit status 0).
# Every failure prints what is missing and how to fix it, and exits non-zero.
set -euo pipefail

say() { printf 'run-sidecar: %s\n' "$*" >&2; }
die() { say "error: $*"; exit "${2:-1}"; }

# --- 1. repository root ----------------------------------------------------------------------
# readlink -f resolves a symlink to this script (e.g. from /usr/local/bin) to the checkout.
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
ROOT=$(cd "$here/.." && pwd -P)
[[ -f $ROOT/pyproject.toml && -d $ROOT/streaming_llm ]] \
    || die "$ROOT does not look like the streaming-llm repository (no pyproject.toml)"
cd "$ROOT"

# --- 2. settings file ------------------------------------------------------------------------
# A small KEY=value reader instead of `source`: values are taken literally (no shell expansion,
# no command substitution), the same way docker compose and systemd read the file.
load_env_file() {
    local file=$1 line key value n=0
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%$'\r'}
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        if [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
            key=${BASH_REMATCH[2]}
            value=${BASH_REMATCH[3]}
            if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
                value=${BASH_REMATCH[1]}
            fi
            [[ -v $key ]] || export "$key=$value"
        else
            die "$file:$n: expected KEY=value, got: $line" 2
        fi
    done <"$file"
}

if [[ -n ${STREAMING_LLM_ENV_FILE:-} ]]; then
    [[ -f $STREAMING_LLM_ENV_FILE ]] \
        || die "STREAMING_LLM_ENV_FILE=$STREAMING_LLM_ENV_FILE: no such file" 2
    env_file=$STREAMING_LLM_ENV_FILE
else
    env_file=$ROOT/.env.sidecar
fi
if [[ -f $env_file ]]; then
    say "settings from $env_file"
    load_env_file "$env_file"
else
    say "no $env_file: defaults and the environment only (cp .env.sidecar.example .env.sidecar)"
fi

# --- 3. Python environment -------------------------------------------------------------------
VENV=${STREAMING_LLM_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
case ${STREAMING_LLM_BOOTSTRAP_DEPS:-1} in
    0 | false | no | off) bootstrap=0 ;;
    1 | true | yes | on) bootstrap=1 ;;
    *) die "STREAMING_LLM_BOOTSTRAP_DEPS=$STREAMING_LLM_BOOTSTRAP_DEPS: expected 1 or 0" 2 ;;
esac

if [[ $bootstrap == 1 ]]; then
    base=${PYTHON:-python3}  # the Makefile's names: PYTHON, TORCH_SPEC
    command -v "$base" >/dev/null \
        || die "$base not found: install Python 3.11 or newer, or set PYTHON to one"
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$base is Python $("$base" -c 'import platform; print(platform.python_version())'), 3.11 or newer is needed"
    torch_spec=${TORCH_SPEC:-torch==2.13.0}
    say "installing dependencies into $VENV ($torch_spec)"
    if command -v make >/dev/null; then
        make -C "$ROOT" --no-print-directory install \
            PYTHON="$base" VENV="$VENV" TORCH_SPEC="$torch_spec" \
            || die "installing the dependencies failed (see above)"
    else
        # No make (e.g. a slim container image): the Makefile's install target, step by step.
        stamp=$VENV/.stamp-install
        if [[ ! -f $stamp || $ROOT/pyproject.toml -nt $stamp ]]; then
            { [[ -x $PY ]] || "$base" -m venv "$VENV"; } \
                || die "creating $VENV failed (on Debian/Ubuntu: apt-get install python3-venv)"
            if ! { "$PY" -m pip install --quiet "$torch_spec" \
                    && "$PY" -m pip install --quiet -e "${ROOT}[postgres]" "$torch_spec"; }; then
                die "installing the dependencies failed (see above)"
            fi
            touch "$stamp"
        fi
    fi
else
    [[ -x $PY ]] || die "no virtual environment at $VENV and STREAMING_LLM_BOOTSTRAP_DEPS=0: run 'make install', point STREAMING_LLM_VENV at one, or unset STREAMING_LLM_BOOTSTRAP_DEPS"
fi
"$PY" -c 'import streaming_llm.app' 2>/dev/null \
    || die "$PY lacks the service's dependencies: run 'make install' (or set STREAMING_LLM_BOOTSTRAP_DEPS=1)"

# --- 4. database ------------------------------------------------------------------------------
# Exit status 2 is a bad setting, already explained on stderr by streaming-llm itself: stop there
# rather than add a misleading word about the database.
status=0
"$PY" -m streaming_llm migrate || status=$?
if [[ $status == 2 ]]; then
    exit 2
elif [[ $status != 0 ]]; then
    die "could not bring the database to the latest migration (see above)"
fi

# --- 5. server -------------------------------------------------------------------------------
say "starting on ${STREAMING_LLM_HOST:-127.0.0.1}:${STREAMING_LLM_PORT:-8000} (engine ${STREAMING_LLM_ENGINE:-local})"
exec "$PY" -m streaming_llm serve
