"""Configuration: the typed schema, dotted overrides, presets, device-free checks, hardware.

The lowest layer: it imports nothing from the rest of jaxsys, and no JAX.

- `schema`: the frozen dataclasses (`Config` and its sections) and `ConfigError`;
- `overrides`: ``section.key=value`` parsing, JSON round trips;
- `checks`: `validate`, the checks that need no devices;
- `presets`: named `Config`s (``shakespeare``, ``tiny``, ``gpt2-small``, ``llama-1b``);
- `hardware`: the one table of accelerator peaks and bandwidths.

The schema, overrides and checks are re-exported here: ``from jaxsys.config import Config``.
"""

from jaxsys.config.checks import validate
from jaxsys.config.overrides import (all_keys, apply_overrides, from_dict, from_file, suggest, to_dict,
                                     to_json)
from jaxsys.config.schema import (CheckpointConfig, Config, ConfigError, DataConfig, FaultsConfig,
                                  LoggingConfig, LRScheduleConfig, MeshConfig, ModelConfig, MoEConfig,
                                  OptimizerConfig, PipelineConfig, TrainConfig,
                                  ContextParallelConfig)

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "FaultsConfig", "LoggingConfig",
           "LRScheduleConfig", "MeshConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "PipelineConfig", "ContextParallelConfig",
           "TrainConfig", "all_keys", "apply_overrides", "from_dict", "from_file", "suggest", "to_dict",
           "to_json", "validate"]
