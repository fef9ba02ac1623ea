"""Typed, frozen configuration for a training run, and dotted `key=value` overrides.

A run is described by one `Config` made of small frozen dataclasses. Presets (see
`jaxsys.presets`) are plain functions returning a `Config`; the command line changes it with
overrides such as ``mesh.fsdp=4 train.steps=500 run_dir=runs/x``. Every override is checked
against the field's type annotation; an unknown key or an ill-typed value raises
`ConfigError` naming the key and suggesting the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and a fix."""


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape and numerics.

    `family` picks the architecture: ``gpt2`` (learned positions, LayerNorm, GELU MLP, biases,
    tied embeddings) or ``llama`` (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head).
    """

    family: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: int = 256
    seq_len: int = 128  # context length in tokens; also the size of the learned position table
    num_layers: int = 4
    embed_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = same as num_heads (multi-head attention)
    head_dim: int = 0  # 0 = embed_dim // num_heads
    mlp_dim: int = 0  # 0 = 4 * embed_dim (gpt2) or the Llama 8/3 rule rounded to 64 (llama)
    dropout: float = 0.0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    attention: Literal["xla", "cudnn", "pallas"] = "xla"
    scan_layers: bool = True
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        if self.mlp_dim:
            return self.mlp_dim
        if self.family == "gpt2":
            return 4 * self.embed_dim
        return 64 * -(-int(8 * self.embed_dim / 3) // 64)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; their product must equal the device count. -1 = the rest."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    pipe: int = 1
    # What the `fsdp` axis (the ZeRO axis) shards: 0 nothing (plain data parallel), 1 the AdamW
    # moments, 2 + gradients, 3 + parameters (FSDP). `data` always replicates.
    zero_stage: int = 3
    # Megatron sequence parallelism: norms/residual/dropout regions split along the sequence
    # over `tensor` (all-gather + reduce-scatter instead of all-reduce).
    sequence_parallel: bool = False
    # Who writes the gradient collectives of data × fsdp: "explicit" (jaxsys.data_parallel: a
    # shard_map over the batch axes with the ZeRO stage's reduce-scatter / all-reduce) or "xla"
    # (sharding constraints only; the partitioner and the backend's passes decide).
    grad_sync: Literal["explicit", "xla"] = "explicit"


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (Optax). `lr` is the peak learning rate of the schedule."""

    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # norms and biases are never decayed
    grad_clip: float = 1.0  # global-norm clipping threshold; 0 disables


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, in optimizer steps.

    kinds: constant, linear (warmup then linear decay to `min_lr_ratio`·lr), cosine (warmup
    then cosine), wsd (warmup, stable, then linear decay over the last `decay_fraction` of
    the run), exponential (warmup then ×`decay_rate` every `transition_steps`), step (×`step_factor`
    at each of `step_boundaries`).
    """

    kind: Literal["constant", "linear", "cosine", "wsd", "exponential", "step"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 = train.steps
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_rate: float = 0.5
    transition_steps: int = 1000
    step_boundaries: tuple[int, ...] = ()
    step_factor: float = 0.1


@dataclass(frozen=True)
class DataConfig:
    """Training text. `source` is ``shakespeare`` (shipped), a text file, or a ``.bin`` file of
    uint16 tokens (memory-mapped). The last `val_fraction` of the tokens is held out."""

    source: str = "shakespeare"
    tokenizer: Literal["byte", "char"] = "byte"
    val_fraction: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings. `batch_size` is the global batch in sequences per optimizer step; it is
    split into `microbatches` accumulated inside one step (same update as the full batch)."""

    steps: int = 1000
    batch_size: int = 32
    microbatches: int = 1
    seed: int = 0
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    # A step whose loss or gradients are not finite is skipped (no update, counted in the
    # metrics as `skipped`); this many skips in a row stop the run.
    max_consecutive_skips: int = 5
    nan_steps: tuple[int, ...] = ()  # testing aid: these steps' losses are poisoned with NaN
    # After max_consecutive_skips: "stop" the run, or "rollback": restore the last checkpoint
    # from before the bad steps and continue with the data *after* them (at most max_rollbacks
    # times per run_dir, logged in <run_dir>/rollbacks.json).
    on_nan: Literal["stop", "rollback"] = "stop"
    max_rollbacks: int = 3
    # Testing aid: these train batches (by data index) hold out-of-range token ids, which the
    # embedding lookup turns into NaN (mesh.tensor=1 only: the vocab-parallel lookup zeroes them).
    nan_batches: tuple[int, ...] = ()


@dataclass(frozen=True)
class PipelineConfig:
    """Pipeline parallelism over `mesh.pipe` stages (used when mesh.pipe > 1; needs
    model.scan_layers). Each step's batch (per `train.microbatches` accumulation step) is split
    into `microbatches` pipeline microbatches of equal size; `virtual_stages` layer chunks per
    device (v ≥ 2 only with the interleaved schedule)."""

    schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"] = "1f1b"
    microbatches: int = 0  # 0 = mesh.pipe (the fewest 1F1B accepts)
    virtual_stages: int = 1


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in `<run_dir>/checkpoints`; every 0 disables saving."""

    every: int = 500
    keep: int = 3
    async_save: bool = True
    resume: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True
    sample_tokens: int = 200  # generated after training; 0 disables
    sample_prompt: str = "ROMEO:"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/default"
    preset: str = ""


# ----------------------------------------------------------------------------- overrides


def all_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key a `Config` accepts, e.g. ``['model.family', ..., 'run_dir']``."""
    cfg = Config() if cfg is None else cfg
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if not close:  # try the last component alone: `lr` -> `optimizer.lr`
        leaf = key.split(".")[-1]
        close = [o for o in options if o.split(".")[-1] == leaf][:1]
    return f" Did you mean '{close[0]}'?" if close else ""


def _parse(key: str, text: str, hint: Any) -> Any:
    """Parse `text` into the type `hint` (int, float, bool, str, Literal, tuple[int, ...])."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if text not in choices:
            raise ConfigError(
                f"{key}={text!r} is not one of {list(choices)}.{_suggest(text, list(choices))}"
            )
        return text
    if origin is tuple:
        (elem, _) = typing.get_args(hint)
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        return tuple(_parse(key, p.strip(), elem) for p in parts)
    if hint is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r} is not a boolean; use true or false.")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a valid {hint.__name__}.") from None
    if hint is str:
        return text
    raise ConfigError(f"{key}: unsupported field type {hint}")  # pragma: no cover


def _set(cfg: Any, path: list[str], text: str, full_key: str) -> Any:
    hints = typing.get_type_hints(type(cfg))
    name = path[0]
    if name not in hints:
        raise ConfigError(f"Unknown config key '{full_key}'.{_suggest(full_key, all_keys())}")
    current = getattr(cfg, name)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"'{full_key}' is a section; set one of its keys, e.g. '{full_key}.{dataclasses.fields(current)[0].name}=...'.")
        return dataclasses.replace(cfg, **{name: _parse(full_key, text, hints[name])})
    if not dataclasses.is_dataclass(current):
        raise ConfigError(f"Unknown config key '{full_key}'.{_suggest(full_key, all_keys())}")
    return dataclasses.replace(cfg, **{name: _set(current, path[1:], text, full_key)})


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return `cfg` with each ``section.key=value`` applied, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key=value, e.g. train.steps=500.")
        key, text = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), text.strip(), key.strip())
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(data: dict[str, Any], cls: type = Config) -> Any:
    """Rebuild a config from `to_dict` output (e.g. a run's config.json); unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"Unknown config key '{key}' in {cls.__name__}.")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value, hint)
        elif typing.get_origin(hint) is tuple:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Checks that need no devices: shapes that cannot work raise `ConfigError`."""
    m = cfg.model
    if m.embed_dim % m.num_heads and not m.head_dim:
        raise ConfigError(
            f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}; "
            "change one of them or set model.head_dim explicitly."
        )
    if m.num_heads % m.kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.kv_heads}; "
            "grouped-query attention needs a whole number of query heads per key/value head."
        )
    if m.family == "gpt2" and m.kv_heads != m.num_heads:
        raise ConfigError("model.num_kv_heads: the gpt2 family uses multi-head attention; "
                          "use model.family=llama for grouped-query attention.")
    if m.family == "llama" and m.head_size % 2:
        raise ConfigError(f"RoPE needs an even head size, got {m.head_size}; change model.head_dim.")
    t = cfg.train
    if t.batch_size % t.microbatches:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.microbatches={t.microbatches}; "
            f"use a batch size that is a multiple of {t.microbatches}."
        )
    c = cfg.checkpoint
    for key, value, low in (("train.steps", t.steps, 1), ("train.batch_size", t.batch_size, 1),
                            ("train.microbatches", t.microbatches, 1), ("model.seq_len", m.seq_len, 1),
                            ("train.log_every", t.log_every, 1), ("train.eval_batches", t.eval_batches, 1),
                            ("train.eval_every", t.eval_every, 0), ("checkpoint.every", c.every, 0),
                            ("checkpoint.keep", c.keep, 1), ("model.num_layers", m.num_layers, 1),
                            ("train.max_consecutive_skips", t.max_consecutive_skips, 1),
                            ("train.max_rollbacks", t.max_rollbacks, 0)):
        if value < low:
            raise ConfigError(f"{key} must be ≥ {low}, got {value}.")
    if cfg.mesh.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"mesh.zero_stage={cfg.mesh.zero_stage} is not one of 0, 1, 2, 3 (0 plain data "
                          "parallel, 1 optimizer state, 2 + gradients, 3 + parameters sharded over fsdp).")
    if t.nan_batches and cfg.mesh.tensor > 1:
        raise ConfigError("train.nan_batches poisons batches with out-of-range token ids, which the "
                          "vocab-parallel embedding (mesh.tensor > 1) ignores; use mesh.tensor=1 or train.nan_steps.")
    if t.on_nan == "rollback" and c.every == 0:
        raise ConfigError("train.on_nan=rollback needs checkpoints to roll back to; set checkpoint.every > 0 "
                          "or use train.on_nan=stop.")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}.")
    _validate_pipeline(cfg)
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}.")


def _validate_pipeline(cfg: Config) -> None:
    """Pipeline settings that cannot work with this model, mesh or batch (`mesh.pipe` > 1)."""
    pl, p, m = cfg.pipeline, cfg.mesh.pipe, cfg.model
    if pl.microbatches < 0 or pl.virtual_stages < 1:
        raise ConfigError(f"pipeline.microbatches must be ≥ 0 and pipeline.virtual_stages ≥ 1, got "
                          f"{pl.microbatches} and {pl.virtual_stages}.")
    if p <= 1:
        return
    v, micro = pl.virtual_stages, pl.microbatches or p
    interleaved = pl.schedule == "interleaved-1f1b"
    if not m.scan_layers:
        raise ConfigError("mesh.pipe > 1 needs stacked layers: set model.scan_layers=true (the "
                          "pipeline splits the stacked [layers, ...] parameters over `pipe`).")
    if m.dropout > 0:
        raise ConfigError("model.dropout > 0 is not supported with mesh.pipe > 1; set model.dropout=0.")
    if interleaved and v < 2:
        raise ConfigError("pipeline.schedule=interleaved-1f1b needs pipeline.virtual_stages ≥ 2.")
    if not interleaved and v != 1:
        raise ConfigError(f"pipeline.virtual_stages={v} needs pipeline.schedule=interleaved-1f1b; "
                          "set pipeline.virtual_stages=1 for the other schedules.")
    if m.num_layers % (p * v):
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by mesh.pipe × pipeline.virtual_stages "
            f"= {p} × {v} = {p * v}; use a multiple of {p * v} layers or another mesh.pipe.")
    if pl.schedule != "gpipe" and micro < p:
        raise ConfigError(f"pipeline.schedule={pl.schedule} needs pipeline.microbatches ≥ mesh.pipe, "
                          f"got {micro} < {p}; use pipeline.microbatches={p} or more (or gpipe).")
    if interleaved and micro % p:
        raise ConfigError(f"pipeline.schedule=interleaved-1f1b needs pipeline.microbatches divisible "
                          f"by mesh.pipe={p}, got {micro}.")
    step_batch = cfg.train.batch_size // cfg.train.microbatches
    if step_batch % micro:
        raise ConfigError(
            f"The per-step batch of {step_batch} sequences (train.batch_size / train.microbatches) is "
            f"not divisible by pipeline.microbatches={micro}; use a train.batch_size that is a "
            f"multiple of {micro * cfg.train.microbatches}.")
