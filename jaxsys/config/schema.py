"""The configuration schema: one `Config` made of small typed, frozen dataclasses.

Presets (`jaxsys.config.presets`) are plain functions returning a `Config`; the command line
changes it with dotted overrides (`jaxsys.config.overrides`) such as ``mesh.fsdp=4
train.steps=500 run_dir=runs/x``; `jaxsys.config.checks.validate` rejects, without devices,
shapes that cannot work. Fields whose 0 means "derive it" (`num_kv_heads`, `head_dim`,
`mlp_dim`) are read through `ModelConfig.resolved()`, which fills them in under the same names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and a fix."""


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts (`model.moe.*`, `jaxsys.model.moe`): routed experts replace the dense MLP in chosen
    layers; `num_experts` = 0 keeps every layer dense.

    Layer i is an MoE layer when i >= `first_dense_layers` and (i - first_dense_layers) %
    `every` == 0. Each token goes to `top_k` of `num_experts` experts (SwiGLU for llama, GELU for
    gpt2, hidden size `expert_dim`, 0 = model.mlp_dim) and always through `num_shared_experts`.
    Routers: "softmax" (top-k of the softmax, weights renormalised; Mixtral) or "sigmoid"
    (sigmoid scores, the top-k normalised to sum 1, times `routed_scale`; DeepSeek-V3).
    Dispatch: "dropless" (tokens sorted by expert, grouped matmul) or "capacity" (each expert
    takes at most ceil(capacity_factor · T · top_k / num_experts) tokens of each sequence; the
    rest pass through the residual). Balancing: the Switch/GShard auxiliary loss
    (`aux_loss_coef`), the router z-loss (`z_loss_coef`), and the auxiliary-loss-free bias
    (`bias_update_rate` > 0: a per-expert bias added to the scores for selection only, moved by
    that rate against the observed load after every step, outside the optimizer)."""

    num_experts: int = 0
    top_k: int = 2
    expert_dim: int = 0
    num_shared_experts: int = 0
    first_dense_layers: int = 0
    every: int = 1
    router: Literal["softmax", "sigmoid"] = "softmax"
    routed_scale: float = 1.0
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape and numerics.

    `family` picks the architecture: ``gpt2`` (learned positions, LayerNorm, GELU MLP, biases,
    tied embeddings) or ``llama`` (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head).
    `gelu`, `rope_scaling`, `head` and `qkv_bias` cover the variants of Hugging Face checkpoints
    (`jaxsys.checkpoint.hf`); their defaults are the two families as above.
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
    # RoPE frequency scaling: "none", or "llama3" (Llama 3.1/3.2: frequencies with wavelengths past
    # rope_original_max_positions / rope_low_freq_factor divided by rope_factor, those below
    # .. / rope_high_freq_factor kept, a smooth blend between; as transformers' llama3 rope_type).
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192  # the pre-training context length, in tokens
    norm_eps: float = 1e-5
    # gpt2's MLP activation: "tanh" (GELU's tanh approximation, GPT-2's gelu_new) or "exact" (erf).
    gelu: Literal["tanh", "exact"] = "tanh"
    # The output head: "tied" (the transposed token embedding), "untied" (its own `head` [D, V]),
    # "auto" = tied for gpt2, untied for llama.
    head: Literal["auto", "tied", "untied"] = "auto"
    qkv_bias: bool = False  # llama only: biases on the query/key/value projections (Qwen2)
    attention: Literal["xla", "cudnn", "pallas"] = "xla"
    # "mha": multi-head / grouped-query attention. "mla": DeepSeek-V2/V3 multi-head latent
    # attention (llama family; jaxsys.model.mla) — K and V (and Q when q_lora_rank > 0) through a
    # low-rank compressed latent, each head's query/key split into a no-RoPE part (qk_nope_dim)
    # and a decoupled RoPE part (qk_rope_dim, its key shared by all heads); values of
    # v_head_dim. num_kv_heads does not apply (every head has its own K and V from the latent).
    attention_kind: Literal["mha", "mla"] = "mha"
    q_lora_rank: int = 0  # 0 = queries projected directly from the residual
    kv_lora_rank: int = 0  # the K/V latent's rank; must be ≥ 1 with attention_kind=mla
    qk_nope_dim: int = 0  # 0 = head_dim
    qk_rope_dim: int = 0  # 0 = head_dim // 2 (DeepSeek-V3: 64 beside 128)
    v_head_dim: int = 0  # 0 = head_dim
    scan_layers: bool = True
    # What a layer's backward pass recomputes (jaxsys.model.block.REMAT_POLICIES), least first:
    # "none" saves every activation; "dots" every matmul's output (the attention scores too);
    # "dots_no_batch" the weight matmuls' outputs only; "full" only the layer input.
    # "offload_dots_no_batch" saves what dots_no_batch saves in host memory (memory kind
    # pinned_host; GPU/TPU only). "auto" (jaxsys.train.remat_auto): the first of none, dots,
    # dots_no_batch, full whose compiled peak fits train.memory_budget.
    remat: Literal["none", "full", "dots", "dots_no_batch", "offload_dots_no_batch", "auto"] = "none"
    # Vocabulary-tiled cross-entropy (`jaxsys.model.vocab_tiles`): project to the vocabulary
    # and take the loss one tile of V/(t·n) entries at a time (t = mesh.tensor, n this value; a
    # scan with each tile's logits recomputed in the backward), so float32 logits [B, T, V] and
    # their gradient never exist whole. 0 = off (one [B, T, V] projection). n must divide
    # vocab_size / mesh.tensor.
    loss_vocab_tiles: int = 0
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # fp8 matmuls for the dense layers (jaxsys.model.fp8): "none", or "current" — the QKV,
    # attention-output and MLP matmuls take float8_e4m3fn operands and float8_e5m2 gradients,
    # each tensor scaled by its own amax / fp8 max computed on the fly (no state). Embedding,
    # head, attention scores and norms stay in compute_dtype. XLA on Hopper-class GPUs runs them
    # as fp8 gemms; elsewhere it is the fp8 numerics at float speed. Dense MHA models only.
    fp8: Literal["none", "current"] = "none"
    moe: MoEConfig = field(default_factory=MoEConfig)  # model.moe.*: dense unless num_experts > 0

    @property
    def tied_head(self) -> bool:
        """Whether the output head is the transposed token embedding (no `head` parameter)."""
        return self.head == "tied" or (self.head == "auto" and self.family == "gpt2")

    def resolved(self) -> "ModelConfig":
        """This config with every derived size filled in under its own name: `num_kv_heads`
        (0 -> num_heads), `head_dim` (0 -> embed_dim // num_heads), `mlp_dim` (0 -> 4·D for
        gpt2, the Llama 8/3·D rule rounded up to 64 for llama), and MLA's `qk_nope_dim` and
        `v_head_dim` (0 -> head_dim) and `qk_rope_dim` (0 -> head_dim // 2). Idempotent."""
        if self.mlp_dim:
            mlp = self.mlp_dim
        elif self.family == "gpt2":
            mlp = 4 * self.embed_dim
        else:
            mlp = 64 * -(-int(8 * self.embed_dim / 3) // 64)
        head_dim = self.head_dim or self.embed_dim // self.num_heads
        return dataclasses.replace(self, num_kv_heads=self.num_kv_heads or self.num_heads,
                                   head_dim=head_dim, mlp_dim=mlp,
                                   qk_nope_dim=self.qk_nope_dim or head_dim,
                                   qk_rope_dim=self.qk_rope_dim or head_dim // 2,
                                   v_head_dim=self.v_head_dim or head_dim)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; their product must equal the device count. -1 = the rest."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    pipe: int = 1
    # Context parallelism: every activation's sequence split over `context`
    # (jaxsys.parallel.context; how attention sees the whole sequence: `context_parallel`).
    context: int = 1
    # Expert parallelism: the MoE experts (and their optimizer state) split over `expert`, tokens
    # sent to their experts' devices by all-to-all (jaxsys.parallel.expert); the batch is split
    # over `expert` as over `data`.
    expert: int = 1
    # What the `fsdp` axis (the ZeRO axis) shards: 0 nothing (plain data parallel), 1 the AdamW
    # moments, 2 + gradients, 3 + parameters (FSDP). `data` always replicates.
    zero_stage: int = 3
    # Megatron sequence parallelism: norms/residual/dropout regions split along the sequence
    # over `tensor` (all-gather + reduce-scatter instead of all-reduce).
    sequence_parallel: bool = False
    # Who writes the gradient collectives of data × fsdp: "explicit" (jaxsys.parallel.zero: a
    # shard_map over the batch axes with the ZeRO stage's reduce-scatter / all-reduce) or "xla"
    # (sharding constraints only; the partitioner and the backend's passes decide).
    grad_sync: Literal["explicit", "xla"] = "explicit"
    # The dtype the explicit sync's gradient reductions (psum / reduce-scatter over the batch
    # axes) send on the wire: "auto" = the gradients' own (the parameter dtype), or "float32" /
    # "bfloat16" (half the bytes of float32; cast before each collective, back after). Explicit
    # sync only (mesh.grad_sync=explicit, mesh.pipe=1).
    grad_comm_dtype: Literal["auto", "float32", "bfloat16"] = "auto"


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
    # "float32": with model.param_dtype=bfloat16, AdamW updates float32 master copies of the
    # parameters (kept in the optimizer state, laid out like the moments) and the model's
    # bfloat16 parameters are those copies rounded after every step. "none": the update is
    # applied to the parameters in their own dtype.
    master_dtype: Literal["none", "float32"] = "none"


@dataclass(frozen=True)
class LRScheduleConfig:
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
    """Training data. `source` is ``shakespeare`` (shipped), a text file, a ``.bin`` file of
    uint16 tokens (memory-mapped; for these the last `val_fraction` of the tokens is held out),
    or a dataset directory of `jaxsys data prepare` (its own train/val split and tokenizer).

    `sources` (instead of `source`): several prepared directories, each batch row drawn from
    one with probability `weights` (normalised; () = equal). `segments`: batches of prepared
    data carry segment_ids / positions / loss_mask so no prediction crosses a document."""

    source: str = "shakespeare"
    tokenizer: Literal["byte", "char"] = "byte"
    val_fraction: float = 0.1
    sources: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    segments: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings. `batch_size` is the global batch in sequences per optimizer step; it is
    split into `grad_accum` microbatches whose gradients are accumulated inside one step (the
    same update as the full batch)."""

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    # A step whose loss or gradients are not finite is skipped (no update, counted in the
    # metrics as `skipped`); this many skips in a row stop the run.
    max_consecutive_skips: int = 5
    # After max_consecutive_skips: "stop" the run, or "rollback": restore the last checkpoint
    # from before the bad steps and continue with the data *after* them (at most max_rollbacks
    # times per run_dir, logged in <run_dir>/rollbacks.json).
    on_nan: Literal["stop", "rollback"] = "stop"
    max_rollbacks: int = 3
    # Dynamic loss scaling (jaxsys.train.loss_scale): the loss is multiplied by a scale before
    # the backward pass and the gradients divided by it after the sync; a step whose loss is
    # finite but whose gradients are not (an overflow) is skipped and halves the scale, every
    # `loss_scale_period` finite steps in a row double it. "auto" = "dynamic" when
    # model.compute_dtype=float16, "none" otherwise. Overflow skips do not count toward
    # max_consecutive_skips (a NaN loss does).
    loss_scale: Literal["auto", "dynamic", "none"] = "auto"
    loss_scale_init: float = 2.0**15  # the first step's scale (a power of two)
    loss_scale_period: int = 2000  # finite steps in a row before the scale doubles
    # Per-device memory, in GiB (2**30 bytes), that model.remat=auto must fit the compiled train
    # step's peak into (arguments + outputs - aliased + temporaries, as `jaxsys plan` counts it);
    # 0 = the device's own memory (refused on CPU, which has no device memory to go by).
    memory_budget: float = 0.0
    # Host offload (GPU/TPU only): "optimizer" keeps the AdamW moments in host memory (memory kind
    # pinned_host) between steps, brought to the device for the update. Saved activations are
    # offloaded by model.remat=offload_dots_no_batch.
    offload: Literal["none", "optimizer"] = "none"


@dataclass(frozen=True)
class FaultsConfig:
    """Fault injection, for tests and drills of the NaN handling; empty in every preset."""

    nan_steps: tuple[int, ...] = ()  # these steps' loss and gradients are poisoned with NaN
    # These train batches (by data index) hold out-of-range token ids, which the embedding
    # lookup turns into NaN (mesh.tensor=1 only: the vocab-parallel lookup zeroes them).
    nan_batches: tuple[int, ...] = ()


@dataclass(frozen=True)
class PipelineConfig:
    """Pipeline parallelism over `mesh.pipe` stages (used when mesh.pipe > 1; needs
    model.scan_layers). Each step's batch (per `train.grad_accum` accumulation microbatch) is split
    into `microbatches` pipeline microbatches of equal size; `virtual_stages` layer chunks per
    device (v ≥ 2 only with the interleaved schedule)."""

    schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"] = "1f1b"
    microbatches: int = 0  # 0 = mesh.pipe (the fewest 1F1B accepts)
    virtual_stages: int = 1


@dataclass(frozen=True)
class ContextParallelConfig:
    """How attention sees the whole sequence when `mesh.context` > 1 (jaxsys.parallel.context).

    kinds: ``all-gather`` (K and V gathered over `context`, queries stay local), ``ring`` (K/V
    blocks rotate around the ring, partial outputs merged by log-sum-exp), ``ulysses`` (all-to-all
    from sequence-split to head-split and back). `load_balance` reorders the sequence zigzag
    (device i holds chunks i and 2c-1-i) so every device does the same causal attention work."""

    kind: Literal["all-gather", "ring", "ulysses"] = "ring"
    load_balance: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in `<run_dir>/checkpoints`; every 0 disables saving."""

    every: int = 500
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    # Keys that may differ from the run's config.json on resume although they change what its
    # checkpoints mean (e.g. data.source, to continue them on other data); see train/run_dir.py.
    allow_changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoggingConfig:
    """What a run prints and where its metrics go (besides `<run_dir>/metrics.jsonl`)."""

    tensorboard: bool = True
    progress: bool = True
    sample_tokens: int = 200  # generated after training; 0 disables
    sample_prompt: str = "ROMEO:"
    # Console lines: "text", or "json" (one JSON object per line on stdout, with an "event" key;
    # no progress bar). `quiet` prints only warnings, errors and the final line.
    format: Literal["text", "json"] = "text"
    quiet: bool = False
    # Experiment trackers written beside TensorBoard (optional extras: pip install -e ".[wandb]").
    trackers: tuple[Literal["wandb", "swanlab"], ...] = ()
    tracker_project: str = "jaxsys"
    tracker_mode: Literal["offline", "online"] = "offline"  # offline: files in the run_dir, sync later
    # A jax.profiler trace of loop steps min..max (1-based, as in metrics.jsonl) in <run_dir>/profile.
    profile_steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    context_parallel: ContextParallelConfig = field(default_factory=ContextParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    run_dir: str = "runs/default"
    preset: str = ""
