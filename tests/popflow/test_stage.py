"""The stage registry: what each stage's hash covers (derived from the declarations), the plan's checks,
the bookkeeping it owns (skip, refuse, manifest), and the house rules the registry relies on."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.pipeline import STAGES
from popflow import stage as registry
from popflow.config import load_pipeline
from popflow.errors import PopflowError
from popflow.stage import Output, Parts, RunContext, hash_sections, plan, stage, upstream

REPO = Path(__file__).resolve().parents[2]


def test_hash_sections_follow_the_declared_reads():
    """tiny (sample/score/pair, training on): each stage covers its own sections and those of every stage it
    reads from, transitively; a whole section replaces its fields (train covers train.dtype):
        sample     reads ingest                          -> prompts, sample
        annotate   reads pair (import_pairs is off)      -> + pair, score, annotate
        ref_logps  reads pair; own trained_strategies (derived: the pair strategies trained on), train.dtype,
                   train.long_prompts
        train      reads annotate, margins, ref_logps    -> annotate, margins, pair, prompts, sample, score, train,
                                                            trained_strategies
        evaluate   reads train, ingest, score            -> train's + evaluate"""
    cfg = load_pipeline("tiny")
    got = {s.name: hash_sections(s, cfg) for s in plan(STAGES, cfg)}
    chain = ("pair", "prompts", "sample", "score")
    assert got == {
        "ingest": ("prompts",),
        "sample": ("prompts", "sample"),
        "score": ("prompts", "sample", "score"),
        "pair": chain,
        "annotate": ("annotate", *chain),
        "margins": ("annotate", "margins", *chain),
        "ref_logps": (*chain, "train.dtype", "train.long_prompts", "trained_strategies"),
        "train": ("annotate", "margins", *chain, "train", "trained_strategies"),
        "evaluate": ("annotate", "evaluate", "margins", *chain, "train", "trained_strategies"),
    }


def test_imported_pairs_plan_and_hashes():
    """`imported` replaces ingest/sample/score/pair by import_pairs, so the later stages hash import_pairs
    instead of the sampling sections; `train: null` drops ref_logps, train and evaluate."""
    cfg = load_pipeline("imported")
    names = [s.name for s in plan(STAGES, cfg)]
    assert names[:3] == ["import_pairs", "annotate", "margins"]
    annotate = next(s for s in STAGES if s.name == "annotate")
    assert hash_sections(annotate, cfg) == ("annotate", "import_pairs")
    assert upstream(annotate, cfg) == ["import_pairs"]
    no_train = load_pipeline("tiny", overrides=["train=null"])
    assert [s.name for s in plan(STAGES, no_train)] == ["ingest", "sample", "score", "pair", "annotate", "margins"]


def test_plan_refuses_unknown_and_later_reads(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    cfg = load_pipeline("tiny")
    first = stage("t_first", writes=("a",))(lambda ctx: Output({}))
    orphan = stage("t_orphan", reads=("t_nowhere",), writes=("b",))(lambda ctx: Output({}))
    with pytest.raises(ValueError, match="reads from 't_nowhere', which is not a registered stage"):
        plan((first, orphan), cfg)
    late = stage("t_late", reads=("t_first",), writes=("c",))(lambda ctx: Output({}))
    with pytest.raises(ValueError, match="reads from 't_first', which runs after it"):
        plan((late, first), cfg)
    assert plan((first, late), cfg) == [first, late]


def test_the_registry_skips_refuses_and_checks_declarations(monkeypatch, tmp_path):
    """The work runs once; a rerun is skipped from the manifest; a changed section is refused; a table the
    stage does not declare is an error."""
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    calls = []

    def work(ctx):
        calls.append(ctx.run_id)
        ctx.lake.write_table("things", ctx.pipeline, ctx.run_id, pa.table({"x": [1, 2, 3]}))
        return Output({"things": 3}, {"note": "it's done"})

    things = stage("t_things", sections=("pair",), writes=("things",))(work)
    ctx = RunContext(str(tmp_path / "it's a lake"), "tiny", "r1", load_pipeline("tiny"))
    first = things(ctx)
    assert (first.tables, first.skipped, calls) == ({"things": 3}, False, ["r1"])
    manifest = ctx.lake.read_manifest("tiny", "r1", "t_things")
    assert manifest["stage_hash"] == ctx.config.hash("pair") and manifest["report"] == {"note": "it's done"}
    again = things(ctx)
    assert (again.skipped, again.tables, calls) == (True, {"things": 3}, ["r1"])  # not run again
    changed = RunContext(ctx.data_dir, "tiny", "r1", load_pipeline("tiny", overrides=["pair.seed=7"]))
    with pytest.raises(PopflowError, match="already has a 't_things' stage made with a different config"):
        things(changed)
    sneaky = stage("t_sneaky", writes=("declared",))(lambda ctx: Output({"undeclared": 1}))
    with pytest.raises(RuntimeError, match=r"wrote tables it does not declare: \['undeclared'\]"):
        sneaky(ctx)
    assert ctx.lake.read_manifest("tiny", "r1", "t_sneaky") is None


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_stage_module_imports_another():
    stage_modules = {s.work.__module__ for s in STAGES}
    assert len(stage_modules) == len(STAGES)  # one module per stage
    for module in stage_modules:
        others = {m for m in imports(REPO / (module.replace(".", "/") + ".py")) if m in stage_modules - {module}}
        assert not others, f"{module} imports the stage module(s) {others}"


def test_the_core_package_imports_neither_tasks_nor_flows():
    """popflow/ is the bottom layer; only the CLI sits on top of the flows (docs/contributing.md)."""
    for path in sorted((REPO / "popflow").rglob("*.py")):
        upward = {m for m in imports(path) if m.split(".")[0] in ("tasks", "flows")}
        if path.name == "cli.py":
            assert upward and all(m.startswith("flows") for m in upward)
        else:
            assert not upward, f"{path.name} imports {upward}"


def test_bad_input_is_never_retried():
    """Prefect wraps what failed in a Failed state: the stage's own Failed state (bad input, reported by
    Stage.task) or an exception; only the transient kind is retried."""
    from prefect.states import Failed

    assert not registry.transient(None, None, Failed(data=Failed(data=PopflowError("bad row"))))
    assert not registry.transient(None, None, Failed(data=PopflowError("bad row")))
    assert registry.transient(None, None, Failed(data=RuntimeError("engine core died")))


def test_no_import_circle():
    """No module of popflow/, tasks/ or flows/ reaches itself through imports at any depth (function-level ones
    included): graphlib's topological sort raises CycleError naming the circle if one does."""
    from graphlib import TopologicalSorter

    names = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in ("popflow", "tasks", "flows") for p in (REPO / pkg).rglob("*.py")}
    graph = {name: (imports(path) & names.keys()) - {name} for name, path in names.items()}
    assert "tasks.train_launch" in graph["tasks.train"] and "tasks.trainer" in graph["tasks.train_launch"]
    TopologicalSorter(graph).prepare()


def test_parts_resume_stage_last_the_marker_and_publish_only_exact_counts(tmp_path):
    """Three parts of two tables, `b` marking a part done. Part p0 staged whole, p1 crashed after its `a` part
    (no `b`): p1 and p2 are still to do. Publishing with a wrong expected count refuses and publishes nothing;
    with the right counts (3 parts x 2 rows of a, x 1 row of b) both tables are published with the run columns."""
    ctx = RunContext(str(tmp_path), "p", "r1", load_pipeline("tiny"))
    a = pa.table({"x": [1, 2]})
    b = pa.table({"y": [1]})
    first = Parts(ctx, "sample", ("a", "b"), ["p0", "p1", "p2"], done_by="b")
    assert first.todo == ["p0", "p1", "p2"] and not Parts.started(ctx, "b")
    first.stage("p0", a=a, b=b)
    ctx.lake.write_staged_part("a", "p", "r1", "p1", a)  # a crash between p1's two tables
    again = Parts(ctx, "sample", ("a", "b"), ["p0", "p1", "p2"], done_by="b")
    assert again.done == {"p0"} and again.todo == ["p1", "p2"] and Parts.started(ctx, "b")
    with pytest.raises(RuntimeError, match="tables"):
        again.stage("p1", a=a)
    for name in again.todo:
        again.stage(name, a=a, b=b)
    with pytest.raises(PopflowError, match="a of run r1: 6 staged rows, expected 5"):
        again.publish(a=5, b=3)
    assert not ctx.has("a") and not ctx.has("b")
    assert again.publish(a=6, b=3) == {"a": 6, "b": 3}
    got = pa.concat_tables(pq.read_table(p) for p in sorted(Path(ctx.glob("a")).parent.glob("*.parquet")))
    assert got.column_names == ["x", "pipeline", "run_id"] and got.num_rows == 6
    assert Parts(ctx, "sample", ("a", "b"), ["p0"], done_by="b").publish(a=6) == {"a": 6, "b": 3}  # published already


def test_parts_of_another_config_or_no_longer_named_are_not_reused(tmp_path):
    """An attempt under another stage config (the sample stage's temperature changed, as `--from-stage sample`
    allows) reuses none of the staged parts; a part whose name this attempt does not have (a reward model
    dropped) is removed, so the count check and the published table hold exactly this attempt's parts. Parts made
from other `inputs` (evaluate: a policy trained again under the same name) are not reused either."""
    ctx = RunContext(str(tmp_path), "p", "r1", load_pipeline("tiny"))
    one = pa.table({"x": [1]})
    first = Parts(ctx, "sample", ("a",), ["m0", "m1"])
    first.stage("m0", a=one)
    first.stage("m1", a=one)
    assert Parts(ctx, "sample", ("a",), ["m0", "m1"]).done == {"m0", "m1"}  # same config: both reused
    fewer = Parts(ctx, "sample", ("a",), ["m0"])
    assert fewer.done == {"m0"} and fewer.publish(a=1) == {"a": 1}
    hotter = RunContext(str(tmp_path), "p", "r2", load_pipeline("tiny", overrides=["sample.temperature=0.5"]))
    Parts(hotter, "sample", ("a",), ["m0"]).stage("m0", a=one)
    assert Parts(hotter, "sample", ("a",), ["m0"]).done == {"m0"}
    colder = RunContext(str(tmp_path), "p", "r2", load_pipeline("tiny"))
    again = Parts(colder, "sample", ("a",), ["m0"])
    assert again.done == set() and again.todo == ["m0"] and not Parts.started(colder, "a")
    with pytest.raises(RuntimeError, match="repeated part names"):
        Parts(ctx, "sample", ("a",), ["m0", "m0"])
    Parts(ctx, "evaluate", ("a",), ["dpo-s0"], inputs="policies-v1").stage("dpo-s0", a=one)
    assert Parts(ctx, "evaluate", ("a",), ["dpo-s0"], inputs="policies-v1").done == {"dpo-s0"}
    retrained = Parts(ctx, "evaluate", ("a",), ["dpo-s0"], inputs="policies-v2")  # same name, another policy
    assert retrained.done == set() and retrained.todo == ["dpo-s0"]
