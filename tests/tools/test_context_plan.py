"""The planner under context parallelism: every kind's collectives in the compiled step equal
their closed forms (`planner.closed_form_context`) within 5%, gradients are reduced over
data × context in one all-reduce, and `search` considers context for a long sequence."""

import jax
import pytest

from jaxsys.config import apply_overrides
from jaxsys.tools import planner
from tests.helpers import tiny_cfg

LLAMA = ("model.family=llama", "model.num_kv_heads=4")
CASES = [
    ("ring", ("mesh.data=2", "mesh.context=4"), ()),
    ("all-gather", ("mesh.context=2", "mesh.tensor=2", "mesh.fsdp=2"), LLAMA),
    ("ulysses", ("mesh.context=8",), ("model.remat=full", "train.grad_accum=2")),
    ("ring", ("mesh.context=2", "mesh.tensor=2", "mesh.fsdp=2"), LLAMA),  # c = 2: one merged send
    ("ring", ("mesh.context=8",), ("model.remat=full",)),
    ("all-gather", ("mesh.data=2", "mesh.context=4"), ()),
    ("ulysses", ("mesh.context=2", "mesh.tensor=2", "mesh.fsdp=2"), LLAMA),
]
KIND_COLLECTIVES = {"ring": ("collective-permute",), "all-gather": ("all-gather", "reduce-scatter"),
                    "ulysses": ("all-to-all",)}


@pytest.mark.parametrize("kind,mesh,model", [
    pytest.param(*c, marks=pytest.mark.slow if i >= 3 else ()) for i, c in enumerate(CASES)])
def test_context_collectives_equal_their_closed_forms(kind, mesh, model):
    cfg = tiny_cfg("mesh.data=1", "train.batch_size=8", "model.num_heads=8", "model.seq_len=64",
                   f"context_parallel.kind={kind}", *mesh, *model)
    p = planner.plan(cfg, jax.devices()[:8])
    assert f" {kind}" in p.layout["name"] and p.layout["context"] > 1
    context_rows = {r["kind"]: r["wire_bytes"] for r in p.collectives if r["axes"] == ["context"]}
    for coll in KIND_COLLECTIVES[kind]:
        formula = planner.closed_form_context(cfg, {**p.layout, "pipe": 1})[coll]
        assert formula > 0 and abs(context_rows[coll] - formula) <= 0.05 * formula, (coll, context_rows, formula)
    # Over context only the kind's own collectives, and the gradients' all-reduce (with data's
    # when data > 1: one all-reduce over both); every kind's total equals the closed form.
    assert set(context_rows) <= set(KIND_COLLECTIVES[kind]) | {"all-reduce"}
    reduce_axes = [tuple(r["axes"]) for r in p.collectives if r["kind"] == "all-reduce" and r["wire_bytes"]]
    assert any("context" in axes for axes in reduce_axes)
    for coll, formula in p.comm_formula.items():
        if coll != "all-reduce" or "model.remat=full" not in model:  # (TP under remat: see planner)
            assert abs(p.comm_bytes[coll] - formula) <= 0.05 * max(formula, 1.0), (coll, p.comm_bytes, p.comm_formula)


def test_search_considers_context_only_for_a_long_sequence():
    short = tiny_cfg()
    long = tiny_cfg("model.seq_len=256", "model.embed_dim=32", "model.num_heads=4")
    assert not planner.long_sequence(short) and planner.long_sequence(long)
    assert all("mesh.context=1" in o for o in planner.candidate_layouts(8, short))
    names = {planner.layout_name(apply_overrides(long, o)) for o in planner.candidate_layouts(8, long)}
    for kind in ("ring", "all-gather", "ulysses"):
        assert f"context=8 {kind}" in names and f"data=2 × context=4 {kind}" in names
    assert not any("sp" in n.split() and "context" in n for n in names)  # SP is not combined with context


@pytest.mark.slow
def test_search_ranks_context_layouts_for_a_long_sequence():
    cfg = tiny_cfg("model.num_layers=1", "model.seq_len=256", "train.batch_size=2")
    plans, rejected = planner.search(cfg, jax.devices()[:2])
    names = [p.layout["name"] for p in plans]
    assert {"context=2 ring", "context=2 all-gather", "context=2 ulysses", "data=2"} <= set(names)
    # The ring keeps no attention probabilities: less memory per device than data parallelism
    # with the whole sequence on every device.
    by = {p.layout["name"]: p for p in plans}
    assert by["context=2 ring"].memory["temp"] < by["data=2"].memory["temp"]
