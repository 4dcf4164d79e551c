"""Deployment parameters, checked offline with the validator Prefect's server applies at run creation."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema as flow_parameter_schema
from prefect.utilities.schema_tools.validation import ValidationError, validate

from flows.deployments import parameter_schema
from flows.pipeline import as_assignments, preference_pipeline
from popflow.config import load_pipeline


@pytest.fixture(scope="module")
def schema() -> dict:
    return parameter_schema(flow_parameter_schema(preference_pipeline.fn).model_dump(), "tiny")


@pytest.mark.parametrize("params", [
    {"pipeline": "tiny"},
    {"pipeline": "tiny", "overrides": {"sample": {"n": 3, "vllm": {"max_model_len": 256}}, "train": None}},
    {"pipeline": "tiny", "overrides": {"score": {"models": [{"name": "c", "kind": "constraints"}]}}},
    {"pipeline": "tiny", "overrides": ["sample.n=3", "train=null"], "run_id": "20261125T020000Z-abc123"},
])
def test_valid_parameters_pass(schema, params):
    validate(params, schema, raise_on_error=True)


@pytest.mark.parametrize("params, message", [
    ({"pipeline": "demo"}, "Validation failed for field 'pipeline'"),  # another pipeline's deployment
    ({"pipeline": "tiny", "overrides": {"sample": {"temprature": 1}}}, "'temprature' was unexpected"),
    ({"pipeline": "tiny", "overrides": {"sampel": {"n": 3}}}, "'sampel' was unexpected"),
    ({"pipeline": "tiny", "overrides": {"sample": {"n": 1}}}, "1 is less than the minimum of 2"),
    ({"pipeline": "tiny", "overrides": {"score": {"models": [{"name": "x", "kind": "hf"}]}}},
     "field 'overrides.score.models[0]'"),  # an hf reward without its model
    ({"pipeline": "tiny", "overrides": ["sampel.n=3"]}, "does not match"),
    # names become paths: a run id or a reward model name that is not a name is refused before any work
    ({"pipeline": "tiny", "run_id": "../../escape"}, "field 'run_id'"),
    ({"pipeline": "tiny", "run_id": ".hidden"}, "field 'run_id'"),
    ({"pipeline": "tiny", "overrides": {"score": {"models": [{"name": "../x", "kind": "constraints"}]}}},
     "field 'overrides.score.models[0]'"),
])
def test_bad_parameters_are_refused_naming_the_field(schema, params, message):
    """Every message below is what `prefect deployment run --param ...` prints when the server refuses."""
    with pytest.raises(ValidationError) as err:
        validate(params, schema, raise_on_error=True)
    assert message in str(err.value), str(err.value)


def test_mapping_overrides_become_the_same_config_as_set_strings():
    """{"sample": {"n": 3, "vllm": {"max_model_len": 256}}, "train": None, "annotate": {"sampling": ["random"]}}
    flattens to four assignments; loading either form gives the same config (and hash)."""
    mapping = {"sample": {"n": 3, "vllm": {"max_model_len": 256}}, "train": None,
               "annotate": {"sampling": ["random"]}}
    strings = ["sample.n=3", "sample.vllm.max_model_len=256", "train=null", 'annotate.sampling=["random"]']
    assert as_assignments(mapping) == strings
    assert as_assignments(strings) == strings and as_assignments(None) == []
    assert load_pipeline("tiny", overrides=as_assignments(mapping)) == load_pipeline("tiny", overrides=strings)
    assert load_pipeline("tiny", overrides=strings).sample.vllm.max_model_len == 256
