"""`jaxsys plan`: what a layout costs per device, read from the compiled train step.

For a config on a mesh the train step is compiled ahead of time (nothing runs) and reported
next to closed forms:

- memory per device: parameters, gradients and AdamW moments from the compiled step's
  shardings (their sum is checked against `memory_analysis().argument_size_in_bytes`), and
  temporaries from `temp_size_in_bytes`; beside them the ZeRO paper's 2Ψ+2Ψ+KΨ with our
  dtypes (fp32 parameters and gradients, two fp32 moments: 4Ψ + 4Ψ + 8Ψ bytes), each divided
  by tensor and, per stage, by fsdp; activations per Korthikanti et al. 2022 (TP/SP/remat).
  The temporaries are also broken down: the buffers live at XLA's memory peak by kind
  (`memory_breakdown`, from the buffer live ranges the compile dumps), beside the terms of
  `closed_form_temporaries` (the activations by kind, the logits, the head's gradient,
  ZeRO-3's gathered weights).
- every collective of the optimized HLO (`hlo_stats`), by kind and mesh axes, beside the
  Megatron/ZeRO closed-form wire bytes, and with expert parallelism the all-to-alls of the
  MoE dispatch and combine beside theirs (`expert_plan.closed_form_expert`); the experts'
  weights, split over `expert`, get their own memory row.
- remat and host offload (`memory_plan`): the policy compiled (`model.remat=auto` resolved on
  the program training compiles, `jaxsys.train.remat_auto`, each candidate's peak shown) and
  the bytes per device `train.offload=optimizer` / `model.remat=offload_dots_no_batch` put on
  the host; on the CPU, which refuses offload, the same step is planned without it.
- FLOPs from `cost_analysis()` and a roofline step time (`roofline`); the closed form 6N +
  attention counts N = the parameters one token uses (MoE: its top_k routed experts only).

XLA's cost analysis counts a `while` body once, so the planner compiles with
`model.scan_layers=false` (every layer visible; collectives are counted the same either way).

Full-size presets (`deepseek-v3`, `mixtral-8x7b`) plan from abstract shapes: nothing is
allocated (measured: 0.78 GB peak host memory for 8 DeepSeek-V3 layers). The compile is
what costs, and it grows with the unrolled layers: DeepSeek-V3 at tensor=8 on 8 simulated
devices, 8 layers in 50 s, all 61 in 749 s on the shared 2-core machine (2026-12-01, MLA with
dense MLPs, before the MoE layer; XLA's HLO passes, not LLVM: backend optimisation level 0
made no difference). With the MoE layer: `model.num_layers=5` (3 dense + 2 MoE, 26.6B
parameters, 4.77B active) in 62 s, 0.84 GB peak host memory; Mixtral 8x7B's first 4 layers in
67 s; the full 61 / 32 layers were not timed with MoE. Measured there, not modelled: XLA:CPU all-reduces bf16 activations in
float32 (twice the formula's bytes, MHA as well), and its temporaries hold the xla attention's
[b, H/t, T, T] scores per layer (191 GB for 8 layers at T = 4096 against the 7.6 GB activation
formula).

Letters: Ψ parameters, L layers, b sequences per device per microbatch, T sequence, D embed,
F MLP hidden, H heads, K kv heads, E head size, V vocabulary, t tensor, z fsdp, d data,
e expert, Ψx the experts' parameters (part of Ψ).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxsys.config import Config, ConfigError, apply_overrides
from jaxsys.config.hardware import get_accelerator
from jaxsys.model.flops import active_params, flops_per_token
from jaxsys.model.params import count_params
from jaxsys.parallel import context as context_lib
from jaxsys.parallel import rules
from jaxsys.parallel.mesh import MESH_AXES, batch_ways, layout_name as mesh_layout_name, make_mesh
from jaxsys.tools import expert_plan, hlo_stats, memory_breakdown, memory_plan, roofline
from jaxsys.tools.memory_formula import closed_form_activations, closed_form_temporaries, width_units
from jaxsys.train import remat_auto
from jaxsys.train import state as state_lib


def _shard_bytes(abstract: Any, shardings: Any) -> int:
    leaves = jax.tree_util.tree_leaves(abstract)
    shs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return int(sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, sh in zip(leaves, shs)))


def closed_form_state(cfg: Config, sizes: dict[str, int], n_params: int,
                      n_expert: int = 0) -> dict[str, float]:
    """ZeRO paper per-device bytes: params, grads, optimizer (K = two moments in param dtype);
    the `n_expert` experts' parameters among `n_params` are split over `expert` as well."""
    pb = np.dtype(cfg.model.param_dtype).itemsize
    t, z, stage = sizes["tensor"], sizes["fsdp"], cfg.mesh.zero_stage
    per_t = (n_params - n_expert) / t + n_expert / (t * sizes.get("expert", 1))
    return {"params": pb * per_t / (z if stage >= 3 else 1),
            "grads": pb * per_t / (z if stage >= 2 else 1),
            "optimizer": 2 * pb * per_t / (z if stage >= 1 else 1)}


def closed_form_comm(cfg: Config, sizes: dict[str, int], tp_param_bytes: float,
                     expert_param_bytes: float = 0.0) -> dict[str, float]:
    """Megatron + ZeRO wire bytes per device per step (ring algorithms), by collective kind.

    TP: per microbatch 4L + 2 all-reduces of b·T·D (2 per block forward, 2 backward, the
    embedding forward, the head's backward; +2L with full remat), or with SP as many
    all-gathers plus reduce-scatters (same wire bytes), and 3 all-reduces of b·T fp32 in the
    vocab-parallel loss. DP/ZeRO on P = parameter bytes per tensor shard: stage 0 all-reduce over
    data×fsdp; stages 1–3 reduce-scatter over fsdp + all-reduce of the 1/z shard over data +
    all-gather over fsdp (stage 3 gathers weights before use, 1–2 gather updated parameters).
    Context parallelism (c = mesh.context) divides the TP activations by c, reduces gradients
    over context with data's, and adds its attention's collectives (`closed_form_context`).
    Expert parallelism (e = mesh.expert): `expert` is a batch axis, reduced with data, except for
    the experts' weights (`expert_param_bytes` of P, per tensor and expert shard), which are
    reduced over data × fsdp × context only; plus the MoE all-to-alls (`closed_form_expert`).
    The gradient reductions (reduce-scatter, all-reduce of P) are sent in `mesh.grad_comm_dtype`
    (P × its itemsize / the parameter itemsize); the parameter all-gathers stay in P's dtype.
    MLA without SP: `_mla_latent_units`; with SP the formula is MHA's (measured on a tiny MLA
    model at tensor=4: 4 all-gathers and 3 reduce-scatters of b·T·D per block plus all-reduces
    of about b·T·(q_lora + kv_lora + Y + 8.5): not modelled)."""
    m, M = cfg.model.resolved(), cfg.train.grad_accum
    t, z, d, c = sizes["tensor"], sizes["fsdp"], sizes["data"], sizes.get("context", 1)
    out = {k: 0.0 for k in hlo_stats.KINDS}
    if t > 1:
        b = cfg.train.batch_size // M // batch_ways(sizes)
        act = b * m.seq_len // c * m.embed_dim * np.dtype(m.compute_dtype).itemsize
        n = 4 * m.num_layers + 2 + (2 * m.num_layers if m.remat == "full" else 0)
        if cfg.mesh.sequence_parallel:
            out["all-gather"] += M * n * (t - 1) / t * act
            out["reduce-scatter"] += M * n * (t - 1) / t * act
        else:
            n -= m.num_layers * _mla_latent_units(m)[0]
            out["all-reduce"] += M * (n + m.num_layers * _mla_latent_units(m)[1]) * 2 * (t - 1) / t * act
        out["all-reduce"] += M * 3 * 2 * (t - 1) / t * b * m.seq_len // c * 4
    e = sizes.get("expert", 1)
    wire = cfg.mesh.grad_comm_dtype
    g = 1.0 if wire == "auto" else np.dtype(wire).itemsize / np.dtype(m.param_dtype).itemsize
    for nbytes, dc in ((tp_param_bytes - expert_param_bytes, d * e * c), (expert_param_bytes, d * c)):
        n = dc * z
        if cfg.mesh.zero_stage == 0 or z == 1:
            out["all-reduce"] += 2 * (n - 1) / n * nbytes * g
        else:
            out["reduce-scatter"] += (z - 1) / z * nbytes * g
            out["all-reduce"] += 2 * (dc - 1) / dc * nbytes / z * g
            out["all-gather"] += (z - 1) / z * nbytes
    for kind, wire in (*closed_form_context(cfg, sizes).items(), *expert_plan.closed_form_expert(cfg, sizes).items()):
        out[kind] += wire
    return out


def _mla_latent_units(m: Any) -> tuple[int, float]:
    """MLA under tensor parallelism without SP (measured in the compiled HLO): the backward
    all-reduces each latent's cotangent, summed over the heads of wq_b / wkv_b, instead of
    the b·T·D of x: (the all-reduces of b·T·D it drops per layer, the latent all-reduces it
    adds in units of b·T·D): with a query latent (1, (q_lora + kv_lora + Y) / D), without one (0,
    (kv_lora + Y) / D), wq's dx all-reduce staying. (0, 0) for MHA."""
    if m.attention_kind != "mla":
        return 0, 0.0
    if m.q_lora_rank:
        return 1, (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_dim) / m.embed_dim
    return 0, (m.kv_lora_rank + m.qk_rope_dim) / m.embed_dim


def closed_form_context(cfg: Config, sizes: dict[str, int]) -> dict[str, float]:
    """Wire bytes per device per step of context-parallel attention, by collective kind.

    Per layer and microbatch, with kv = b·(T/c)·(K/t)·E bytes of one local K or V block
    (compute dtype; kv32 the same in float32) and c = mesh.context:
    ring: forward (c-1) sends of K and V, backward (c-1) of K and V again plus c of the float32
    dK and dV accumulators: 4(c-1)·kv + 2c·kv32 (collective-permute, payload = wire); at c = 2
    XLA merges the backward's K/V swap with the forward's (`ring_attention`): 2·kv + 4·kv32;
    all-gather: K and V gathered forward, dK and dV reduce-scattered backward: 2·(c-1)·kv each;
    Ulysses: q, k, v and o all-to-all forward and their cotangents backward: 2·(c-1)/c·(2H + 2K)
    /K·kv. Full remat runs each forward's collectives a second time."""
    c = sizes.get("context", 1)
    out: dict[str, float] = {}
    if c == 1:
        return out
    m, M = cfg.model.resolved(), cfg.train.grad_accum
    t = sizes["tensor"]
    b = cfg.train.batch_size // M // batch_ways(sizes)
    elems = b * (m.seq_len // c) * (m.num_kv_heads // t) * m.head_dim
    kv, kv32 = elems * np.dtype(m.compute_dtype).itemsize, elems * 4
    again = 1 if m.remat == "full" else 0  # the forward's collectives once more in the backward
    kind = cfg.context_parallel.kind
    if kind == "ring":
        backward_kv = 0 if c == 2 else 2 * (c - 1) * kv  # (c = 2: merged with a forward send, measured)
        out["collective-permute"] = 2 * (c - 1) * kv * (1 + again) + backward_kv + 2 * c * kv32
    elif kind == "all-gather":
        out["all-gather"] = 2 * (c - 1) * kv * (1 + again)
        out["reduce-scatter"] = 2 * (c - 1) * kv
    else:
        per_pass = (c - 1) / c * (2 * m.num_heads + 2 * m.num_kv_heads) / m.num_kv_heads * kv
        out["all-to-all"] = per_pass * (2 + again)
    return {k: v * M * m.num_layers for k, v in out.items()}


@dataclasses.dataclass
class Plan:
    """Everything `jaxsys plan` reports for one layout; bytes are per device."""

    layout: dict[str, Any]
    memory: dict[str, float]  # measured: params, grads, optimizer, state_compiled, temp, peak
    memory_formula: dict[str, float]  # params, grads, optimizer, activations
    collectives: list[dict[str, Any]]  # by (kind, axes): count, payload_bytes, wire_bytes per step
    comm_bytes: dict[str, float]  # measured wire bytes per step by kind
    comm_formula: dict[str, float]  # closed-form wire bytes per step by kind
    flops: float  # per device per step, cost_analysis
    flops_formula: float  # 6N + attention (PaLM), per device per step
    roofline: dict[str, float]
    compile_s: float
    # model.remat and host offload (`memory_plan`): the policy compiled, each one tried by
    # model.remat=auto with its peak / temporaries, and the bytes per device offload puts on the host.
    remat: dict[str, Any] = dataclasses.field(default_factory=dict)
    offload: dict[str, float] = dataclasses.field(default_factory=dict)
    # What XLA keeps live at the memory peak, by kind (`memory_breakdown.breakdown`), and the
    # closed-form terms of the same names (`closed_form_temporaries`); bytes per device.
    temp_breakdown: dict[str, float] = dataclasses.field(default_factory=dict)
    temp_formula: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def state_bytes(self) -> float:
        return self.memory["params"] + self.memory["grads"] + self.memory["optimizer"]

    @property
    def state_formula(self) -> float:
        f = self.memory_formula
        return f["params"] + f["grads"] + f["optimizer"]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state_bytes"], d["state_formula"] = self.state_bytes, self.state_formula
        return d


def layout_name(cfg: Config) -> str:
    """`jaxsys.parallel.mesh.layout_name` of `cfg.mesh` as configured, with ZeRO stage and SP."""
    m = cfg.mesh
    return mesh_layout_name({a: getattr(m, a) for a in MESH_AXES}, m.zero_stage, m.sequence_parallel,
                            _kind_name(cfg))


def _kind_name(cfg: Config) -> str:
    cp = cfg.context_parallel
    return cp.kind + ("" if cp.load_balance else " contiguous")


def plan(cfg: Config, devices: list | None = None, accelerator: str = "h100") -> Plan:
    """Compile `cfg`'s train step for its mesh over `devices` (default: all) and report."""
    acc = get_accelerator(accelerator)  # an unknown name fails before the compile
    devices = list(devices if devices is not None else jax.devices())
    wanted = cfg
    cfg = memory_plan.offload_stand_in(cfg, devices[0].platform)
    mesh = make_mesh(cfg.mesh, devices)
    tried: list[remat_auto.Tried] = []
    if cfg.model.remat == "auto":  # chosen on the programs training compiles (scan_layers as configured)
        picked, _, tried = remat_auto.resolve(cfg, mesh)
        cfg = apply_overrides(cfg, [f"model.remat={picked.cfg.model.remat}"])
    cfg = apply_overrides(cfg, ["model.scan_layers=false"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxsys-plan-") as dump:
        s, compiled, compiled_tried = remat_auto.resolve(
            cfg, mesh, compiler_options=memory_breakdown.dump_options(dump))
        compile_s = time.perf_counter() - t0
        live_range = memory_breakdown.read_live_range(dump)
    tried = tried or compiled_tried
    sizes = dict(s.mesh.shape)

    abstract = state_lib.abstract_state(s)
    params_b = _shard_bytes(abstract.params, s.state_sharding.params)
    opt_b = _shard_bytes(abstract.opt_state, s.state_sharding.opt_state)
    grads_b = _shard_bytes(abstract.params, s.grad_sharding)
    ma = compiled.memory_analysis()
    n_dev = s.mesh.devices.size
    batch_b = 2 * cfg.train.batch_size * cfg.model.seq_len * 4 // batch_ways(sizes)
    memory = {"params": params_b, "grads": grads_b, "optimizer": opt_b,
              "state_compiled": ma.argument_size_in_bytes - batch_b,
              "temp": ma.temp_size_in_bytes,
              "peak": ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
              + ma.temp_size_in_bytes}
    n_params = count_params(s.abstract_params)
    n_active = active_params(cfg.model, s.abstract_params, s.logical_specs)
    tp_only = rules.param_shardings(s.logical_specs, s.mesh, rules.grad_rules(
        dataclasses.replace(cfg.mesh, zero_stage=0)))
    tp_param_b = _shard_bytes(abstract.params, tp_only)
    only_x = lambda tree: expert_plan.expert_leaves(tree, s.logical_specs)  # noqa: E731
    expert_tp_b = _shard_bytes(only_x(abstract.params), only_x(tp_only))
    n_expert = expert_plan.expert_params(s.abstract_params, s.logical_specs)
    memory["expert_params"] = _shard_bytes(only_x(abstract.params), only_x(s.state_sharding.params))

    hlo_text = compiled.as_text()
    rows, comm, comm_s = _collectives(hlo_text, s.mesh, acc, sizes)

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # The microbatch loop is a while loop too: its body (forward + backward) is counted once.
    flops = float(cost.get("flops", 0.0)) * cfg.train.grad_accum
    hbm = float(cost.get("bytes accessed", 0.0)) * cfg.train.grad_accum
    tokens = cfg.train.batch_size * cfg.model.seq_len
    flops_formula = flops_per_token(cfg.model, n_active) * tokens / n_dev
    bf16 = cfg.model.compute_dtype != "float32"
    est = roofline.estimate(acc, flops, hbm, comm_s, bf16)

    m = cfg.mesh
    layout = {"name": mesh_layout_name(sizes, m.zero_stage, m.sequence_parallel, _kind_name(cfg)),
              "devices": n_dev, "data": sizes["data"], "fsdp": sizes["fsdp"], "expert": sizes["expert"],
              "context": sizes["context"],
              "context_kind": cfg.context_parallel.kind if sizes["context"] > 1 else None,
              "tensor": sizes["tensor"], "zero_stage": m.zero_stage,
              "sequence_parallel": m.sequence_parallel, "grad_sync": m.grad_sync,
              "grad_comm_dtype": m.grad_comm_dtype, "platform": devices[0].platform,
              "accelerator": acc.name, "params": n_params,
              "active_params": n_active}
    formula_mem = closed_form_state(cfg, sizes, n_params, n_expert)
    formula_mem["activations"] = closed_form_activations(cfg, sizes)
    formula_mem["expert_params"] = closed_form_state(cfg, sizes, n_expert, n_expert)["params"]
    temp_formula = closed_form_temporaries(cfg, sizes, tp_param_b)
    formula_mem["temporaries"] = temp_formula["total temporaries"]
    breakdown = memory_breakdown.breakdown(live_range, hlo_text, _local_extents(cfg, sizes))
    return Plan(layout, memory, formula_mem, rows, comm, closed_form_comm(cfg, sizes, tp_param_b, expert_tp_b),
                flops, flops_formula, est, compile_s, *memory_plan.memory_moves(wanted, s, compiled, tried, sizes),
                breakdown, temp_formula)


def _collectives(hlo_text: str, mesh: Any, acc: Any, sizes: dict[str, int]
                 ) -> tuple[list[dict[str, Any]], dict[str, float], float]:
    """The compiled program's collectives: (rows by kind and mesh axes, wire bytes per step by
    kind, seconds on the accelerator's links per the roofline)."""
    comm = {k: 0.0 for k in hlo_stats.KINDS}
    comm_s = 0.0
    rows = []
    for (kind, axes), row in hlo_stats.summarize(hlo_stats.collectives(hlo_text, mesh)).items():
        comm[kind] += row["wire_bytes"]
        comm_s += row["wire_bytes"] / roofline.link_bandwidth(acc, axes, sizes, MESH_AXES)
        rows.append({"kind": kind, "axes": list(axes), **row})
    return rows, comm, comm_s


def _local_extents(cfg: Config, sizes: dict[str, int]) -> dict[str, int]:
    """This device's vocabulary, embedding, query and key extents, as `memory_breakdown` sorts by."""
    m = cfg.model.resolved()
    return {"vocab": m.vocab_size // sizes["tensor"], "embed": m.embed_dim,
            "seq": m.seq_len // sizes.get("context", 1), "kv_seq": m.seq_len}


def long_sequence(cfg: Config) -> bool:
    """Is the sequence long enough for `search` to consider context parallelism? When a layer's
    saved attention probabilities (H·T² per sequence) outweigh its other activations (T·D·(4 +
    A), `closed_form_activations`): then T, not the width, is what memory scales with."""
    m = cfg.model.resolved()
    return m.num_heads * m.seq_len > m.embed_dim * (4 + width_units(m))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(n_devices: int, cfg: Config) -> list[list[str]]:
    """Every data × fsdp × tensor (× ZeRO stage when fsdp > 1, × SP when tensor > 1) for N; for
    a `long_sequence`, also every context > 1 with each context-parallel kind (without SP)."""
    contexts = _divisors(n_devices) if long_sequence(cfg) else [1]
    out = []
    for c in contexts:
        for t in _divisors(n_devices // c):
            for z in _divisors(n_devices // c // t):
                d = n_devices // c // t // z
                for stage in ((0, 1, 2, 3) if z > 1 else (cfg.mesh.zero_stage,)):
                    for sp in ((False, True) if t > 1 and c == 1 else (False,)):
                        for kind in (context_lib.KINDS if c > 1 else (cfg.context_parallel.kind,)):
                            out.append([f"mesh.data={d}", f"mesh.fsdp={z}", f"mesh.tensor={t}",
                                        f"mesh.context={c}", f"context_parallel.kind={kind}",
                                        f"mesh.zero_stage={stage}", f"mesh.sequence_parallel={sp}"])
    return out


def search(cfg: Config, devices: list | None = None, accelerator: str = "h100",
           memory_budget: float | None = None,
           progress: Callable[[str], None] | None = None) -> tuple[list[Plan], list[tuple[str, str]]]:
    """Plan every valid layout; drop those whose peak bytes exceed `memory_budget` (default: the
    accelerator's memory); rank by estimated step time. `progress` gets one line per layout
    before it compiles. Returns (ranked plans, rejected (layout, reason))."""
    devices = list(devices if devices is not None else jax.devices())
    if memory_budget is not None and not memory_budget > 0:
        raise ConfigError(f"The memory budget must be > 0 bytes, got {memory_budget}.")
    budget = memory_budget if memory_budget is not None else get_accelerator(accelerator).memory_bytes
    plans, rejected = [], []
    candidates = candidate_layouts(len(devices), cfg)
    for i, overrides in enumerate(candidates, 1):
        c = apply_overrides(cfg, overrides)
        if progress is not None:
            progress(f"planning {i}/{len(candidates)}: {layout_name(c)} ...")
        try:
            plans.append(plan(c, devices, accelerator))
        except ConfigError as e:
            rejected.append((layout_name(c), str(e)))
    kept, over = rank(plans, budget)
    return kept, rejected + over


def rank(plans: list[Plan], budget: float) -> tuple[list[Plan], list[tuple[str, str]]]:
    """Plans whose peak bytes fit `budget`, fastest estimated step first; and the rest, with why."""
    kept = sorted((p for p in plans if p.memory["peak"] <= budget), key=lambda p: p.roofline["step_s"])
    over = [(p.layout["name"], f"peak {p.memory['peak'] / 2**20:.3f} MiB > budget {budget / 2**20:.3f} MiB")
            for p in plans if p.memory["peak"] > budget]
    return kept, over


# ----------------------------------------------------------------------------- formatting


def _mib(x: float) -> str:
    return f"{x / 2**20:.3f}"


def format_plan(p: Plan) -> str:
    """A readable report: memory and communication beside their closed forms, roofline."""
    active = p.layout.get("active_params", p.layout["params"])
    params = f"{p.layout['params']:,} parameters" + (f", {active:,} active per token" if active != p.layout["params"] else "")
    wire = p.layout.get("grad_comm_dtype", "auto")
    lines = [f"layout: {p.layout['name']} on {p.layout['devices']} devices, grad_sync "
             f"{p.layout.get('grad_sync', '?')}{'' if wire == 'auto' else f' (gradients sent in {wire})'} "
             f"({params}; compiled in {p.compile_s:.1f} s)", "",
             "memory per device (MiB)      compiled    formula"]
    for key in ("params", "grads", "optimizer"):
        lines.append(f"  {key:<26} {_mib(p.memory[key]):>9}  {_mib(p.memory_formula[key]):>9}")
    lines.append(f"  {'params+grads+optimizer':<26} {_mib(p.state_bytes):>9}  {_mib(p.state_formula):>9}")
    if p.memory.get("expert_params"):
        lines.append(f"  {'  of params: experts':<26} {_mib(p.memory['expert_params']):>9}  "
                     f"{_mib(p.memory_formula['expert_params']):>9}  (split over expert={p.layout['expert']})")
    if "temporaries" in p.memory_formula:
        lines.append(f"  {'temporaries (XLA temp)':<26} {_mib(p.memory['temp']):>9}  "
                     f"{_mib(p.memory_formula['temporaries']):>9}  "
                     f"({p.memory['temp'] / max(p.memory_formula['temporaries'], 1):.2f}x the formula)")
    else:
        lines.append(f"  {'temporaries (XLA temp)':<26} {_mib(p.memory['temp']):>9}  "
                     f"{_mib(p.memory_formula['activations']):>9}  (formula: activations only)")
    lines.append(f"  {'peak':<26} {_mib(p.memory['peak']):>9}")
    lines += memory_plan.format_memory_moves(p.remat, p.offload)
    if p.temp_breakdown:
        lines += [""] + memory_breakdown.format_breakdown(p.temp_breakdown, p.temp_formula)
    lines += ["", "collectives per step          axes            count   wire MiB"]
    for r in p.collectives:
        lines.append(f"  {r['kind']:<26} {','.join(r['axes']) or '-':<14} {r['count']:>7}  "
                     f"{_mib(r['wire_bytes']):>9}")
    lines += ["", "wire bytes per step by kind    compiled    formula"]
    for k in hlo_stats.KINDS:
        if p.comm_bytes[k] or p.comm_formula[k]:
            lines.append(f"  {k:<26} {_mib(p.comm_bytes[k]):>9}  {_mib(p.comm_formula[k]):>9}")
    lines.append(f"  {'total':<26} {_mib(sum(p.comm_bytes.values())):>9}  "
                 f"{_mib(sum(p.comm_formula.values())):>9}")
    if wire in ("bfloat16", "float16") and p.layout.get("platform") == "cpu":
        lines.append(f"  (XLA:CPU runs {wire} reductions in float32: the compiled bytes are float32's;"
                     " the formula is what a GPU/TPU sends)")
    r = p.roofline
    lines += ["", f"FLOPs per device per step: {p.flops:.4g} (cost analysis), "
                  f"{p.flops_formula:.4g} (6N + attention)",
              f"roofline on {p.layout['accelerator']}: compute {r['compute_s'] * 1e3:.3f} ms, "
              f"memory {r['memory_s'] * 1e3:.3f} ms, communication {r['comm_s'] * 1e3:.3f} ms -> "
              f"step {r['step_s'] * 1e3:.3f} ms ({r['step_overlapped_s'] * 1e3:.3f} ms if fully overlapped)"]
    return "\n".join(lines)


def _same_program_key(p: Plan) -> tuple:
    """What a search row shows, plus the collectives (kind, count, bytes; their axes are named
    apart): layouts equal in all of it are one row (fsdp=N with ZeRO stage 0 shards nothing over
    fsdp: it compiles to what data=N does, over an axis of another name)."""
    return (p.layout["devices"], p.memory["params"], p.memory["grads"], p.memory["optimizer"],
            p.memory["peak"], tuple(sorted(p.comm_bytes.items())), p.flops, p.roofline["step_s"],
            tuple(sorted((r["kind"], r["count"], r["wire_bytes"]) for r in p.collectives)))  # axes named apart


def format_search(plans: list[Plan], rejected: list[tuple[str, str]]) -> str:
    rows: dict[tuple, list[Plan]] = {}
    for p in plans:  # ranked order is kept: a group sits where its first member ranked
        rows.setdefault(_same_program_key(p), []).append(p)
    width = max([30] + [len(" = ".join(q.layout["name"] for q in g)) for g in rows.values()])
    lines = [f"{'rank':>4}  {'layout':<{width}} {'state MiB':>10} {'peak MiB':>10} {'comm MiB':>10} "
             f"{'step ms':>9}"]
    for i, group in enumerate(rows.values(), 1):
        p, name = group[0], " = ".join(q.layout["name"] for q in group)
        lines.append(f"{i:>4}  {name:<{width}} {_mib(p.state_bytes):>10} "
                     f"{_mib(p.memory['peak']):>10} {_mib(sum(p.comm_bytes.values())):>10} "
                     f"{p.roofline['step_s'] * 1e3:>9.4g}")
    if any(len(g) > 1 for g in rows.values()):
        lines.append("(a = b: the same per-device memory, collectives and step time)")
    if rejected:
        lines += ["", "rejected:"] + [f"  {name}: {why}" for name, why in rejected]
    return "\n".join(lines)
