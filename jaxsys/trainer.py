"""The host training loop: data, compiled step, progress, eval, metrics, checkpoints, sample.

Everything on the device happens in the compiled `train_step`; this loop only feeds batches
and reads metrics one step late (after the next step is dispatched), so the host never waits
for the device except at log, eval and checkpoint steps.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsys import checkpoint as ckpt
from jaxsys import config as config_lib
from jaxsys import data as data_lib
from jaxsys import rollback as rollback_lib
from jaxsys import sharding as shd
from jaxsys import train_step as ts
from jaxsys.config import Config, ConfigError
from jaxsys.metrics import MetricWriter, peak_flops
from jaxsys.model import count_params, flops_per_token
from jaxsys.preemption import StopRequest
from jaxsys.sampling import generate


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message says what to change."""


@dataclass
class TrainResult:
    final_step: int
    start_step: int
    train_loss: float
    val_loss: float
    compile_seconds: float
    train_seconds: float  # wall time of the step loop, excluding compile
    tokens_per_sec: float
    num_params: int
    losses: list[float] = field(default_factory=list)  # every step's loss, this invocation
    sample: str = ""
    state: Any = None
    stopped_by: str = ""  # "SIGTERM"/"SIGINT" when a signal ended the run early (checkpoint saved)


def _is_main() -> bool:
    return jax.process_index() == 0


def _log(msg: str) -> None:
    if _is_main():
        print(msg, flush=True)


def _check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Fail early on an unwritable run dir or a resume with a different model."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: they share run_dir
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir={str(run_dir)!r} is not writable ({e.strerror}); choose another run_dir.") from None
    ckpt_dir = run_dir / "checkpoints"
    has_checkpoints = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if has_checkpoints and not cfg.checkpoint.resume:
        # Orbax would silently skip saves at steps it already has; never overwrite or mix runs.
        raise ConfigError(
            f"run_dir={str(run_dir)!r} already holds checkpoints and checkpoint.resume=false. Use a "
            f"new run_dir, or delete {ckpt_dir} yourself to start over."
        )
    saved = run_dir / "config.json"
    if has_checkpoints and saved.exists():
        old, new = json.loads(saved.read_text()), config_lib.to_dict(cfg)
        keys = [("model", k) for k in ("family", "vocab_size", "seq_len", "num_layers", "embed_dim",
                                       "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                                       "scan_layers", "param_dtype")]
        keys += [("data", "source"), ("data", "tokenizer")]
        for section, key in keys:
            before = old.get(section, {}).get(key, new[section][key])
            if before != new[section][key]:
                raise ConfigError(
                    f"run_dir={str(run_dir)!r} holds checkpoints of a run with {section}.{key}={before!r}, "
                    f"but this run has {section}.{key}={new[section][key]!r}. Use a new run_dir."
                )


def _check_corpus(cfg: Config, corpus: data_lib.Corpus) -> None:
    """Data problems that would otherwise surface mid-run (or as a NaN loss)."""
    m = cfg.model
    if corpus.tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"{corpus.tokenizer.vocab_size}; set model.vocab_size={corpus.tokenizer.vocab_size}.")
    top = int(max(corpus.train.max(), corpus.val.max()))
    if top >= m.vocab_size:
        raise ConfigError(f"data.source={cfg.data.source!r} contains token id {top}, but "
                          f"model.vocab_size={m.vocab_size}; set model.vocab_size above {top}.")
    for split, tokens in (("train", corpus.train), ("validation", corpus.val)):
        if len(tokens) < m.seq_len + 2:
            raise ConfigError(
                f"The {split} split has {len(tokens)} tokens, fewer than model.seq_len+2={m.seq_len + 2}; "
                "use more data, a shorter model.seq_len, or another data.val_fraction."
            )
    if cfg.logging.sample_tokens > 0:
        try:
            corpus.tokenizer.encode(cfg.logging.sample_prompt)
        except ValueError as e:
            raise ConfigError(f"logging.sample_prompt={cfg.logging.sample_prompt!r}: {e}.") from None


def val_batches(corpus: data_lib.Corpus, cfg: Config, sharding: jax.sharding.Sharding,
                num_batches: int) -> list[dict[str, jax.Array]]:
    """The fixed validation batches (the same ones at every eval), already on the devices."""
    return [data_lib.global_batch(corpus.val, cfg.train.seed, i, "val", cfg.train.batch_size,
                                  cfg.model.seq_len, sharding) for i in range(num_batches)]


def evaluate(eval_step: Any, params: Any, batches: list[dict[str, jax.Array]]) -> float:
    """Mean loss over `batches`, one batch at a time.

    Not all dispatched at once: XLA:CPU runs independent multi-device programs concurrently on
    a small thread pool, and two programs whose all-reduces each hold one device's thread while
    waiting for the other device can deadlock (measured: `jaxsys train --devices 2` aborted in
    its final eval, after XLA's 40 s rendezvous timeout)."""
    return sum(float(eval_step(params, b)) for b in batches) / len(batches)


def _rollback_target(cfg: Config, run_dir: Path, manager: Any, failed_step: int,
                     rollbacks: list[dict[str, int]]) -> int:
    """Choose (and prepare) the checkpoint to roll back to after the streak ending at `failed_step`:
    the newest good one from before the streak. Newer checkpoints belong to the abandoned timeline
    and are moved to `rejected_checkpoints/`. Raises `TrainingError` when none is left."""
    k = cfg.train.max_consecutive_skips
    manager.wait_until_finished()
    ckpt.write_missing_manifests(run_dir)
    if len(rollbacks) >= cfg.train.max_rollbacks:
        raise TrainingError(
            f"{k} steps in a row up to step {failed_step} had a non-finite loss or gradients, and "
            f"this run_dir already rolled back {len(rollbacks)} times (train.max_rollbacks="
            f"{cfg.train.max_rollbacks}; see {run_dir / rollback_lib.LOG}). Lower optimizer.lr or "
            "check the data.")
    target, _ = ckpt.select_resume_step(run_dir, _log, below=failed_step - k + 1)
    if target is None:
        raise TrainingError(f"{k} steps in a row up to step {failed_step} had a non-finite loss or "
                            f"gradients and no checkpoint from before step {failed_step - k + 1} is "
                            "left to roll back to. Lower optimizer.lr or save checkpoints more often.")
    if _is_main():
        for step in sorted(ckpt.step_dirs(run_dir)):
            if step > target:
                ckpt.reject(run_dir, step, f"abandoned by the rollback from step {failed_step} to {target}")
    ckpt._sync("jaxsys_rollback")
    manager.reload()
    return target


def train(cfg: Config, devices: list | None = None) -> TrainResult:
    """Run (or resume) the training described by `cfg`; returns a `TrainResult`."""
    config_lib.validate(cfg)
    corpus = data_lib.load_corpus(cfg.data)
    _check_corpus(cfg, corpus)
    mesh = shd.make_mesh(cfg.mesh, devices)
    s = ts.setup(cfg, mesh)
    run_dir = Path(cfg.run_dir)
    _check_run_dir(run_dir, cfg)
    target = shd.with_shardings(ts.abstract_state(s), s.state_sharding)
    if cfg.checkpoint.every > 0:
        ckpt.check_free_space(run_dir, ckpt.state_bytes(target), cfg.checkpoint.keep)
    if _is_main():
        (run_dir / "config.json").write_text(config_lib.to_json(cfg))
        (run_dir / "tokenizer.json").write_text(json.dumps(corpus.tokenizer.to_json()))

    num_params = count_params(s.abstract_params)
    layout = " × ".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device"
    procs = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    _log(f"jaxsys: {cfg.preset or 'custom'} | {cfg.model.family} {num_params / 1e6:.2f}M params | "
         f"mesh {layout} ({mesh.devices.size} × {mesh.devices.flat[0].platform}{procs}) | "
         f"batch {cfg.train.batch_size}×{cfg.model.seq_len} tokens | run_dir {run_dir}")

    manager, start_step, resume_step = None, 0, None
    if cfg.checkpoint.every > 0:
        if cfg.checkpoint.resume and ckpt.step_dirs(run_dir):
            # Unusable newest steps (incomplete, truncated, bit-flipped) are set aside, loudly.
            resume_step, _ = ckpt.select_resume_step(run_dir, _log)
            if resume_step is None:
                _log(f"No usable checkpoint left in {run_dir / 'checkpoints'}: starting from step 0.")
        manager = ckpt.make_manager(run_dir, cfg.checkpoint)
    if resume_step is not None:
        ckpt.check_compatible(manager, resume_step, target)  # names the parameter and both shapes
        start_step, state = ckpt.restore(manager, target, resume_step)
        _log(f"Resumed from checkpoint step {start_step} in {run_dir / 'checkpoints'}")
    else:
        state = ts.init_state(s, cfg.train.seed)

    t0 = time.perf_counter()
    step_fn = ts.compile_train_step(s)
    eval_fn = ts.compile_eval_step(s, cfg.train.batch_size)
    compile_seconds = time.perf_counter() - t0
    _log(f"Compiled train and eval steps in {compile_seconds:.1f}s")
    val_data = val_batches(corpus, cfg, s.batch_sharding, cfg.train.eval_batches)

    rollbacks = rollback_lib.load(run_dir)
    poisoned = set(cfg.train.nan_batches)
    bad_tokens: list[np.ndarray] = []  # testing aid: out-of-range ids make the embedding NaN

    def train_batch(step: int) -> dict[str, jax.Array]:
        index = rollback_lib.batch_index(rollbacks, step)
        tokens = corpus.train
        if index in poisoned:
            bad_tokens[:] = bad_tokens or [np.full(len(tokens), cfg.model.vocab_size, np.int32)]
            tokens = bad_tokens[0]
        return data_lib.global_batch(tokens, cfg.train.seed, index, "train", cfg.train.batch_size,
                                     cfg.model.seq_len, s.batch_sharding)

    writer = MetricWriter(run_dir, cfg.logging.tensorboard) if _is_main() else None
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    fpt = flops_per_token(cfg.model, num_params)
    peak = peak_flops(mesh.devices.flat[0].device_kind)

    bar = None
    if cfg.logging.progress and _is_main() and start_step < cfg.train.steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True,
                   mininterval=1.0)

    losses: list[float] = []
    pending: list[tuple[int, dict]] = []  # metrics not yet read back, oldest first
    window_start, window_step = time.perf_counter(), start_step
    loop_start = time.perf_counter()
    last_loss, val_loss, tok_s = float("nan"), float("nan"), 0.0
    consecutive_skips = 0
    failed_step = 0  # set when a streak of skips asks for a rollback
    manifests_due = False  # a save was started whose manifest is not written yet

    def drain(keep: int) -> None:
        """Read back all but the newest `keep` pending metrics; log those on log steps."""
        nonlocal last_loss, window_start, window_step, tok_s, consecutive_skips, failed_step
        while len(pending) > keep and not failed_step:
            step_done, m = pending.pop(0)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            last_loss = m["loss"]
            losses.append(last_loss)
            consecutive_skips = consecutive_skips + 1 if m["skipped"] else 0
            if m["skipped"]:
                _log(f"step {step_done}: loss {last_loss}, gradient norm {m['grad_norm']}: update "
                     f"skipped ({consecutive_skips} in a row, {int(m['skipped_total'])} in all)")
            if consecutive_skips >= cfg.train.max_consecutive_skips and cfg.train.on_nan == "rollback":
                failed_step = step_done  # the loop rolls back; later pending steps are discarded
            elif consecutive_skips >= cfg.train.max_consecutive_skips:
                saved = manager.latest_step() if manager is not None else None
                raise TrainingError(
                    f"{consecutive_skips} steps in a row up to step {step_done} had a non-finite loss "
                    f"or gradients (last loss {last_loss}); stopping (train.max_consecutive_skips="
                    f"{cfg.train.max_consecutive_skips}). Lower optimizer.lr or raise "
                    f"schedule.warmup_steps, or set train.on_nan=rollback. Last good checkpoint: "
                    f"{f'step {saved} in {run_dir}/checkpoints (untouched)' if saved is not None else 'none'}."
                )
            if writer is not None:
                if step_done % cfg.train.log_every == 0 or step_done == cfg.train.steps:
                    now = time.perf_counter()
                    tok_s = (step_done - window_step) * tokens_per_step / max(now - window_start, 1e-9)
                    window_start, window_step = now, step_done
                    m["tokens_per_sec"] = tok_s
                    if peak:
                        m["mfu"] = fpt * tok_s / (peak * mesh.devices.size)
                    writer.write(step_done, m)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)

    with StopRequest(_log) as stop:  # SIGTERM/SIGINT: stop after this step, with a checkpoint
        stopped_by = ""
        try:
            step = start_step
            while step < cfg.train.steps:
                state, metrics = step_fn(state, train_batch(step))
                done = step + 1
                pending.append((done, metrics))
                drain(keep=1)  # read the previous step's metrics while this one runs
                stopped_by = stop.agreed()
                is_eval = cfg.train.eval_every > 0 and done % cfg.train.eval_every == 0
                is_save = manager is not None and (done % cfg.checkpoint.every == 0
                                                   or done == cfg.train.steps or stopped_by)
                if is_eval or is_save or done == cfg.train.steps:
                    drain(keep=0)  # a step is checked finite before it becomes a checkpoint
                if failed_step:
                    step = _rollback_target(cfg, run_dir, manager, failed_step, rollbacks)
                    entry = rollback_lib.record(run_dir, rollbacks, step, failed_step)
                    _, state = ckpt.restore(manager, target, step)
                    _log(f"Rolled back from step {failed_step} to checkpoint step {step}; continuing with "
                         f"batch {entry['data_index']}, after the bad ones (rollback {len(rollbacks)} of "
                         f"at most {cfg.train.max_rollbacks}).")
                    pending.clear()
                    failed_step, consecutive_skips, manifests_due = 0, 0, False
                    if bar is not None:
                        bar.n = step
                    continue
                step = done
                if bar is not None:
                    bar.update(1)
                if is_eval or done == cfg.train.steps:
                    val_loss = evaluate(eval_fn, state.params, val_data)
                    if writer is not None:
                        writer.write(done, {"val_loss": val_loss})
                    if bar is not None:
                        bar.write(f"step {done}: train loss {last_loss:.4f}, val loss {val_loss:.4f}")
                    else:
                        _log(f"step {done}: train loss {last_loss:.4f}, val loss {val_loss:.4f}")
                if manifests_due and (is_save or not manager.is_saving_in_progress()):
                    manager.wait_until_finished()  # a new save would wait for it anyway
                    ckpt.write_missing_manifests(run_dir)  # the previous save is finalised
                    manifests_due = False
                if is_save:
                    ckpt.save(manager, done, state)
                    manifests_due = True
                if stopped_by:
                    break
            drain(keep=0)
            if start_step >= cfg.train.steps:
                _log(f"Nothing to train: {run_dir} is already at step {start_step} (train.steps="
                     f"{cfg.train.steps}). Raise train.steps to continue, or use a new run_dir.")
                val_loss = evaluate(eval_fn, state.params, val_data)
        finally:  # also on errors: let started saves finish so they are never half-written
            if bar is not None:
                bar.close()
            if manager is not None:
                manager.wait_until_finished()
                ckpt.write_missing_manifests(run_dir)  # written last: a step without one is incomplete
                manager.close()
            if writer is not None:
                writer.close()
    train_seconds = time.perf_counter() - loop_start

    if stopped_by:
        final = int(jax.device_get(state.step))
        where = (f"checkpoint step {final} saved in {run_dir / 'checkpoints'}" if manager is not None
                 else "no checkpoint (checkpoint.every=0)")
        _log(f"Stopped by {stopped_by} after step {final}: {where}. "
             "Run the same command again to resume.")
        return TrainResult(final_step=final, start_step=start_step, train_loss=last_loss,
                           val_loss=val_loss, compile_seconds=compile_seconds,
                           train_seconds=time.perf_counter() - loop_start, tokens_per_sec=0.0,
                           num_params=num_params, losses=losses, state=state,
                           stopped_by=stopped_by)
    steps_run = max(0, cfg.train.steps - start_step)
    mean_tok_s = steps_run * tokens_per_step / train_seconds if steps_run else 0.0
    _log(f"Done: {steps_run} steps in {train_seconds:.1f}s ({mean_tok_s:,.0f} tokens/s), "
         f"compile {compile_seconds:.1f}s; final val loss {val_loss:.4f}")

    sample = ""
    if cfg.logging.sample_tokens > 0 and jax.process_count() == 1:
        sample = sample_text(s.model, state.params, corpus.tokenizer, cfg.logging.sample_prompt,
                             cfg.logging.sample_tokens, seed=cfg.train.seed)
        _log("-" * 60 + "\n" + sample + "\n" + "-" * 60)
    return TrainResult(final_step=max(start_step, cfg.train.steps), start_step=start_step, train_loss=last_loss,
                       val_loss=val_loss, compile_seconds=compile_seconds, train_seconds=train_seconds,
                       tokens_per_sec=mean_tok_s, num_params=num_params, losses=losses,
                       sample=sample, state=state)


def sample_text(model: Any, params: Any, tokenizer: data_lib.Tokenizer, prompt: str,
                max_new_tokens: int, temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> str:
    """Decode `max_new_tokens` tokens after `prompt` with `generate`."""
    params = jax.device_put(params, jax.devices()[0])  # sampling is small: one device
    try:
        prompt_ids = tokenizer.encode(prompt or "\n")
    except ValueError as e:
        raise ConfigError(f"Prompt {prompt!r} cannot be encoded: {e}.") from None
    if not 0 <= top_k <= tokenizer.vocab_size:
        raise ConfigError(f"top_k={top_k} must be between 0 (off) and the vocabulary size {tokenizer.vocab_size}.")
    ids = generate(model, params, jax.numpy.asarray(prompt_ids), jax.random.key(seed),
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   num_tokens=tokenizer.vocab_size)
    return tokenizer.decode(np.asarray(ids))


def load_for_sampling(run_dir: str | Path) -> tuple[Config, Any, Any, data_lib.Tokenizer]:
    """(config, model, params, tokenizer) of the latest checkpoint in `run_dir`, on one device."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}/config.json not found: is {run_dir} a jaxsys run directory?")
    cfg = config_lib.from_dict(json.loads((run_dir / "config.json").read_text()))
    cfg = config_lib.apply_overrides(cfg, ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.pipe=1"])
    tokenizer = data_lib.tokenizer_from_json(json.loads((run_dir / "tokenizer.json").read_text()))
    s = ts.setup(cfg, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
    manager = ckpt.make_manager(run_dir, cfg.checkpoint)
    target = shd.with_shardings(ts.abstract_state(s), s.state_sharding)
    _, state = ckpt.restore(manager, target)
    manager.close()
    return cfg, s.model, state.params, tokenizer

