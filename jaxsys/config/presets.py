"""Named presets: plain functions that return a `Config`.

- ``shakespeare``: the CPU default; a byte-level GPT (3 layers, 128 wide, context 64) trained
  for 1000 steps of 16 sequences on the shipped Shakespeare.
- ``tiny``: seconds-long runs for tests.
- ``gpt2-small``: GPT-2 124M shapes (12 layers, 768 wide, 12 heads, context 1024).
- ``llama-1b``: Llama-3.2-1B-like shapes (16 layers, 2048 wide, 32 heads, 8 KV heads), bf16
  compute; meant for GPUs.
"""

from __future__ import annotations

from typing import Callable

from jaxsys.config.overrides import suggest
from jaxsys.config.schema import (CheckpointConfig, Config, ConfigError, DataConfig, LoggingConfig,
                                  LRScheduleConfig, ModelConfig, OptimizerConfig, TrainConfig)


def shakespeare() -> Config:
    # Tuned for wall time to a target loss on a 2-core CPU (docs/benchmarks.md): 3 layers beat 4
    # at equal time, context 64 with 16 sequences beats context 128 with 8, and an unrolled
    # layer loop runs faster than `scan` on CPU at this depth.
    return Config(
        model=ModelConfig(family="gpt2", vocab_size=256, seq_len=64, num_layers=3,
                          embed_dim=128, num_heads=4, dropout=0.0, scan_layers=False),
        optimizer=OptimizerConfig(lr=5e-3, b2=0.99, weight_decay=0.1, grad_clip=1.0),
        lr_schedule=LRScheduleConfig(kind="cosine", warmup_steps=30, min_lr_ratio=0.1),
        train=TrainConfig(steps=1000, batch_size=16, eval_every=250, eval_batches=50, log_every=10),
        checkpoint=CheckpointConfig(every=500, keep=2),
        run_dir="runs/shakespeare",
        preset="shakespeare",
    )


def tiny() -> Config:
    return Config(
        model=ModelConfig(family="gpt2", vocab_size=256, seq_len=16, num_layers=2,
                          embed_dim=32, num_heads=4),
        optimizer=OptimizerConfig(lr=1e-2),
        lr_schedule=LRScheduleConfig(kind="constant", warmup_steps=0),
        train=TrainConfig(steps=4, batch_size=8, eval_every=2, eval_batches=2, log_every=1),
        checkpoint=CheckpointConfig(every=2, keep=2),
        logging=LoggingConfig(sample_tokens=16),
        run_dir="runs/tiny",
        preset="tiny",
    )


def gpt2_small() -> Config:
    return Config(
        model=ModelConfig(family="gpt2", vocab_size=50304, seq_len=1024, num_layers=12,
                          embed_dim=768, num_heads=12),
        optimizer=OptimizerConfig(lr=6e-4, b2=0.95, weight_decay=0.1),
        lr_schedule=LRScheduleConfig(kind="cosine", warmup_steps=700),
        train=TrainConfig(steps=20_000, batch_size=32, eval_every=1000),
        checkpoint=CheckpointConfig(every=1000),
        run_dir="runs/gpt2-small",
        preset="gpt2-small",
    )


def llama_1b() -> Config:
    return Config(
        model=ModelConfig(family="llama", vocab_size=128_256, seq_len=2048, num_layers=16,
                          embed_dim=2048, num_heads=32, num_kv_heads=8, mlp_dim=8192,
                          rope_theta=500_000.0, remat="dots", compute_dtype="bfloat16"),
        optimizer=OptimizerConfig(lr=3e-4, b2=0.95, weight_decay=0.1),
        lr_schedule=LRScheduleConfig(kind="wsd", warmup_steps=2000),
        data=DataConfig(),
        train=TrainConfig(steps=100_000, batch_size=64, eval_every=2000),
        checkpoint=CheckpointConfig(every=1000),
        run_dir="runs/llama-1b",
        preset="llama-1b",
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "shakespeare": shakespeare,
    "tiny": tiny,
    "gpt2-small": gpt2_small,
    "llama-1b": llama_1b,
}


def get_preset(name: str) -> Config:
    """The preset called `name`; an unknown name raises `ConfigError` with the closest one."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset '{name}'; choose from {sorted(PRESETS)}.{suggest(name, list(PRESETS))}")
    return PRESETS[name]()
