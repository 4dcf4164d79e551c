#!/usr/bin/env bash
# Write the proof's small result tables (CSV) and figures (PNG) from the lake into docs/proof/, the SQL the
# README's "Does it work?" tables come from. Run from the repository root after `make proof`:
#     docs/proof/export.sh [DATA_DIR]          (default: $POPFLOW_DATA_DIR, else ./data)
set -euo pipefail
data="${1:-${POPFLOW_DATA_DIR:-data}}"
out="$(dirname "$0")"
sql() { .venv/bin/popflow sql --data-dir "$data" --csv "$1" | tr -d "\r"; }
runs="$data/lake/_runs"
latest() { sql "select run_id from latest_runs where pipeline = '$1'" | tail -n +2; }
has() { [ -n "$(latest "$1")" ]; }

if has proof_loop; then  # the loop: every round's gate, and the climb of the held-out reward
  sql "select round, run_id, method || '-s' || seed as candidate, parent_round, win_rate, win_lower, win_upper,
              heldout_accuracy, promoted, reason from loop_rounds where pipeline = 'proof_loop' order by round" \
      > "$out/loop_rounds.csv"
  .venv/bin/python - "$data" > "$out/loop_climb.csv" <<'PY'
import csv, sys
from popflow.lake import Lake
from popflow.report import climb_table
from popflow.runs import resolve_data_dir
table = climb_table(Lake(resolve_data_dir(sys.argv[1])).connect(), "proof_loop")
prompts = table.column("prompts").to_pylist()[0]
w = csv.writer(sys.stdout, lineterminator="\n"); w.writerow(table.column_names); w.writerows(zip(*[c.to_pylist() for c in table.columns]))
from pathlib import Path
from popflow.plots import plot_climb
plot_climb(table.to_pylist(), Path("docs/proof/loop_climb.png"), f"proof_loop, {prompts} held-out prompts")
PY
  cp "$runs/pipeline=proof_loop/run=$(latest proof_loop)/loop_rounds.png" "$out/loop_rounds.png"
fi
if has proof_points; then  # the seven points as n grows (no training)
  .venv/bin/python - "$data" > "$out/point_growth.csv" <<'PY'
import csv, sys
from popflow.lake import Lake
from popflow.runs import resolve_data_dir
from popflow.sql import t_literal
from tasks.pair import growth_curve_sql
con = Lake(resolve_data_dir(sys.argv[1])).connect()
source = "(select * from latest_point_growth where pipeline = 'proof_points')"
prompts = con.execute(f"select count(distinct prompt_id) from {source}").fetchall()[0][0]
table = con.sql(growth_curve_sql(source, t_literal(prompts))).to_arrow_table()
w = csv.writer(sys.stdout, lineterminator="\n"); w.writerow(table.column_names); w.writerows(zip(*[c.to_pylist() for c in table.columns]))
PY
  cp "$runs/pipeline=proof_points/run=$(latest proof_points)/point_growth.png" "$out/point_growth.png"
fi
if has proof; then  # the claims: methods x 3 seeds, and the PoP sweep
  sql "select method, metric, mean, std, seeds, low, high, units from latest_comparison
       where pipeline = 'proof' order by metric, method" > "$out/comparison.csv"
  sql "select sampling, k, avg(spearman) as spearman, stddev_samp(spearman) as sd, avg(pearson) as pearson,
              avg(uncompared) as uncompared, count(*) as draws
       from latest_pop_sweep where pipeline = 'proof' group by all order by all" > "$out/pop_sweep.csv"
  last="$runs/pipeline=proof/run=$(latest proof)"
  cp "$last/comparison.png" "$out/comparison.png"; cp "$last/pop_sweep.png" "$out/pop_sweep.png"
fi
ls -l "$out"
