"""Pipeline configs: the schema, and reading a config into it with every problem at once.

Owns the schema (``schema.py``: every key, its bounds and default), reading YAML within
bounds with each key's line (``parsing.py``), dotted-key overrides and a run's own
settings (``overrides.py``), the checks after parsing (``checks.py``: components through
the registry, the rules across keys, the operator's trust and quotas, a build on the meta
device; ``plan.py``: the horizon and checkpoint plan against the quotas), and the entry
points :func:`load_config` and :func:`validate` (``loading.py``). It builds on ``build``,
``experiment``, ``checkpoint`` and ``trust``; it must not import the engine (the
strategy knows no config) nor the run package, which builds pipelines from it.
"""

from baton.config.checks import check_checkpoint_location
from baton.config.loading import load_config, validate
from baton.config.overrides import RUN_SETTINGS, apply_overrides, parse_overrides, run_settings
from baton.config.parsing import (
    MAX_ALIASES,
    MAX_CONFIG_BYTES,
    MAX_EXPANDED_NODES,
    MAX_NESTING,
    MAX_OVERRIDES,
    MAX_STRING,
    ConfigProblem,
    Positions,
    parse_yaml,
)
from baton.config.schema import (
    AutoScaleLR,
    CheckpointPolicy,
    ClipGrad,
    CompileConfig,
    Component,
    DataConfig,
    LoadFrom,
    OptimWrapperConfig,
    PipelineConfig,
    RandomnessConfig,
    Resume,
    TrainConfig,
)

__all__ = [
    "MAX_ALIASES",
    "MAX_CONFIG_BYTES",
    "MAX_EXPANDED_NODES",
    "MAX_NESTING",
    "MAX_OVERRIDES",
    "MAX_STRING",
    "RUN_SETTINGS",
    "AutoScaleLR",
    "CheckpointPolicy",
    "ClipGrad",
    "CompileConfig",
    "Component",
    "ConfigProblem",
    "DataConfig",
    "LoadFrom",
    "OptimWrapperConfig",
    "PipelineConfig",
    "Positions",
    "RandomnessConfig",
    "Resume",
    "TrainConfig",
    "apply_overrides",
    "check_checkpoint_location",
    "load_config",
    "parse_overrides",
    "parse_yaml",
    "run_settings",
    "validate",
]
