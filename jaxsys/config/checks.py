"""Checks that need no devices: a config whose shapes cannot work raises `ConfigError` here,
before any device, data or compile is touched. Checks that depend on the mesh (divisibility by
axis sizes) are in `jaxsys.parallel.layout`.
"""

from __future__ import annotations

from jaxsys.config.schema import Config, ConfigError

def validate(cfg: Config) -> None:
    """Checks that need no devices: shapes that cannot work raise `ConfigError`."""
    m = cfg.model.resolved()
    if cfg.model.embed_dim % m.num_heads and not cfg.model.head_dim:
        raise ConfigError(
            f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}; "
            "change one of them or set model.head_dim explicitly."
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
            "grouped-query attention needs a whole number of query heads per key/value head."
        )
    if m.family == "gpt2" and m.num_kv_heads != m.num_heads:
        raise ConfigError("model.num_kv_heads: the gpt2 family uses multi-head attention; "
                          "use model.family=llama for grouped-query attention.")
    if m.family == "llama" and m.head_dim % 2:
        raise ConfigError(f"RoPE needs an even head size, got {m.head_dim}; change model.head_dim.")
    t = cfg.train
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}; "
            f"use a batch size that is a multiple of {t.grad_accum}."
        )
    c = cfg.checkpoint
    for key, value, low in (("train.steps", t.steps, 1), ("train.batch_size", t.batch_size, 1),
                            ("train.grad_accum", t.grad_accum, 1), ("model.seq_len", m.seq_len, 1),
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
    if cfg.faults.nan_batches and cfg.mesh.tensor > 1:
        raise ConfigError("faults.nan_batches poisons batches with out-of-range token ids, which the "
                          "vocab-parallel embedding (mesh.tensor > 1) ignores; use mesh.tensor=1 or faults.nan_steps.")
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
    step_batch = cfg.train.batch_size // cfg.train.grad_accum
    if step_batch % micro:
        raise ConfigError(
            f"The per-microbatch batch of {step_batch} sequences (train.batch_size / train.grad_accum) "
            f"is not divisible by pipeline.microbatches={micro}; use a train.batch_size that is a "
            f"multiple of {micro * cfg.train.grad_accum}.")
