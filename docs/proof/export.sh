#!/usr/bin/env bash
# Write the proof's small result tables (CSV) and figures (PNG) from the lake into docs/proof/, the SQL the
# docs/proof.md's tables come from. Run from the repository root after `make proof`:
#     docs/proof/export.sh [DATA_DIR]          (default: $POPFLOW_DATA_DIR, else ./data)
set -euo pipefail
data="${1:-${POPFLOW_DATA_DIR:-data}}"
out="$(dirname "$0")"
sql() { .venv/bin/popflow sql --data-dir "$data" --csv "$1" | tr -d "\r"; }
runs="$data/lake/_runs"
latest() { sql "select run_id from latest_runs where pipeline = '$1'" | tail -n +2; }
has() { [ -n "$(latest "$1")" ]; }
# the SQL of one of popflow's query functions (module, function, its string arguments), as popflow runs it
query() { .venv/bin/python -c 'import importlib, sys; print(getattr(importlib.import_module(sys.argv[1]), sys.argv[2])(*sys.argv[3:]))' "$@"; }

for p in proof_loop proof_nightly; do  # the loops: every round's gate, and the climb of the held-out reward
  has "$p" || continue
  name="${p#proof_}"  # loop_*, nightly_*
  sql "select round, run_id, method || '-s' || seed as candidate, parent_round, win_rate, win_lower, win_upper,
              heldout_accuracy, promoted, reason from loop_rounds where pipeline = '$p' order by round" \
      > "$out/${name}_rounds.csv"
  sql "$(query popflow.report climb_sql "$p")" > "$out/${name}_climb.csv"
  .venv/bin/python - "$data" "$out" "$p" "$name" <<'PY'
import sys
from pathlib import Path
from popflow.lake import Lake
from popflow.plots import plot_climb
from popflow.report import climb_sql
from popflow.runs import resolve_data_dir
data, out, pipeline, name = sys.argv[1:]
rows = Lake(resolve_data_dir(data)).connect().sql(climb_sql(pipeline)).to_arrow_table().to_pylist()
plot_climb(rows, Path(out) / f"{name}_climb.png", f"{pipeline}, {rows[0]['prompts']} held-out prompts")
PY
  cp "$runs/pipeline=$p/run=$(latest "$p")/loop_rounds.png" "$out/${name}_rounds.png"
done
if has proof_points; then  # the seven points as n grows (no training)
  sql "$(query tasks.pair growth_curve_sql "(select * from latest_point_growth where pipeline = 'proof_points')")" \
      > "$out/point_growth.csv"
  cp "$runs/pipeline=proof_points/run=$(latest proof_points)/point_growth.png" "$out/point_growth.png"
fi
for p in proof proof_pairs; do  # the claims: methods x 3 seeds (proof: DPO-PoP's; proof_pairs: pair strategies)
  has "$p" || continue
  sql "select method, metric, mean, std, seeds, low, high, units from latest_comparison
       where pipeline = '$p' order by metric, method" > "$out/${p}_comparison.csv"
  cp "$runs/pipeline=$p/run=$(latest "$p")/comparison.png" "$out/${p}_comparison.png"
done
for p in proof proof_pairs; do  # the PoP sweeps: margin Spearman against the ground truth, on each run's pairs
  has "$p" || continue
  sql "$(query flows.experiment pop_sweep_sql "(select * from latest_pop_sweep where pipeline = '$p')")" \
      > "$out/${p}_pop_sweep.csv"
  cp "$runs/pipeline=$p/run=$(latest "$p")/pop_sweep.png" "$out/${p}_pop_sweep.png"
done
ls -l "$out"
