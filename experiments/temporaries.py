"""Where the temporaries go: XLA's compiled temporaries of every layout of the gpt2-small table
(`experiments/parallel_layouts.py`) beside the planner's extended formula
(`planner.closed_form_temporaries`), without and with the vocabulary-tiled cross-entropy
(`model.loss_vocab_tiles`), and what is live at the memory peak by kind (`memory_breakdown`).

Compile only (nothing runs): each layout is compiled once per loss setting, ~40–90 s each on
the shared 2-core machine.

    python experiments/temporaries.py                       # every layout, tiles 0 and 6
    python experiments/temporaries.py --layouts 0 3 --tiles 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from jaxsys.parallel.runtime import simulate_cpu_devices  # imports no jax  # noqa: E402

MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--plan", nargs="*", default=["train.batch_size=8"])
    ap.add_argument("--tiles", nargs="*", type=int, default=[0, 6], help="model.loss_vocab_tiles values")
    ap.add_argument("--layouts", nargs="*", type=int, default=None, help="indices into LAYOUTS (default all)")
    ap.add_argument("--json", default=None, help="also write every plan's memory numbers here")
    ap.add_argument("--formula-only", action="store_true",
                    help="print the extended formula's total per layout and loss setting; compile nothing")
    args = ap.parse_args()
    simulate_cpu_devices(8)
    from parallel_layouts import LAYOUTS

    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import get_preset
    from jaxsys.tools import memory_breakdown, planner

    picked = [LAYOUTS[i] for i in (args.layouts if args.layouts is not None else range(len(LAYOUTS)))]
    if args.formula_only:
        return print_formulas(args, picked)
    kinds = memory_breakdown.KINDS
    print("| layout | loss_vocab_tiles | temp MiB | formula MiB | temp / formula | "
          + " | ".join(f"{k} (live / formula)" for k in kinds) + " |")
    print("|---" * (5 + len(kinds)) + "|")
    records = []
    for name, overrides in picked:
        for tiles in args.tiles:
            cfg = apply_overrides(get_preset(args.preset), [*args.plan, *overrides, f"model.loss_vocab_tiles={tiles}"])
            p = planner.plan(cfg)
            f, b = p.temp_formula, p.temp_breakdown
            cells = [f"{b.get(k, 0) / MiB:.0f} / {f.get(k, 0) / MiB:.0f}" for k in kinds]
            print(f"| {name} | {tiles} | {p.memory['temp'] / MiB:.0f} | {f['total temporaries'] / MiB:.0f} | "
                  f"{p.memory['temp'] / f['total temporaries']:.2f} | " + " | ".join(cells) + " |", flush=True)
            records.append({"layout": name, "loss_vocab_tiles": tiles, "temp": p.memory["temp"],
                            "compile_s": p.compile_s, "formula": f, "breakdown": b})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)


def print_formulas(args: argparse.Namespace, picked: list) -> None:
    """The extended formula per layout and tiling, from shapes alone (no compile)."""
    import jax

    from jaxsys.config import apply_overrides
    from jaxsys.config.presets import get_preset
    from jaxsys.parallel.mesh import make_mesh
    from jaxsys.tools import planner
    from jaxsys.train import state as state_lib

    print("| layout | loss_vocab_tiles | activations formula (old) MiB | extended formula MiB |")
    print("|---|---|---|---|")
    for name, overrides in picked:
        for tiles in args.tiles:
            cfg = apply_overrides(get_preset(args.preset), [*args.plan, *overrides, f"model.loss_vocab_tiles={tiles}"])
            s = state_lib.setup(cfg, make_mesh(cfg.mesh, jax.devices()))
            sizes = dict(s.mesh.shape)
            tp_only = planner.rules.param_shardings(s.logical_specs, s.mesh, planner.rules.grad_rules(
                planner.dataclasses.replace(cfg.mesh, zero_stage=0)))
            tp_b = planner._shard_bytes(state_lib.abstract_state(s).params, tp_only)
            f = planner.closed_form_temporaries(cfg, sizes, tp_b)
            print(f"| {name} | {tiles} | {planner.closed_form_activations(cfg, sizes) / MiB:.0f} | "
                  f"{f['total temporaries'] / MiB:.0f} |", flush=True)


if __name__ == "__main__":
    main()
