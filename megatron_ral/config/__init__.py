"""Typed configuration: dataclasses (schema), YAML + dotted overrides (loader), rules (validate).

    cfg = load_config("examples/configs/tiny_ral.yaml", ["algorithm.lambda_attn=1.0"])
    validate(cfg, world_size=8)

``python -m megatron_ral.config --config FILE [key=value ...]`` (``megatron_ral.cli.config``) prints the resolved
configuration or one line naming the bad key (exit code 2).
"""

from megatron_ral.config.errors import ConfigError
from megatron_ral.config.loader import load_config, parse_override, to_dict
from megatron_ral.config.schema import (
    AlgorithmConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    GenerationConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
)
from megatron_ral.config.validate import ModelDims, model_dims_from_hf, validate

__all__ = [
    "AlgorithmConfig", "CheckpointConfig", "Config", "DataConfig", "ConfigError", "GenerationConfig", "LoggingConfig",
    "ModelConfig", "ModelDims", "OptimizerConfig", "ParallelConfig", "TrainingConfig", "load_config",
    "model_dims_from_hf", "parse_override", "to_dict", "validate",
]
