"""scripts/build-llama-cpp.sh --dry-run: the cmake flags it would build llama.cpp's bench tools
with, from the CPU flags of a given cpuinfo (never AMX; AVX-512 only where the CPU lists it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-llama-cpp.sh"
# /proc/cpuinfo's first lines on an AVX2 machine that also advertises AMX but no AVX-512, and
# on an AVX-512 one (with VNNI and BF16, and AMX again).
AVX2 = "fpu vme sse4_2 avx bmi2 fma f16c avx2 amx_tile amx_int8 amx_bf16"
AVX512 = AVX2 + " avx512f avx512_vnni avx512_bf16"


def dry_run(tmp_path: Path, flags: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n"
                           f"processor\t: 1\nflags\t\t: {flags} avx512f\n")
    return subprocess.run([str(SCRIPT), *args], check=False, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "CPUINFO": str(cpuinfo)})


def cmake_flags(result: subprocess.CompletedProcess[str]) -> set[str]:
    assert result.returncode == 0, result.stderr
    configure = [line for line in result.stderr.splitlines() if line.startswith("+ cmake -S ")]
    assert len(configure) == 1
    return {word for word in configure[0].split() if word.startswith("-D")}


def test_an_avx2_cpu_gets_avx2_and_never_avx512_or_amx(tmp_path: Path) -> None:
    result = dry_run(tmp_path, AVX2, str(tmp_path / "llama"), "--dry-run")
    flags = cmake_flags(result)
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
            "-DGGML_OPENMP=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
            "-DGGML_AVX512=OFF"} <= flags
    # The first CPU's flags count (the second one's avx512f does not).
    assert not any("AVX512" in f and f.endswith("=ON") for f in flags)
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= flags
    # Nothing built yet: the paths it will build, one a line, and no change on disk.
    assert result.stdout.split() == [str(tmp_path / "llama" / "build" / "bin" / tool) for tool in
                                     ("llama-bench", "llama-batched-bench", "llama-server",
                                      "llama-quantize")]
    assert not (tmp_path / "llama").exists()


def test_an_avx512_cpu_gets_avx512_and_still_no_amx(tmp_path: Path) -> None:
    flags = cmake_flags(dry_run(tmp_path, AVX512, "--dry-run", str(tmp_path / "llama")))
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
            "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX2=ON"} <= flags
    assert not any("AMX" in f and f.endswith("=ON") for f in flags)


def test_a_cpu_without_avx2_gets_none(tmp_path: Path) -> None:
    flags = cmake_flags(dry_run(tmp_path, "fpu sse4_2 avx", str(tmp_path / "llama"), "--dry-run"))
    assert {"-DGGML_AVX2=OFF", "-DGGML_FMA=OFF", "-DGGML_AVX=ON", "-DGGML_AVX512=OFF"} <= flags


def test_the_sdist_comes_from_pypi_at_a_pinned_version(tmp_path: Path) -> None:
    result = dry_run(tmp_path, AVX2, str(tmp_path / "llama"), "--dry-run")
    assert "pip download --no-binary :all: --no-deps" in result.stderr
    assert "llama-cpp-python==0.3.36" in result.stderr
    assert f"-S {tmp_path}/llama/src/llama_cpp_python-0.3.36/vendor/llama.cpp" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    ((), "DEST is missing"),
    (("a", "b"), "one DEST only"),
    (("a", "--jobs"), "unknown option --jobs"),
])
def test_bad_arguments_are_refused(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = dry_run(tmp_path, AVX2, *args)
    assert result.returncode == 2 and message in result.stderr


def test_an_unreadable_cpuinfo_is_refused(tmp_path: Path) -> None:
    result = dry_run(tmp_path, None, str(tmp_path / "llama"), "--dry-run")
    assert result.returncode == 2 and "cannot read" in result.stderr
