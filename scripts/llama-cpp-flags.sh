# Sourced by scripts/build-llama-cpp.sh and scripts/install-llama-cpp-python.sh: sets
# `isa_flags`, llama.cpp's cmake flags for the instruction sets of this machine's CPU.
#
# Set explicitly from the CPU's flags, read at run time (GGML_NATIVE=OFF): a GGML_NATIVE build
# crashed on AMX instructions that a machine advertised but did not allow, so AMX is never on;
# AVX-512 (and its VNNI, BF16, VBMI) only where the CPU lists it. CPUINFO (default
# /proc/cpuinfo) is the file read.

CPUINFO=${CPUINFO:-/proc/cpuinfo}
# The first CPU's flags (x86: "flags : fpu vme ... avx2 ..."); none elsewhere.
cpu_flags=" $(grep -m1 '^flags' "$CPUINFO" | cut -d: -f2-) "
has() { [[ $cpu_flags == *" $1 "* ]]; }
on_if() { if has "$2"; then echo "-D$1=ON"; else echo "-D$1=OFF"; fi; }

isa_flags=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
if has avx2; then
    isa_flags+=("$(on_if GGML_SSE42 sse4_2)" "$(on_if GGML_AVX avx)" -DGGML_AVX2=ON
                "$(on_if GGML_FMA fma)" "$(on_if GGML_F16C f16c)" "$(on_if GGML_BMI2 bmi2)"
                "$(on_if GGML_AVX_VNNI avx_vnni)")
else
    isa_flags+=(-DGGML_AVX2=OFF "$(on_if GGML_AVX avx)" "$(on_if GGML_FMA fma)"
                "$(on_if GGML_F16C f16c)" -DGGML_BMI2=OFF)
fi
if has avx512f; then
    isa_flags+=(-DGGML_AVX512=ON "$(on_if GGML_AVX512_VNNI avx512_vnni)"
                "$(on_if GGML_AVX512_BF16 avx512_bf16)" "$(on_if GGML_AVX512_VBMI avx512vbmi)")
else
    isa_flags+=(-DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
                -DGGML_AVX512_VBMI=OFF)
fi
