"""Loading a run directory for generation: its config, tokenizer and newest parameters.

Only the parameters are wanted, on one device, so nothing of training is built: the config and
tokenizer come from the run's JSON files, the parameter shapes from the model, and
`checkpoint.manager.restore_params` reads the `params` of the saved train state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from jaxsys import config as config_lib
from jaxsys.checkpoint import manager as ckpt
from jaxsys.config import Config
from jaxsys.data.tokenizers import Tokenizer, tokenizer_from_json
from jaxsys.model.transformer import Transformer, abstract_params


def load_for_sampling(run_dir: str | Path) -> tuple[Config, Transformer, Any, Tokenizer]:
    """(config, model, params, tokenizer) of the latest checkpoint in `run_dir`, on one device."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}/config.json not found: is {run_dir} a jaxsys run directory?")
    cfg = config_lib.from_dict(json.loads((run_dir / "config.json").read_text()))
    tokenizer = tokenizer_from_json(json.loads((run_dir / "tokenizer.json").read_text()))
    params, _ = abstract_params(cfg.model)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), params)
    manager = ckpt.make_manager(run_dir, cfg.checkpoint)
    try:
        _, params = ckpt.restore_params(manager, target)
    finally:
        manager.close()
    return cfg, Transformer(cfg.model), params, tokenizer
