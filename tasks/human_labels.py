"""PoP labels from people: the comparisons as Label Studio tasks, and their answers read back as a run's labels.

DPO-PoP's point is that people say more reliably which of two preferences is stronger than they give calibrated
scores. The comparisons are the ones the annotate stage would simulate (same `annotate.sampling`, `k`, `partners`,
`seed`: tasks/annotate.py draws them), each shown as two pairs (prompt, chosen, rejected) with the question
"which preference is stronger?". The tool is Label Studio (open source, maintained: labelstud.io):

    .venv/bin/popflow annotate export demo --run-id RUN --to labels/      # tasks.json + labeling_config.xml
    # Label Studio: create a project, Settings > Labeling Interface > Code: paste labeling_config.xml;
    # Import: tasks.json; label; Export: JSON (or JSON-MIN) -> answers.json
    .venv/bin/popflow annotate import demo answers.json --run-id RUN      # reruns annotate on the answers,
                                                                          # then margins, training, evaluation

`import` is `popflow run demo --run-id RUN --from-stage annotate --set annotate.labels=answers.json`: the
annotate stage then takes each answered comparison's label from the file (source `human`; unanswered
comparisons are left out, ties are people's to judge) instead of simulating it, and margins and DPO-PoP train
on them. A bad answers file stops the stage with one line naming the file, the task and what is wrong: a
task of another run (pair ids repeat from run to run, responses do not), a comparison this run does not draw,
one answered twice, pairs or texts that are not the ones drawn, a choice other than A or B.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from popflow.errors import PopflowError

CHOICES = {"A": True, "B": False}  # the answer -> pair A's preference is the stronger
QUESTION = ("Which preference is stronger? In each pair the first answer was preferred to the second: "
            "in which pair is the first answer MORE clearly better?")

def _pair_view(side: str) -> str:
    """One pair of the labeling interface: its prompt, the preferred answer, the rejected one."""
    return f"""    <View style="flex: 50%">
      <Header value="Pair {side.upper()}"/>
      <Text name="prompt_{side}" value="$prompt_{side}"/>
      <Header value="preferred" size="6"/>
      <Text name="chosen_{side}" value="$chosen_{side}"/>
      <Header value="over" size="6"/>
      <Text name="rejected_{side}" value="$rejected_{side}"/>
    </View>
"""


LABELING_CONFIG = f"""<View>
  <Header value="{QUESTION}"/>
  <View style="display: flex; gap: 1em">
{_pair_view("a")}{_pair_view("b")}  </View>
  <Choices name="stronger" toName="prompt_a" choice="single" required="true" showInline="true">
    <Choice value="A"/>
    <Choice value="B"/>
  </Choices>
</View>
"""


def comparison_id(sampling: str, index: int) -> str:
    return f"{sampling}-{index}"


def text(messages) -> str:
    """A message list as the text an annotator reads (a system prompt, if any, first)."""
    return "\n\n".join(m["content"] for m in messages)


def texts_check(pair_a: dict, pair_b: dict) -> str:
    """A short hash of the texts an annotator sees for a comparison: answers are taken only for these texts (pair
    ids repeat from run to run of a pipeline, the responses do not)."""
    import hashlib

    blob = json.dumps([[pair[k] for k in ("prompt", "chosen", "rejected")] for pair in (pair_a, pair_b)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tasks(comparisons: list[tuple[str, int, str, str]], pairs: dict[str, dict], run_id: str) -> list[dict]:
    """Label Studio tasks of (sampling, index, pair_a, pair_b) comparisons of run `run_id`; `pairs`: pair_id -> its
    row (prompt, chosen, rejected message lists)."""
    out = []
    for sampling, i, a, b in comparisons:
        pa_, pb = pairs[a], pairs[b]
        out.append({"data": {"comparison": comparison_id(sampling, i), "run_id": run_id, "sampling": sampling,
                             "pair_a": a, "pair_b": b, "check": texts_check(pa_, pb),
                             "prompt_a": text(pa_["prompt"]), "chosen_a": text(pa_["chosen"]),
                             "rejected_a": text(pa_["rejected"]), "prompt_b": text(pb["prompt"]),
                             "chosen_b": text(pb["chosen"]), "rejected_b": text(pb["rejected"])}})
    return out


def write_tasks(folder: Path, task_list: list[dict]) -> tuple[Path, Path]:
    from popflow.lake import write_text

    folder.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(task_list, indent=1, ensure_ascii=False), folder / "tasks.json")
    write_text(LABELING_CONFIG, folder / "labeling_config.xml")
    return folder / "tasks.json", folder / "labeling_config.xml"


def read_answers(path: str | Path) -> list[dict]:
    """The answers of a Label Studio export (JSON: tasks with `annotations`; or JSON-MIN: one flat record per
    annotation with a `stronger` field) as [{task, row, comparison, run_id, pair_a, pair_b, check, choice}], one per
    answer given (a task labelled by two people gives two); cancelled or empty annotations are no answer."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PopflowError(f"{path}: not a Label Studio JSON export ({exc})") from None
    if not isinstance(records, list):
        raise PopflowError(f"{path}: expected a list of tasks (Label Studio's JSON or JSON-MIN export)")
    answers = []
    for row, rec in enumerate(records, 1):
        data = rec.get("data", rec) if isinstance(rec, dict) else None
        if not isinstance(data, dict) or not data.get("comparison"):
            raise PopflowError(f"{path}: task #{row} has no `comparison` (not a task of `popflow annotate export`)")
        where = f"{path}: task #{row} (comparison {data['comparison']!r})"
        if "annotations" in rec:
            given = rec["annotations"]
            if not isinstance(given, list) or not all(isinstance(a, dict) for a in given):
                raise PopflowError(f"{where}: `annotations` is not a list of annotations")
            choices = [c for a in given if not a.get("was_cancelled") for r in (a.get("result") or [])
                       if isinstance(r, dict) and r.get("from_name") == "stronger"
                       for c in (r.get("value") or {}).get("choices", [])]
        else:
            choices = [rec["stronger"]] if rec.get("stronger") not in (None, "") else []
        for choice in choices:
            if not isinstance(choice, str) or choice not in CHOICES:
                raise PopflowError(f"{where}: answer {choice!r} is not one of {', '.join(CHOICES)}")
            answers.append({"task": rec.get("id", f"#{row}"), "row": row, "comparison": data["comparison"],
                            "run_id": data.get("run_id"), "pair_a": data.get("pair_a"), "pair_b": data.get("pair_b"),
                            "check": data.get("check"), "choice": choice, "where": where})
    return answers


def check_answers(answers: list[dict]) -> None:
    """A comparison is one task: the same comparison under two task ids is a duplicate (an export imported twice).
    Several answers of one task (JSON-MIN writes a record per annotator) are several labels."""
    first: dict[str, tuple] = {}
    for ans in answers:
        seen = first.setdefault(ans["comparison"], (ans["task"], ans["row"]))
        if seen[0] != ans["task"]:
            raise PopflowError(f"{ans['where']}: the comparison is answered again (first in task #{seen[1]})")


def human_labels(path: str | Path, sampling: str, a: np.ndarray, b: np.ndarray, ids: np.ndarray, run_id: str,
                 pairs: dict[str, dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """The answers to one sampling's drawn comparisons (indices a, b into ids) of run `run_id`: (which comparison
    each answer is, its a_stronger, how many drawn comparisons got no answer). Every answer must name a comparison
    drawn here, of this run, with the pairs drawn and the texts the annotator saw (`pairs`: pair_id -> row);
    another sampling's answers are that sampling's."""
    answers = read_answers(path)
    check_answers(answers)
    drawn = {comparison_id(sampling, i): i for i in range(len(a))}
    rows, strong = [], []
    for ans in answers:
        kind = ans["comparison"].rsplit("-", 1)[0]
        if kind != sampling:
            if kind in ("iterative", "random"):
                continue
            raise PopflowError(f"{ans['where']}: not a comparison of popflow's (<sampling>-<index> expected)")
        if ans["run_id"] != run_id:
            raise PopflowError(f"{ans['where']}: a task of run {ans['run_id']!r}, not of run {run_id!r}: people "
                               "labelled another run's responses")
        i = drawn.get(ans["comparison"])
        if i is None:
            raise PopflowError(f"{ans['where']}: this run draws no such comparison ({len(a)} {sampling} "
                               "comparisons): the export of another config?")
        if (ans["pair_a"], ans["pair_b"]) != (ids[a[i]], ids[b[i]]):
            raise PopflowError(f"{ans['where']}: pairs {ans['pair_a']!r} vs {ans['pair_b']!r}, but this run draws "
                               f"{ids[a[i]]!r} vs {ids[b[i]]!r}: the export of another config?")
        if ans["check"] != texts_check(pairs[ids[a[i]]], pairs[ids[b[i]]]):
            raise PopflowError(f"{ans['where']}: the pairs' texts are not the ones exported for labelling (the "
                               "run's pairs were made again?)")
        rows.append(i)
        strong.append(CHOICES[ans["choice"]])
    return np.asarray(rows, dtype=np.int64), np.asarray(strong, dtype=bool), len(a) - len(set(rows))
