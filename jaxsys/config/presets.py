"""Named presets: plain functions that return a `Config`.

- ``shakespeare``: the CPU default; a byte-level Llama-style model (2 layers, 128 wide, RoPE,
  SwiGLU, RMSNorm, context 64) trained for 850 steps of 16 sequences on the shipped Shakespeare.
- ``tiny``: seconds-long runs for tests.
- ``gpt2-small``: GPT-2 124M shapes (12 layers, 768 wide, 12 heads, context 1024).
- ``llama-1b``: Llama-3.2-1B-like shapes (16 layers, 2048 wide, 32 heads, 8 KV heads), bf16
  compute; meant for GPUs.
- ``deepseek-tiny``: a byte-level DeepSeek-style model (multi-head latent attention, routed +
  shared experts with a sigmoid router, first layer dense) that trains on the CPU on the
  shipped Shakespeare (200 steps; minutes on a loaded 2-core machine).
- ``deepseek-v3`` and ``mixtral-8x7b``: the published shapes (DeepSeek-V3 671B without its
  multi-token-prediction module; Mixtral 8x7B), for `jaxsys plan` only: too large to train
  here, their parameters are only ever abstract shapes.
"""

from __future__ import annotations

from typing import Callable

from jaxsys.config.overrides import suggest
from jaxsys.config.schema import (CheckpointConfig, Config, ConfigError, DataConfig, LoggingConfig,
                                  LRScheduleConfig, ModelConfig, MoEConfig, OptimizerConfig, TrainConfig)


def shakespeare() -> Config:
    # Tuned for wall time to nanoGPT's val loss (1.886) on a 2-core CPU (docs/benchmarks.md):
    # the llama block (RoPE, SwiGLU) with 2 layers reaches it in fewer steps and less time per
    # step than gpt2 with 3 (1.906 vs 1.938 at 700 steps), context 64 with 16 sequences beats
    # context 128 with 8, and an unrolled layer loop runs faster than `scan` on CPU at this depth.
    return Config(
        model=ModelConfig(family="llama", vocab_size=256, seq_len=64, num_layers=2,
                          embed_dim=128, num_heads=4, dropout=0.0, scan_layers=False),
        optimizer=OptimizerConfig(lr=5e-3, b2=0.99, weight_decay=0.1, grad_clip=1.0),
        lr_schedule=LRScheduleConfig(kind="cosine", warmup_steps=30, min_lr_ratio=0.1),
        train=TrainConfig(steps=850, batch_size=16, eval_every=250, eval_batches=50, log_every=10),
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


def deepseek_tiny() -> Config:
    # DeepSeek-V3's recipe at Shakespeare scale: MLA (query latent 64, K/V latent 32, heads of
    # 32 no-RoPE + 16 RoPE dims, values of 32), 8 routed experts top-2 + 1 shared (each 128
    # wide), a sigmoid router with a small auxiliary loss, layer 0 dense. Measured 2026-12-01 on
    # the shared 2-core machine (load ~6): 300 steps to val loss 2.09 (200: 2.18) at 1.0-1.3
    # steps/s, so 200 steps. The loss-free bias (V3's, model.moe.bias_update_rate=0.001) is off:
    # inference does not read the moe_bias collection yet, and the final sample and `jaxsys
    # sample` fail with it.
    return Config(
        model=ModelConfig(family="llama", vocab_size=256, seq_len=64, num_layers=4, embed_dim=128,
                          num_heads=4, mlp_dim=384, attention_kind="mla", q_lora_rank=64, kv_lora_rank=32,
                          qk_nope_dim=32, qk_rope_dim=16, v_head_dim=32, scan_layers=False,
                          moe=MoEConfig(num_experts=8, top_k=2, expert_dim=128, num_shared_experts=1,
                                        first_dense_layers=1, router="sigmoid", routed_scale=1.0,
                                        dispatch="dropless", aux_loss_coef=0.001)),
        optimizer=OptimizerConfig(lr=3e-3, b2=0.99, weight_decay=0.1, grad_clip=1.0),
        lr_schedule=LRScheduleConfig(kind="cosine", warmup_steps=20, min_lr_ratio=0.1),
        train=TrainConfig(steps=200, batch_size=16, eval_every=100, eval_batches=20, log_every=10),
        checkpoint=CheckpointConfig(every=200, keep=1),
        run_dir="runs/deepseek-tiny",
        preset="deepseek-tiny",
    )


def deepseek_v3() -> Config:
    # DeepSeek-V3 (arXiv 2412.19437, its config.json): 61 layers, the first 3 dense; MLA with
    # q_lora 1536, kv_lora 512, 128 heads of 128 + 64 (RoPE) query/key dims and 128 value dims;
    # 256 routed experts (top-8, sigmoid, scaled 2.5) + 1 shared, each 2048 wide. Its YaRN
    # context extension and the multi-token-prediction module are not modelled.
    return Config(
        model=ModelConfig(family="llama", vocab_size=129_280, seq_len=4096, num_layers=61, embed_dim=7168,
                          num_heads=128, mlp_dim=18_432, norm_eps=1e-6, attention_kind="mla",
                          q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
                          remat="full", compute_dtype="bfloat16",
                          moe=MoEConfig(num_experts=256, top_k=8, expert_dim=2048, num_shared_experts=1,
                                        first_dense_layers=3, router="sigmoid", routed_scale=2.5,
                                        dispatch="capacity", capacity_factor=1.25, aux_loss_coef=0.0001,
                                        bias_update_rate=0.001)),
        optimizer=OptimizerConfig(lr=2.2e-4, b2=0.95, weight_decay=0.1),
        lr_schedule=LRScheduleConfig(kind="wsd", warmup_steps=2000),
        train=TrainConfig(steps=100_000, batch_size=8, eval_every=2000),
        checkpoint=CheckpointConfig(every=1000),
        run_dir="runs/deepseek-v3",
        preset="deepseek-v3",
    )


def mixtral_8x7b() -> Config:
    # Mixtral 8x7B (arXiv 2401.04088, its config.json): 32 layers, 32 heads / 8 KV heads of 128,
    # every MLP 8 experts of 14336 with a softmax top-2 router, RoPE base 1e6.
    return Config(
        model=ModelConfig(family="llama", vocab_size=32_000, seq_len=4096, num_layers=32, embed_dim=4096,
                          num_heads=32, num_kv_heads=8, mlp_dim=14_336, rope_theta=1e6, remat="full",
                          compute_dtype="bfloat16",
                          moe=MoEConfig(num_experts=8, top_k=2, expert_dim=14_336, router="softmax",
                                        dispatch="capacity", capacity_factor=1.25, aux_loss_coef=0.02)),
        optimizer=OptimizerConfig(lr=3e-4, b2=0.95, weight_decay=0.1),
        lr_schedule=LRScheduleConfig(kind="wsd", warmup_steps=2000),
        train=TrainConfig(steps=100_000, batch_size=8, eval_every=2000),
        checkpoint=CheckpointConfig(every=1000),
        run_dir="runs/mixtral-8x7b",
        preset="mixtral-8x7b",
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "shakespeare": shakespeare,
    "tiny": tiny,
    "gpt2-small": gpt2_small,
    "llama-1b": llama_1b,
    "deepseek-tiny": deepseek_tiny,
    "deepseek-v3": deepseek_v3,
    "mixtral-8x7b": mixtral_8x7b,
}


def get_preset(name: str) -> Config:
    """The preset called `name`; an unknown name raises `ConfigError` with the closest one."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset '{name}'; choose from {sorted(PRESETS)}.{suggest(name, list(PRESETS))}")
    return PRESETS[name]()
