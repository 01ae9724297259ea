"""Run configuration: the one reader of the flat kebab-case keys.

Each key is declared once, on the field of the section dataclass that holds its
value (:func:`common.config.keys.setting`): its name, default and type, one-line
doc, whether a resume may change it, and its check. :data:`DEFAULTS`, the TOML and
``--set`` reader (:mod:`common.config.sources`), the resume check and the key
reference docs/CONFIG.md (:mod:`common.config.reference`) all come from those
declarations. :meth:`RunConfig.from_flat` is the only function that reads the keys;
the rest of the code base works with the frozen dataclasses.

Validation runs in three layers: each key's own check, each section's rules across
its own keys (in the section's module), and the rules across sections in
:mod:`common.config.constraints`.
"""

from __future__ import annotations

from common.config.aggregation import AggregationConfig
from common.config.aggregation_rules import AGGREGATION_RULES, RuleTraits
from common.config.codec import CODECS, CodecConfig
from common.config.data import PARTITION_KINDS, DataConfig
from common.config.dp import DP_LEVELS, DP_MODES, DpConfig
from common.config.errors import ConfigError, Refusal
from common.config.head import HEAD_INITS, HeadConfig
from common.config.keys import ConfigValue, Key
from common.config.lora import LoraSettings
from common.config.model import (
    DISTRIBUTE_MODES,
    POOLING_MODES,
    QUANTISATIONS,
    TASKS,
    ModelConfig,
)
from common.config.run import DEFAULTS, KEYS, RESUMABLE_CHANGES, RunConfig
from common.config.secagg import SecAggConfig
from common.config.sim import SimConfig
from common.config.sources import load_config, parse_assignment
from common.config.tracking import TrackingConfig
from common.config.train import TRAIN_MODES, TrainConfig

__all__ = [
    "AGGREGATION_RULES",
    "CODECS",
    "DEFAULTS",
    "DISTRIBUTE_MODES",
    "DP_LEVELS",
    "DP_MODES",
    "HEAD_INITS",
    "KEYS",
    "PARTITION_KINDS",
    "POOLING_MODES",
    "QUANTISATIONS",
    "RESUMABLE_CHANGES",
    "TASKS",
    "TRAIN_MODES",
    "AggregationConfig",
    "CodecConfig",
    "ConfigError",
    "ConfigValue",
    "DataConfig",
    "DpConfig",
    "HeadConfig",
    "Key",
    "LoraSettings",
    "ModelConfig",
    "Refusal",
    "RuleTraits",
    "RunConfig",
    "SecAggConfig",
    "SimConfig",
    "TrackingConfig",
    "TrainConfig",
    "load_config",
    "parse_assignment",
]
