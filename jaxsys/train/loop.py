"""The host training loop: data, compiled step, progress, eval, metrics, checkpoints.

Everything on the device happens in the compiled `train_step`; this loop only feeds batches
and reads metrics one step late (after the next step is dispatched), so the host never waits
for the device except at log, eval and checkpoint steps.

`train` runs in phases: `_prepare` (config, data, mesh, layout and run-directory checks, all
before any compile; nothing written), `_restore_or_init` (the checkpoint's own metadata checked),
`_accept` (only then config.json, tokenizer.json and the changed settings are written; a run
already at train.steps stops before it), `_compile`, then `_Loop.run` (the step loop and its
eval / save / rollback policy), whose read-back state lives in `_Readback`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsys import config as config_lib
from jaxsys.checkpoint import manager as ckpt
from jaxsys.checkpoint import run_files
from jaxsys.config import Config
from jaxsys.config.hardware import peak_flops
from jaxsys.data import batches as batches_lib
from jaxsys.data.corpus import Corpus, check_corpus, load_corpus
from jaxsys.model.flops import active_params, flops_per_token
from jaxsys.model.params import count_params
from jaxsys.parallel.mesh import layout_name, make_mesh
from jaxsys.parallel.rules import with_shardings
from jaxsys.train import remat_auto
from jaxsys.train import rollback as rollback_lib
from jaxsys.train import state as state_lib
from jaxsys.train import step as step_lib
from jaxsys.train import trackers as trackers_lib
from jaxsys.train.console import Console
from jaxsys.train.metrics import MetricWriter
from jaxsys.train.preemption import StopRequest
from jaxsys.train.profiling import StepProfiler
from jaxsys.train.timings import Timings
from jaxsys.train import run_dir as run_dir_lib


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
    state: Any = None
    stopped_by: str = ""  # "SIGTERM"/"SIGINT" when a signal ended the run early (checkpoint saved)
    tokenizer: Any = None  # the data's tokenizer (to decode samples of the trained model)
    timings: Timings = field(default_factory=Timings)  # seconds per phase (data, compile, training, ...)


def _is_main() -> bool:
    return jax.process_index() == 0


_console = Console()  # text or JSON lines, quiet or not: set from cfg.logging by each `train`


def _log(msg: str, event: str = "log", level: str = "info", **fields: Any) -> None:
    """One line on process 0; `level` "warn" and "final" lines survive logging.quiet."""
    if _is_main():
        _console.log(msg, event, level, **fields)


def _warn(msg: str) -> None:
    _log(msg, "warning", "warn")


def val_batches(corpus: Corpus, cfg: Config, sharding: jax.sharding.Sharding,
                num_batches: int) -> list[dict[str, jax.Array]]:
    """The fixed validation batches (the same ones at every eval), already on the devices."""
    return [batches_lib.global_batch(corpus.val, cfg.train.seed, i, "val", cfg.train.batch_size,
                                     cfg.model.seq_len, sharding) for i in range(num_batches)]


def evaluate(eval_step: Any, params: Any, batches: list[dict[str, jax.Array]],
             model_state: dict[str, Any] | None = None) -> float:
    """Mean loss over `batches`, one batch at a time.

    Not all dispatched at once: XLA:CPU runs independent multi-device programs concurrently on
    a small thread pool, and two programs whose all-reduces each hold one device's thread while
    waiting for the other device can deadlock (measured: `jaxsys train --devices 2` aborted in
    its final eval, after XLA's 40 s rendezvous timeout)."""
    extra = (model_state,) if model_state else ()  # the MoE loss-free bias (compile_eval_step)
    return sum(float(eval_step(params, b, *extra)) for b in batches) / len(batches)


# ----------------------------------------------------------------------------- phases


@dataclass
class _Run:
    """What `_prepare` established: checked config, data, layout and where the state goes."""

    cfg: Config
    corpus: Corpus
    setup: state_lib.Setup
    run_dir: Path
    target: Any  # the TrainState as ShapeDtypeStructs with shardings (restore / lowering target)
    num_params: int
    changes: list = field(default_factory=list)  # run_dir.Change: settings that differ from config.json
    train_step: Any = None  # already compiled (model.remat=auto compiles to choose), else None


def _prepare(cfg: Config, devices: list | None, timings: Timings) -> _Run:
    """Every check that needs no compile: config, data, mesh and layout, run directory, disk."""
    config_lib.validate(cfg)
    with timings.phase("data"):
        corpus = load_corpus(cfg.data)
        check_corpus(cfg, corpus)
    mesh = make_mesh(cfg.mesh, devices)
    auto = cfg.model.remat == "auto"
    # The shardings do not depend on the remat policy: a stand-in one for the checks below.
    s = state_lib.setup(config_lib.apply_overrides(cfg, ["model.remat=none"]) if auto else cfg, mesh)
    run_dir = Path(cfg.run_dir)
    changes = run_dir_lib.check_run_dir(run_dir, cfg, corpus.tokenizer.to_json())  # reads only
    target = with_shardings(state_lib.abstract_state(s), s.state_sharding)
    if cfg.checkpoint.every > 0:
        ckpt.check_free_space(run_dir, ckpt.state_bytes(target), cfg.checkpoint.keep)
    run = _Run(cfg, corpus, s, run_dir, target, count_params(s.abstract_params), changes)
    procs = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    _log(f"jaxsys: {cfg.preset or 'custom'} | {cfg.model.family} {run.num_params / 1e6:.2f}M params | "
         f"mesh {layout_name(dict(mesh.shape), context_kind=cfg.context_parallel.kind)} ({mesh.devices.size} × {mesh.devices.flat[0].platform}{procs}) | "
         f"batch {cfg.train.batch_size}×{cfg.model.seq_len} tokens | run_dir {run_dir}", "start",
         run_dir=str(run_dir), params=run.num_params,
         mesh=layout_name(dict(mesh.shape), context_kind=cfg.context_parallel.kind),
         devices=mesh.devices.size, processes=jax.process_count())
    if auto:  # compiles each candidate policy until one fits; an impossible budget stops here
        run.setup, run.train_step, _ = remat_auto.resolve(cfg, mesh, batches_lib.batch_keys(corpus.train), _log)
    return run


def _restore_or_init(run: _Run) -> tuple[Any, int, Any]:
    """(checkpoint manager or None, start step, state): the newest usable checkpoint, else a
    fresh state. Unusable newest steps (incomplete, truncated, bit-flipped) are set aside, loudly."""
    cfg = run.cfg
    manager, resume_step = None, None
    if cfg.checkpoint.every > 0:
        if cfg.checkpoint.resume and ckpt.step_dirs(run.run_dir):
            resume_step, _ = ckpt.select_resume_step(run.run_dir, _warn)
            if resume_step is None:
                _warn(f"No usable checkpoint left in {run.run_dir / 'checkpoints'}: starting from step 0.")
        manager = ckpt.make_manager(run.run_dir, cfg.checkpoint)
    if resume_step is None:
        return manager, 0, state_lib.init_state(run.setup, cfg.train.seed)
    params_only = ckpt.is_params_only(manager, resume_step)  # an imported model: fine-tune it
    try:  # names the parameter and both shapes
        if params_only:
            ckpt.check_params_compatible(manager, resume_step, run.target.params)
        else:
            ckpt.check_compatible(manager, resume_step, run.target)
    except Exception:
        manager.close()  # refused: nothing was written, and no Orbax thread is left behind
        raise
    if params_only:
        _, params = ckpt.restore_params(manager, run.target.params, resume_step)
        _log(f"Starting from the parameters of checkpoint step {resume_step} in {run.run_dir / 'checkpoints'} "
             "with a fresh optimizer (a params-only checkpoint, e.g. `jaxsys hf import`)", "resumed", step=0)
        return manager, 0, state_lib.state_from_params(run.setup, params)
    start_step, state = ckpt.restore(manager, run.target, resume_step)
    _log(f"Resumed from checkpoint step {start_step} in {run.run_dir / 'checkpoints'}", "resumed",
         step=start_step)
    return manager, start_step, state


def _accept(run: _Run, start_step: int) -> None:
    """The checkpoint agreed with this config (`check_compatible`): only now write config.json and
    tokenizer.json, and report and record the changed settings (config_changes.jsonl)."""
    if run.changes:
        _warn(f"{'Resuming' if start_step else 'Starting'} with changed settings: "
              f"{run_dir_lib.describe(run.changes)} (recorded in {run.run_dir / run_dir_lib.CHANGES})")
    if _is_main():
        run_dir_lib.accept(run.run_dir, run.cfg, run.corpus.tokenizer, run.changes, start_step)


def _nothing_to_train(run: _Run, manager: Any, start_step: int, state: Any) -> "TrainResult":
    """A run already at (or past) train.steps: say so and return before anything compiles."""
    if manager is not None:
        manager.close()
    steps = run.cfg.train.steps
    where = "= train.steps" if start_step == steps else f"> train.steps={steps}"
    ignored = [c for c in run.changes if c.key != "train.steps"]
    unused = (f" The changed settings ({run_dir_lib.describe(ignored)}) only matter for more steps: "
              "not applied, config.json unchanged." if ignored else "")
    _warn(f"Nothing to train: {run.run_dir} is already at step {start_step} {where}; raise train.steps "
          f"to continue, or use a new run_dir.{unused}")
    if _is_main() and not (run.run_dir / run_files.CONFIG).exists():  # the checkpoint agreed: restore it
        run_dir_lib.accept(run.run_dir, run.cfg, run.corpus.tokenizer, [], start_step)
    return TrainResult(final_step=start_step, start_step=start_step, train_loss=float("nan"),
                       val_loss=float("nan"), compile_seconds=0.0, train_seconds=0.0, tokens_per_sec=0.0,
                       num_params=run.num_params, state=state, tokenizer=run.corpus.tokenizer)


def _compile(run: _Run) -> tuple[Any, Any, float]:
    """The compiled train and eval steps, and the seconds compiling took."""
    t0 = time.perf_counter()
    keys = batches_lib.batch_keys(run.corpus.train)  # + segment_ids, positions, loss_mask when packed
    step_fn = run.train_step or step_lib.compile_train_step(run.setup, keys)
    eval_fn = step_lib.compile_eval_step(run.setup, run.cfg.train.batch_size, keys)
    seconds = time.perf_counter() - t0
    _log(f"Compiled train and eval steps in {seconds:.1f}s", "compiled", seconds=seconds)
    return step_fn, eval_fn, seconds


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
    target, _ = ckpt.select_resume_step(run_dir, _warn, below=failed_step - k + 1)
    if target is None:
        raise TrainingError(f"{k} steps in a row up to step {failed_step} had a non-finite loss or "
                            f"gradients and no checkpoint from before step {failed_step - k + 1} is "
                            "left to roll back to. Lower optimizer.lr or save checkpoints more often.")
    if _is_main():
        for step in sorted(ckpt.step_dirs(run_dir)):
            if step > target:
                ckpt.reject(run_dir, step, f"abandoned by the rollback from step {failed_step} to {target}")
    ckpt.sync("jaxsys_rollback")
    manager.reload()
    return target


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Readback:
    """Metrics read back from the device so far, and what they decided (one step late)."""

    pending: list[tuple[int, dict]] = field(default_factory=list)  # not read back yet, oldest first
    losses: list[float] = field(default_factory=list)
    last_loss: float = float("nan")
    consecutive_skips: int = 0
    failed_step: int = 0  # set when a streak of skips asks for a rollback
    window_start: float = 0.0  # throughput window for tokens/s
    window_step: int = 0


class _Loop:
    """The step loop of one `train` call, with its eval, save and rollback policy."""

    def __init__(self, run: _Run, manager: Any, step_fn: Any, eval_fn: Any, start_step: int,
                 timings: Timings):
        self.run, self.cfg, self.manager = run, run.cfg, manager
        self.timings = timings  # the loop adds its "eval" and "checkpoints" seconds
        self.step_fn, self.eval_fn, self.start_step = step_fn, eval_fn, start_step
        s = run.setup
        self.val_data = val_batches(run.corpus, self.cfg, s.batch_sharding, self.cfg.train.eval_batches)
        self.rollbacks = rollback_lib.load(run.run_dir)
        self.bad_tokens: np.ndarray | None = None  # fault injection: out-of-range ids make the embedding NaN
        self.writer = None  # metrics.jsonl + TensorBoard, then the trackers (logging.trackers)
        if _is_main():
            trackers = trackers_lib.make_trackers(self.cfg, run.run_dir)
            metrics = MetricWriter(run.run_dir, self.cfg.logging.tensorboard)
            self.writer = trackers_lib.Sinks([metrics, *trackers])
        self.profiler = StepProfiler(self.cfg.logging.profile_steps, run.run_dir, _log)
        self.tokens_per_step = self.cfg.train.batch_size * self.cfg.model.seq_len
        self.flops_per_token = flops_per_token(self.cfg.model, active_params(self.cfg.model, s.abstract_params,
                                                                             s.logical_specs))
        self.peak = peak_flops(s.mesh.devices.flat[0].device_kind)
        self.bar = None
        if _console.shows_progress(self.cfg.logging) and _is_main() and start_step < self.cfg.train.steps:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.cfg.train.steps, initial=start_step, unit="step",
                            dynamic_ncols=True, mininterval=1.0)
            _console.bar = self.bar  # lines go through bar.write while it is shown
        self.rb = _Readback(window_start=time.perf_counter(), window_step=start_step)
        self.val_loss = float("nan")
        self.manifests_due = False  # a save was started whose manifest is not written yet

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        """The batch of loop step `step` (after rollbacks: the data index moved past bad batches)."""
        index = rollback_lib.batch_index(self.rollbacks, step)
        tokens = self.run.corpus.train
        if index in self.cfg.faults.nan_batches:
            if self.bad_tokens is None:
                self.bad_tokens = np.full(len(tokens), self.cfg.model.vocab_size, np.int32)
            tokens = self.bad_tokens
        return batches_lib.global_batch(tokens, self.cfg.train.seed, index, "train", self.cfg.train.batch_size,
                                        self.cfg.model.seq_len, self.run.setup.batch_sharding)

    def drain(self, keep: int) -> None:
        """Read back all but the newest `keep` pending metrics; log those on log steps."""
        rb, t = self.rb, self.cfg.train
        while len(rb.pending) > keep and not rb.failed_step:
            step_done, m = rb.pending.pop(0)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            rb.last_loss = m["loss"]
            rb.losses.append(rb.last_loss)
            # A loss-scale overflow (jaxsys.train.loss_scale) is expected: it neither counts nor breaks a streak.
            overflow = m.get("overflow", 0.0) > 0
            if not overflow:
                rb.consecutive_skips = rb.consecutive_skips + 1 if m["skipped"] else 0
            if m["skipped"] and not overflow:
                _log(f"step {step_done}: loss {rb.last_loss}, gradient norm {m['grad_norm']}: update "
                     f"skipped ({rb.consecutive_skips} in a row, {int(m['skipped_total'])} in all)", "skipped",
                     "warn", step=step_done, loss=rb.last_loss, in_a_row=rb.consecutive_skips)
            if rb.consecutive_skips >= t.max_consecutive_skips and t.on_nan == "rollback":
                rb.failed_step = step_done  # the loop rolls back; later pending steps are discarded
            elif rb.consecutive_skips >= t.max_consecutive_skips:
                self._stop_on_nan(step_done)
            if self.writer is not None and (step_done % t.log_every == 0 or step_done == t.steps):
                self._write_metrics(step_done, m)

    def _stop_on_nan(self, step_done: int) -> None:
        rb, t = self.rb, self.cfg.train
        saved = self.manager.latest_step() if self.manager is not None else None
        raise TrainingError(
            f"{rb.consecutive_skips} steps in a row up to step {step_done} had a non-finite loss "
            f"or gradients (last loss {rb.last_loss}); stopping (train.max_consecutive_skips="
            f"{t.max_consecutive_skips}). Lower optimizer.lr or raise "
            f"lr_schedule.warmup_steps, or set train.on_nan=rollback. Last good checkpoint: "
            f"{f'step {saved} in {self.run.run_dir}/checkpoints (untouched)' if saved is not None else 'none'}."
        )

    def _write_metrics(self, step_done: int, m: dict[str, float]) -> None:
        rb = self.rb
        now = time.perf_counter()
        tok_s = (step_done - rb.window_step) * self.tokens_per_step / max(now - rb.window_start, 1e-9)
        rb.window_start, rb.window_step = now, step_done
        m["tokens_per_sec"] = tok_s
        if self.peak:
            m["mfu"] = self.flops_per_token * tok_s / (self.peak * self.run.setup.mesh.devices.size)
        self.writer.write(step_done, m)
        if _console.json:
            _log(f"step {step_done}", "step", step=step_done, **m)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rb.last_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)

    def _roll_back(self) -> tuple[int, Any]:
        """Restore the checkpoint from before the bad streak; (its step, its state)."""
        rb, cfg = self.rb, self.cfg
        step = _rollback_target(cfg, self.run.run_dir, self.manager, rb.failed_step, self.rollbacks)
        entry = rollback_lib.record(self.run.run_dir, self.rollbacks, step, rb.failed_step)
        _, state = ckpt.restore(self.manager, self.run.target, step)
        _log(f"Rolled back from step {rb.failed_step} to checkpoint step {step}; continuing with "
             f"batch {entry['data_index']}, after the bad ones (rollback {len(self.rollbacks)} of "
             f"at most {cfg.train.max_rollbacks}).", "rollback", "warn", step=step, failed_step=rb.failed_step)
        rb.pending.clear()
        rb.failed_step, rb.consecutive_skips, self.manifests_due = 0, 0, False
        if self.bar is not None:
            self.bar.n = step
        return step, state

    def _evaluate(self, done: int, state: Any) -> None:
        with self.timings.phase("eval"):
            self.val_loss = evaluate(self.eval_fn, state.params, self.val_data, state.model_state)
        if self.writer is not None:
            self.writer.write(done, {"val_loss": self.val_loss})
        msg = f"step {done}: train loss {self.rb.last_loss:.4f}, val loss {self.val_loss:.4f}"
        _log(msg, "eval", step=done, train_loss=self.rb.last_loss, val_loss=self.val_loss)

    def _save(self, done: int, state: Any, is_save: bool) -> None:
        """Finish the previous save's manifest when it is done, then start this save."""
        if self.manifests_due and (is_save or not self.manager.is_saving_in_progress()):
            self.manager.wait_until_finished()  # a new save would wait for it anyway
            ckpt.write_missing_manifests(self.run.run_dir)  # the previous save is finalised
            self.manifests_due = False
        if is_save:
            ckpt.save(self.manager, done, state)
            self.manifests_due = True

    def run_steps(self, state: Any, stop: StopRequest) -> tuple[Any, str]:
        """Steps from `start_step` to `train.steps` (or a stop signal); (state, signal or "")."""
        cfg, rb = self.cfg, self.rb
        stopped_by = ""
        step = self.start_step
        while step < cfg.train.steps:
            self.profiler.before(step + 1)
            state, metrics = self.step_fn(state, self.train_batch(step))
            done = step + 1
            self.profiler.after(done, state)
            rb.pending.append((done, metrics))
            self.drain(keep=1)  # read the previous step's metrics while this one runs
            stopped_by = stop.agreed()
            is_eval = cfg.train.eval_every > 0 and done % cfg.train.eval_every == 0
            is_save = self.manager is not None and (done % cfg.checkpoint.every == 0
                                                    or done == cfg.train.steps or stopped_by)
            if is_eval or is_save or done == cfg.train.steps:
                self.drain(keep=0)  # a step is checked finite before it becomes a checkpoint
            if rb.failed_step:
                step, state = self._roll_back()
                continue
            step = done
            if self.bar is not None:
                self.bar.update(1)
            if is_eval or done == cfg.train.steps:
                self._evaluate(done, state)
            if self.manager is not None:
                with self.timings.phase("checkpoints"):
                    self._save(done, state, is_save)
            if stopped_by:
                break
        self.drain(keep=0)
        return state, stopped_by

    def close(self) -> None:
        """Also on errors: let started saves finish so they are never half-written."""
        self.profiler.stop()
        _console.bar = None
        if self.bar is not None:
            self.bar.close()
        if self.manager is not None:
            with self.timings.phase("checkpoints"):  # the last save finishing
                self.manager.wait_until_finished()
                ckpt.write_missing_manifests(self.run.run_dir)  # written last: a step without one is incomplete
                self.manager.close()
        if self.writer is not None:
            self.writer.close()


def train(cfg: Config, devices: list | None = None) -> TrainResult:
    """Run (or resume) the training described by `cfg`; returns a `TrainResult`."""
    global _console
    _console = Console(cfg.logging)
    trackers_lib.check_available(cfg)  # a missing extra fails before anything is built
    timings = Timings()
    t_setup = time.perf_counter()
    run = _prepare(cfg, devices, timings)
    timings.add("setup", time.perf_counter() - t_setup - timings.seconds["data"])
    with timings.phase("init"):  # a checkpoint restored, or the parameters initialised (one compile)
        manager, start_step, state = _restore_or_init(run)
    if start_step >= cfg.train.steps:
        return _nothing_to_train(run, manager, start_step, state)
    _accept(run, start_step)
    step_fn, eval_fn, compile_seconds = _compile(run)
    timings.add("compile", compile_seconds)
    with timings.phase("setup"):  # validation batches on the devices, metric sinks
        loop = _Loop(run, manager, step_fn, eval_fn, start_step, timings)
    loop_start = time.perf_counter()
    with StopRequest(_log) as stop:  # SIGTERM/SIGINT: stop after this step, with a checkpoint
        try:
            state, stopped_by = loop.run_steps(state, stop)
        finally:
            loop.close()
    train_seconds = time.perf_counter() - loop_start
    timings.add("training", train_seconds - timings.seconds.get("eval", 0.0)
                - timings.seconds.get("checkpoints", 0.0))
    result = TrainResult(final_step=max(start_step, cfg.train.steps), start_step=start_step,
                         train_loss=loop.rb.last_loss, val_loss=loop.val_loss,
                         compile_seconds=compile_seconds, train_seconds=train_seconds,
                         tokens_per_sec=0.0, num_params=run.num_params, losses=loop.rb.losses,
                         state=state, stopped_by=stopped_by, tokenizer=run.corpus.tokenizer,
                         timings=timings)
    if stopped_by:
        result.final_step = int(jax.device_get(state.step))
        where = (f"checkpoint step {result.final_step} saved in {run.run_dir / 'checkpoints'}"
                 if manager is not None else "no checkpoint (checkpoint.every=0)")
        _log(f"Stopped by {stopped_by} after step {result.final_step}: {where}. "
             "Run the same command again to resume.", "stopped", "final", signal=stopped_by,
             step=result.final_step)
        return result
    steps_run = max(0, cfg.train.steps - start_step)
    result.tokens_per_sec = steps_run * loop.tokens_per_step / train_seconds if steps_run else 0.0
    _log(f"Done: {steps_run} steps in {train_seconds:.1f}s ({result.tokens_per_sec:,.0f} tokens/s), "
         f"compile {compile_seconds:.1f}s; final val loss {loop.val_loss:.4f}", "done", "final",
         steps=steps_run, final_step=result.final_step, train_seconds=train_seconds,
         compile_seconds=compile_seconds, tokens_per_sec=result.tokens_per_sec,
         train_loss=result.train_loss, val_loss=loop.val_loss)
    return result
