"""Loading a run directory for generation: its config, tokenizer and newest usable parameters.

Only the parameters and the model state are wanted, on one device, so nothing of training is
built: the config and tokenizer come from the run's JSON files, the shapes from the model, and
`checkpoint.manager.restore_items` reads the `params` and `model_state` of the saved train
state. The model state is what the model applies besides its parameters (the MoE loss-free
bias, `{"moe_bias": tree}`, with `model.moe.bias_update_rate` > 0; `{}` otherwise): every
inference path takes it beside the parameters, `model.apply({"params": p, **model_state}, ...)`.
A checkpoint without one (a params-only import) gets the zero bias training would start from. The step is
chosen as training chooses it (`select_resume_step`: the newest whose files match their
manifest; damaged ones are moved to `rejected_checkpoints/`), and its metadata is compared with
the model of config.json before any array is read.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax

from jaxsys.checkpoint import manager as ckpt
from jaxsys.checkpoint import run_files
from jaxsys.config import Config, ConfigError
from jaxsys.data.tokenizers import Tokenizer, tokenizer_from_json
from jaxsys.model.transformer import Transformer, abstract_model_state, abstract_params


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class LoadedRun:
    """A run directory's config, model, newest usable parameters (on one device) and tokenizer."""

    cfg: Config
    model: Transformer
    params: Any
    tokenizer: Tokenizer
    step: int  # the loaded checkpoint's step
    model_state: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"moe_bias": ...} or {}


def read_run(run_dir: str | Path) -> tuple[Config, Tokenizer]:
    """(config, tokenizer) of a run directory, from its JSON files; errors name the file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found; give the run_dir of a `jaxsys train`.")
    cfg = run_files.read_config(run_dir)
    tok_path = run_dir / run_files.TOKENIZER
    if not tok_path.exists():
        raise FileNotFoundError(f"{tok_path} not found: is {run_dir} a jaxsys run directory?")
    try:
        tokenizer = tokenizer_from_json(run_files.read_json(tok_path), base=run_dir)  # hf: run_dir/tokenizer/
    except ValueError as e:  # ConfigError (an unreadable tokenizer/ folder) is a ValueError too
        raise ConfigError(f"{tok_path}: {str(e).splitlines()[0]}; restore it, or run the training "
                          "command again to rewrite it.") from None
    return cfg, tokenizer


def load_params(run_dir: str | Path, cfg: Config, log: Callable[[str], None] = _stderr) -> tuple[int, Any]:
    """(step, params on one device) of the newest usable checkpoint of `run_dir`, whose metadata
    must match `cfg.model`. What it set aside and which step it loaded go to `log`."""
    step, params, _ = load_variables(run_dir, cfg, log)
    return step, params


def load_variables(run_dir: str | Path, cfg: Config, log: Callable[[str], None] = _stderr
                   ) -> tuple[int, Any, dict[str, Any]]:
    """(step, params, model state) on one device of the newest usable checkpoint of `run_dir`
    (see `load_params`); the model state is `{}` for a model without one."""
    run_dir = Path(run_dir)
    if not ckpt.step_dirs(run_dir):
        raise FileNotFoundError(f"No checkpoint in {run_dir / 'checkpoints'}; train first (checkpoint.every > 0).")
    step, _ = ckpt.select_resume_step(run_dir, log, keep_incomplete=True)
    if step is None:
        raise FileNotFoundError(f"No usable checkpoint left in {run_dir / 'checkpoints'} (see the lines "
                                f"above and {run_dir / ckpt.REJECTED}).")
    params, _ = abstract_params(cfg.model)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_one = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)
    state = abstract_model_state(cfg.model)
    manager = ckpt.make_manager(run_dir, cfg.checkpoint, read_only=True)
    try:
        ckpt.check_params_compatible(manager, step, on_one(params))  # config.json against the checkpoint
        targets = {"params": on_one(params), **({"model_state": on_one(state)} if state else {})}
        _, items = ckpt.restore_items(manager, targets, step)
    finally:
        manager.close()
    model_state = items.get("model_state")
    if model_state is None:  # a params-only checkpoint: the bias a fine-tune would start from
        model_state = jax.tree_util.tree_map(lambda x: jax.device_put(jax.numpy.zeros(x.shape, x.dtype), one), state)
    log(f"Loaded checkpoint step {step} from {run_dir / 'checkpoints'}")
    return step, items["params"], model_state


def load_run(run_dir: str | Path, log: Callable[[str], None] = _stderr) -> LoadedRun:
    """The newest usable checkpoint in `run_dir`, on one device, with its config and tokenizer.
    What it set aside and which step it loaded go to `log` (stderr: stdout is the sample).
    Raises FileNotFoundError / ConfigError with one line naming the file or step."""
    cfg, tokenizer = read_run(run_dir)
    step, params, model_state = load_variables(run_dir, cfg, log)
    return LoadedRun(cfg, Transformer(cfg.model), params, tokenizer, int(step), model_state)


def load_for_sampling(run_dir: str | Path, log: Callable[[str], None] = _stderr
                      ) -> tuple[Config, Transformer, Any, Tokenizer]:
    """(config, model, params, tokenizer) of the newest usable checkpoint in `run_dir`, on one
    device (`load_run` as a tuple). Raises FileNotFoundError / ConfigError with one line naming
    the file or step."""
    run = load_run(run_dir, log)
    return run.cfg, run.model, run.params, run.tokenizer
