"""Typed config of where the heavy stages run: the `execution:` section (Ray replicas) and `train.accelerate`.

`execution:` says where sample, score and evaluate run, never what they compute: it is left out of every stage
hash, so a run started on one machine resumes on a cluster (and back) shard by shard. `train.accelerate` does change the
training (processes x batch_size pairs per step), so it lives in `train:` and its hash.

    .venv/bin/popflow run tiny --set execution.sample.backend=ray --set execution.sample.replicas=2
    RAY_ADDRESS=10.0.0.1:6379 .venv/bin/popflow run demo --set execution.score.backend=ray

popflow/cluster.py runs it; docs/scale-out.md shows a cluster end to end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from popflow.config.base import Strict

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


class RayOptions(Strict):
    address: str | None = Field(
        None, description="The Ray cluster: 'host:6379' (its GCS), 'ray://host:10001' (Ray Client) or 'auto' (the "
        "cluster `ray start` made on this machine). Default: the RAY_ADDRESS environment variable, else a local Ray "
        "started for the stage (on the CPUs and GPUs of this machine) and stopped after it.")
    connect_timeout_s: float = Field(20.0, gt=0, description="How long to wait for the cluster before the stage "
                                     "fails with an error naming the address (never a hang).")
    num_cpus: int | None = Field(None, ge=1, description="A local Ray only: the CPUs it may schedule (default: all "
                                 "this process may run on).")


class Replicas(Strict):
    backend: Literal["local", "ray"] = Field(
        "local", description="local: in the stage's own process (one engine or model at a time); ray: `replicas` "
        "actors on the Ray cluster, each holding one engine or reward model, fed shard by shard from one queue.")
    replicas: int = Field(1, ge=1, description="ray: data-parallel replicas (each a vLLM engine or a reward model).")
    gpus: float | None = Field(
        None, ge=0, description="ray: GPUs per replica. Default: sample.vllm.tensor_parallel_size (sample) or 1 "
        "(score) when the cluster has GPUs, else 0 (vLLM-CPU).")
    cpus: float = Field(1.0, gt=0, description="ray: CPUs per replica. On a CPU node a vLLM-CPU replica binds its "
                        "threads to that many cores of its own (replicas on one node never share a core).")
    max_restarts: int = Field(
        2, ge=0, description="ray: a replica whose process dies is restarted this many times and its shard retried; "
        "then its shards go to the surviving replicas, and the stage fails only when none is left.")


class EvaluateReplicas(Replicas):
    backend: Literal["local", "ray"] = Field(
        "local", description="local: in the stage's own process, one trained policy after another; ray: `replicas` "
        "engine actors on the Ray cluster, each given one policy per call from one queue.")
    replicas: int = Field(1, ge=1, description="ray: engine replicas, each sampling whole policies.")
    gpus: float | None = Field(
        None, ge=0, description="ray: GPUs per replica. Default: sample.vllm.tensor_parallel_size (vllm) or 1 when "
        "the cluster has GPUs, else 0 (vLLM-CPU).")


class ScoreReplicas(Replicas):
    chunk_size: int = Field(512, ge=1, description="ray: samples per task sent to a reward model replica.")


class ExecutionConfig(Strict):
    ray: RayOptions = Field(default_factory=RayOptions, description="How to reach (or start) the Ray cluster.")
    sample: Replicas = Field(default_factory=Replicas, description="Stage 1: where the vLLM engines run.")
    score: ScoreReplicas = Field(
        default_factory=ScoreReplicas, description="Stage 2: where the hf reward models run (the cheap kinds, "
        "constraints, ifeval, relevance and python, become one Ray CPU task each).")
    evaluate: EvaluateReplicas = Field(
        default_factory=EvaluateReplicas, description="Stage 7: where the trained policies generate on held-out "
        "prompts (one policy per call to a replica; a LoRA adapter's files travel with the call, the base and a fully "
        "trained model load from their paths: docs/scale-out.md).")

    def uses_ray(self) -> bool:
        return "ray" in (self.sample.backend, self.score.backend, self.evaluate.backend)


class AccelerateLaunch(Strict):
    processes: int = Field(2, ge=1, description="Training processes (one per GPU; on CPU, gloo processes). Each "
                           "takes train.batch_size pairs per step: the global batch is processes x batch_size x "
                           "grad_accum.")
    config: str = Field(
        "ddp", description="An accelerate config shipped in configs/accelerate/ (ddp, fsdp, zero2, zero3: "
        "DeepSpeed ZeRO-2/3, which needs the deepspeed package) or the path of your own accelerate YAML.")
    main_process_port: int | None = Field(None, ge=1024, le=65535, description="torch.distributed's rendezvous "
                                          "port; default: a free one.")
    timeout_s: int | None = Field(None, ge=1, description="Stop a launch (every process) that runs longer than "
                                  "this, and fail the method naming its log; null: no limit. A nightly loop sets "
                                  "one so a hung collective cannot hold the night.")

    @field_validator("config")
    @classmethod
    def _known_config(cls, value: str) -> str:
        if "/" not in value and not value.endswith((".yaml", ".yml")) and not (ACCELERATE_CONFIGS / f"{value}.yaml"
                                                                              ).is_file():
            shipped = sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))
            raise ValueError(f"unknown accelerate config {value!r}: shipped ones are {shipped}, or give a YAML path")
        return value

    def config_file(self) -> Path:
        """The accelerate YAML this launch uses (a shipped name or a path)."""
        return ACCELERATE_CONFIGS / f"{self.config}.yaml" if "/" not in self.config and not self.config.endswith(
            (".yaml", ".yml")) else Path(self.config)
