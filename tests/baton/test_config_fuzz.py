"""Property tests: whatever YAML or overrides arrive, the loader returns a valid config or
raises ConfigError; nothing else escapes."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton import ConfigError
from baton.config import PipelineConfig, load_config

from .test_config import base

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=20,
)
KEYS = [
    "experiment_name",
    "model",
    "model.type",
    "model.hidden",
    "train.max_epochs",
    "train.max_iters",
    "train_data.batch_size",
    "train_data.dataset.type",
    "optim_wrapper.optimizer.lr",
    "optim_wrapper.type",
    "param_scheduler",
    "checkpoint.keep_last",
    "randomness.seed",
    "work_dir",
    "resume",
    "nonexistent.key",
]


def _outcome(call):
    try:
        result = call()
    except ConfigError:
        return "error"
    assert isinstance(result, PipelineConfig)
    return "ok"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_documents(document):
    _outcome(lambda: load_config(yaml.safe_dump(document) + "\n"))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_random_text(text):
    _outcome(lambda: load_config(text + "\n"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), documents), max_size=4))
def test_random_overrides_on_a_valid_config(pairs):
    _outcome(lambda: load_config(base(), dict(pairs)))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_random_override_strings(items):
    _outcome(lambda: load_config(base(), items))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.one_of(st.text(max_size=40), documents),
    overrides=st.one_of(st.none(), st.lists(st.text(max_size=30), max_size=3)),
    experiment_name=st.one_of(st.none(), st.text(max_size=40)),
    resume=st.one_of(st.none(), st.text(max_size=40)),
    work_dir=st.one_of(st.none(), st.text(max_size=40)),
)
def test_the_flow_parameters(config, overrides, experiment_name, resume, work_dir):
    """What the UI form may send, through the flow's first task: a config or ConfigError."""
    from baton.tasks.config import validate_config

    settings_ = {"experiment_name": experiment_name, "resume": resume, "work_dir": work_dir}
    settings_ = {k: v for k, v in settings_.items() if v is not None}
    try:
        result = validate_config.fn(config, overrides, settings_)
    except ConfigError:
        return
    assert isinstance(result, dict) and "experiment_name" in result
