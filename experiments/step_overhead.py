"""The toolkit's own cost per train step: jaxsys's compiled step against a minimal hand-written
one (plain Flax apply + Optax AdamW, the same model, batch and optimizer settings).

Both steps are jitted with the state donated and run on the same batches. They are timed in
alternating blocks (`--rounds` × `--block` steps each, a block of A then a block of B, the order
flipped every round), so machine drift hits both alike; the table shows each round's median step
time and the median of the per-round ratios.

    python experiments/step_overhead.py                       # shakespeare preset, 1 CPU device
    python experiments/step_overhead.py --rounds 9 --block 50
    python experiments/step_overhead.py --preset tiny train.batch_size=8

What the jaxsys step does beyond the plain one: `optax.apply_if_finite` around AdamW (a skipped
step on non-finite gradients), the metrics it returns (loss, global gradient norm, lr, skip
counters), and the mask-aware loss. The plain step returns only the loss.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="shakespeare")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block", type=int, default=40, help="steps per timed block")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import optax

    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import get_preset
    from jaxsys.data import batches as batches_lib
    from jaxsys.data.corpus import load_corpus
    from jaxsys.model.transformer import Transformer
    from jaxsys.parallel.mesh import make_mesh
    from jaxsys.train import state as state_lib, step as step_lib
    from jaxsys.train.optimizer import decay_mask

    cfg = apply_overrides(get_preset(args.preset), [*args.overrides, "mesh.data=1"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    s = state_lib.setup(cfg, mesh)
    corpus = load_corpus(cfg.data)
    batches = [batches_lib.global_batch(corpus.train, cfg.train.seed, i, "train", cfg.train.batch_size,
                                        cfg.model.seq_len, s.batch_sharding) for i in range(args.block)]

    # jaxsys: the step `jaxsys train` runs.
    jaxsys_step = step_lib.compile_train_step(s)
    jaxsys_state = state_lib.init_state(s, cfg.train.seed)

    # Hand-written: the same model and optimizer, nothing else.
    model = Transformer(cfg.model)
    o = cfg.optimizer
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(s.lr_schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                 mask=lambda p: decay_mask(p, o.decay_embeddings)))

    def plain_step(state, batch):
        params, opt_state = state

        def loss_fn(p):
            logits = model.apply({"params": p}, batch["inputs"])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), batch["targets"]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    params = jax.tree_util.tree_map(jnp.copy, jaxsys_state.params)
    plain = jax.jit(plain_step, donate_argnums=0).lower((params, tx.init(params)), batches[0]).compile()
    plain_state = (params, tx.init(params))

    def run_jaxsys() -> float:
        nonlocal jaxsys_state
        t = time.perf_counter()
        for b in batches:
            jaxsys_state, m = jaxsys_step(jaxsys_state, b)
        jax.block_until_ready(m["loss"])
        return (time.perf_counter() - t) / len(batches)

    def run_plain() -> float:
        nonlocal plain_state
        t = time.perf_counter()
        for b in batches:
            plain_state, loss = plain(plain_state, b)
        jax.block_until_ready(loss)
        return (time.perf_counter() - t) / len(batches)

    run_jaxsys(), run_plain()  # warm-up
    print(f"jax {jax.__version__} | {jax.devices()[0].device_kind} | preset {args.preset} | "
          f"batch {cfg.train.batch_size}×{cfg.model.seq_len} | {args.rounds} rounds × {args.block} steps")
    print(f"{'round':>5} {'plain ms':>9} {'jaxsys ms':>9} {'ratio':>7}")
    ratios = []
    for r in range(args.rounds):
        if r % 2:
            j, p = run_jaxsys(), run_plain()
        else:
            p, j = run_plain(), run_jaxsys()
        ratios.append(j / p)
        print(f"{r:>5} {p * 1e3:>9.2f} {j * 1e3:>9.2f} {j / p:>7.3f}", flush=True)
    print(f"median ratio jaxsys / plain: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
