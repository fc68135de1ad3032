"""The trainer end to end on simulated CPU devices, with a synthetic input (seconds per run).

Each run is a subprocess (device counts are fixed at JAX start-up). The uninterrupted
single-device run is shared by several tests as the reference.
"""

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import types
import sys
import threading
import time

from absl import app
from etils import epath
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from bert_sym import checkpoint
from bert_sym import distributed
from bert_sym import loop
from bert_sym import metrics_writer
from bert_sym import model as model_lib
from bert_sym import objectives
from bert_sym import optim
from bert_sym import pretrain_loop
from bert_sym import train
from tests import train_fixtures
from tests.train_fixtures import run_trainer

STEPS = 16
# 16 steps, checkpoints every 4, keep all: the reference every other run is compared to.
BASE = dict(total_steps=STEPS, log_every_steps=2, eval_every_steps=8,
            checkpoint__every_steps=4, checkpoint__keep_last=10)


def _overrides(**extra):
  return dict(BASE, **extra)


def _final_params(workdir):
  return checkpoint.load_params(checkpoint.resolve_step_dir(workdir))


def _metrics(workdir):
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


def _logged_step(workdir) -> int:
  """The newest step with a row in metrics.jsonl (-1 before the first; a row being
  written is not counted)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  steps = [-1]
  for line in path.read_text().splitlines() if path.exists() else []:
    with contextlib.suppress(ValueError):
      steps.append(json.loads(line)['step'])
  return max(steps)


def _train_losses(workdir):
  return {m['step']: m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m}


def _assert_params_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y), f'{jax.tree_util.keystr(path)} differs'


def _assert_params_close(a, b, atol=2e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def _wait_for(predicate, process, timeout=120):
  start = time.time()
  while not predicate():
    if process.poll() is not None:
      raise AssertionError(f'trainer exited early:\n{process.stdout.read()[-5000:]}')
    if time.time() - start > timeout:
      process.kill()
      raise AssertionError('timed out waiting for the trainer')
    time.sleep(0.05)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """(workdir, its trainer's output) of the reference run, trained once per session:
  tests copy the workdir before changing it."""
  def build(path):
    result = run_trainer(path / 'workdir', overrides=_overrides())
    (path / 'stdout').write_text(result.stdout)
    (path / 'stderr').write_text(result.stderr)
  path = train_fixtures.built_once(tmp_path_factory, 'train_reference_run', build)
  return path / 'workdir', types.SimpleNamespace(stdout=(path / 'stdout').read_text(),
                                                 stderr=(path / 'stderr').read_text())


def test_relative_workdir_as_users_type_it(tmp_path):
  """`--workdir=runs/x` (relative): orbax itself only takes absolute paths."""
  relative = os.path.relpath(tmp_path / 'run', train_fixtures.REPO_ROOT)
  assert not os.path.isabs(relative)
  run_trainer(relative, overrides=_overrides(checkpoint__async_save=True))
  assert checkpoint.finished_steps(tmp_path / 'run')[-1] == STEPS
  # A kill between the last save and its eval (a preemption saves first) left no final
  # eval row: the next start writes it, once, and the ablation report sees a finished run.
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  rows = metrics.read_text().splitlines()
  final = [r for r in rows if json.loads(r)['step'] == STEPS and 'eval/loss' in json.loads(r)]
  assert len(final) == 1
  metrics.write_text(''.join(r + '\n' for r in rows if r not in final))
  again = run_trainer(relative, overrides=_overrides())   # resumes: nothing left to do
  assert (STEPS, True) in [(m['step'], 'eval/loss' in m) for m in _metrics(tmp_path / 'run')]
  assert checkpoint.load_pretrained(os.path.relpath(tmp_path / 'run'))[1]
  # A second `make demo` ends like the first, with the final eval loss (no new row).
  assert 'Already trained to step' in again.stdout
  # Its advice says what raising total_steps does to the schedule (the rate jumped 10x).
  assert 'learning-rate decay is then recomputed for the new total' in again.stdout
  assert f'Done: step {STEPS}. Final eval MLM loss' in again.stdout, again.stdout[-2000:]
  assert re.search(rf'Checkpoint: \S*run/checkpoints/{STEPS}\b', again.stdout), again.stdout[-2000:]
  _assert_one_row_per_step(tmp_path / 'run')
  # Fewer steps asked than done: nothing trains, and config.json still describes the run
  # (it is not rewritten with the lower total_steps).
  lower = run_trainer(relative, overrides=_overrides(total_steps=STEPS - 4))
  assert f'Already trained to step {STEPS} (config.total_steps={STEPS - 4})' in lower.stdout
  assert checkpoint.read_config(tmp_path / 'run').total_steps == STEPS


# ---------------------------------------------------------------------------------------
# Command line, dry run, clear errors.
# ---------------------------------------------------------------------------------------

def test_dry_run_prints_paper_counts_without_workdir():
  result = run_trainer(None, '--dry_run', synthetic=False, config='configs/sym_base.py')
  assert '102,984,960' in result.stdout
  assert 'pairwise' in result.stdout and 'FLOPs per token' in result.stdout
  assert 'formula' in result.stdout
  from configs import std_base   # pylint: disable=g-import-not-at-top
  summary = model_lib.summary(std_base.get_config())
  assert '109,482,240' in summary and 'standard' in summary


def test_help_and_unknown_config_key():
  result = run_trainer(None, '--help', synthetic=False, check=False)
  assert '--dry_run' in result.stdout and '--workdir' in result.stdout
  # The multi-process flags the README and launch/ name (were in --helpfull only).
  for flag in ('--[no]distributed', '--coordinator_address', '--num_processes', '--process_id'):
    assert flag in result.stdout, flag
  # The config keys, which absl cannot list by itself, with the given config's values.
  assert '--config.model.attention' in result.stdout
  assert "--config.data.validation_files" in result.stdout
  assert "--config.total_steps" in result.stdout and '300' in result.stdout
  result = run_trainer('/tmp/unused', '--config.model.no_such_key=1', synthetic=False,
                       check=False)
  assert result.returncode != 0
  assert 'no_such_key' in result.stderr and 'Traceback' not in result.stderr


def test_help_lists_the_given_configs_keys_in_either_flag_form_from_any_directory(tmp_path):
  """`--config configs/tiny.py` (a form accepted everywhere else) listed sym_base's values,
  and from outside the checkout the listing failed."""
  def listed(*args):
    out = subprocess.run([sys.executable, '-m', 'bert_sym.train', '--help', *args],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS='cpu',
                                  PYTHONPATH=train_fixtures.REPO_ROOT))
    assert out.returncode == 0 and 'cannot list' not in out.stdout, out.stdout[-2000:]
    return [l.split()[1] for l in out.stdout.splitlines()
            if l.split()[:1] == ['--config.total_steps']]
  assert listed('--config=configs/tiny.py') == listed('--config', 'configs/tiny.py') == ['300']
  assert listed() == ['200000']   # configs/sym_base.py, the headline config
  short = subprocess.run([sys.executable, '-m', 'bert_sym.train', '-h'], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert short.returncode == 0 and '--workdir' in short.stdout   # absl knows no -h


@pytest.mark.parametrize('devices, overrides, message', [
    (8, dict(batch_size=12), 'not divisible by the data-parallel size'),
    (8, dict(mesh__data=4, mesh__tensor=4), 'has 16 devices but JAX sees 8'),
])
def test_bad_mesh_or_batch_is_a_clear_error(tmp_path, devices, overrides, message):
  result = run_trainer(tmp_path, devices=devices, overrides=_overrides(**overrides),
                       check=False)
  assert result.returncode == 1
  assert message in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.parametrize('flag, message', [
    ('--config.model.attention=foo', "config.model.attention='foo' is not one of: standard"),
    ('--config.model.attention_impl=flash', "config.model.attention_impl='flash' is not one of"),
    ('--config.data.text_files=/tmp/x.txt',
     'Fix: add --config.data.task=bert_sym_mlm_text_files'),
    ('--config.on_nonfinite=ignore', "config.on_nonfinite='ignore' is not one of: stop, skip"),
    ('--config.total_steps=-5', 'config.total_steps=-5 must be an integer >= 1'),
])
def test_bad_config_value_fails_before_anything_is_written(tmp_path, flag, message):
  """The real command line (no synthetic input): one line, exit 1, no workdir created."""
  workdir = tmp_path / 'never_created'
  result = run_trainer(workdir, flag, synthetic=False, check=False, timeout=60)
  assert result.returncode == 1, result.stderr[-2000:]
  error_lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert error_lines == [l for l in error_lines if 'error:' in l] and len(error_lines) == 1, (
      result.stderr[-2000:])
  assert message in error_lines[0]
  assert not workdir.exists()


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  for workdir in (blocker / 'run', blocker):   # under a file, or a file itself
    result = run_trainer(workdir, overrides=_overrides(), check=False)
    assert result.returncode == 1
    assert (f'Cannot write to --workdir={workdir}: {blocker} is a file, not a directory. '
            'Pass a writable directory') in result.stderr, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, reference_run):
  workdir = tmp_path / 'copy'
  shutil.copytree(reference_run[0], workdir)
  config_before = (workdir / 'config.json').read_text()
  written = json.loads(config_before)['model']['mlp_dim']
  result = run_trainer(workdir, overrides=_overrides(model__mlp_dim=48), check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'intermediate/kernel' in result.stderr and 'another config' in result.stderr
  assert 'Traceback' not in result.stderr
  # The cause leads, with the flag that resumes: the arrays come after (they were 15 lines
  # in front of it, the cause second to last).
  [first] = [line for line in result.stderr.splitlines() if 'error:' in line]
  assert (f'model.mlp_dim={written} in its config.json, 48 now. Fix: rerun with '
          f'--config.model.mlp_dim={written} to resume it, or use a fresh --workdir') in first
  assert (workdir / 'config.json').read_text() == config_before   # left untouched


def test_an_unparsable_config_json_is_one_line_naming_it(tmp_path):
  workdir = tmp_path / 'edited'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"seed": 0, ')   # cut short by a hand edit
  result = run_trainer(workdir, overrides=_overrides(total_steps=2), check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if 'error' in line]
  assert len(errors) == 1 and 'config.json is not valid JSON' in errors[0], errors
  assert (workdir / 'config.json').read_text() == '{"seed": 0, '   # left as it was


def test_a_config_json_that_is_not_an_object_is_named(tmp_path):
  """A hand edit leaving valid JSON that is not an object (`[]`): ConfigDict raised a bare
  AttributeError traceback."""
  (tmp_path / 'config.json').write_text('[]')
  with pytest.raises(ValueError, match=r'config.json holds a JSON list, not an object; it '
                     r"holds the run's config. Fix: put back a copy"):
    checkpoint.read_config(tmp_path)


def test_a_finished_run_that_lost_its_config_json_gets_it_back_from_its_command(
    tmp_path, reference_run):
  """read_config's fix for a damaged config.json: remove it and rerun the training
  command. A finished run's rerun trains nothing and kept its config.json, so it wrote
  none either, and export and GLUE could not read the workdir again."""
  source, _ = reference_run
  workdir = tmp_path / 'workdir'
  shutil.copytree(source, workdir)
  written = (workdir / 'config.json').read_text()
  (workdir / 'config.json').unlink()
  # Until then, what reads it names the deleted file and the fix, not "not a workdir".
  with pytest.raises(FileNotFoundError, match=r'config.json does not exist, though .* holds '
                     r'checkpoints: .* Fix: put back a copy of it, or rerun the training'):
    checkpoint.read_config(workdir)
  run_trainer(workdir, overrides=_overrides())   # finished: nothing trains
  assert (workdir / 'config.json').read_text() == written
  assert checkpoint.finished_steps(workdir) == checkpoint.finished_steps(source)


# ---------------------------------------------------------------------------------------
# Training, layouts, resume.
# ---------------------------------------------------------------------------------------

def test_reference_run_writes_everything(reference_run):
  workdir, result = reference_run
  config = checkpoint.read_config(workdir)
  assert config.total_steps == STEPS and config.model.hidden_size == 32
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [4, 8, 12, 16]
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  metrics = _metrics(workdir)
  last = [m for m in metrics if 'perf/tokens_per_sec' in m][-1]
  for key in ('train/loss', 'train/mlm_accuracy', 'train/learning_rate', 'train/grad_norm',
              'perf/steps_per_sec', 'perf/tokens_per_sec', 'perf/tflops_per_device'):
    assert np.isfinite(last[key]), key
  assert any('eval/loss' in m for m in metrics)
  assert 'ETA' in result.stdout and 'tok/s' in result.stdout
  # The kernel that runs is said by default (auto's choice is otherwise an INFO log), on
  # the first line, as the README says.
  assert re.fullmatch(r"Mesh \{.*\} over 1 cpu device\(s\), 1 process\(es\); "
                      r"attention=pairwise, kernel xla", result.stdout.splitlines()[0]), (
                          result.stdout)
  # No MFU against a made-up CPU peak (config.peak_flops_per_device is 0).
  assert 'MFU' not in result.stdout and not any('perf/mfu' in m for m in metrics)
  # The run ends on a summary, not on library logs.
  tail = result.stdout.strip().splitlines()[-6:]
  assert tail[0].startswith(f'Done: step {STEPS}. Final eval MLM loss'), tail
  assert any(f'Checkpoint: {workdir}/checkpoints/{STEPS}' in l for l in tail)
  assert f'Metrics: {workdir}/metrics.jsonl; tensorboard --logdir {workdir}/tensorboard' in tail
  assert any('python -m bert_sym.hf_export' in l for l in tail)
  assert any('python -m bert_sym.glue' in l for l in tail)
  assert 'orbax' not in result.stdout + result.stderr
  _, params = checkpoint.load_pretrained(workdir)
  assert params['encoder']['layer_0']['attention']['pairwise'].shape == (2, 16, 16)


def test_the_summary_names_tensorboard_only_where_its_events_were_written(tmp_path,
                                                                         monkeypatch):
  """GPU images may lack the tensorboard package: the metrics are then in metrics.jsonl
  only, and the summary must not send the user to a log directory that does not exist."""
  monkeypatch.setitem(sys.modules, 'tensorboard.compat.proto', None)   # not installed
  writer = metrics_writer.MetricWriter(str(tmp_path))
  run = types.SimpleNamespace(eval_metrics={}, last_saved=None, writer=writer)
  summary = pretrain_loop.closing_summary(tmp_path, 3, run).splitlines()
  writer.close()
  assert not (tmp_path / 'tensorboard').exists()
  assert f'Metrics: {tmp_path}/metrics.jsonl' in summary, summary
  assert 'tensorboard' not in '\n'.join(summary)


def test_config_json_reproduces_the_run(tmp_path, reference_run):
  workdir = reference_run[0]
  run_trainer(tmp_path, config=f'configs/from_json.py:{workdir / "config.json"}',
              apply_tiny=False)
  assert (tmp_path / 'config.json').read_text() == (workdir / 'config.json').read_text()
  _assert_params_equal(_final_params(tmp_path), _final_params(workdir))


@pytest.mark.parametrize('name, mesh', [
    ('data_parallel', dict(mesh__data=8)),
    ('fsdp', dict(mesh__data=1, mesh__fsdp=8)),
    ('data_x_tensor', dict(mesh__data=4, mesh__tensor=2)),
])
def test_mesh_layouts_match_single_device(tmp_path, reference_run, name, mesh):
  del name
  workdir = tmp_path / 'run'
  # Saves at 8 and 16, not every 4 (~1 s of CPU a save): the one at 8 is async, taken
  # while the next sharded steps train on each layout; the final one is compared below.
  # The evals at 0, 8 and 16 stay: the eval step on each layout runs too.
  run_trainer(workdir, devices=8, overrides=_overrides(total_steps=STEPS,
                                                       checkpoint__every_steps=STEPS // 2,
                                                       **mesh))
  reference = _train_losses(reference_run[0])
  losses = _train_losses(workdir)
  assert losses.keys() == reference.keys()
  for step in reference:
    np.testing.assert_allclose(losses[step], reference[step], rtol=1e-4, err_msg=f'{step}')
  _assert_params_close(_final_params(workdir), _final_params(reference_run[0]))


def _assert_one_row_per_step(workdir):
  rows = [(m['step'], 'eval/loss' in m) for m in _metrics(workdir)]
  assert len(rows) == len(set(rows)), f'duplicate metrics rows: {sorted(rows)}'
  steps = [step for step, _ in rows]
  assert steps == sorted(steps)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, reference_run):
  workdir = tmp_path / 'killed'
  # Held at step 12's batch until killed: slowed to 0.15 s a batch instead, the rest of
  # the run took under a second after step 10's row, and a test process starved that long
  # (a loaded CI machine) killed a finished run (killed_at 16).
  held = {'SYNTHETIC_WAIT_FOR_FILE': str(tmp_path / 'never'), 'SYNTHETIC_WAIT_AT_BATCH': '11'}
  process = run_trainer(workdir, overrides=_overrides(), background=True, env=held)
  # Kill somewhere after the step-8 save was finalised, i.e. mid-way through step 9-12.
  _wait_for(lambda: (workdir / 'checkpoints' / '8').is_dir(), process)
  # Mid-way through steps 9-12: once step 9's row is logged (an event, not a delay).
  _wait_for(lambda: _logged_step(workdir) >= 9, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = int(checkpoint.resolve_step_dir(workdir).name)
  assert killed_at == 8
  [[first_run, started_from]] = checkpoint.lineage_of(workdir / 'checkpoints' / '8')
  assert started_from == -1
  with open(workdir / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 12, "train/lo')   # a row cut off by the kill (or by a full disk)
  result = run_trainer(workdir, overrides=_overrides())
  assert 'Resumed from step' in result.stdout
  assert "moved 1 line(s) that are not JSON rows" in result.stderr
  # ... to metrics.jsonl.dropped, kept (was deleted), after the line naming the resume
  assert '{"step": 12, "train/lo' in (workdir / 'metrics.jsonl.dropped').read_text().splitlines()
  _assert_params_equal(_final_params(workdir), _final_params(reference_run[0]))
  _assert_one_row_per_step(workdir)   # rows logged after step 8 were redone, not doubled
  # The steps after the resume record the start that wrote them, after the first one's.
  [first, (resumed_run, resumed_from)] = checkpoint.lineage_of(workdir / 'checkpoints' / '16')
  assert first == [first_run, -1] and resumed_from == killed_at and resumed_run != first_run


def _truncate_data_files(step_dir):
  for f in (step_dir / 'state').rglob('d/*'):
    f.write_bytes(f.read_bytes()[:10])


def _truncate_the_largest_data_file(step_dir):
  """Array bytes only, the metadata intact: orbax's array read fails, wrapped in a bare
  Exception whose cause (TensorStore OUT_OF_RANGE) alone says the step is damaged."""
  largest = max((step_dir / 'state').rglob('d/*'), key=lambda f: f.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:10])


def _delete_the_largest_data_file(step_dir):
  """Gone from under its OCDBT manifest: TensorStore says FAILED_PRECONDITION (a
  "Truncated Zstd-compressed stream"), not NOT_FOUND."""
  max((step_dir / 'state').rglob('d/*'), key=lambda f: f.stat().st_size).unlink()


def _cut_the_sharding_file(step_dir):
  sharding = step_dir / 'state' / '_sharding'   # FAILED_PRECONDITION: ... Invalid JSON
  sharding.write_bytes(sharding.read_bytes()[:10])


_DAMAGES = {
    'truncated_data_file': _truncate_data_files,
    'truncated_array_bytes': _truncate_the_largest_data_file,
    'deleted_array_file': _delete_the_largest_data_file,
    'cut_sharding_file': _cut_the_sharding_file,
    'missing_METADATA': lambda step_dir: (step_dir / 'state' / '_METADATA').unlink(),
    'missing_data_iter_metadata': lambda step_dir: (step_dir / 'data_iter' / 'metadata').unlink(),
}


@pytest.mark.parametrize('damages', [
    ('truncated_data_file', 'truncated_array_bytes', 'deleted_array_file'),
    ('cut_sharding_file', 'missing_METADATA', 'missing_data_iter_metadata'),
], ids=['array_files', 'metadata_files'])
def test_damaged_newest_checkpoint_falls_back_to_previous_step(tmp_path, reference_run,
                                                               damages):
  """A run whose newest checkpoints (16, 12, 8) were each damaged in one way resumes from
  4, says which it skipped, and ends bitwise equal to the uninterrupted run. (Three kinds
  of damage per run, each on its own step: every step is tried, newest first, and each is
  named, so a damage the restore took for a good step would stop the fall-back there.)"""
  workdir = tmp_path / 'damaged'
  shutil.copytree(reference_run[0], workdir)
  for step, name in zip((16, 12, 8), damages):
    _DAMAGES[name](workdir / 'checkpoints' / str(step))
  result = run_trainer(workdir, overrides=_overrides())
  output = result.stdout + result.stderr
  for step, name in zip((16, 12, 8), damages):
    assert f'checkpoint step {step} cannot be restored' in output, (name, output[-3000:])
  assert 'Resumed from step 4' in result.stdout
  assert 'Exception ignored' not in output and 'Traceback' not in output
  assert len(output.splitlines()) < 40
  assert sorted(p.name.split('-')[0] for p in (workdir / 'damaged_checkpoints').iterdir()) == [
      '12', '16', '8']
  _assert_params_equal(_final_params(workdir), _final_params(reference_run[0]))
  _assert_one_row_per_step(workdir)


def test_start_over_and_verbosity_as_typed_on_the_command_line(tmp_path, reference_run):
  """Every checkpoint damaged: the trainer stops naming --start_over, quietly (no absl INFO
  lines); `--start_over` trains from step 0, keeping the old rows, and `--verbosity=0`
  shows the libraries' INFO logs."""
  workdir = tmp_path / 'all_damaged'
  shutil.copytree(reference_run[0], workdir)
  for step_dir in (workdir / 'checkpoints').iterdir():
    (step_dir / 'state' / '_METADATA').unlink()
  absl_info = re.compile(r'^I\d{4} \d\d:\d\d:\d\d', re.MULTILINE)
  refused = run_trainer(workdir, overrides=_overrides(), check=False)
  assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
  assert '--start_over' in refused.stderr and 'Traceback' not in refused.stderr
  assert not absl_info.search(refused.stdout + refused.stderr)
  result = run_trainer(workdir, '--start_over', '--verbosity=0',
                       overrides=_overrides(total_steps=4, eval_every_steps=4))
  assert 'Resumed' not in result.stdout
  assert absl_info.search(result.stdout + result.stderr), result.stderr[-3000:]
  assert checkpoint.finished_steps(workdir) == [4]
  [[new_run, started_from]] = checkpoint.lineage_of(workdir / 'checkpoints' / '4')
  assert started_from == -1   # a run of its own, not the one the damaged steps were
  assert new_run not in str(checkpoint.lineage_of(reference_run[0] / 'checkpoints' / '16'))
  assert len(list(workdir.glob('metrics.jsonl.*.old'))) == 1
  assert _metrics(workdir)[0]['step'] == 0


def test_ctrl_c_saves_and_resumes(tmp_path, reference_run):
  workdir = tmp_path / 'interrupted'
  # Held at step 11's batch until the Ctrl-C has been taken: slowed to 0.15 s a batch
  # instead, a test process starved for the 1.8 s left after step 4's save signalled a
  # finished run (exit 0).
  gate = tmp_path / 'ctrl_c_taken'
  process = run_trainer(workdir, overrides=_overrides(), background=True,
                        env={'SYNTHETIC_WAIT_FOR_FILE': str(gate),
                             'SYNTHETIC_WAIT_AT_BATCH': '10'})
  _wait_for(lambda: (workdir / 'checkpoints' / '4').is_dir(), process)
  # And once step 6 is logged, step 4's save call has returned: the asynchronous save
  # renames the directory in a thread of its own, which can do so before that call
  # returns, and a Ctrl-C taken inside the save stops at step 4 itself.
  _wait_for(lambda: _logged_step(workdir) >= 6, process)
  process.send_signal(signal.SIGINT)
  watchdog = threading.Timer(120, process.kill)   # a hung run ends the readline below
  watchdog.start()
  read = ['']
  while 'Ctrl-C: saving' not in read[-1]:   # printed (and flushed) by the handler
    read.append(process.stdout.readline())
    assert read[-1], 'the trainer ended before taking the Ctrl-C:\n' + ''.join(read)
  watchdog.cancel()
  gate.write_text('')
  output = ''.join(read) + process.communicate(timeout=120)[0]
  assert process.returncode == train.INTERRUPTED_EXIT_CODE == 130, output[-3000:]
  assert 'Traceback' not in output
  stopped_at = int(checkpoint.resolve_step_dir(workdir).name)
  # Said once (the loop's line and the entry point's log line said it twice).
  assert output.count('stopped by SIGINT') + output.count('Stopped by SIGINT') == 1, output
  assert (f'Stopped by SIGINT: saved step {stopped_at}, exiting with code 130 (rerun the '
          'same command to resume).') in output
  assert 4 < stopped_at < STEPS
  result = run_trainer(workdir, overrides=_overrides())
  assert f'Resumed from step {stopped_at}' in result.stdout
  _assert_params_equal(_final_params(workdir), _final_params(reference_run[0]))


def test_sigterm_saves_exits_42_and_resumes_on_another_mesh(tmp_path, reference_run):
  """Preempted on 8 devices (fsdp), resumed on 1: same result as never stopping.

  The exit code is train.PREEMPTED_EXIT_CODE (not 0), so launchers know to requeue.
  """
  workdir = tmp_path / 'preempted'
  mesh8 = dict(mesh__data=1, mesh__fsdp=8)
  # Slow input (the trainer prefetches it, so it must be slower than a save of step 4
  # takes to appear on disk), so that SIGTERM lands between scheduled saves.
  process = run_trainer(workdir, devices=8, overrides=_overrides(**mesh8), background=True,
                        env={'SYNTHETIC_SLEEP_SECONDS': '1.0'})
  _wait_for(lambda: (workdir / 'checkpoints' / '4').is_dir(), process)
  # And once step 6 is logged, step 4's save call has returned: the asynchronous save
  # renames the directory in a thread of its own, which can do so before that call
  # returns, and a SIGTERM taken inside the save stops at step 4 itself.
  _wait_for(lambda: _logged_step(workdir) >= 6, process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == train.PREEMPTED_EXIT_CODE == 42, output[-3000:]
  assert 'Stopped by SIGTERM' in output
  assert 'Traceback' not in output
  stopped_at = int(checkpoint.resolve_step_dir(workdir).name)
  assert 4 < stopped_at < STEPS   # usually off-schedule; on a loaded machine maybe 8
  result = run_trainer(workdir, devices=1, overrides=_overrides())
  assert result.returncode == 0   # a finished run exits 0
  assert f'Resumed from step {stopped_at}' in result.stdout
  _assert_params_close(_final_params(workdir), _final_params(reference_run[0]))


def test_gradient_accumulation_matches_big_batch(tmp_path):
  no_dropout = dict(model__dropout_rate=0.0, model__attention_dropout_rate=0.0,
                    total_steps=4, checkpoint__every_steps=4)
  run_trainer(tmp_path / 'big', overrides=_overrides(**no_dropout))
  run_trainer(tmp_path / 'accum', overrides=_overrides(optimizer__grad_accum_steps=4,
                                                       **no_dropout))
  big, accum = _train_losses(tmp_path / 'big'), _train_losses(tmp_path / 'accum')
  for step in big:
    np.testing.assert_allclose(accum[step], big[step], rtol=1e-5)
  _assert_params_close(_final_params(tmp_path / 'accum'), _final_params(tmp_path / 'big'),
                       atol=1e-6)


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path):
  # Batch index 5 is consumed by step 6: the step-4 checkpoint is the last good one.
  result = run_trainer(tmp_path, overrides=_overrides(), env={'SYNTHETIC_NAN_AT_BATCH': '5'},
                       check=False)
  assert result.returncode == 1
  assert 'Non-finite loss or gradient at step 6' in result.stderr
  assert 'Traceback' not in result.stderr
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['4']
  params = _final_params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nonfinite_skip_continues(tmp_path):
  # Only the final checkpoint is read (one save, not four).
  result = run_trainer(tmp_path, overrides=_overrides(on_nonfinite='skip',
                                                      checkpoint__every_steps=STEPS),
                       env={'SYNTHETIC_NAN_AT_BATCH': '5'})
  assert checkpoint.resolve_step_dir(tmp_path).name == str(STEPS)
  skipped = sum(m.get('train/nonfinite_steps', 0) for m in _metrics(tmp_path))
  assert skipped == 1, result.stdout[-2000:]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_final_params(tmp_path)))
  # The skipped step still advanced the lr schedule (so the last update used
  # schedule(STEPS - 1) and the schedule hits 0 at total_steps), while Adam's moments and
  # bias-correction count skipped it.
  counts = _optimizer_counts(tmp_path)
  assert counts[optax.ScaleByScheduleState] == STEPS
  assert counts[optax.ScaleByAdamState] == STEPS - 1


def _optimizer_counts(workdir):
  """{optax state type: count} of the latest checkpoint's opt_state."""
  step_dir = checkpoint.resolve_step_dir(workdir)
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(step_dir / checkpoint.STATE).item_metadata.tree
  raw = ckptr.restore(step_dir / checkpoint.STATE, args=ocp.args.PyTreeRestore(
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  config = checkpoint.read_config(workdir)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  # The checkpoint stores optax's namedtuples as lists/dicts in the same leaf order.
  abstract = jax.eval_shape(tx.init, raw['params'])
  opt_state = jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(raw['opt_state']))
  kinds = (optax.ScaleByScheduleState, optax.ScaleByAdamState)
  return {type(s): int(s.count) for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, kinds)) if isinstance(s, kinds)}


def _two_processes(workdir, overrides, env=None):
  """The trainer as 2 local processes x 2 CPU devices (jax.distributed, gloo), started."""
  address = train_fixtures.coordinator_address()
  return [run_trainer(workdir, f'--coordinator_address={address}', '--num_processes=2',
                      f'--process_id={i}', devices=2, overrides=overrides, background=True,
                      env=env)
          for i in range(2)]


def _outputs_of(processes, timeout):
  """Each process's output once it has exited; every one is killed if one overruns (a
  hung process must not outlive the test)."""
  try:
    return [p.communicate(timeout=timeout)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()


def test_two_processes_started_as_two_runs_stop_at_once_in_one_line(tmp_path):
  """Hosts given different workdirs (node-local paths) trained, then hung at the first
  save with no step ever complete; hosts given different overrides hung in a collective
  (total_steps) or trained one model from two recipes, without a word. Both now stop
  before the first step, every process with the same line. So does a workdir that only
  process 0 (which serves jax.distributed) cannot create: it left, and the other aborted
  in a page of C++ stack (SIGABRT, "the JAX distributed service detected fatal errors").
  Hosts reading different copies of the data (a node-local export of another corpus) each
  trained on their own and saved their diverging positions: they now stop in the same way."""
  (tmp_path / 'a_file').write_text('')   # a directory under it cannot be made, even by root
  for name, per_process, message in (
      ('workdirs', [[], []], 'is not one directory shared by every process: process(es) 1 '
                             'do not see the lock file'),
      ('configs', [[], ['--config.seed=7']], 'started with different configs: process 1 '
                                             'differs from process 0 in seed=7 (process 0: '),
      ('unwritable', [[], []], f'Cannot write to --workdir={tmp_path / "a_file" / "run"}: '),
      ('data', [[], []], "read different data: process 1's train split has corpus='another' "
                         '(process 0: None). Fix: give every host the same data')):
    workdirs = {'workdirs': [tmp_path / name / 'host0', tmp_path / name / 'host1'],
                'unwritable': [tmp_path / 'a_file' / 'run', tmp_path / name / 'run']}.get(
                    name, [tmp_path / name / 'run'] * 2)
    address = train_fixtures.coordinator_address()
    processes = [run_trainer(workdirs[i],
                             f'--coordinator_address={address}', '--num_processes=2',
                             f'--process_id={i}', *per_process[i], devices=2,
                             overrides=_overrides(), background=True,
                             env={'SYNTHETIC_CORPUS': 'another'} if name == 'data' and i else None)
                 for i in range(2)]
    outputs = _outputs_of(processes, timeout=240)
    for p, out in zip(processes, outputs):
      errors = [line for line in out.splitlines() if 'bert_sym.train: error:' in line]
      assert p.returncode == 1 and 'Traceback' not in out, out[-3000:]
      assert len(errors) == 1 and message in errors[0], out[-3000:]
      assert 'step 1' not in out
    if name == 'unwritable':
      assert 'process 0 of this run stopped on its inputs: ' in outputs[1]
    assert not list((tmp_path / name).rglob('checkpoints/*'))
    assert not list((tmp_path / name).rglob('trainer.lock'))   # released on the way out


def test_inputs_refused_on_one_host_stop_every_host_in_one_line(tmp_path):
  """One host's inputs fail its checks (a data path missing on one node's disk; here a
  mesh only it was given): that host left, and the other died in a traceback at the
  config comparison ("Gloo context initialization failed: ... GetKeyValue() timed out").
  Each now stops in one line, the other naming the process and its error."""
  address = train_fixtures.coordinator_address()
  processes = [run_trainer(tmp_path, f'--coordinator_address={address}', '--num_processes=2',
                           f'--process_id={i}', *(['--config.mesh.data=3'] if i else []),
                           devices=2, overrides=_overrides(), background=True)
               for i in range(2)]
  outputs = _outputs_of(processes, timeout=240)
  for p, out in zip(processes, outputs):
    errors = [line for line in out.splitlines() if 'bert_sym.train: error:' in line]
    assert p.returncode == 1 and 'Traceback' not in out, out[-3000:]
    assert len(errors) == 1 and 'mesh' in errors[0], out[-3000:]
  assert 'process 1 of this run stopped on its inputs: ' in outputs[0]
  assert not (tmp_path / 'checkpoints').exists()


def test_two_processes_stop_at_one_step_on_sigterm_to_one_and_match_one_process(
    tmp_path, reference_run):
  """jax.distributed over 2 local processes x 2 CPU devices, gloo collectives. A preemption
  notice reaches one host of two: JAX's preemption sync point (through orbax) makes both
  save the same step and exit 42; a rerun of both resumes from it and ends where an
  uninterrupted single-device run ends (losses and parameters). A local signal handler
  would stop only the host that got the signal; the other would hang in a collective."""
  workdir = tmp_path / 'preempted'
  processes = _two_processes(workdir, _overrides(), env={'SYNTHETIC_SLEEP_SECONDS': '1.0'})
  _wait_for(lambda: (workdir / 'checkpoints' / '4').is_dir(), processes[0], timeout=240)
  processes[1].send_signal(signal.SIGTERM)   # the non-coordinator host only
  outputs = _outputs_of(processes, timeout=240)
  for p, out in zip(processes, outputs):
    assert p.returncode == train.PREEMPTED_EXIT_CODE, out[-5000:]
    assert 'Traceback' not in out, out[-5000:]
  stopped_at = int(checkpoint.resolve_step_dir(workdir).name)
  assert 4 < stopped_at < STEPS
  assert f'saved step {stopped_at}, exiting with code 42' in outputs[0]
  processes = _two_processes(workdir, _overrides())
  outputs = _outputs_of(processes, timeout=240)
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-5000:]
  assert f'Resumed from step {stopped_at}' in outputs[0]
  assert 'Mesh' in outputs[0] and 'Mesh' not in outputs[1]   # only process 0 logs
  # 2 processes x 2 devices, stopped and resumed, train as 1 device does uninterrupted.
  reference = _train_losses(reference_run[0])
  losses = _train_losses(workdir)
  # A row averages the steps since the previous row. A stop between rows writes none: the
  # save keeps those steps (its meter state) and the rerun's first row averages them with
  # its own, so the rows are the reference's, whether the stop fell on a row or between.
  assert sorted(losses) == sorted(reference)
  for step in reference:
    np.testing.assert_allclose(losses[step], reference[step], rtol=1e-4)
  _assert_params_close(_final_params(workdir), _final_params(reference_run[0]))
  states = json.loads((workdir / 'checkpoints' / str(STEPS) / 'data_iter' / 'metadata')
                      .read_text())
  assert states['process_count'] == 2 and len(states['states']) == 2


def test_ctrl_c_to_a_two_process_run_stops_both_in_one_line_keeping_the_checkpoints(tmp_path):
  """Ctrl-C in a terminal reaches every process (srun, mpirun): with several processes
  there is no handler (a local one would stop one process at a step the others never
  reach), so each stops at once, exit 130, saying how to save instead; the checkpoints
  written so far are intact (the newest loads).

  The signal comes while both wait for step 7's batch (held): one process still blocked in
  a collective at a log step cannot take it (gloo's C++ wait), and the one that took it
  left that process to be aborted when the coordination service went down with it."""
  held = {'SYNTHETIC_WAIT_FOR_FILE': str(tmp_path / 'never'), 'SYNTHETIC_WAIT_AT_BATCH': '6'}
  processes = _two_processes(tmp_path, _overrides(), env=held)
  # Step 6's row is written once both processes are past its collectives (not a save or
  # eval step: nothing else follows it).
  _wait_for(lambda: _logged_step(tmp_path) >= 6, processes[0], timeout=240)
  for p in processes:
    p.send_signal(signal.SIGINT)
  outputs = _outputs_of(processes, timeout=120)
  for p, out in zip(processes, outputs):
    assert p.returncode == train.INTERRUPTED_EXIT_CODE, out[-5000:]
    assert ('stopped by Ctrl-C on a multi-process run (it saves on SIGTERM only' in out
            and 'Traceback' not in out), out[-5000:]
  newest = checkpoint.finished_steps(tmp_path)[-1]
  assert newest >= 4 and checkpoint.load_params(tmp_path / 'checkpoints' / str(newest))


def test_two_process_divergence_sets_its_checkpoints_aside_once_and_both_stop(tmp_path):
  """Process 0 renames and both hosts wait at each rename, so both must set aside the same
  steps: process 0's list (a host listing after a rename used to skip that barrier and
  leave the other waiting). Both stop with exit 1; step 3 is set aside once."""
  diverging = _overrides(checkpoint__every_steps=3, optimizer__learning_rate=1e6)
  processes = _two_processes(tmp_path, diverging)
  outputs = _outputs_of(processes, timeout=240)
  for p, out in zip(processes, outputs):
    assert p.returncode == 1, out[-5000:]
    assert 'Non-finite loss or gradient at step' in out
  assert 'Set aside checkpoint step 3' in outputs[0]
  assert checkpoint.finished_steps(tmp_path) == []
  assert sorted(p.name.split('-')[0] for p in (tmp_path / 'damaged_checkpoints').iterdir()
                if p.name.endswith('-diverged')) == ['3']


def test_real_input_pipeline_trains_and_resumes(tmp_path, tmp_path_factory):
  """bert_sym.train's own command line on the embedded corpus (seqio task): the session's
  4-step run (train_fixtures.real_pretrained, which the GLUE tests fine-tune), resumed for
  one more step. A fresh 2-step run here cost a second real-corpus trainer start (~20 s)."""
  pretrained, stdout = train_fixtures.real_pretrained(tmp_path_factory)
  assert 'step 4/4' in stdout and 'eval step 4' in stdout
  workdir = tmp_path / 'run'
  shutil.copytree(pretrained, workdir)   # the fixture is read-only
  flags = [f'--config.{k}={v}'
           for k, v in dict(train_fixtures.REAL_TINY, total_steps=5).items()]
  result = run_trainer(workdir, *flags, synthetic=False)
  assert 'Resumed from step 4' in result.stdout and 'step 5/5' in result.stdout
  state = json.loads((workdir / 'checkpoints' / '5' / 'data_iter' / 'metadata').read_text())
  assert state['states'][0]['step'] == 5


# ---------------------------------------------------------------------------------------
# Pieces.
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('warmup, total', [(3, 20), (0, 7), (10, 10), (1, 1)])
def test_lr_schedule_matches_hugging_face(warmup, total):
  """Every step 0..total against transformers.get_linear_schedule_with_warmup."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  opt = train_fixtures.tiny_config(optimizer__warmup_steps=warmup).optimizer
  ours = optim.learning_rate_schedule(opt, total)
  torch_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=opt.learning_rate)
  hf = transformers.get_linear_schedule_with_warmup(torch_opt, warmup, total)
  for step in range(total + 1):
    np.testing.assert_allclose(float(ours(step)), hf.get_last_lr()[0], rtol=1e-6,
                               atol=1e-12, err_msg=f'step {step}')
    torch_opt.step()
    hf.step()


def test_weight_decay_mask_matches_hugging_face():
  """Hugging Face's no_decay = ['bias', 'LayerNorm.weight'] on the exported names."""
  import transformers  # pylint: disable=g-import-not-at-top
  from bert_sym import hf_export as export  # pylint: disable=g-import-not-at-top

  # 'standard' maps one to one onto HF's parameters (the other variants fold W_k).
  cfg = train_fixtures.tiny_config(model__attention='standard').model
  params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32),
                        model_lib.abstract_params(model_lib.BertForMaskedLM(cfg)))
  mask = optim.weight_decay_mask(params)
  # Carry the mask through the exporter: each HF tensor is all 1 (decayed) or all 0.
  as_hf = export.mlm_params_to_hf(
      jax.tree.map(lambda p, m: np.full(p.shape, float(m), np.float32), params, mask), cfg)
  hf_model = transformers.BertForMaskedLM(
      transformers.BertConfig(**export.hf_bert_config_kwargs(cfg)))
  no_decay = ['bias', 'LayerNorm.weight']
  hf_decayed = 0
  # named_parameters() lists tied tensors (decoder = word embeddings) once, as HF's
  # optimizer grouping sees them.
  for name, parameter in hf_model.named_parameters():
    hf_decays = not any(nd in name for nd in no_decay)
    values = np.unique(as_hf[name])
    assert len(values) == 1 and bool(values[0]) == hf_decays, name
    hf_decayed += parameter.numel() * hf_decays
  ours_decayed = sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(mask)) if m)
  assert ours_decayed == hf_decayed > 0
  # The variants' extra parameter (P_h) has no HF counterpart; it is a matrix: decayed.
  pairwise = optim.weight_decay_mask(model_lib.abstract_params(model_lib.BertForMaskedLM(
      train_fixtures.tiny_config(model__attention='pairwise').model)))
  assert pairwise['encoder']['layer_0']['attention']['pairwise']


def test_slurm_local_device_ids():
  base = {'SLURM_LOCALID': '3', 'SLURM_NODEID': '1', 'SLURM_STEP_TASKS_PER_NODE': '8(x2)'}
  # --gpus-per-node=8 --ntasks-per-node=8: every task sees 8 GPUs and takes its own.
  assert distributed.slurm_local_device_ids(
      dict(base, CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7')) == [3]
  # --gpus-per-task=1: the task sees only its GPU, as ordinal 0 (jax's default: [3]).
  assert distributed.slurm_local_device_ids(
      dict(base, CUDA_VISIBLE_DEVICES='3', SLURM_GPUS_PER_TASK='1')) == [0]
  assert distributed.slurm_local_device_ids(dict(base, CUDA_VISIBLE_DEVICES='5')) == [0]
  # --gpus-per-task=1 --gpu-bind=none: every task sees the node's 8 (all 8 tasks drove all 8).
  assert distributed.slurm_local_device_ids(dict(
      base, CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7', SLURM_GPUS_PER_TASK='1')) == [3]
  assert distributed.slurm_local_device_ids(dict(   # 2 each, typed: 'h100:2'
      base, SLURM_STEP_TASKS_PER_NODE='4(x2)', CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7',
      SLURM_GPUS_PER_TASK='h100:2')) == [6, 7]
  assert distributed.slurm_local_device_ids(dict(   # bound: sees its own 2
      base, CUDA_VISIBLE_DEVICES='6,7', SLURM_GPUS_PER_TASK='2')) == [0, 1]
  # One task per node drives all of them; 2 tasks x 4 shared GPUs take slices.
  one = {'SLURM_LOCALID': '0', 'SLURM_NODEID': '0', 'SLURM_STEP_TASKS_PER_NODE': '1(x4)',
         'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
  assert distributed.slurm_local_device_ids(one) == [0, 1, 2, 3]
  assert distributed.slurm_local_device_ids(
      dict(one, SLURM_LOCALID='1', SLURM_STEP_TASKS_PER_NODE='2,2')) == [2, 3]
  # A step on fewer nodes than the allocation (srun -N1 on its second node): JAX's default.
  assert distributed.slurm_local_device_ids(
      {'SLURM_LOCALID': '0', 'SLURM_NODEID': '1', 'SLURM_STEP_TASKS_PER_NODE': '2',
       'CUDA_VISIBLE_DEVICES': '0,1'}) is None
  # Not SLURM, or no GPU list: JAX's own default.
  assert distributed.slurm_local_device_ids({'CUDA_VISIBLE_DEVICES': '0'}) is None
  assert distributed.slurm_local_device_ids(dict(base)) is None
  # --gpu-bind=closest on 2 sockets: each of the node's 8 tasks sees its socket's 4 GPUs.
  # All 8 drove all 4 they saw: every GPU claimed by 4 processes.
  closest = dict(base, CUDA_VISIBLE_DEVICES='4,5,6,7')
  with pytest.raises(app.UsageError, match=r'sees 4 GPUs .* 8 tasks, so tasks would share'):
    distributed.slurm_local_device_ids(closest)
  with pytest.raises(app.UsageError, match='--gpus-per-task=1'):   # 9 tasks, 8 GPUs
    distributed.slurm_local_device_ids(dict(base, SLURM_STEP_TASKS_PER_NODE='9,7', SLURM_NODEID='0',
                                            CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'))
  # A node with GPUs enough for each task's own pair (SLURM_GPUS_ON_NODE): all of them.
  assert distributed.slurm_local_device_ids(
      dict(base, CUDA_VISIBLE_DEVICES='6,7', SLURM_GPUS_ON_NODE='16')) == [0, 1]
  # closest with 2 tasks on 8 GPUs: each sees its socket's 4 and drives them (it took a
  # half of them as if all 8 were shared, leaving GPUs 2-5 idle).
  two = dict(base, SLURM_STEP_TASKS_PER_NODE='2(x2)', SLURM_GPUS_ON_NODE='8')
  assert distributed.slurm_local_device_ids(
      dict(two, SLURM_LOCALID='1', CUDA_VISIBLE_DEVICES='4,5,6,7')) == [0, 1, 2, 3]
  assert distributed.slurm_local_device_ids(   # no binding: all 8 seen, halves taken
      dict(two, SLURM_LOCALID='1', CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7')) == [4, 5, 6, 7]


def test_only_a_process_srun_started_counts_as_multi_process(monkeypatch):
  """A batch script's own shell (or `salloc -n 4`'s) has SLURM_NTASKS=4 but no step:
  taking it for a multi-process run made jax.distributed.initialize fail with
  'coordinator_address should be defined' (a GLUE run after the training srun)."""
  for name in [k for k in os.environ if k.startswith(('SLURM_', 'OMPI_', 'TPU_', 'JAX_C'))]:
    monkeypatch.delenv(name)
  monkeypatch.setenv('SLURM_NTASKS', '4')
  monkeypatch.setenv('SLURM_PROCID', '0')
  assert not distributed._multiprocess_environment()
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'node[1-2]')
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '4')
  assert distributed._multiprocess_environment()
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '1')   # srun -n 1: one process
  assert not distributed._multiprocess_environment()
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', '10.0.0.1')   # a single-host TPU VM
  assert not distributed._multiprocess_environment()
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', '10.0.0.1,10.0.0.2')
  assert 'TPU_WORKER_HOSTNAMES' in distributed._multiprocess_environment()
  monkeypatch.delenv('TPU_WORKER_HOSTNAMES')
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'host0:1234')   # JAX's own variable
  assert 'JAX_COORDINATOR_ADDRESS' in distributed._multiprocess_environment()


def _start_up_flags(**values):
  names = ('distributed', 'coordinator_address', 'num_processes', 'process_id')
  return types.SimpleNamespace(**{n: types.SimpleNamespace(value=values.get(n, False if
                                  n == 'distributed' else None)) for n in names})


def test_start_up_takes_the_flags_beside_an_environment_coordinator_and_names_the_trigger(
    monkeypatch, capsys):
  """Flags beside JAX_COORDINATOR_ADDRESS were dropped (auto-detection, which then found no
  process count); an Open MPI 5 job (no OMPI_MCA_orte_hnp_uri, which JAX reads) was told to
  'drop --distributed', a flag it never had."""
  for name in [k for k in os.environ
               if k.startswith(('SLURM_', 'OMPI_', 'TPU_WORKER', 'JAX_COORDINATOR'))]:
    monkeypatch.delenv(name)
  jax.devices()   # this process's own backend, started before config.update is replaced
  settings = []   # (not this test process's own collectives)
  monkeypatch.setattr(jax.config, 'update', lambda *setting: settings.append(setting))
  calls = []
  from jax._src.clusters import ompi_cluster  # pylint: disable=g-import-not-at-top

  def initialize(*args, **kwargs):
    calls.append((args, kwargs))
    detected = ompi_cluster.OmpiCluster.is_env_present()
    if 'JAX_COORDINATOR_ADDRESS' not in os.environ and not detected:
      raise ValueError('coordinator_address should be defined.')   # JAX's, nothing detected
  monkeypatch.setattr(jax.distributed, 'initialize', initialize)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'host0:1234')
  distributed.initialize(_start_up_flags(num_processes=4, process_id=3))
  assert calls == [((None,), {'num_processes': 4, 'process_id': 3})]
  # JAX's timeout, when a process never connects, ends in a C++ abort that names no cause.
  waiting = capsys.readouterr().out
  assert 'never connects stops the others after 5 minutes' in waiting
  # Two processes given one id: JAX aborts the older at once with ALREADY_EXISTS ("a
  # request from a newer incarnation"), a C++ abort no check of ours can turn into a line.
  assert 'ALREADY_EXISTS' in waiting and 'was given the --process_id of another' in waiting
  assert settings == [('jax_cpu_collectives_implementation', 'gloo')]
  # An srun task bound to its own GPU (--gpus-per-task=1) sees it as ordinal 0: with the
  # flags too, not JAX's default [SLURM_LOCALID] (a GPU it cannot see).
  calls.clear()
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')   # (this process's backend already runs)
  for name, value in {'SLURM_LOCALID': '3', 'SLURM_GPUS_PER_TASK': '1',
                      'CUDA_VISIBLE_DEVICES': '3'}.items():
    monkeypatch.setenv(name, value)
  distributed.initialize(_start_up_flags(num_processes=8, process_id=3))
  assert calls == [((None,), {'num_processes': 8, 'process_id': 3, 'local_device_ids': [0]})]
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  for name in ('SLURM_LOCALID', 'SLURM_GPUS_PER_TASK', 'CUDA_VISIBLE_DEVICES'):
    monkeypatch.delenv(name)

  with pytest.raises(app.UsageError, match='--num_processes and --process_id go together'):
    distributed.initialize(_start_up_flags(process_id=3))
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '2')
  with pytest.raises(app.UsageError, match=r'OMPI_COMM_WORLD_SIZE=2\) asks for') as error:
    distributed.initialize(_start_up_flags())
  assert 'drop --distributed' not in str(error.value)
  # Open MPI 4's mpirun sets OMPI_MCA_orte_hnp_uri: JAX's own detection reads the job from
  # it (the coordinator, count and rank), and the start-up hands it over without flags.
  for name, value in {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.0.0.5,10.1.0.5:38721',
                      'OMPI_COMM_WORLD_RANK': '1', 'OMPI_COMM_WORLD_LOCAL_RANK': '1'}.items():
    monkeypatch.setenv(name, value)
  assert ompi_cluster.OmpiCluster.get_coordinator_address(None, None).startswith('10.0.0.5:')
  assert (ompi_cluster.OmpiCluster.get_process_count(),
          ompi_cluster.OmpiCluster.get_process_id()) == (2, 1)
  calls.clear()
  distributed.initialize(_start_up_flags())
  assert calls == [((), {'local_device_ids': None})]
  for name in ('OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK'):
    monkeypatch.delenv(name)
  monkeypatch.delenv('OMPI_COMM_WORLD_SIZE')
  with pytest.raises(app.UsageError, match='drop --distributed'):
    distributed.initialize(_start_up_flags(distributed=True))


def test_a_process_count_other_than_the_coordinators_is_corrected_aloud(monkeypatch, capsys):
  """A process given --num_processes=3 joins process 0's run of 2 (checked with two real
  processes: jax.process_count() is 2 in both), yet said 'Process 1 of 3' and nothing else."""
  for name in [k for k in os.environ
               if k.startswith(('SLURM_', 'OMPI_', 'TPU_WORKER', 'JAX_COORDINATOR'))]:
    monkeypatch.delenv(name)
  jax.devices()
  monkeypatch.setattr(jax.config, 'update', lambda *setting: None)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args, **kwargs: None)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)   # what the coordinator's run has
  distributed.initialize(_start_up_flags(coordinator_address='host0:1234', num_processes=3,
                                         process_id=1))
  out = capsys.readouterr().out
  assert ('Process 1: the run has 2 processes (process 0\'s --num_processes), not the '
          '--num_processes=3 given here' in out), out
  assert 'Fix: pass the same --num_processes on every host.' in out
  distributed.initialize(_start_up_flags(coordinator_address='host0:1234', num_processes=2,
                                         process_id=1))
  assert 'the run has' not in capsys.readouterr().out


def test_a_second_process_0_on_the_coordinators_port_is_refused_before_waiting(monkeypatch):
  """Two trainers both given --process_id=0 on one host (gRPC binds the port with
  SO_REUSEPORT, so both did) waited out JAX's timeout, then both aborted in C++
  (DEADLINE_EXCEEDED, a page of stack naming no cause)."""
  for name in [k for k in os.environ
               if k.startswith(('SLURM_', 'OMPI_', 'TPU_WORKER', 'JAX_COORDINATOR'))]:
    monkeypatch.delenv(name)
  jax.devices()
  monkeypatch.setattr(jax.config, 'update', lambda *setting: None)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append(a))
  coordinator = socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET)
  coordinator.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)   # as gRPC listens
  coordinator.bind(('', 0))
  coordinator.listen()
  address = f'localhost:{coordinator.getsockname()[1]}'
  try:
    with pytest.raises(app.UsageError, match=f'serves the coordinator at {address}, but port '
                       r'\d+ of this host is already in use.*Fix: give each process its own '
                       '--process_id'):
      distributed.initialize(_start_up_flags(coordinator_address=address, num_processes=2,
                                             process_id=0))
    assert not calls
    # JAX binds JAX_COORDINATOR_BIND_ADDRESS's port where it is set (a container's port
    # behind a Kubernetes Service's): that one is probed, not the address's.
    monkeypatch.setenv('JAX_COORDINATOR_BIND_ADDRESS', '[::]:' + address.split(':')[1])
    with pytest.raises(app.UsageError, match=r'\(JAX_COORDINATOR_BIND_ADDRESS\) of this host '
                       'is already in use'):
      distributed.initialize(_start_up_flags(coordinator_address='coordinator-service:1',
                                             num_processes=2, process_id=0))
    with socket.socket() as free:
      free.bind(('', 0))
      monkeypatch.setenv('JAX_COORDINATOR_BIND_ADDRESS', f'[::]:{free.getsockname()[1]}')
    distributed.initialize(_start_up_flags(coordinator_address=address, num_processes=2,
                                           process_id=0))
    monkeypatch.delenv('JAX_COORDINATOR_BIND_ADDRESS')
    assert calls == [(address,)]
    calls.clear()
    # Process 1 only connects there: the port in use is what it expects.
    distributed.initialize(_start_up_flags(coordinator_address=address, num_processes=2,
                                           process_id=1))
  finally:
    coordinator.close()
  distributed.initialize(_start_up_flags(coordinator_address=address, num_processes=2,
                                         process_id=0))   # free again
  assert calls == [(address,), (address,)]


@pytest.mark.parametrize('argv, message', [
    (['--coordinator_address=localhost:1', '--process_id=2', '--num_processes=2'],
     'process ids run from 0 to 1'),
    (['--coordinator_address=localhost:1', '--process_id=0'],
     'needs --num_processes and --process_id'),
    (['--distributed'], 'found no cluster'),
    (['--num_processes=2', '--process_id=1'], 'need --coordinator_address'),
])
def test_multi_process_start_up_errors_are_one_line_before_waiting(argv, message, tmp_path):
  """A process id out of range was a traceback while process 0 waited; --distributed on a
  lone machine a traceback ('coordinator_address should be defined')."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'OMPI_', 'TPU_WORKER', 'JAX_COORDINATOR'))}
  # The errors come before any input is read. configs/tiny.py's seqio input imports
  # TensorFlow first (5 s of CPU): kept for '--distributed', the others start as a run on
  # TF-free exported shards does (never read here).
  tf_free = ([] if argv == ['--distributed'] else
             ['--config.data.source=shards', f'--config.data.shards_dir={tmp_path / "shards"}'])
  result = subprocess.run([sys.executable, '-m', 'bert_sym.train', '--config=configs/tiny.py',
                           f'--workdir={tmp_path / "run"}', *tf_free, *argv],
                          cwd=train_fixtures.REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
  errors = [line for line in result.stderr.splitlines() if 'error:' in line]
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert not (tmp_path / 'run').exists()


def test_masked_positions_are_the_weighted_ones_in_order():
  weights = np.zeros((2, 10), np.float32)
  weights[0, [7, 2, 5]] = 1.0
  weights[1, [0, 9]] = 1.0
  positions = np.asarray(objectives.masked_positions(weights, 4))
  np.testing.assert_array_equal(positions[0, :3], [2, 5, 7])
  np.testing.assert_array_equal(positions[1, :2], [0, 9])
  assert (weights[0, positions[0, 3]] == 0) and (weights[1, positions[1, 2:]] == 0).all()


def test_host_mlm_positions_equal_the_device_fallback():
  rng = np.random.default_rng(0)
  weights = (rng.random((3, 12)) < 0.3).astype(np.float32)
  weights[2] = 0.0
  weights[1, :] = 1.0                  # more targets than P: the first P, as top_k keeps
  targets = rng.integers(1, 50, (3, 12)).astype(np.int32) * (weights > 0)
  batch = {'mlm_weights': weights, 'mlm_targets': targets}
  host = objectives.host_mlm_positions(batch, 5)
  assert host['mlm_positions'].shape == (3, 5) and host['mlm_positions'].dtype == np.int32
  device = np.asarray(objectives.masked_positions(weights, 5))
  gather = lambda x, p: np.take_along_axis(x, p, axis=1)
  for name, dense in (('mlm_position_weights', weights), ('mlm_position_targets', targets)):
    np.testing.assert_array_equal(host[name], gather(dense, device))
  real = host['mlm_position_weights'] > 0
  np.testing.assert_array_equal(host['mlm_positions'][real], device[real])
  # P larger than the sequence: padded with weight-0 slots.
  wide = objectives.host_mlm_positions(batch, 20)
  assert wide['mlm_positions'].shape == (3, 20) and wide['mlm_position_weights'][:, 12:].sum() == 0
  assert wide['mlm_position_weights'].sum() == weights.sum()


_SIGNAL_TO_THE_READER = """
import signal, sys, threading
from bert_sym import loop

class Stalled:   # a read that never returns (a hung storage client)
  def __next__(self):
    threading.Event().wait()
  def get_state(self):
    return {}

def taken(signum, frame):
  print('taken', flush=True)
  sys.exit(3)

signal.signal(signal.SIGINT, taken)
prefetcher = loop.Prefetcher(Stalled(), lambda x: x)
# The OS hands a process's signal to any thread that does not block it: here the reader's.
threading.Timer(0.5, signal.pthread_kill, (prefetcher._thread.ident, signal.SIGINT)).start()
next(prefetcher)
"""


def test_a_signal_is_taken_while_the_step_waits_for_a_stalled_read():
  """The step waits for its batch; the Ctrl-C lands in another thread (the kernel picks
  one): its handler, which Python runs in the main thread only, never ran (the flaky
  test_second_ctrl_c_quits_in_one_line timed out on it under load)."""
  result = subprocess.run([sys.executable, '-c', _SIGNAL_TO_THE_READER], capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 3 and result.stdout == 'taken\n', result.stderr[-2000:]


def test_prefetcher_state_is_the_next_batch_the_step_consumes():
  class Counter:
    def __init__(self):
      self.i = 0
    def __next__(self):
      self.i += 1
      return self.i
    def get_state(self):
      return {'i': self.i}
  counter = Counter()
  prefetcher = loop.Prefetcher(counter, lambda x: x * 10, depth=2)
  try:
    assert prefetcher.state == {'i': 0}
    assert next(prefetcher) == 10 and next(prefetcher) == 20
    deadline = time.time() + 60        # the thread reads ahead `depth` batches: wait for it
    while counter.i < 4 and time.time() < deadline:
      time.sleep(0.01)
    assert counter.i >= 4              # read ahead, yet the state is what was consumed
    assert prefetcher.state == {'i': 2}
  finally:
    prefetcher.close()


def test_scan_layers_mismatch_with_checkpoint_is_a_clear_error(tmp_path, reference_run):
  workdir = tmp_path / 'copy'
  shutil.copytree(reference_run[0], workdir)
  result = run_trainer(workdir, overrides=_overrides(model__scan_layers=True), check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert '--config.model.scan_layers=False' in result.stderr
  assert 'Traceback' not in result.stderr


def test_trainer_reports_compile_time_once(reference_run):
  _, result = reference_run
  assert result.stdout.count('compiled train step in ') == 1, result.stdout[-3000:]
  compiles = [m for m in _metrics(reference_run[0]) if 'perf/compile_seconds' in m]
  assert len(compiles) == 1 and compiles[0]['perf/compile_seconds'] > 0


# ---------------------------------------------------------------------------------------
# Failures that must stop the run in one line and keep what it had.
# ---------------------------------------------------------------------------------------

def _strict_json_rows(workdir):
  def refuse(token):
    raise ValueError(f'bare {token} in metrics.jsonl')
  return [json.loads(line, parse_constant=refuse)
          for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def _error_lines(result):
  return [l for l in result.stderr.splitlines() if 'error:' in l]


def test_divergence_with_unreadable_steps_aside_names_start_over(tmp_path):
  """A run that fell back past an unreadable step (in damaged_checkpoints/) and then
  diverged from the one it resumed: its error said 'a rerun starts from step 0', but the
  rerun refused (unacknowledged damaged steps): the error names --start_over."""
  from bert_sym import pretrain_loop  # pylint: disable=g-import-not-at-top
  (tmp_path / 'damaged_checkpoints' / '12-1796568251').mkdir(parents=True)
  (tmp_path / 'damaged_checkpoints' / '8-1796568254-diverged').mkdir()
  run = types.SimpleNamespace(console=print, last_saved=8)
  manager = types.SimpleNamespace(wait_until_finished=lambda: None)
  error = pretrain_loop.set_aside_divergence(
      loop.NonFiniteError('Non-finite loss at step 9.', onset=9), tmp_path, manager, None, run)
  assert run.last_saved is None
  assert str(error).endswith('There is no checkpoint from before the divergence, and the steps '
                             'in damaged_checkpoints/ (12-1796568251) could not be read: rerun '
                             'with a fixed config and --start_over to start from step 0.'), error


def test_workdir_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
  """The shell leaves `--workdir=~/x` as typed: the run went to ./~/x while its closing
  summary's TensorBoard command pointed at $HOME/x."""
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.chdir(tmp_path / '..')
  assert str(train._prepare_workdir('~/run')) == str(tmp_path / 'run')  # pylint: disable=protected-access
  assert str(checkpoint.absolute('~/run')) == str(tmp_path / 'run')
  assert not (tmp_path.parent / '~').exists()


def test_divergence_sets_its_checkpoints_aside_and_a_fixed_rerun_finishes(tmp_path):
  """lr 1e6, a checkpoint every 3 steps: the step-3 checkpoint holds exploded weights and
  used to trap the workdir (every rerun resumed it and diverged again)."""
  diverging = _overrides(checkpoint__every_steps=3, optimizer__learning_rate=1e6)
  result = run_trainer(tmp_path, overrides=diverging, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  [line] = _error_lines(result)
  assert 'Non-finite loss or gradient at step' in line
  assert 'no checkpoint from before the divergence' in line and 'None' not in line, line
  assert 'Set aside checkpoint step 3' in result.stdout and 'Traceback' not in result.stderr
  assert checkpoint.finished_steps(tmp_path) == []
  assert [p.name.endswith('-diverged') for p in (tmp_path / 'damaged_checkpoints').iterdir()]
  _strict_json_rows(tmp_path)
  # The same command with the default learning rate: no file deleted by hand.
  result = run_trainer(tmp_path, overrides=_overrides(checkpoint__every_steps=3))
  final = [m for m in _strict_json_rows(tmp_path) if m['step'] == STEPS and 'train/loss' in m]
  assert final and np.isfinite(final[0]['train/loss']), result.stdout[-2000:]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_final_params(tmp_path)))


# The divergence tests' cadence: a row every step, a checkpoint every 2, keeping 3.
_DIVERGENCE_CADENCE = dict(log_every_steps=1, eval_every_steps=100, checkpoint__every_steps=2,
                           checkpoint__keep_last=3, optimizer__warmup_steps=1,
                           optimizer__grad_clip_norm=0)


@pytest.fixture
def healthy_four_steps(tmp_path_factory, tmp_path):
  """tmp_path/'run': a copy of a healthy 4-step run at _DIVERGENCE_CADENCE (checkpoints 2
  and 4), trained once per session for the tests that then blow it up."""
  built = train_fixtures.built_once(
      tmp_path_factory, 'train_healthy_four_steps',
      lambda path: run_trainer(path, overrides=_overrides(total_steps=4,
                                                          **_DIVERGENCE_CADENCE)))
  shutil.copytree(built, tmp_path / 'run')
  return tmp_path / 'run'


def test_a_divergence_across_a_restart_keeps_the_good_checkpoint_and_names_it(
    healthy_four_steps):
  """A run stopped while its loss was exploding (here: it reached total_steps; a
  preemption is the same) and resumed: the checkpoint it resumed from was saved mid-streak.
  It used to count as good, so rotation deleted the real good one (4) and the NaN stop
  sent the rerun back into the exploded model.

  Extending the run (total_steps 4, then 9) also records the new config: config.json
  describes the run that continues (the config `configs/from_json.py` reproduces), not the
  one it was started as."""
  tmp_path, cadence = healthy_four_steps, _DIVERGENCE_CADENCE   # healthy: 2, 4
  assert checkpoint.finished_steps(tmp_path) == [2, 4]
  assert checkpoint.read_config(tmp_path).total_steps == 4
  exploding = dict(cadence, optimizer__learning_rate=1e3)
  first = run_trainer(tmp_path, overrides=_overrides(total_steps=9, **exploding))
  assert 'Resumed from step 4' in first.stdout
  assert checkpoint.read_config(tmp_path).total_steps == 9
  assert checkpoint.read_config(tmp_path).optimizer.learning_rate == 1e3
  assert 'Loss spike at step 6' in first.stderr, first.stderr[-3000:]
  assert checkpoint.finished_steps(tmp_path) == [4, 6, 8, 9]   # 4: the newest good one
  # It reached total_steps inside the spike: 'Done' came alone, with 'Next:' lines that
  # give hf_export and GLUE the workdir, i.e. its newest (diverging) step.
  assert ('WARNING: the run ended inside an unhealthy streak (loss spikes or skipped '
          'non-finite steps) that began at step 6 and never recovered') in first.stdout, (
              first.stdout[-3000:])
  assert (f'The newest checkpoint from before it is step 4: pass --checkpoint='
          f'{tmp_path / "checkpoints" / "4"} to hf_export and GLUE.') in first.stdout
  result = run_trainer(tmp_path, overrides=_overrides(total_steps=40, **exploding),
                       check=False)
  assert 'Resumed from step 9' in result.stdout and result.returncode == 1
  [line] = _error_lines(result)
  assert 'The newest checkpoint from before the divergence is step 4' in line, line
  assert checkpoint.finished_steps(tmp_path) == [4]
  assert 'unhealthy from step 6 on' in result.stdout


def test_a_checkpoint_that_itself_diverges_on_resume_goes_aside_not_the_rerun_into_it(
    healthy_four_steps):
  """A run stopped right after the update that blew its parameters up (finite, so the save
  took them; here it reached total_steps, a preemption is the same). Resumed, the first
  step's loss is already non-finite: the checkpoint resumed from gave it, whatever the
  learning rate. It was kept and named ('rerun with a fixed config and it resumes from
  there'), so every rerun resumed into it and stopped again: the workdir was trapped."""
  tmp_path, cadence = healthy_four_steps, _DIVERGENCE_CADENCE   # healthy: 2, 4
  run_trainer(tmp_path, overrides=_overrides(total_steps=5, optimizer__learning_rate=1e30,
                                             **cadence))   # step 5's update: |w| ~ 1e30
  assert checkpoint.finished_steps(tmp_path) == [2, 4, 5]
  result = run_trainer(tmp_path, overrides=_overrides(total_steps=40, **cadence), check=False)
  assert 'Resumed from step 5' in result.stdout and result.returncode == 1, result.stderr[-3000:]
  [line] = _error_lines(result)
  assert 'The newest checkpoint from before the divergence is step 4' in line, line
  assert 'Step 5, which this run resumed from, went aside' in line, line
  assert checkpoint.finished_steps(tmp_path) == [2, 4]
  run_trainer(tmp_path, overrides=_overrides(total_steps=6, **cadence))   # no trap
  assert checkpoint.finished_steps(tmp_path)[-1] == 6


def test_a_resume_between_log_rows_logs_the_rows_of_the_uninterrupted_run(tmp_path):
  """Saves every 3 steps, rows every 4: the first row after resuming from step 3 averages
  steps 1-4, as the run that never stopped does (it averaged step 4 alone)."""
  cadence = _overrides(total_steps=8, log_every_steps=4, checkpoint__every_steps=3,
                       eval_every_steps=6)
  reference, resumed = tmp_path / 'reference', tmp_path / 'resumed'
  run_trainer(reference, overrides=cadence)
  shutil.copytree(reference, resumed)
  for step in (6, 8):   # as if killed after saving step 3
    shutil.rmtree(resumed / 'checkpoints' / str(step))
  result = run_trainer(resumed, overrides=cadence)
  assert 'Resumed from step 3' in result.stdout
  train_rows = lambda w: [{k: v for k, v in m.items() if k.startswith('train/')}
                          for m in _metrics(w) if 'train/loss' in m]
  assert [m['step'] for m in _metrics(resumed) if 'train/loss' in m] == [4, 8]
  assert train_rows(resumed) == train_rows(reference)
  # Every eval reads the same validation batches (the iterator rewound), so the resumed
  # run's evals at 6 and 8 equal those of the run that evaluated at 0 first.
  eval_rows = lambda w: [{k: v for k, v in m.items() if k != 'time'} for m in _metrics(w)
                         if 'eval/loss' in m and m['step'] > 3]
  assert [m['step'] for m in eval_rows(resumed)] == [6, 8]
  assert eval_rows(resumed) == eval_rows(reference)
  # Stopped at step 3 and rerun with total_steps=3: nothing trains, and step 3's row (steps
  # 1-3, kept by the save) was never written; the metrics ended at the eval row.
  lowered = tmp_path / 'lowered'
  shutil.copytree(reference, lowered)
  for step in (6, 8):
    shutil.rmtree(lowered / 'checkpoints' / str(step))
  result = run_trainer(lowered, overrides=dict(cadence, total_steps=3))
  assert 'Already trained to step 3' in result.stdout, result.stdout[-2000:]
  [last] = [m for m in _metrics(lowered) if 'train/loss' in m]
  assert last['step'] == 3 and last['train/nonfinite_steps'] == 0
  first_four = [m for m in _metrics(reference) if 'train/loss' in m][0]
  assert abs(last['train/loss'] - first_four['train/loss']) < 0.5   # the same first steps
  assert [m['step'] for m in _metrics(lowered) if 'eval/loss' in m] == [0, 3]
  # Raised again to 4: steps 1-3 are in step 3's row, so step 4's row is step 4 alone (it
  # averaged steps 1-4 again, counting 1-3 twice); together the two rows are the
  # uninterrupted run's first (per-step losses are bitwise those of that run).
  run_trainer(lowered, overrides=dict(cadence, total_steps=4))
  three, four = [m for m in _metrics(lowered) if 'train/loss' in m]
  assert four['step'] == 4
  assert (3 * three['train/loss'] + four['train/loss']) / 4 == pytest.approx(
      first_four['train/loss'], rel=1e-6)


def test_a_resume_evaluates_the_step_whose_eval_was_killed(tmp_path):
  """A preemption saves, then runs the eval due at that step inside the notice; a kill
  during that eval lost it for good (the resumed run evaluated at step 0 only). The resume
  now evaluates a due step that has no eval row: the row the uninterrupted run wrote."""
  cadence = _overrides(total_steps=6, log_every_steps=3, checkpoint__every_steps=3,
                       eval_every_steps=3)
  reference, resumed = tmp_path / 'reference', tmp_path / 'resumed'
  run_trainer(reference, overrides=cadence)
  shutil.copytree(reference, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')   # as if killed in step 3's eval:
  rows = (resumed / 'metrics.jsonl').read_text().splitlines()   # no row from it on
  (resumed / 'metrics.jsonl').write_text(''.join(
      f'{r}\n' for r in rows if json.loads(r)['step'] < 3 or (
          json.loads(r)['step'] == 3 and 'eval/loss' not in json.loads(r))))
  result = run_trainer(resumed, overrides=cadence)
  assert 'Resumed from step 3' in result.stdout
  evals = lambda w: [{k: v for k, v in m.items() if k != 'time'} for m in _metrics(w)
                     if 'eval/loss' in m]
  assert [m['step'] for m in evals(resumed)] == [0, 3, 6]
  assert evals(resumed) == evals(reference)
  # A resume whose step has its eval row does not evaluate it again.
  shutil.rmtree(resumed / 'checkpoints' / '6')
  run_trainer(resumed, overrides=cadence)
  assert [m['step'] for m in evals(resumed)] == [0, 3, 6]


def test_skip_stops_after_consecutive_nonfinite_steps_and_keeps_no_bad_model(tmp_path):
  result = run_trainer(tmp_path, overrides=_overrides(
      checkpoint__every_steps=3, optimizer__learning_rate=1e6, on_nonfinite='skip',
      max_consecutive_nonfinite=4), check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  [line] = _error_lines(result)
  assert '4 consecutive non-finite steps' in line and 'max_consecutive_nonfinite=4' in line
  for step in checkpoint.finished_steps(tmp_path):   # whatever is left to resume from
    params = checkpoint.load_params(tmp_path / 'checkpoints' / str(step))
    assert all(np.isfinite(x).all() and np.abs(x).max() < 100 for x in jax.tree.leaves(params))
  rows = _strict_json_rows(tmp_path)   # strict JSON: non-finite values are null + flagged
  flagged = [m for m in rows if 'nonfinite' in m]
  assert flagged and all(m[k] is None for m in flagged for k in m['nonfinite'])


def _mount_tmpfs(path, size):
  """A small tmpfs (a real full disk) where the test may mount one (root), else None."""
  path.mkdir()
  if os.geteuid() != 0 or not shutil.which('mount'):
    return None
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True, check=False)
  return path if done.returncode == 0 else None


def test_full_disk_stops_at_the_failed_save_in_one_line(tmp_path):
  """Checkpoints of this model take ~360 KB: on a 1000 KB tmpfs step 4 fits and a later
  save fails with ENOSPC. Without a mountable tmpfs, creating step 8 fails with ENOSPC."""
  disk = _mount_tmpfs(tmp_path / 'disk', '1000k')
  env = {} if disk else {'SYNTHETIC_NO_SPACE_AT_STEP': '8'}
  try:
    workdir = tmp_path / 'disk' / 'run'
    result = run_trainer(workdir, overrides=_overrides(checkpoint__async_save=True),
                         env=env, check=False)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    [line] = _error_lines(result)
    failed = int(line.split('Saving checkpoint step ')[1].split()[0])
    assert failed >= 8 and f'{workdir}/checkpoints/{failed}' in line, line
    assert '(ENOSPC' in line and 'previous checkpoint (step' in line, line
    assert 'Traceback' not in result.stdout + result.stderr
    assert len((result.stdout + result.stderr).splitlines()) < 25
    assert not list((workdir / 'checkpoints').glob('*orbax-checkpoint-tmp*'))
    kept = checkpoint.finished_steps(workdir)
    assert kept and kept[-1] < failed
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_final_params(workdir)))
  finally:
    if disk:
      subprocess.run(['umount', str(disk)], check=False)


def test_a_disk_that_fills_before_a_save_stops_there_in_one_line(tmp_path):
  """A real full disk (a tmpfs filled while the run starts), asynchronous
  saves every 10 steps: step 10's background write fails. The run said so in one line,
  then closing the checkpoint manager raised orbax's copy of the error over it (two
  tracebacks ending in a bare OSError, no error line), and the step's temporary files,
  recreated by writes still running, were left behind."""
  disk = _mount_tmpfs(tmp_path / 'disk', '20m')
  if not disk:
    pytest.skip('needs a tmpfs to fill (root and mount)')
  try:
    workdir = disk / 'run'
    # Filled once the step-0 eval row is written: the train step's compilation and 10
    # steps of 0.3 s come before the save. 64 KiB are then given back: room for the rows
    # and TensorBoard events of steps 5 and 10, not for the checkpoint (its Adam state
    # alone is ~0.4 MB). Filled to the last byte, a row's write met the full disk first
    # (CI, once: "error: [Errno 28] ... the disk is full", not the save's line).
    process = run_trainer(workdir, overrides=_overrides(
        total_steps=40, log_every_steps=5, eval_every_steps=100, checkpoint__every_steps=10,
        checkpoint__keep_last=2, checkpoint__async_save=True), background=True,
        env={'SYNTHETIC_SLEEP_SECONDS': '0.3'})
    _wait_for(lambda: _logged_step(workdir) >= 0, process)
    subprocess.run(['dd', 'if=/dev/zero', f'of={disk}/filler', 'bs=4k'], capture_output=True,
                   check=False)
    filler = disk / 'filler'
    os.truncate(filler, max(filler.stat().st_size - 64 * 1024, 0))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1 and 'Traceback' not in output, output[-3000:]
    [line] = [l for l in output.splitlines() if 'error:' in l]
    # The full disk as TensorStore words it (RESOURCE_EXHAUSTED), said as ENOSPC / EDQUOT.
    assert 'Saving checkpoint step 10' in line and 'disk is full' in line, line
    assert 'ENOSPC' in line and 'rerun the same command to resume' in line, line
    assert not list((workdir / 'checkpoints').glob('*orbax-checkpoint-tmp*'))
    assert checkpoint.finished_steps(workdir) == []
  finally:
    subprocess.run(['umount', str(disk)], check=False)


@pytest.mark.parametrize('async_save', [False, True])
def test_one_hosts_failed_save_stops_every_host_in_one_line(tmp_path, async_save):
  """2 processes (gloo); process 1's disk is full at step 8. Synchronous saves: process 1
  said so, then both hung in jax.distributed's shutdown barrier (process 0 was still in
  the save's collective) and aborted after 5 minutes (exit 134); now both exit 1 at once.
  Asynchronous saves: nothing said, both trained on and waited at orbax's barrier for
  its 20-minute default; now for config.checkpoint.save_timeout_s (20 s here). Process 1
  names the full disk, process 0 the process that stopped."""
  workdir = tmp_path / 'run'
  processes = _two_processes(
      workdir, _overrides(checkpoint__async_save=async_save, checkpoint__save_timeout_s=20),
      env={'SYNTHETIC_NO_SPACE_ON_PROCESS_AT_STEP': '1:8'})
  outputs = _outputs_of(processes, timeout=150)
  for p, out in zip(processes, outputs):
    assert p.returncode == 1 and 'Traceback' not in out, out[-3000:]
  [line_0] = [l for l in outputs[0].splitlines() if 'bert_sym.train: error:' in l]
  [line_1] = [l for l in outputs[1].splitlines() if 'bert_sym.train: error:' in l]
  assert 'Saving checkpoint step 8' in line_1 and '(ENOSPC' in line_1, line_1
  assert 'another process of this run stopped or stalled' in line_0, line_0
  assert 'Its own log says why' in line_0 and 'Free space' not in line_0, line_0
  assert checkpoint.finished_steps(workdir) == [4]   # the good step, untouched
  if async_save:   # said when it happened, not only at the timeout
    assert ('WARNING: process 1: writing its part of a checkpoint failed (OSError: [Errno '
            '28] No space left on device' in outputs[1]), outputs[1][-3000:]


def test_a_save_failure_that_surfaces_between_saves_stops_every_host_together(tmp_path):
  """Process 1's disk is full at step 8 (asynchronous saves, every 8 steps). orbax's own
  finalize thread took the failure and held it until the next save (16), where process 0
  then waited out save_timeout_s: both trained on, unsaved. When process 1 did see it at
  a step of its own, it stopped alone and process 0, left in the next step's collective,
  was aborted by jax.distributed (SIGABRT, "Terminating process because the JAX
  distributed service detected fatal errors"; CI met it). Now the failure is recorded as
  the write ends and both stop together at a log step between the two saves, process 0
  naming process 1."""
  workdir = tmp_path / 'run'
  processes = _two_processes(
      workdir, _overrides(checkpoint__async_save=True, checkpoint__every_steps=8,
                          checkpoint__save_timeout_s=60),
      # 0.6 s a step: process 1's failed write must be recorded before step 14's check,
      # 3.6 s after step 8's save began (0.3 s left 1.8 s to a starved CI machine).
      env={'SYNTHETIC_NO_SPACE_ON_PROCESS_AT_STEP': '1:8', 'SYNTHETIC_SLEEP_SECONDS': '0.6'})
  outputs = _outputs_of(processes, timeout=150)
  for p, out in zip(processes, outputs):
    assert p.returncode == 1 and 'Traceback' not in out and 'Fatal' not in out, out[-3000:]
  [line_0] = [l for l in outputs[0].splitlines() if 'bert_sym.train: error:' in l]
  [line_1] = [l for l in outputs[1].splitlines() if 'bert_sym.train: error:' in l]
  assert 'Saving checkpoint step 8' in line_1 and '(ENOSPC' in line_1, line_1
  assert ('Saving checkpoint step 8' in line_0 and 'another process of this run stopped or '
          'stalled in this save (process(es) 1 reported it failed)' in line_0), line_0
  logged = [row['step'] for row in _metrics(workdir) if 'train/loss' in row]
  assert 8 <= max(logged) < 14, logged   # stopped at a log step's check, not at step 16's save


def test_sigterm_at_an_eval_step_whose_save_fails_stops_in_one_line(tmp_path):
  """On SIGTERM at an eval step the trainer waits for the save before that eval (the notice
  before the kill is for the save). When the save fails (disk full) the run stops in one
  line naming the step and the cause, with no traceback, and runs no eval on the unsaved
  step. Every step is an eval step here and the only save is the preemption's."""
  workdir = tmp_path / 'run'
  process = run_trainer(workdir, overrides=_overrides(
      eval_every_steps=1, checkpoint__every_steps=1000, checkpoint__async_save=True),
      background=True, env={'SYNTHETIC_NO_SPACE_AT_STEP': 'any',
                            'SYNTHETIC_SLEEP_SECONDS': '0.3'})
  _wait_for(lambda: _logged_step(workdir) >= 2, process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 1, output[-3000:]
  [line] = [l for l in output.splitlines() if 'error:' in l]
  assert 'Saving checkpoint step ' in line and '(ENOSPC' in line, line
  failed = int(line.split('Saving checkpoint step ')[1].split()[0])
  assert 'Traceback' not in output and 'Stopped by SIGTERM' not in output
  eval_steps = [m['step'] for m in _metrics(workdir) if 'eval/loss' in m]
  assert failed not in eval_steps and eval_steps == list(range(eval_steps[0], failed))
  assert checkpoint.finished_steps(workdir) == []
  assert not list((workdir / 'checkpoints').glob('*orbax-checkpoint-tmp*'))


def test_eval_steps_zero_and_a_second_trainer_on_the_live_workdir(tmp_path):
  """eval_steps=0: no eval rows, no eval line in the summary (never eval/loss 0.0). A
  second trainer on the same workdir stops at once; the first one's files are its own."""
  workdir = tmp_path / 'run'
  # The first run waits after two batches until the second one has been turned away.
  gate = tmp_path / 'second_has_tried'
  first = run_trainer(workdir, overrides=_overrides(eval_steps=0,   # one save, at the end
                                                   checkpoint__every_steps=STEPS),
                      background=True, env={'SYNTHETIC_WAIT_FOR_FILE': str(gate)})
  lock = workdir / checkpoint.LOCK_FILE
  _wait_for(lambda: lock.exists() and json.loads(lock.read_text() or '{}'), first)
  assert json.loads(lock.read_text())['pid'] == first.pid
  second = run_trainer(workdir, overrides=_overrides(seed=1), check=False)
  gate.write_text('')
  assert second.returncode == 1, second.stderr[-3000:]
  [line] = _error_lines(second)
  assert f'in use by another trainer (pid {first.pid} on {socket.gethostname()}' in line
  output, _ = first.communicate(timeout=240)
  assert first.returncode == 0, output[-3000:]
  assert f'Done: step {STEPS}.\n' in output, output[-2000:]
  assert 'eval step' not in output and 'Final eval' not in output, output[-2000:]
  rows = _strict_json_rows(workdir)
  assert not [m for m in rows if any(k.startswith('eval/') for k in m)]
  _assert_one_row_per_step(workdir)
  assert checkpoint.read_config(workdir).seed == 0
  assert not (workdir / checkpoint.LOCK_FILE).exists()


def test_a_sigterm_while_the_inputs_are_checked_exits_42_untouched(tmp_path, monkeypatch):
  """A preemption in start-up, while the inputs are checked (the data read: seconds to
  minutes), killed the trainer: exit 143, which launch/slurm_gpu.sbatch does not requeue
  (only 42), so the run stopped for good. It now stops with 42, nothing written."""
  class Killed(Exception):   # what the default action would do: the process ends here
    pass

  def killed(*_):
    raise Killed()
  real = train.config_check.preflight

  def preflight(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)   # the preemption's notice
    return real(*args, **kwargs)
  monkeypatch.setattr(train.config_check, 'preflight', preflight)
  previous = signal.signal(signal.SIGTERM, killed)
  try:
    with pytest.raises(train.Preempted) as stopped:
      train.train_and_evaluate(train_fixtures.tiny_config(), str(tmp_path / 'run'),
                               make_iterator=train_fixtures.make_synthetic_iterator)
    assert signal.getsignal(signal.SIGTERM) is killed   # the caller's handler is back
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert stopped.value.exit_code == train.PREEMPTED_EXIT_CODE
  assert str(stopped.value).startswith('Stopped by SIGTERM: before training started, nothing '
                                       'to save, exiting with code 42'), stopped.value
  assert not (tmp_path / 'run').exists()   # stopped before the workdir was made


def _catches_sigterm(pid: int) -> bool:
  """Whether the process has a handler for SIGTERM (Linux: /proc/PID/status, SigCgt)."""
  status = pathlib.Path(f'/proc/{pid}/status').read_text()
  caught = int(re.search(r'^SigCgt:\s*([0-9a-f]+)', status, re.M).group(1), 16)
  return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize('module', ['bert_sym.train', 'bert_sym.glue'])
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_sigterm_or_ctrl_c_while_the_libraries_import_exits_42_or_130(module, signum, tmp_path):
  """The first seconds (JAX, TensorFlow importing) had no handler: a preemption or scancel
  there ended the process with 143, which launch/slurm_gpu.sbatch does not requeue (only
  42). The entry points now take SIGTERM before those imports: exit 42, nothing written.
  Ctrl-C there was a KeyboardInterrupt traceback of the imports (exit -2): now one line,
  exit 130. The signal is sent as soon as the process catches SIGTERM (Ctrl-C's handler
  is set before it), while JAX still imports."""
  args = {'bert_sym.train': ['--config=configs/tiny.py',
                             f'--workdir={tmp_path / "run"}'],
          'bert_sym.glue': [f'--checkpoint={tmp_path / "none"}',
                            f'--output_dir={tmp_path / "run"}']}[module]
  process = subprocess.Popen(
      [sys.executable, '-m', module, *args], cwd=train_fixtures.REPO_ROOT, text=True,
      env=dict(os.environ, PYTHONPATH=train_fixtures.REPO_ROOT, JAX_PLATFORMS='cpu'),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while not _catches_sigterm(process.pid) and time.time() < deadline:
    time.sleep(0.005)
  process.send_signal(signum)
  output = process.communicate(timeout=120)[0]
  if signum == signal.SIGINT:
    assert process.returncode == train.INTERRUPTED_EXIT_CODE, output[-3000:]
    assert output.strip() == ('Stopped by Ctrl-C: before training started, nothing to save, '
                              'exiting with code 130 (rerun the same command to resume).'
                              ), output[-3000:]
  else:
    assert process.returncode == train.PREEMPTED_EXIT_CODE, output[-3000:]
    assert output.strip() == ('Stopped by SIGTERM: before training started (or after it '
                              'ended), nothing to save, exiting with code 42 (rerun the same '
                              'command to resume).'), output[-3000:]
  assert not (tmp_path / 'run').exists()


def test_a_ctrl_c_while_the_inputs_are_checked_stops_at_once(tmp_path, monkeypatch, capsys):
  """The handler that keeps a start-up SIGTERM for exit 42 took Ctrl-C too: it said
  "saving a checkpoint at the end of this step" with no step to come, and the input
  checks (seconds to minutes) ran on to their end. A Ctrl-C there stops at once again,
  as before that handler: KeyboardInterrupt, which main says as "stopped by Ctrl-C"."""
  went_on = []

  def preflight(*args, **kwargs):
    signal.raise_signal(signal.SIGINT)   # the user's Ctrl-C, while the data is read
    went_on.append(True)
    return args[0]
  monkeypatch.setattr(train.config_check, 'preflight', preflight)
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt) as stopped:
    train.train_and_evaluate(train_fixtures.tiny_config(), str(tmp_path / 'run'),
                             make_iterator=train_fixtures.make_synthetic_iterator)
  assert not went_on and not stopped.value.args   # at once; not "a second Ctrl-C"
  assert 'saving a checkpoint' not in capsys.readouterr().out
  assert signal.getsignal(signal.SIGINT) is before and not (tmp_path / 'run').exists()


def test_a_ctrl_c_before_the_loops_handler_is_not_called_a_second_one(tmp_path):
  """A first Ctrl-C during start-up (here while the processes connect) was said to be "a
  second Ctrl-C"."""
  result = run_trainer(tmp_path / 'run', overrides=_overrides(), check=False,
                       env={'SYNTHETIC_CTRL_C_AT_START': '1'})
  assert result.returncode == train.INTERRUPTED_EXIT_CODE, result.stderr[-3000:]
  assert 'stopped by Ctrl-C without saving' in result.stderr, result.stderr[-3000:]
  assert 'second' not in result.stderr


def test_second_ctrl_c_quits_in_one_line(tmp_path):
  """The second Ctrl-C comes while the first's save is pending: the run is held at step 7's
  batch (the step that would end with it cannot end), and it is sent once the first has
  been taken (two signals sent back to back could be merged into one by the OS)."""
  workdir = tmp_path / 'run'
  held = {'SYNTHETIC_WAIT_FOR_FILE': str(tmp_path / 'never'), 'SYNTHETIC_WAIT_AT_BATCH': '6'}
  process = run_trainer(workdir, overrides=_overrides(), background=True, env=held)
  _wait_for(lambda: _logged_step(workdir) >= 6, process)
  process.send_signal(signal.SIGINT)
  watchdog = threading.Timer(120, process.kill)   # a hung run ends the readline below
  watchdog.start()
  taken = ''
  while 'Ctrl-C: saving' not in taken:   # printed (and flushed) by the handler
    taken = process.stdout.readline()
    assert taken, 'the trainer ended before taking the first Ctrl-C'
  watchdog.cancel()
  process.send_signal(signal.SIGINT)
  [output] = _outputs_of([process], timeout=120)   # killed if it hangs at the held batch
  assert process.returncode == train.INTERRUPTED_EXIT_CODE, output[-3000:]
  assert 'stopped by a second Ctrl-C without saving' in output
  assert 'Traceback' not in output and 'KeyboardInterrupt' not in output, output[-3000:]
  assert not (workdir / checkpoint.LOCK_FILE).exists()


@contextlib.contextmanager
def _ctrl_c_ignored():
  """Processes started inside inherit SIGINT ignored, as a shell starts `train ... &` (not
  a preexec_fn: Python code between fork and exec can deadlock a multithreaded JAX process)."""
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def test_a_run_started_with_ctrl_c_ignored_ignores_it_and_still_saves_on_sigterm(tmp_path):
  """The README: a run started with Ctrl-C ignored (a shell's `train ... &`) leaves it
  ignored, as POSIX programs do. The whole command, not only the loop's handler
  (tests/test_meter.py): a Ctrl-C meant for the job in front reaches it while the
  libraries import (the real entry point, whose early handlers take Ctrl-C) and mid-run,
  and neither stops it; SIGTERM still stops it with 42, saving once it trains."""
  with _ctrl_c_ignored():
    importing = subprocess.Popen(
        [sys.executable, '-m', 'bert_sym.train', '--config=configs/tiny.py',
         f'--workdir={tmp_path / "early"}'], cwd=train_fixtures.REPO_ROOT, text=True,
        env=dict(os.environ, PYTHONPATH=train_fixtures.REPO_ROOT, JAX_PLATFORMS='cpu'),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while not _catches_sigterm(importing.pid) and time.time() < deadline:
    time.sleep(0.005)
  importing.send_signal(signal.SIGINT)
  time.sleep(0.2)
  importing.send_signal(signal.SIGTERM)
  [output] = _outputs_of([importing], timeout=120)
  assert importing.returncode == train.PREEMPTED_EXIT_CODE, output[-3000:]
  assert output.startswith('Stopped by SIGTERM: before training started'), output[-3000:]

  workdir = tmp_path / 'run'
  go = tmp_path / 'go'
  held = {'SYNTHETIC_WAIT_FOR_FILE': str(go), 'SYNTHETIC_WAIT_AT_BATCH': '6'}
  with _ctrl_c_ignored():
    process = run_trainer(workdir, overrides=_overrides(), background=True, env=held)
  try:
    _wait_for(lambda: _logged_step(workdir) >= 6, process)
    process.send_signal(signal.SIGINT)   # the batch of step 7 held
    time.sleep(1)
    assert process.poll() is None, process.stdout.read()[-3000:]
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    go.touch()
  finally:
    [output] = _outputs_of([process], timeout=120)
  assert process.returncode == train.PREEMPTED_EXIT_CODE, output[-3000:]
  assert 'Stopped by SIGTERM' in output and 'Ctrl-C' not in output, output[-3000:]
  assert int(checkpoint.resolve_step_dir(workdir).name) >= 7


def test_zero_nonfinite_limit_is_refused_before_the_workdir_exists(tmp_path):
  config = train_fixtures.tiny_config(max_consecutive_nonfinite=0)
  with pytest.raises(train.RunError, match='max_consecutive_nonfinite=0 must be an integer >= 1'):
    train.train_and_evaluate(config, str(tmp_path / 'run'),
                             make_iterator=train_fixtures.make_synthetic_iterator)
  assert not (tmp_path / 'run').exists()


def test_a_changed_config_is_named_when_config_json_is_rewritten(tmp_path, caplog):
  """Resuming with other values must say which ones changed, not rewrite silently."""
  workdir = epath.Path(tmp_path)
  train._write_config(workdir, train_fixtures.tiny_config())  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    train._write_config(  # pylint: disable=protected-access
        workdir, train_fixtures.tiny_config(seed=7, total_steps=9))
  warnings = [r.getMessage() for r in caplog.records if 'Config differs' in r.getMessage()]
  assert len(warnings) == 1 and 'seed' in warnings[0] and 'total_steps' in warnings[0], warnings
  assert checkpoint.read_config(workdir).seed == 7


def test_eval_reads_the_validation_split_and_training_the_train_split():
  config = train_fixtures.tiny_config()
  mesh = train.checked_mesh(config)
  made = []

  def make_iterator(data_config, *, split, **kwargs):
    it = train_fixtures.make_synthetic_iterator(data_config, split=split, **kwargs)
    made.append((split, it))
    return it
  run = types.SimpleNamespace(console=lambda *a, **k: None)
  data = train._build_input(config, mesh, make_iterator, run)  # pylint: disable=protected-access
  splits = {id(it): split for split, it in made}
  assert splits[id(data.train_iter)] == 'train'
  assert splits[id(data.eval_iter)] == 'validation'


def test_a_boolean_nonfinite_limit_is_refused(tmp_path):
  config = train_fixtures.tiny_config()
  with config.unlocked():
    config.max_consecutive_nonfinite = True
  with pytest.raises(train.RunError, match='max_consecutive_nonfinite=True must be an integer'):
    train.train_and_evaluate(config, str(tmp_path / 'run'),
                             make_iterator=train_fixtures.make_synthetic_iterator)
  assert not (tmp_path / 'run').exists()
