"""pipelines.yaml -> typed config: every shipped pipeline validates; bad keys and values are named."""

from __future__ import annotations

import textwrap

import pytest

from flows.preflight import preflight
from popflow.config import DEFAULT_CONFIG, load_pipeline, pipeline_names
from popflow.errors import PopflowError


def write(tmp_path, text: str):
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", pipeline_names())
def test_every_shipped_pipeline_validates(name):
    cfg = load_pipeline(name)
    preflight(cfg)  # built-in refs known, local paths exist, python rewards import
    assert cfg.sample.n >= 2
    first_comment = DEFAULT_CONFIG.read_text().split(f"\n{name}:\n", 1)[1].lstrip().splitlines()[0]
    assert first_comment.startswith("#") and any(cmd in first_comment for cmd in (
        "popflow run", "popflow loop", "popflow experiment", "make demo"))


def test_shipped_set_includes_the_three_required():
    assert {"demo", "tiny", "ultrafeedback-llama3"} <= set(pipeline_names())
    big = load_pipeline("ultrafeedback-llama3")
    assert big.sample.n >= 64 and big.sample.engine == "vllm"
    assert all(m.kind == "hf" for m in big.score.models)


def test_unknown_key_is_named_with_its_line(tmp_path):
    path = write(tmp_path, """\
        p:
          sample:
            n: 4
            temprature: 0.7
        """)
    with pytest.raises(PopflowError) as err:
        load_pipeline("p", path)
    assert f"{path}:4" in str(err.value) and "sample.temprature: unknown key" in str(err.value)


@pytest.mark.parametrize("body, expected", [
    ("sample: {n: 1}", "sample.n: Input should be greater than or equal to 2"),
    ("sample: {engine: vlm}", "sample.engine"),
    ("pair: {rejected: mu-3sigma}", "pair.rejected"),
    ("pair: {chosen: mu-sigma, rejected: mu}", "must lie above rejected point 'mu'"),
    ("score: {models: [{name: a, kind: constraints}, {name: a, kind: relevance}]}", "repeated: ['a']"),
    ("score: {models: [{name: x, kind: hf}]}", "score.models.0.model: Field required"),
    ("score: {models: [{name: x, kind: python, function: nocolon}]}", "score.models.0.function"),
])
def test_bad_values_are_named(tmp_path, body, expected):
    path = write(tmp_path, f"p:\n  {body}\n")
    with pytest.raises(PopflowError, match="pipeline 'p'") as err:
        load_pipeline("p", path)
    assert expected in str(err.value)


def test_a_pipeline_extends_another_key_by_key(tmp_path):
    """`extends` deep-merges: c extends b extends a; c's sample.n (6) wins over b's (5), the sampling seed and
    max_tokens come from a and b, a list (extra_strategies) is replaced whole; an unknown parent and a cycle
    are named with their line, and an override applies after the merge."""
    path = write(tmp_path, """\
        a:
          sample: {n: 4, max_tokens: 32, seed: 7}
          pair: {extra_strategies: [max_min, random]}
        b:
          extends: a
          sample: {n: 5}
        c:
          extends: b
          sample: {n: 6}
          pair: {extra_strategies: [random]}
        d:
          extends: nope
        e:
          extends: f
        f:
          extends: e
        """)
    c = load_pipeline("c", path)
    assert (c.sample.n, c.sample.max_tokens, c.sample.seed, c.pair.extra_strategies) == (6, 32, 7, ["random"])
    assert load_pipeline("b", path).pair.extra_strategies == ["max_min", "random"]
    assert load_pipeline("c", path, ["sample.max_tokens=48"]).sample.max_tokens == 48
    with pytest.raises(PopflowError, match=rf"{path}:12: pipeline 'd': extends 'nope': no such pipeline"):
        load_pipeline("d", path)
    with pytest.raises(PopflowError, match="a cycle \\(e -> f -> e\\)"):
        load_pipeline("e", path)


def test_overrides_are_validated_like_the_file():
    overrides = ["sample.n=6", "pair.extra_strategies=[random]", "sample.engine=transformers"]
    cfg = load_pipeline("tiny", overrides=overrides)
    assert (cfg.sample.n, cfg.pair.extra_strategies, cfg.sample.engine) == (6, ["random"], "transformers")
    with pytest.raises(PopflowError, match="sample.nn: unknown key"):
        load_pipeline("tiny", overrides=["sample.nn=6"])
    with pytest.raises(PopflowError, match="expected key.path=value"):
        load_pipeline("tiny", overrides=["sample.n"])
    # chunk_size is read by score only: sample refuses it rather than accepting and ignoring it
    assert load_pipeline("tiny", overrides=["execution.score.chunk_size=4"]).execution.score.chunk_size == 4
    with pytest.raises(PopflowError, match="execution.sample.chunk_size: unknown key"):
        load_pipeline("tiny", overrides=["execution.sample.chunk_size=4"])
    # imported pairs come without prompts: evaluate cannot sample the trained policies on held-out ones
    assert load_pipeline("imported").evaluate.generate is False
    with pytest.raises(PopflowError, match="evaluate.generate: an import_pairs pipeline has no prompts"):
        load_pipeline("imported", overrides=["evaluate.generate=true"])


def test_unknown_pipeline_and_missing_file(tmp_path):
    with pytest.raises(PopflowError, match="no pipeline named 'nope'; available: demo"):
        load_pipeline("nope")
    with pytest.raises(PopflowError, match="config file not found"):
        load_pipeline("tiny", tmp_path / "missing.yaml")


def test_missing_model_path_fails_preflight(tmp_path):
    cfg = load_pipeline("tiny", overrides=[f"sample.policy={tmp_path}/no-such-model"])
    with pytest.raises(PopflowError, match=r"sample.policy: model path '.*no-such-model' does not exist"):
        preflight(cfg)
    cfg = load_pipeline("tiny", overrides=["sample.policy=builtin:nope"])
    with pytest.raises(PopflowError, match="unknown built-in model"):
        preflight(cfg)


def test_config_hash_is_stable_and_sectioned():
    a, b = load_pipeline("tiny"), load_pipeline("tiny")
    assert a.hash() == b.hash() and len(a.hash()) == 12
    c = load_pipeline("tiny", overrides=["pair.chosen=mu+2sigma"])
    assert c.hash() != a.hash()
    assert c.hash("prompts", "sample") == a.hash("prompts", "sample")  # sampling is unaffected by pairing


def test_where_a_stage_runs_is_not_hashed_but_train_processes_are():
    """execution: moves sample and score to Ray without changing what they compute, so neither the stage hashes
    nor the run's config hash move (a local run resumes on a cluster); train.accelerate changes the global batch,
    so the train hash moves and the sampling hashes do not. An accelerate config that is neither shipped nor a
    path is refused naming the shipped ones."""
    from flows.pipeline import STAGES
    from popflow.stage import hash_sections

    stages = {s.name: s for s in STAGES}
    base = load_pipeline("tiny")
    ray = load_pipeline("tiny", overrides=["execution.sample.backend=ray", "execution.sample.replicas=4",
                                           "execution.score.backend=ray", "execution.ray.address=10.0.0.1:6379"])
    assert ray.hash() == base.hash()
    sections = {name: hash_sections(stages[name], base) for name in ("sample", "score", "train")}
    assert all(ray.hash(*keys) == base.hash(*keys) for keys in sections.values())
    launched = load_pipeline("tiny", overrides=["train.accelerate={processes: 2}"])
    assert launched.train.accelerate.config_file().name == "ddp.yaml"
    assert launched.hash(*sections["train"]) != base.hash(*sections["train"])
    assert launched.hash(*sections["sample"]) == base.hash(*sections["sample"])
    with pytest.raises(PopflowError, match=r"unknown accelerate config 'zero4'.*'ddp', 'fsdp', 'zero2', 'zero3'"):
        load_pipeline("tiny", overrides=["train.accelerate={config: zero4}"])


def test_shipped_accelerate_configs_load_with_accelerate():
    """Each configs/accelerate/*.yaml is what its name says, read by accelerate's own loader (as `accelerate
    launch --config_file` reads it), and opens with the command that uses it."""
    from accelerate.commands.config.config_args import load_config_from_file

    from popflow.config.execution import ACCELERATE_CONFIGS

    kinds = {}
    for path in sorted(ACCELERATE_CONFIGS.glob("*.yaml")):
        cfg = load_config_from_file(str(path))
        kinds[path.stem] = (cfg.distributed_type.value, (cfg.deepspeed_config or {}).get("zero_stage"))
        assert f"config: {path.stem}" in path.read_text().split("compute_environment")[0]
    assert kinds == {"ddp": ("MULTI_GPU", None), "fsdp": ("FSDP", None), "zero2": ("DEEPSPEED", 2),
                     "zero3": ("DEEPSPEED", 3)}


def test_the_proof_pipelines_share_one_recipe_and_never_tune_on_held_out_prompts():
    """proof_loop, proof_nightly (its round sized for AVX2) and proof_tune extend proof (same sampling and
    training); proof has >= 512 train and >= 96 held-out prompts at n >= 8 (its experiment: proof_pairs' 256 train
    prompts, so the 15 trainings fit a sitting); proof_tune holds none of proof's held-out prompts, and its
    validation prompts are whole base instructions (no train prompt shares an instruction with a validation one)."""
    import json

    proof, loop, tune, nightly = (load_pipeline(n) for n in ("proof", "proof_loop", "proof_tune", "proof_nightly"))
    assert nightly.loop == loop.loop and nightly.prompts.eval_limit == proof.prompts.eval_limit
    for other in (loop, tune, nightly):
        assert other.sample == proof.sample and other.train == proof.train and other.annotate == proof.annotate
    assert loop.loop is not None and proof.loop is None and loop.loop.gate.min_win_rate == 0.5
    assert loop.loop.gate.guard == [m.name for m in loop.score.models]  # no reward traded for another
    assert proof.sample.n >= 8 and proof.sample.policy == "builtin:smollm2-135m-instruct"
    # the pair strategies are compared where n tells them apart (proof_pairs), on the proof's own training
    pairs = load_pipeline("proof_pairs")
    assert pairs.sample.n >= 32 and pairs.train == proof.train and pairs.prompts.eval_limit == proof.prompts.eval_limit
    assert {m.pairs for m in pairs.experiment.methods} == {None, "max_min", "random"}
    assert all(m.pairs is None for m in proof.experiment.methods)
    # the claims experiment trains on proof_pairs' train prompts (its run: the experiment's own --set)
    from flows.experiment import experiment_overrides

    claims = load_pipeline("proof", None, experiment_overrides(proof, []))
    assert claims.prompts.limit == pairs.prompts.limit and proof.prompts.limit is None and claims.loop is None
    user = load_pipeline("proof", None, experiment_overrides(proof, ["prompts.limit=64", "loop.rounds=2"]))
    assert user.prompts.limit == 64 and user.loop is None  # the user's value wins; never a loop round
    assert pairs.experiment.set == []  # proof's experiment.set is the claims' own, not inherited by proof_pairs
    assert claims.prompts.eval_limit == proof.prompts.eval_limit and (
        claims.train.model_dump(exclude={"methods", "seeds"}) == proof.train.model_dump(exclude={"methods", "seeds"}))

    def rows(cfg):
        return [json.loads(line) for line in open(cfg.prompts.source)]

    held = {r["prompt"] for r in rows(proof) if r["split"] == "eval"}
    train = sum(r["split"] == "train" for r in rows(proof))
    assert train >= 512 and len(held) >= 96 <= proof.prompts.eval_limit
    assert nightly.prompts.limit * 4 <= train  # a round sized for 2 AVX2 cores: a quarter of the train prompts at most
    tuning = rows(tune)
    assert not held & {r["prompt"] for r in tuning}
    instruction = {r["prompt_id"]: r["prompt"].split(". ")[0].rstrip(".") for r in tuning}
    valid = {instruction[r["prompt_id"]] for r in tuning if r["split"] == "eval"}
    assert valid and not valid & {instruction[r["prompt_id"]] for r in tuning if r["split"] == "train"}


def test_a_key_added_later_leaves_earlier_runs_hashes_alone_until_set():
    """annotate.labels and the IFEval columns of prompts.columns came after runs were made: at their defaults, the
    hash is that of the config without them (so those runs resume with their stage hashes); set, they change the
    hash of the section they belong to."""
    import hashlib
    import json

    from popflow.config import OPERATIONAL

    cfg = load_pipeline("tiny")
    data = cfg.model_dump(mode="json", exclude=set(OPERATIONAL))
    del data["annotate"]["labels"]
    for key in ("instruction_ids", "instruction_kwargs", "ground_truth"):
        del data["prompts"]["columns"][key]
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    assert cfg.hash() == hashlib.sha256(blob).hexdigest()[:12]
    labelled = load_pipeline("tiny", overrides=["annotate.labels=/answers.json"])
    assert labelled.hash("annotate") != cfg.hash("annotate") and labelled.hash("sample") == cfg.hash("sample")
    mapped = load_pipeline("tiny", overrides=["prompts.columns.ground_truth=gt"])
    assert mapped.hash("prompts") != cfg.hash("prompts") and mapped.hash("score") == cfg.hash("score")
