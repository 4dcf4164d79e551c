"""Typed config of how a pipeline runs as a service and publishes: `schedule:`, `retention:` and `export:`.

Part of the one config (popflow/config/__init__.py imports these into PipelineConfig). Neither section changes what a
run computes, so neither enters the run's config hash: a schedule can change without orphaning a run.

    nightly:
      schedule: {cron: "30 1 * * *", timezone: Europe/Paris}   # default: 0 2 * * * UTC when served
      retention: {keep_runs: 14}                                # default: keep every run
      export: {license: apache-2.0, tags: [math]}               # what `popflow export` writes in the card

    .venv/bin/popflow serve nightly        # a Prefect deployment with that cron (see flows/deployments.py)
"""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from popflow.config.base import Strict


class ScheduleConfig(Strict):
    cron: str = Field("0 2 * * *", description="When the deployment runs, as a 5-field cron string (Prefect's "
                      "CronSchedule; random 'R' and hashed 'H' forms are not accepted). Default: nightly at 02:00.")
    timezone: str = Field("UTC", description="IANA time zone the cron is read in (e.g. Europe/Paris); daylight "
                          "saving is followed.")
    active: bool = Field(True, description="false: the deployment exists but its schedule is paused.")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule  # the validator the server applies

        try:
            CronSchedule(cron=value)
        except ValueError:
            raise ValueError(f"invalid cron {value!r}: expected 5 fields 'minute hour day-of-month month "
                             "day-of-week', e.g. '0 2 * * *'") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as UTC or Europe/Paris)") from None
        return value


class RetentionConfig(Strict):
    keep_runs: int | None = Field(None, ge=1, description="After a run completes, keep this pipeline's newest N "
                                  "completed runs and delete older runs (their partitions, records and trained "
                                  "models); runs still in progress are never touched. null keeps everything.")


class ExportConfig(Strict):
    license: str = Field("other", pattern=r"^[a-z0-9][a-z0-9.\-]*$", description="The licence id the dataset card "
                         "declares (a Hub licence identifier such as apache-2.0 or cc-by-4.0). The pairs hold the "
                         "policy's outputs and your prompts: 'other' (the default) until you have checked both.")
    tags: list[str] = Field(default_factory=list, description="Tags the card adds to dpo, trl, preference and popflow.")
    pretty_name: str | None = Field(None, description="The dataset's display name (default: the pipeline's name).")
