"""Checks that need no devices: a config whose shapes cannot work raises `ConfigError` here,
before any device, data or compile is touched. Checks that depend on the mesh (divisibility by
axis sizes) are in `jaxsys.parallel.layout`.
"""

from __future__ import annotations

import math

from jaxsys.config.overrides import all_keys, suggest
from jaxsys.config.schema import Config, ConfigError


def _validate_ranges(cfg: Config) -> None:
    """Numbers outside their meaningful range (a negative learning rate trains, to a loss of 154;
    zero heads divides by zero): each names the key, the allowed range and the value."""
    m, o, s, t, g = cfg.model, cfg.optimizer, cfg.lr_schedule, cfg.train, cfg.logging
    at_least = (("model.vocab_size", m.vocab_size, 1), ("model.embed_dim", m.embed_dim, 1),
                ("model.num_heads", m.num_heads, 1), ("model.num_kv_heads", m.num_kv_heads, 0),
                ("model.head_dim", m.head_dim, 0), ("model.mlp_dim", m.mlp_dim, 0),
                ("train.grad_accum", t.grad_accum, 1), ("train.batch_size", t.batch_size, 1),
                ("lr_schedule.warmup_steps", s.warmup_steps, 0),
                ("lr_schedule.decay_steps", s.decay_steps, 0),
                ("lr_schedule.transition_steps", s.transition_steps, 1),
                ("logging.sample_tokens", g.sample_tokens, 0),
                ("optimizer.weight_decay", o.weight_decay, 0.0), ("optimizer.grad_clip", o.grad_clip, 0.0),
                ("lr_schedule.step_factor", s.step_factor, 0.0))
    for key, value, low in at_least:
        if not value >= low:  # also catches nan
            raise ConfigError(f"{key} must be ≥ {low}, got {value}.")
    finite = (("optimizer.lr", o.lr), ("optimizer.weight_decay", o.weight_decay),
              ("optimizer.grad_clip", o.grad_clip), ("lr_schedule.step_factor", s.step_factor),
              ("model.rope_theta", m.rope_theta), ("model.dropout", m.dropout))
    for key, value in finite:
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}.")
    above_zero = (("optimizer.lr", o.lr, "the peak learning rate"), ("optimizer.eps", o.eps, "AdamW's ε"),
                  ("model.norm_eps", m.norm_eps, "the norms' ε"), ("model.rope_theta", m.rope_theta, "RoPE's base"),
                  ("lr_schedule.decay_rate", s.decay_rate, "the exponential decay factor"))
    for key, value, what in above_zero:
        if not value > 0:  # also catches nan
            raise ConfigError(f"{key} ({what}) must be > 0, got {value}.")
    for key, value in (("optimizer.b1", o.b1), ("optimizer.b2", o.b2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value} (AdamW's moment decay; typical "
                              "0.9 and 0.95–0.999).")
    for key, value in (("lr_schedule.min_lr_ratio", s.min_lr_ratio),
                       ("lr_schedule.decay_fraction", s.decay_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {value}.")
    if list(s.step_boundaries) != sorted(set(s.step_boundaries)) or any(b < 1 for b in s.step_boundaries):
        raise ConfigError(f"lr_schedule.step_boundaries must be increasing steps ≥ 1, got "
                          f"{','.join(map(str, s.step_boundaries))}.")
    for key, steps in (("faults.nan_steps", cfg.faults.nan_steps), ("faults.nan_batches", cfg.faults.nan_batches)):
        if any(k < 0 for k in steps):
            raise ConfigError(f"{key} must be step numbers ≥ 0, got {','.join(map(str, steps))}.")
    unknown = [k for k in cfg.checkpoint.allow_changes if k not in all_keys()]
    if unknown:
        raise ConfigError(f"checkpoint.allow_changes: unknown config key '{unknown[0]}'."
                          f"{suggest(unknown[0], all_keys())}")
    for axis in ("data", "fsdp", "expert", "context", "tensor", "pipe"):
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size} is invalid; axis sizes are ≥ 1 (or -1 for 'the rest').")


def validate(cfg: Config) -> None:
    """Checks that need no devices: shapes and numbers that cannot work raise `ConfigError`."""
    _validate_ranges(cfg)
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
    _validate_variants(m)
    _validate_fp8(m)
    _validate_mla(cfg)
    _validate_moe(cfg)
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
    _validate_expert_parallel(cfg)
    _validate_precision(cfg)
    _validate_memory(cfg)
    _validate_loss_vocab_tiles(cfg)
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}.")
    _validate_data(cfg)
    _validate_logging(cfg)


def _validate_precision(cfg: Config) -> None:
    """Loss scaling, master weights and the gradient-communication dtype (docs: README, Mixed precision)."""
    t, m = cfg.train, cfg.mesh
    scaled = t.loss_scale == "dynamic" or (t.loss_scale == "auto" and cfg.model.compute_dtype == "float16")
    if scaled and m.pipe > 1:
        raise ConfigError("dynamic loss scaling (model.compute_dtype=float16 or train.loss_scale=dynamic) is not "
                          "supported with mesh.pipe > 1; use model.compute_dtype=bfloat16 or mesh.pipe=1.")
    if not (math.isfinite(t.loss_scale_init) and t.loss_scale_init >= 1.0):
        raise ConfigError(f"train.loss_scale_init must be a finite number ≥ 1, got {t.loss_scale_init} "
                          "(the default 32768 = 2**15 suits most models).")
    if t.loss_scale_period < 1:
        raise ConfigError(f"train.loss_scale_period must be ≥ 1, got {t.loss_scale_period}.")
    if cfg.optimizer.master_dtype != "none" and cfg.model.param_dtype == "float32":
        raise ConfigError("optimizer.master_dtype=float32 keeps float32 copies of bfloat16 parameters; with "
                          "model.param_dtype=float32 it would only duplicate them. Set model.param_dtype=bfloat16 "
                          "or optimizer.master_dtype=none.")
    if m.grad_comm_dtype != "auto" and (m.grad_sync != "explicit" or m.pipe > 1):
        raise ConfigError(f"mesh.grad_comm_dtype={m.grad_comm_dtype} applies to the explicit data-parallel sync "
                          "only; set mesh.grad_sync=explicit and mesh.pipe=1, or mesh.grad_comm_dtype=auto.")


def _validate_loss_vocab_tiles(cfg: Config) -> None:
    """`model.loss_vocab_tiles`: tiles of each device's vocabulary shard (0 = off)."""
    n, V, t = cfg.model.loss_vocab_tiles, cfg.model.vocab_size, max(cfg.mesh.tensor, 1)
    if n < 0 or (n and (V % t or (V // t) % n)):
        fits = [d for d in range(2, 65) if V % t == 0 and (V // t) % d == 0]
        raise ConfigError(f"model.loss_vocab_tiles={n} must be 0 (off) or divide the {V // t} vocabulary entries "
                          f"of each tensor shard (model.vocab_size={V} / mesh.tensor={t}); "
                          + (f"e.g. one of {fits[:6]}." if fits else "pad model.vocab_size."))


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.sources and d.source != "shakespeare":
        raise ConfigError(f"data.source={d.source!r} and data.sources={','.join(d.sources)} are both set; "
                          "give one directory as data.source, or several as data.sources.")
    if d.weights and len(d.weights) != len(d.sources):
        raise ConfigError(f"data.weights has {len(d.weights)} values for {len(d.sources)} data.sources; "
                          "give one weight per source (or none for equal weights).")
    if any(not (w > 0 and math.isfinite(w)) for w in d.weights):  # also refuses nan
        raise ConfigError(f"data.weights={','.join(map(str, d.weights))}: every weight must be finite and > 0.")


def _validate_variants(m) -> None:
    """The Hugging Face variants (`model.gelu`, `head`, `qkv_bias`, `rope_scaling` and its numbers):
    each only where its family has the part it changes."""
    for key, value, choices in (("gelu", m.gelu, ("tanh", "exact")), ("head", m.head, ("auto", "tied", "untied")),
                                ("rope_scaling", m.rope_scaling, ("none", "llama3"))):
        if value not in choices:
            raise ConfigError(f"model.{key}={value!r} is not one of {list(choices)}.")
    if m.family == "llama" and m.gelu != "tanh":
        raise ConfigError("model.gelu only applies to gpt2's MLP (llama's is SwiGLU); set model.gelu=tanh.")
    if m.family == "gpt2" and m.qkv_bias:
        raise ConfigError("model.qkv_bias is for llama (gpt2 always has q/k/v biases); set model.qkv_bias=false.")
    if m.rope_scaling == "none":
        return
    if m.family == "gpt2":
        raise ConfigError("model.rope_scaling: gpt2 has learned positions, no RoPE; set model.rope_scaling=none.")
    for key in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions"):
        if not getattr(m, key) > 0:  # also catches nan
            raise ConfigError(f"model.{key} must be > 0 with model.rope_scaling=llama3, got {getattr(m, key)}.")
    if not m.rope_high_freq_factor > m.rope_low_freq_factor:
        raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must be > model.rope_low_freq_"
                          f"factor={m.rope_low_freq_factor} (llama3 blends between the two wavelengths).")


def _validate_fp8(m) -> None:
    """`model.fp8` (`jaxsys.model.fp8`): a known mode, on a model whose matmuls it covers."""
    if m.fp8 not in ("none", "current"):
        raise ConfigError(f"model.fp8={m.fp8!r} is not one of ['none', 'current'].")
    if m.fp8 == "none":
        return
    if m.attention_kind != "mha":
        raise ConfigError("model.fp8=current covers the multi-head attention projections, not multi-head latent "
                          "attention's; set model.fp8=none or model.attention_kind=mha.")
    if m.moe.num_experts:
        raise ConfigError("model.fp8=current covers dense MLPs, not routed experts; set model.fp8=none or "
                          "model.moe.num_experts=0.")


_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim")


def _validate_mla(cfg: Config) -> None:
    """Multi-head latent attention (`model.attention_kind=mla`, `jaxsys.model.mla`): llama family
    only, a K/V latent, an even RoPE part; its keys refused with the default attention."""
    m = cfg.model
    for key in _MLA_KEYS:
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key} must be ≥ 0, got {getattr(m, key)}.")
    if m.attention_kind != "mla":
        if m.attention_kind != "mha":
            raise ConfigError(f"model.attention_kind={m.attention_kind!r} is not one of ['mha', 'mla'].")
        set_keys = [k for k in _MLA_KEYS if getattr(m, k)]
        if set_keys:
            raise ConfigError(f"model.{set_keys[0]} is a multi-head latent attention size; set "
                              "model.attention_kind=mla to use it, or leave it at 0.")
        return
    r = m.resolved()
    if m.family != "llama":
        raise ConfigError("model.attention_kind=mla needs RoPE, RMSNorm and SwiGLU: use model.family=llama.")
    if m.kv_lora_rank < 1:
        raise ConfigError("model.attention_kind=mla compresses K and V into a latent: set model.kv_lora_rank ≥ 1 "
                          "(DeepSeek-V3: 512).")
    if r.qk_rope_dim < 2 or r.qk_rope_dim % 2:
        raise ConfigError(f"model.qk_rope_dim={r.qk_rope_dim}: RoPE needs an even size ≥ 2; change "
                          "model.qk_rope_dim (or model.head_dim, whose half it defaults to).")
    if r.num_kv_heads != r.num_heads:
        raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} does not apply to model.attention_kind=mla "
                          "(every head gets its K and V from the latent); set model.num_kv_heads=0.")
    if m.qkv_bias:
        raise ConfigError("model.qkv_bias: multi-head latent attention has no q/k/v biases; set model.qkv_bias=false.")
    if cfg.mesh.context != 1:
        raise ConfigError("model.attention_kind=mla does not run context-parallel yet; set mesh.context=1 (split "
                          "the batch, or heads with mesh.tensor, instead).")


def _validate_moe(cfg: Config) -> None:
    """Mixture-of-experts settings (`model.moe.*`) that cannot work; nothing when num_experts = 0."""
    e = cfg.model.moe
    if not e.num_experts >= 0:
        raise ConfigError(f"model.moe.num_experts must be ≥ 0 (0 = dense MLPs), got {e.num_experts}.")
    if e.num_experts == 0:
        return
    L, T = cfg.model.num_layers, cfg.model.seq_len
    for key, value, choices in (("router", e.router, ("softmax", "sigmoid")),
                                ("dispatch", e.dispatch, ("dropless", "capacity"))):
        if value not in choices:
            raise ConfigError(f"model.moe.{key}={value!r} is not one of {list(choices)}.")
    if e.top_k < 1:
        raise ConfigError(f"model.moe.top_k must be ≥ 1 (experts per token), got {e.top_k}.")
    if e.top_k > e.num_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} > model.moe.num_experts={e.num_experts}; a token "
                          f"picks distinct experts: use top_k ≤ {e.num_experts} or more experts.")
    for key, value in (("expert_dim", e.expert_dim), ("num_shared_experts", e.num_shared_experts),
                       ("first_dense_layers", e.first_dense_layers)):
        if value < 0:
            raise ConfigError(f"model.moe.{key} must be ≥ 0, got {value}.")
    if e.every < 1:
        raise ConfigError(f"model.moe.every must be ≥ 1 (1 = every layer after the dense ones is MoE), got {e.every}.")
    if e.first_dense_layers >= L:
        raise ConfigError(f"model.moe.first_dense_layers={e.first_dense_layers} leaves no MoE layer of "
                          f"model.num_layers={L}; use first_dense_layers < {L} or model.moe.num_experts=0.")
    for key, value in (("aux_loss_coef", e.aux_loss_coef), ("z_loss_coef", e.z_loss_coef),
                       ("bias_update_rate", e.bias_update_rate)):
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"model.moe.{key} must be a finite number ≥ 0 (0 turns it off), got {value}.")
    if not (e.routed_scale > 0 and math.isfinite(e.routed_scale)):
        raise ConfigError(f"model.moe.routed_scale must be a finite number > 0, got {e.routed_scale}.")
    per_expert = e.capacity_factor * T * e.top_k / e.num_experts
    if e.dispatch == "capacity" and not per_expert >= 1:
        raise ConfigError(f"model.moe.capacity_factor={e.capacity_factor} gives each expert "
                          f"{per_expert:.3g} < 1 token per sequence (capacity_factor · seq_len · top_k / "
                          f"num_experts); raise it to ≥ {e.num_experts / (T * e.top_k):.3g} or use "
                          "model.moe.dispatch=dropless.")
    if cfg.mesh.pipe > 1 and (e.first_dense_layers or e.every != 1):
        raise ConfigError(f"model.moe with mesh.pipe > 1 needs every layer MoE (the pipeline splits one uniform "
                          f"stack), got first_dense_layers={e.first_dense_layers}, every={e.every}; set "
                          "model.moe.first_dense_layers=0 and model.moe.every=1, or mesh.pipe=1.")
    if cfg.mesh.context > 1:
        raise ConfigError("model.moe with mesh.context > 1 is not supported yet (capacity and the "
                          "balance loss are per whole sequence); use mesh.context=1.")


TRACKERS = ("wandb", "swanlab")


def _validate_logging(cfg: Config) -> None:
    """Console format, trackers and profiled steps (a config file is not parsed like overrides)."""
    g = cfg.logging
    if g.format not in ("text", "json"):
        raise ConfigError(f"logging.format={g.format!r} is not one of ['text', 'json'].")
    unknown = [t for t in g.trackers if t not in TRACKERS]
    if unknown or len(set(g.trackers)) != len(g.trackers):
        raise ConfigError(f"logging.trackers={','.join(map(str, g.trackers))} must name each of "
                          f"{', '.join(TRACKERS)} at most once.")
    if g.tracker_mode not in ("offline", "online"):
        raise ConfigError(f"logging.tracker_mode={g.tracker_mode!r} is not one of ['offline', 'online'].")
    if g.profile_steps and (min(g.profile_steps) < 1 or max(g.profile_steps) > cfg.train.steps):
        raise ConfigError(f"logging.profile_steps={','.join(map(str, g.profile_steps))} must be steps in "
                          f"1..train.steps={cfg.train.steps} (the trace covers the first to the last).")


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


def _validate_expert_parallel(cfg: Config) -> None:
    """The `expert` mesh axis against the MoE shape (`jaxsys.parallel.expert`). On a dense model
    `mesh.expert` > 1 is allowed: it splits the batch like `mesh.data` (the batch is split over
    data × fsdp × expert whatever the model), so a layout can be tried dense and sparse alike."""
    mesh, moe = cfg.mesh, cfg.model.moe
    if moe.num_experts <= 0:
        return
    e, t = mesh.expert, mesh.tensor
    if e > 1 and moe.num_experts % e:
        divisors = [d for d in range(1, e + 1) if moe.num_experts % d == 0]
        raise ConfigError(f"model.moe.num_experts={moe.num_experts} is not divisible by mesh.expert={e} "
                          f"(each device holds num_experts / mesh.expert experts); use mesh.expert="
                          f"{max(divisors)} or a multiple of {e} experts.")
    F = moe.expert_dim or cfg.model.resolved().mlp_dim
    if t > 1 and F % t:
        raise ConfigError(f"The experts' hidden size {F} (model.moe.expert_dim, 0 = model.mlp_dim) is not "
                          f"divisible by mesh.tensor={t}; use an expert_dim that is a multiple of {t}.")


def _validate_memory(cfg: Config) -> None:
    """train.memory_budget is a size; model.remat=auto and host offload need what they choose by."""
    budget = cfg.train.memory_budget
    if not budget >= 0:  # also nan
        raise ConfigError(f"train.memory_budget must be ≥ 0 GiB (0 = the device's memory), got {budget}.")


def check_memory_platform(cfg: Config, platform: str) -> None:
    """What needs the devices' platform (`jax.Device.platform`), checked before any compile:
    host offload needs a separate host memory, `model.remat=auto` a memory to fit."""
    if platform != "cpu":
        return
    # Measured (jax 0.10.2): XLA:CPU accepts pinned_host memory kinds but its device memory *is*
    # host memory, and it compiles the offload to nothing (host_temp_size_in_bytes 0, the same
    # temporaries): an offload there would look like it works and save no byte.
    if cfg.train.offload != "none":
        raise ConfigError(f"train.offload={cfg.train.offload} needs a GPU or TPU: on the CPU the device "
                          "memory is host memory, nothing would move; use train.offload=none.")
    if cfg.model.remat == "offload_dots_no_batch":
        raise ConfigError("model.remat=offload_dots_no_batch needs a GPU or TPU: on the CPU the device "
                          "memory is host memory, nothing would move; use model.remat=dots_no_batch.")
    if cfg.model.remat == "auto" and not cfg.train.memory_budget:
        raise ConfigError("model.remat=auto on the CPU needs a per-device budget to fit: pass "
                          "--memory-budget GiB (train.memory_budget), or choose model.remat yourself.")
