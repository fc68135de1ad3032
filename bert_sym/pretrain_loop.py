"""The pre-training run's loop section (`train.train_and_evaluate` calls it): the meter
and the run's health, the log/eval/save cadences (a non-finite model is never saved), the
run to config.total_steps through `bert_sym.loop`, and setting a divergence aside.

`bert_sym.loop` is the host loop every training run shares (GLUE too); this is how the MLM
trainer drives it. `data` and `run` are the trainer's `_Input` and `_Run`.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from bert_sym import checkpoint
from bert_sym import cli
from bert_sym import loop
from bert_sym import metrics_writer
from bert_sym import model as model_lib


def make_meter(config, latest) -> loop.Meter:
  """Throughput and the health of the run (bert_sym.loop.StepHealth), step by step."""
  seq_len = config.data.max_seq_len
  meter = loop.Meter(
      config.total_steps, config.batch_size * seq_len,
      model_lib.train_flops_per_token(config.model, seq_len,
                                      model_lib.mlm_predicted_fraction(config)),
      metrics_writer.peak_flops_per_device(override=config.peak_flops_per_device),
      config.on_nonfinite, what='The run')
  meter.last_saved = latest
  # A loss twice that of guessing uniformly over the vocabulary means exploded weights.
  meter.health = loop.StepHealth(
      config.on_nonfinite, 'The run', loss_ceiling=2 * math.log(config.model.vocab_size),
      warmup_steps=config.optimizer.warmup_steps,
      max_consecutive_skips=config.get('max_consecutive_nonfinite', 10))
  return meter


# ---- The meter in the checkpoint: a resumed run judges and logs as if never stopped ----
# Saved beside the input position (the data_iter item): the health of the run (a loss-spike
# streak open at the save, the recent healthy losses) and the steps not yet in a row.
# Without it a run resumed mid-divergence took its checkpoint for a good one, and the
# first row after a resume averaged fewer steps than the uninterrupted run's.
_HEALTH_KEYS = ('recent', 'onset', 'skipped_in_a_row', 'last_healthy')


def meter_state(meter: loop.Meter) -> dict:
  """JSON of what `load_meter_state` puts back (metrics as fetched: call after fetch)."""
  interval = [[step, {k: [str(np.asarray(v).dtype), np.asarray(v).tolist()]
                      for k, v in metrics.items()}] for step, metrics in meter.interval]
  health = {k: getattr(meter.health, k) for k in _HEALTH_KEYS}
  health['recent'] = [float(x) for x in health['recent']]
  return {'health': health, 'interval': interval}


def load_meter_state(meter: loop.Meter, saved: dict | None) -> None:
  """Puts back `meter_state`; None (a checkpoint from before it was saved) changes nothing."""
  if not saved:
    return
  for key in _HEALTH_KEYS:
    setattr(meter.health, key, saved['health'][key])
  meter.interval = [(step, {k: np.asarray(value, dtype) for k, (dtype, value) in m.items()})
                    for step, m in saved['interval']]


@jax.jit
def all_finite(params):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def make_hooks(config, run, manager, evaluate, meter, input_position, lineage=None):
  """Log, eval and save cadences; a save refuses non-finite params. Every save records
  `lineage` (checkpoint.extend_lineage): which start of the trainer wrote it."""
  def save(state, step):
    # Without an unhealthy streak, the loss of `step` was finite: the params from before
    # its update are good, and only the next loss would show the damage (onset step + 1).
    if not bool(all_finite(state['params'])):
      raise loop.NonFiniteError(f'The parameters at step {step} are not finite; they were '
                                'not saved.', meter.health.onset or step + 1)
    checkpoint.save(manager, step, state, input_position(), force=True,
                    meter_state=meter_state(meter), lineage=lineage)
    run.last_saved = step

  return loop.Hooks(
      log=loop.progress_logger(run.writer, run.console, config.total_steps), save=save,
      log_every=config.log_every_steps, save_every=config.checkpoint.every_steps,
      evaluate=evaluate, eval_every=config.eval_every_steps, console=run.console,
      check_saves=lambda together: checkpoint.check_saves(manager, together=together),
      finish_saves=lambda: checkpoint.finish_saves(manager),
      row_at_preemption=False)   # the save keeps the steps since the last row (meter_state)


def run_to_total_steps(config, state, latest, train_step, data, evaluate, manager, preemption,
           run) -> int:
  """The train loop (bert_sym.loop: compile once, progress line, non-finite policy,
  preemption); returns the last step. Every save has finished (or failed loudly) after."""
  step = int(jax.device_get(state['step']))
  meter, prefetcher = make_meter(config, latest), None
  saved = run.saved or {}
  load_meter_state(meter, saved.get('meter'))
  lineage = checkpoint.extend_lineage(saved.get('lineage'), latest)   # this start's own id
  # Saved while a loss-spike streak was open, the checkpoint resumed from is no good one.
  resumed_good = latest if meter.health.onset is None else None
  run.keep_good.good_below = lambda: meter.health.good_below(resumed_from=resumed_good)
  # The position of the next batch the step consumes, not what was prefetched.
  position = lambda: prefetcher.state if prefetcher else data.train_iter.get_state()
  hooks = make_hooks(config, run, manager, evaluate, meter, position, lineage)
  # Whether `step`'s eval row is missing: a preemption saves first and evaluates after,
  # inside the notice, and the kill may come first. Process 0 alone reads metrics.jsonl;
  # every process takes its answer (eval is collective).
  eval_row_missing = lambda: not checkpoint.allgather_json(
      run.writer.logged(step, 'eval/loss'))[0]
  if step >= config.total_steps:
    run.console(f'Already trained to step {step} (config.total_steps={config.total_steps});'
                ' nothing to do. Raise --config.total_steps to train further (the learning-'
                'rate decay is then recomputed for the new total: the rate rises again).')
    try:
      if (meter.interval and step == config.total_steps
          and not run.writer.logged(step, 'train/loss')):
        # Stopped between rows and rerun with total_steps lowered to that step: the last
        # step's row (the steps since the previous one, kept by the save) is still due.
        meter.timing = (0.0, step)   # no step runs now: a row without throughput
        hooks.log(step, *meter.row(step))
      if evaluate:
        # The closing summary's numbers; a new row only where the last step's is missing
        # (without it, readers of metrics.jsonl, the ablation report, see an unfinished run).
        evaluate(state, step, write=step == config.total_steps and eval_row_missing())
    finally:
      manager.close()
    return step
  # Resumed where a rerun with total_steps lowered to this step wrote the row of the steps
  # the save kept (above): the next row starts after them, or it would count them again.
  if step and checkpoint.allgather_json(run.writer.logged(step, 'train/loss'))[0]:
    meter.interval = []
  # Step 0's eval; or a resume from a step whose eval never wrote its row.
  if evaluate and (step == 0 or (loop.due(step, config.eval_every_steps, config.total_steps)
                                 and eval_row_missing())):
    evaluate(state, step)
  # A failed save is said once, in one line: orbax's echoes of it (tasks collected when the
  # manager closes) are muted until the manager is closed, not only during the loop.
  with checkpoint.quiet_orbax_echoes():
    abandoned = save_failed = False
    try:
      prefetcher = loop.Prefetcher(data.train_iter, data.to_global, depth=2)
      state, step, preempted = loop.run(state, step, config.total_steps, train_step,
                                        prefetcher, meter, hooks, preemption, manager)
      checkpoint.finish_saves(manager)
    except loop.NonFiniteError as e:
      raise set_aside_divergence(e, run.workdir, manager, resumed_good, run) from None
    except checkpoint.CheckpointSaveError:
      # Every process stopped on it together (checkpoint.check_saves): orbax's threads
      # still wait for the failed save's barriers (save_timeout_s); this process leaves
      # without them (cli.leave_a_multiprocess_run).
      abandoned, save_failed = cli.one_of_several_processes(), True
      raise
    finally:
      if prefetcher:
        prefetcher.close()
      if not abandoned:
        with contextlib.suppress(Exception):   # a failed save was said already
          manager.wait_until_finished()
          checkpoint.remove_rotated_out(manager.directory)   # however the run ended
        # orbax still holds the failure (checkpoint.saving leaves it there): closing would
        # raise it again, over the one line that says it.
        with contextlib.suppress(Exception) if save_failed else contextlib.nullcontext():
          manager.close()
        if save_failed:   # writes still running when it was said recreated the step's files
          checkpoint.remove_unfinished_steps(manager)
  if preempted:
    raise loop.Preempted(step, preemption.signal_name)
  if meter.health.onset is not None:   # the last steps were unhealthy, never recovered
    run.console(unhealthy_end_warning(run.workdir, meter.health.onset))
  return step


def unhealthy_end_warning(workdir, onset: int) -> str:
  """A run that reached total_steps inside a loss spike said 'Done' alone, and its 'Next:'
  lines gave hf_export and GLUE the workdir, which read its newest, diverging checkpoint
  (a stop on a non-finite step names the good one in its error)."""
  good = [s for s in checkpoint.finished_steps(workdir) if s < onset - 1]
  where = (f'The newest checkpoint from before it is step {good[-1]}: pass --checkpoint='
           f'{checkpoint.checkpoint_dir(workdir) / str(good[-1])} to hf_export and GLUE.'
           if good else 'No checkpoint from before it is left.')
  return (f'WARNING: the run ended inside an unhealthy streak (loss spikes or skipped '
          f'non-finite steps) that began at step {onset} and never recovered: the checkpoints '
          f'from step {onset - 1} on may hold a diverging model, and hf_export and GLUE '
          f'given the workdir read the newest. {where}')


def set_aside_divergence(error: loop.NonFiniteError, workdir, manager, resumed_good, run):
  """Checkpoints from the step before the divergence began go aside (as damaged ones do),
  as in a run that never stopped; the error then names the newest one left.

  That takes the checkpoint this run resumed from when the divergence began at the first
  step after it: that step's loss and gradient come from its parameters and the data alone,
  not from the config a rerun would fix. Kept and named, it trapped the workdir: each rerun
  resumed into it and stopped again. (Rotation already counted it as no good one.)"""
  with contextlib.suppress(Exception):
    manager.wait_until_finished()
  diverged = [s for s in checkpoint.finished_steps(workdir) if s >= error.onset - 1]
  checkpoint.set_aside_diverged(workdir, diverged, error.onset, log=run.console)
  kept = checkpoint.finished_steps(workdir)
  run.last_saved = kept[-1] if kept else None
  resumed_into = (f' Step {resumed_good}, which this run resumed from, went aside too: the '
                  'divergence began at the first step after it, so its parameters gave it.'
                  if resumed_good in diverged else '')
  # Unreadable steps set aside earlier make a rerun refuse to start silently from step 0.
  damaged = [] if kept else checkpoint.damaged_steps_found(workdir)
  where = (f'The newest checkpoint from before the divergence is step {kept[-1]}: rerun with '
           'a fixed config (e.g. a lower --config.optimizer.learning_rate) and it resumes '
           'from there.' if kept else
           'There is no checkpoint from before the divergence, and the steps in '
           f'damaged_checkpoints/ ({", ".join(damaged)}) could not be read: rerun with a fixed '
           'config and --start_over to start from step 0.' if damaged else
           'There is no checkpoint from before the divergence: a rerun with a fixed config '
           'starts from step 0.')
  return loop.NonFiniteError(error.headline, error.onset, where + resumed_into)


def closing_summary(workdir, step: int, run) -> str:
  """The run's last words: where it ended, where the model is, what to run next."""
  lines, metrics = [f'Done: step {step}.'], run.eval_metrics
  if metrics:
    lines[0] += (f' Final eval MLM loss {metrics["eval/loss"]:.4f}, '
                 f'accuracy {metrics["eval/mlm_accuracy"]:.3f}.')
  if run.last_saved is not None:
    lines.append(f'Checkpoint: {checkpoint.checkpoint_dir(workdir) / str(run.last_saved)}')
  lines += [   # TensorBoard only where its package wrote events (GPU images may lack it)
      f'Metrics: {workdir}/metrics.jsonl' + (f'; tensorboard --logdir {workdir}/tensorboard'
                                             if run.writer.writes_tensorboard else ''),
      'Next:',
      f'  python -m bert_sym.hf_export --checkpoint={workdir} --out_dir=EXPORT_DIR   '
      '# Hugging Face BERT',
      f'  python -m bert_sym.glue --checkpoint={workdir} --output_dir=GLUE_OUT_DIR '
      '--glue_dir=/path/to/glue_data --tasks=rte --seeds=1   # GLUE fine-tuning',
  ]
  return '\n'.join(lines)
