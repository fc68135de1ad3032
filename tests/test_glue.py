"""bert_sym.glue end to end: a checkpoint from the real trainer, fine-tuned on slices of
the real GLUE files; outputs, sweep, sharding over 2 devices, and clear errors."""

import csv
import json
import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from scipy import stats
from sklearn import metrics as sklearn_metrics
import tensorflow_datasets as tfds

from bert_sym import kernel_choice
from bert_sym import checkpoint
from bert_sym import config_check
from bert_sym import loop
from bert_sym import model as model_lib
from bert_sym import sharding
from bert_sym import steps as steps_lib
from bert_sym.glue import data as glue_data
from bert_sym.glue import finetune
from bert_sym.glue import metrics as glue_metrics
from bert_sym.glue import report
from bert_sym.glue import reuse
from bert_sym.glue import suite
from bert_sym.glue import sweep
from configs import glue as glue_config
from tests import real_data
from tests import test_bad_inputs
from tests import train_fixtures
from tests.train_fixtures import cpu_devices_flags

REPO_ROOT = Path(__file__).resolve().parents[1]
# The end-to-end tests read the committed GLUE-layout fixture, so they run in every clone.
GLUE_DIR = real_data.FIXTURE_GLUE_DIR

@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """Pre-trained with the real trainer CLI on the embedded corpus: 4 steps, saves 2 and 4
  (train_fixtures.real_pretrained, shared with tests/test_train.py)."""
  workdir, _ = train_fixtures.real_pretrained(tmp_path_factory)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']
  return workdir


def _config(**overrides):
  config = glue_config.get_config('runlocal')
  config.update(dict(max_train_examples=24, max_eval_examples=20, max_seq_len=32,
                     length_buckets=False, progress_bar=False, glue_dir=str(GLUE_DIR)))
  config.update(overrides)
  return config


# 2 steps on a pair task: the tests that fine-tune the pre-trained tiny model with it (or
# one of its shape) share its compiled steps (the session's persistent compilation cache).
_SHORT_RUN = dict(max_train_examples=16, max_eval_examples=8, max_seq_len=16, batch_size=8)


def _read_tsv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f, delimiter='\t'))


# The command line, data parallel over 2 simulated CPUs: checked by
# test_cli_end_to_end_on_two_devices, the one-process run that
# test_cli_two_processes_match_one_process's two processes must equal.
_TWO_DEVICE_FLAGS = [
    f'--glue_dir={GLUE_DIR}', '--config.max_train_examples=24',
    '--config.max_eval_examples=20', '--config.max_seq_len=32', '--config.epochs=1',
    '--config.length_buckets=false', '--config.progress_bar=false', '--config.batch_size=8',
    '--config.eval_batch_size=8']


@pytest.fixture(scope='module')
def two_device_run(workdir, tmp_path_factory):
  """`--tasks=cola,stsb --seeds=1,2` on 2 devices, once per session (read-only): glue/ is
  its output dir, stdout.txt what it printed."""
  def build(path):
    path.mkdir()
    result = subprocess.run(
        [sys.executable, '-m', 'bert_sym.glue', f'--checkpoint={workdir}',
         f'--output_dir={path / "glue"}', '--tasks=cola,stsb', '--seeds=1,2',
         *_TWO_DEVICE_FLAGS], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS='cpu',
                 XLA_FLAGS=cpu_devices_flags(2), TF_CPP_MIN_LOG_LEVEL='3'))
    assert result.returncode == 0, result.stderr[-5000:]
    (path / 'stdout.txt').write_text(result.stdout)
  return train_fixtures.built_once(tmp_path_factory, 'glue_two_device_run', build)


def test_cli_two_processes_match_one_process(workdir, two_device_run, tmp_path):
  """Two hosts through jax.distributed (gloo on CPU), one device each, each with its own
  local output dir: the data-parallel fine-tune equals the 2-device single-process run
  (STS-B seed 1 of `two_device_run`: its regression outputs, to the last bit)."""
  common = [sys.executable, '-m', 'bert_sym.glue', f'--checkpoint={workdir}', '--tasks=stsb',
            '--seeds=1', *_TWO_DEVICE_FLAGS]
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='3')
  address = train_fixtures.coordinator_address()
  procs = [subprocess.Popen(
      common + [f'--output_dir={tmp_path / f"host{i}"}', f'--coordinator_address={address}',
                '--num_processes=2', f'--process_id={i}'],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert not (tmp_path / 'host1' / 'glue_results.json').exists()   # process 0 writes
  two = json.loads((tmp_path / 'host0' / 'glue_results.json').read_text())
  one = json.loads((two_device_run / 'glue' / 'glue_results.json').read_text())
  assert two['devices'] == one['devices'] == 2
  # Bit for bit only if the one-process run trained seed 1 alone (parallel_seeds=auto on
  # CPU); a vmapped group of seeds 1,2 matches a lone seed to rounding only.
  assert 'trained_with_seeds' not in one['runs']['stsb']['1'], one['runs']['stsb']['1']
  assert two['runs']['stsb']['1']['scores'] == one['runs']['stsb']['1']['scores']
  assert (_read_tsv(tmp_path / 'host0' / 'predictions' / 'stsb_seed1.tsv')
          == _read_tsv(two_device_run / 'glue' / 'predictions' / 'stsb_seed1.tsv'))


def test_cli_output_dir_process_0_cannot_write_stops_both_processes_in_one_line(workdir,
                                                                                tmp_path):
  """Process 0 (which serves jax.distributed) could not create its --output_dir and left;
  process 1, waiting for it in finished_runs' collective, aborted (SIGABRT) in a page of
  C++ stack. Both now stop at the inputs' check, in one line naming the path."""
  (tmp_path / 'a_file').write_text('')   # a directory under it cannot be made, even by root
  blocked = tmp_path / 'a_file' / 'glue'
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='3')
  address = train_fixtures.coordinator_address()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'bert_sym.glue', f'--checkpoint={workdir}', '--tasks=stsb',
       '--seeds=1', *_TWO_DEVICE_FLAGS, f'--output_dir={tmp_path / "host1" if i else blocked}',
       f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    errs = [p.communicate(timeout=240)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errs):
    errors = [line for line in err.splitlines() if 'bert_sym.glue: error:' in line]
    assert p.returncode == 1 and 'Traceback' not in err, err[-3000:]
    assert len(errors) == 1 and f'Cannot write to --output_dir={blocked}: ' in errors[0], err
  assert 'process 0 of this GLUE run stopped on its inputs: ' in errs[1]


def test_cli_end_to_end_on_two_devices(workdir, two_device_run):
  """The command line, data parallel over 2 simulated CPUs, two seeds, a single-sentence
  (MCC) and a regression pair task: every output is written and every score can be
  recomputed from the predictions file."""
  out = two_device_run / 'glue'
  assert '| mean ± std |' in (two_device_run / 'stdout.txt').read_text()

  results = json.loads((out / 'glue_results.json').read_text())
  assert results['step'] == 4 and results['devices'] == 2 and results['mesh']['data'] == 2
  [[trainer_run, started_from]] = checkpoint.lineage_of(workdir / 'checkpoints' / '4')
  assert started_from == -1 and results['checkpoint_run'] == trainer_run   # the sweep's history (test_a_sweep_*)
  assert results['model']['attention'] == 'pairwise'
  assert results['config']['learning_rate'] == 1e-5        # the paper's recipe by default
  for task, name in (('cola', 'cola'), ('stsb', 'stsb')):
    for seed in (1, 2):
      run = results['runs'][task][str(seed)]
      assert run['train_examples'] == 24 and run['train_steps'] == 3   # ceil(24 / 8)
      rows = _read_tsv(out / 'predictions' / f'{name}_seed{seed}.tsv')
      assert len(rows) == 20 and list(rows[0]) == ['idx', 'label', 'prediction']
      cast = float if task == 'stsb' else int
      labels = [cast(r['label']) for r in rows]
      predictions = [cast(r['prediction']) for r in rows]
      # Recomputed with scikit-learn / scipy directly, at the paper's definitions: MCC for
      # CoLA, the mean of Pearson and Spearman for STS-B, in percent.
      if task == 'cola':
        expected = 100 * sklearn_metrics.matthews_corrcoef(labels, predictions)
      else:
        expected = 50 * (stats.pearsonr(labels, predictions)[0] +
                         stats.spearmanr(labels, predictions)[0])
      assert run['scores'][name]['score'] == pytest.approx(expected, abs=1e-4)
      events = list((out / 'runs' / f'{task}_seed{seed}' / 'tensorboard').iterdir())
      assert events and events[0].name.startswith('events.out.tfevents')
  summary = results['summary']
  assert summary['over_seeds']['cola']['n'] == 2 and summary['over_seeds']['qqp']['n'] == 0
  assert summary['per_seed']['1']['glue'] is None          # 2 of 9 tasks: never a full GLUE
  assert summary['per_seed']['1']['glue_partial'] == pytest.approx(np.mean(
      [results['runs'][t]['1']['scores'][t]['score'] for t in ('cola', 'stsb')]))
  table = (out / 'glue_results.md').read_text()
  assert '(partial 2/9)' in table and '| 2 |' in table
  # Cut dev sets are said in the table itself, not only in the JSON.
  assert ('Cut data, not comparable with the paper:** only the first 24 training examples; '
          'only the first 20 dev-set examples') in table
  assert not list(out.rglob('*.tmp-*'))                     # atomic writes left no temp


def test_sweep_scores_every_step(workdir, tmp_path, capsys):
  out = tmp_path / 'sweep'
  config = _config(tasks='mrpc', seeds='1')
  source, workdir = workdir, tmp_path / 'run'   # a copy: step 2 is rotated away below
  shutil.copytree(source, workdir)
  sweep.run_sweep(str(workdir), str(out), config, reference_score=40.0)
  summary = json.loads((out / 'glue_vs_step.json').read_text())
  assert [p['step'] for p in summary['points']] == [2, 4]
  assert summary['threshold'] == pytest.approx(38.0)
  assert (out / 'glue_vs_step.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # The curve compared with the reference came from cut sets: its table says so, as each
  # step's glue_results.md does (it said nothing, and read as comparable with the paper).
  assert ('Cut data, not comparable with the paper:** only the first 24 training examples; '
          'only the first 20 dev-set examples') in (out / 'glue_vs_step.md').read_text()
  for step in (2, 4):
    assert (out / f'step_{step:08d}' / 'predictions' / 'mrpc_seed1.tsv').exists()
  # A 4-step model's scores are unpredictable, so the threshold logic is checked with
  # references whose answer is not: MRPC >= 0 always, and never >= 95% of 1000. The
  # reruns reuse the finished step_* runs (resume), so they train nothing.
  summary = sweep.run_sweep(str(workdir), str(out), config, reference_score=0.0)
  assert json.loads((out / 'glue_vs_step.json').read_text())[
      'first_step_reaching_threshold'] == 2
  sweep.run_sweep(str(workdir), str(out), config, reference_score=1000.0)
  assert json.loads((out / 'glue_vs_step.json').read_text())[
      'first_step_reaching_threshold'] is None
  # Step 2 rotated away (keep_last) while the trainer ran on: its scored point stays on the
  # curve, and so does the answer to "the first step reaching it".
  shutil.rmtree(workdir / 'checkpoints' / '2')
  sweep.run_sweep(str(workdir), str(out), config, reference_score=0.0)
  summary = json.loads((out / 'glue_vs_step.json').read_text())
  assert [p['step'] for p in summary['points']] == [2, 4]
  assert summary['first_step_reaching_threshold'] == 2
  sweep.run_sweep(str(workdir), str(out), _config(tasks='mrpc', seeds='2'))   # another
  assert [p['step'] for p in json.loads(    # seed list: step 2's seed-1 point is not its
      (out / 'glue_vs_step.json').read_text())['points']] == [4]
  # A damaged step in the middle of a run is a gap in the sweep, not the sweep's end.
  damaged = tmp_path / 'damaged_run'
  shutil.copytree(source, damaged)
  for array_file in (damaged / 'checkpoints' / '2' / 'state').rglob('d/*'):
    array_file.write_bytes(array_file.read_bytes()[:array_file.stat().st_size // 2])
  sweep.run_sweep(str(damaged), str(tmp_path / 'sweep_damaged'), config)
  assert [p['step'] for p in json.loads(
      (tmp_path / 'sweep_damaged' / 'glue_vs_step.json').read_text())['points']] == [4]
  assert 'step 2 skipped, its checkpoint is damaged' in capsys.readouterr().err


def test_a_sweep_leaves_out_a_step_whose_params_are_not_finite_with_a_warning(workdir,
                                                                            tmp_path):
  """The README's "--sweep leaves it out with a warning", as a user runs it: the command
  line over a workdir whose newest step holds NaN scores the step before, says why the
  other is missing, and exits 0. That step is never fine-tuned."""
  run, out = tmp_path / 'run', tmp_path / 'sweep'
  shutil.copytree(workdir, run)
  train_fixtures.make_params_nonfinite(run / 'checkpoints' / '4')
  result = subprocess.run(
      [sys.executable, '-m', 'bert_sym.glue', f'--checkpoint={run}', f'--output_dir={out}',
       '--sweep', '--tasks=wnli', '--seeds=1', f'--glue_dir={GLUE_DIR}',
       *[f'--config.{k}={v}' for k, v in _SHORT_RUN.items()], '--config.epochs=1',
       '--config.progress_bar=false', f'--config.tokens_cache_dir={tmp_path / "tokens"}'],
      cwd=REPO_ROOT, env=_glue_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'WARNING: GLUE sweep: step 4 skipped, its checkpoint is damaged \(The '
                   r'parameters in \S*checkpoints/4 are not finite .* Fix: '
                   r'--checkpoint=\S*checkpoints/2 \(the newest step before it\)',
                   result.stderr), result.stderr[-3000:]
  summary = json.loads((out / 'glue_vs_step.json').read_text())
  assert [p['step'] for p in summary['points']] == [2] and summary['unfinished_steps'] == []
  assert (out / 'step_00000002' / 'predictions' / 'wnli_seed1.tsv').exists()
  assert not (out / 'step_00000004').exists()
  assert 'GLUE finished' in result.stdout


def _point(step, score, kind='glue'):
  return {'step': step, 'score': score, 'std': None, 'score_kind': kind, 'glue_full': score,
          'tasks': {n: score for n in glue_metrics.FULL_SCORES}}


def test_first_step_reaching_threshold():
  points = [_point(1000, 60.0), _point(2000, None), _point(3000, 75.4),
            _point(4000, 75.39), _point(5000, 80.0)]
  assert report.first_step_reaching(points, 75.39) == 3000   # not 4000: the first one
  assert report.first_step_reaching(points, 75.4) == 3000    # reaching = equal counts
  assert report.first_step_reaching(points, 75.41) == 5000
  assert report.first_step_reaching(points, 50.0) == 1000
  assert report.first_step_reaching(points, 80.01) is None   # never reached
  assert report.first_step_reaching([_point(1000, None)], 0.0) is None


def test_a_sigterm_while_a_sweep_scores_stops_it_with_exit_42(workdir, tmp_path, monkeypatch):
  """SIGTERM while step 2's last task is scored: each step had its own signal handler, so
  the flag was dropped with it and the sweep went on to step 4 (a preemption's SIGKILL then
  ended it with no 42, no requeue). It stops after step 2 now; the rerun does step 4."""
  import signal  # pylint: disable=g-import-not-at-top
  from bert_sym import loop  # pylint: disable=g-import-not-at-top
  out, config = tmp_path / 'sweep', _config(tasks='mrpc', seeds='1')
  score = suite._score   # pylint: disable=protected-access
  signalled = []

  def score_then_sigterm(*args, **kwargs):
    if not signalled:
      signalled.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
    return score(*args, **kwargs)
  monkeypatch.setattr(suite, '_score', score_then_sigterm)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.Preempted) as stopped:
    sweep.run_sweep(str(workdir), str(out), config)
  assert stopped.value.exit_code == 42 and stopped.value.step == 2
  assert signal.getsignal(signal.SIGTERM) == before   # the process's handler again
  assert (out / 'step_00000002' / 'glue_results.json').exists()
  assert not (out / 'step_00000004').exists()
  # The summary of the stopped sweep says step 4 is still to score: it read as a finished
  # sweep of step 2 alone ("First step reaching it: none yet" over every checkpoint).
  assert json.loads((out / 'glue_vs_step.json').read_text())['unfinished_steps'] == [4]
  assert '**Unfinished:** step(s) 4 not scored yet' in (out / 'glue_vs_step.md').read_text()
  points = sweep.run_sweep(str(workdir), str(out), config)['points']
  assert [p['step'] for p in points] == [2, 4]
  assert json.loads((out / 'glue_vs_step.json').read_text())['unfinished_steps'] == []
  assert 'Unfinished' not in (out / 'glue_vs_step.md').read_text()


def test_sweep_summary_reports_95_percent_of_the_reference(tmp_path):
  points = [_point(1000, 60.0), _point(2000, 74.0), _point(3000, 76.0), _point(4000, 79.0)]
  report.write_sweep(tmp_path, 'WORKDIR', points, reference_score=79.36)
  summary = json.loads((tmp_path / 'glue_vs_step.json').read_text())
  assert summary['threshold'] == pytest.approx(75.392)      # 0.95 * 79.36
  assert summary['first_step_reaching_threshold'] == 3000   # 74.0 < 75.392 <= 76.0
  assert summary['points'] == points and summary['workdir'] == 'WORKDIR'
  table = (tmp_path / 'glue_vs_step.md').read_text()
  assert '95% of it = 75.39. First step reaching it: 3000.' in table
  assert '| 2000 | 74.00 | glue |' in table and 'partial' not in table

  report.write_sweep(tmp_path, 'WORKDIR', points[:2] + [_point(3000, 70.0, 'glue_partial (2/9)')],
                   reference_score=79.36)
  summary = json.loads((tmp_path / 'glue_vs_step.json').read_text())
  assert summary['first_step_reaching_threshold'] is None
  table = (tmp_path / 'glue_vs_step.md').read_text()
  assert 'First step reaching it: none yet.' in table
  assert 'Warning: some scores are partial GLUE means' in table

  report.write_sweep(tmp_path, 'WORKDIR', points, reference_score=79.36,
                     config={'max_train_examples': 0, 'max_eval_examples': 128})
  table = (tmp_path / 'glue_vs_step.md').read_text()
  assert '**Cut data, not comparable with the paper:** only the first 128 dev-set' in table
  assert 'training examples' not in table

  report.write_sweep(tmp_path, 'WORKDIR', points, reference_score=None)
  assert 'Cut data' not in (tmp_path / 'glue_vs_step.md').read_text()
  summary = json.loads((tmp_path / 'glue_vs_step.json').read_text())
  assert 'threshold' not in summary and 'first_step_reaching_threshold' not in summary
  assert not list(tmp_path.glob('.*tmp-*'))


def test_a_second_glue_command_on_an_output_dir_in_use_stops(workdir, tmp_path):
  """Two commands on one --output_dir at once (say --tasks=rte and --tasks=mrpc): each
  rewrote glue_results.json with its own runs alone, so the first one to finish lost its
  scores, and each set the other's predictions aside as strays. The second now stops in
  one line naming the holder, and leaves the first one's files alone."""
  import fcntl  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  out = tmp_path / 'glue'
  out.mkdir()
  lock = out / 'glue.lock'   # held as the running command holds it: an flock
  fd = os.open(lock, os.O_CREAT | os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({'host': 'elsewhere', 'pid': 4242}).encode())
    with pytest.raises(ValueError, match=r'in use by another GLUE run \(pid 4242 on elsewhere.*'
                       r'another --output_dir'):
      suite.run_glue(str(workdir), str(out), _config(tasks='wnli', seeds='1', **_SHORT_RUN))
  finally:
    os.close(fd)
  assert [p.name for p in out.iterdir()] == ['glue.lock']   # nothing written or moved
  results = suite.run_glue(str(workdir), str(out), _config(tasks='wnli', seeds='1',
                                                           **_SHORT_RUN))
  assert list(results['runs']) == ['wnli'] and not lock.exists()   # taken, then released


def test_resume_reuses_finished_runs_only(workdir, tmp_path, monkeypatch):
  out = tmp_path / 'resume'
  config = _config(tasks='wnli', seeds='1', **_SHORT_RUN,
                   tokens_cache_dir=str(tmp_path / 'tokens'))
  compiled = {}   # shared by the calls with one recipe, as a sweep does: compile once
  handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  first = suite.run_glue(str(workdir), str(out), config, compiled)['runs']['wnli']['1']
  # In process (a notebook): Ctrl-C and SIGTERM are the caller's again afterwards.
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
  # Killed after a group's results were written, before its checkpoints were removed: a
  # rerun with nothing left to train left them for good. Those of a group with a seed
  # still to finish (a longer --seeds list, killed) stay, to resume.
  group_dir = out / 'runs' / 'wnli'
  (group_dir / 'checkpoints' / '7').mkdir(parents=True)
  (group_dir / 'group.json').write_text(json.dumps({'seeds': [1, 2]}))
  suite.run_glue(str(workdir), str(out), config, compiled)
  assert (group_dir / 'checkpoints' / '7').is_dir()
  (group_dir / 'group.json').write_text(json.dumps({'seeds': [1]}))
  suite.run_glue(str(workdir), str(out), config, compiled)
  assert not group_dir.exists() and (out / 'runs' / 'wnli_seed1').is_dir()
  trained = []
  real_finetune = suite.finetune_lib.finetune_group
  monkeypatch.setattr(suite.finetune_lib, 'finetune_group',
                      lambda *a, **k: trained.extend(a[4]) or real_finetune(*a, **k))
  config.seeds = '1,2'
  results = suite.run_glue(str(workdir), str(out), config, compiled)
  assert trained == [2] and results['runs']['wnli']['1'] == first
  # The token ids of WNLI's two train and two dev columns, cached by the first run and
  # read by this one (it wrote none).
  assert len(list((tmp_path / 'tokens').glob('wordpiece-*.npz'))) == 4
  assert results['summary']['over_seeds']['wnli']['n'] == 2
  (out / 'predictions' / 'wnli_seed2.tsv').unlink()     # an interrupted write: redo seed 2
  suite.run_glue(str(workdir), str(out), config, compiled)
  assert trained == [2, 2]
  config.tasks = 'rte'                     # another task joins the table of the first
  results = suite.run_glue(str(workdir), str(out), config, compiled)
  assert set(results['runs']) == {'wnli', 'rte'} and trained == [2, 2, 1, 2]
  assert results['summary']['per_seed'][1]['glue_full_tasks'] == ['rte', 'wnli']
  trained.clear()
  config.tasks = 'wnli'
  # Another recipe: redo everything. (A knob outside the train step, whose compile is then
  # the first one's; test_every_training_knob_is_part_of_the_recipe goes through each.)
  config.max_eval_examples = 6
  results = suite.run_glue(str(workdir), str(out), config)
  assert trained == [1, 2] and set(results['runs']) == {'wnli'}


def test_a_stop_loses_no_run_finished_before(tmp_path, monkeypatch):
  """Runs reused from glue_results.json are in it from its first rewrite on: a stop before
  their task is reached loses none of them (they would be fine-tuned again). Seeds not
  requested stay too, outside the table, and count again when asked for."""
  workdir = _handmade_workdir(tmp_path / 'run', model__vocab_size=30522)
  out = tmp_path / 'out'
  config = _config(tasks='wnli,rte', seeds='1', **_SHORT_RUN, parallel_seeds='false')
  compiled = {}

  def saved_runs(key='runs'):
    return json.loads((out / 'glue_results.json').read_text()).get(key, {})

  first = suite.run_glue(str(workdir), str(out), config, compiled)['runs']
  trained, stop_at = [], ['rte']
  real_finetune = suite.finetune_lib.finetune_group

  def finetune(*args, **kwargs):
    trained.append((args[1].spec.name, list(args[4])))
    if args[1].spec.name in stop_at:
      raise loop.Preempted(0)                       # SIGTERM while rte seed 2 trains
    return real_finetune(*args, **kwargs)

  monkeypatch.setattr(suite.finetune_lib, 'finetune_group', finetune)
  config.seeds = '1,2'
  with pytest.raises(loop.Preempted):
    suite.run_glue(str(workdir), str(out), config, compiled)
  assert trained == [('wnli', [2]), ('rte', [2])]
  runs = saved_runs()
  assert runs['rte'] == {'1': first['rte']['1']} and set(runs['wnli']) == {'1', '2'}
  stop_at.clear()
  second = suite.run_glue(str(workdir), str(out), config, compiled)['runs']
  assert trained[2:] == [('rte', [2])]             # rte seed 1 was not fine-tuned again
  config.seeds = '1'
  results = suite.run_glue(str(workdir), str(out), config, compiled)
  assert results['summary']['over_seeds']['wnli']['n'] == 1 and len(trained) == 3
  assert saved_runs(suite.OTHER_SEEDS) == {t: {'2': second[t]['2']} for t in ('wnli', 'rte')}
  config.seeds = '1,2'                             # asked for again: reused, not redone
  assert suite.run_glue(str(workdir), str(out), config, compiled)['runs'] == second
  assert len(trained) == 3 and not saved_runs(suite.OTHER_SEEDS)


def test_a_task_whose_checkpoints_are_all_damaged_is_fine_tuned_again(workdir, tmp_path,
                                                                      monkeypatch, caplog):
  """GLUE has no --start_over: refusing (as the trainer does) would stop this output
  directory for good. The task starts again from the pre-trained encoder instead, with
  the warning, and ends on the same predictions as the first run."""
  out = tmp_path / 'glue'
  config = _config(tasks='wnli', seeds='1', **_SHORT_RUN, checkpoint_every_steps=1)
  compiled = {}
  # As if the process died after its last save: the task's checkpoint stays, no results.
  monkeypatch.setattr(suite.finetune_lib, 'finish_group', lambda *a, **k: None)
  suite.run_glue(str(workdir), str(out), config, compiled)
  first = _read_tsv(out / 'predictions' / 'wnli_seed1.tsv')
  (out / 'predictions' / 'wnli_seed1.tsv').unlink()
  [saved] = (out / 'runs' / 'wnli' / 'checkpoints').glob('[0-9]*')
  (saved / 'state' / '_METADATA').unlink()
  monkeypatch.undo()
  caplog.clear()
  suite.run_glue(str(workdir), str(out), config, compiled)
  err = caplog.text
  assert f'checkpoint step {saved.name} cannot be restored' in err
  assert 'starting over from step 0' in err
  assert _read_tsv(out / 'predictions' / 'wnli_seed1.tsv') == first
  assert not (out / 'runs' / 'wnli').exists()   # a finished task leaves no damaged steps


def test_sweep_plot_is_a_png(tmp_path):
  points = [{'step': s, 'score': v} for s, v in ((1000, 50.0), (2000, 70.0), (4000, None))]
  report.plot_sweep(tmp_path / 'plot.png', points, threshold=66.5)
  assert (tmp_path / 'plot.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert os.listdir(tmp_path) == ['plot.png']                # the temporary file is gone


def test_write_on_process_0_replaces_text_and_bytes(tmp_path):
  path = tmp_path / 'new' / 'dir' / 'out.json'
  report.write_on_process_0(path, 'héllo\n')
  assert path.read_bytes() == 'héllo\n'.encode('utf-8')
  report.write_on_process_0(str(path), b'\x00\x01')                 # str paths, bytes data
  assert path.read_bytes() == b'\x00\x01'
  assert os.listdir(path.parent) == ['out.json']


_TWO_PROCESS_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    address, process_id, output_dir, workdir = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
    jax.distributed.initialize(address, num_processes=2, process_id=process_id)
    from bert_sym import checkpoint, cli
    from bert_sym.checkpoint import restoring
    from bert_sym.glue import finetune, hosts, suite
    if process_id == 1:   # step 4 unreadable on this host only (a stale or partial copy)
      read_json_item = restoring.read_json_item
      def unreadable_4(step_dir):
        if str(step_dir).endswith('/4'):
          raise FileNotFoundError(2, 'No such file or directory', f'{step_dir}/data_iter')
        return read_json_item(step_dir)
      restoring.read_json_item = unreadable_4
    try:
      loaded = finetune.load_pretrained_encoder(workdir).step
    except Exception as e:
      loaded = f'{type(e).__name__}: {e}'
    from configs import glue as glue_config
    config = glue_config.get_config('runlocal')
    done = suite.finished_runs(output_dir, 'CKPT/checkpoints/4', config)
    mine = hosts.on_process_0(lambda: jax.process_index())
    try:
      hosts.on_process_0(lambda: 1 / 0)
      error = None
    except Exception as e:
      error = f'{type(e).__name__}: {e}'
    try:   # the user's error: one line on every process (cli.user_error_message)
      hosts.on_process_0(lambda: checkpoint.candidate_step_dirs(output_dir + '/none'))
    except Exception as e:
      user_error = cli.user_error_message(e)
    print('RESULT', json.dumps({'done': sorted(f'{t}/{s}' for t, s in done), 'mine': mine,
                                'error': error, 'loaded': loaded, 'user_error': user_error}))
''')


def test_two_hosts_with_local_output_dirs_take_process_0s_decisions(workdir, tmp_path):
  """Only process 0 writes glue_results.json; with per-host output dirs, process 1 sees
  none. Each host deciding alone would make process 0 skip the finished run while process
  1 enters finetune's collectives: a hang. Both must get process 0's answer. Likewise the
  checkpoint: a step that process 1 alone cannot read stops both in one line naming it
  (process 0 used to wait in orbax's restore barrier, process 1 in the agreement: gloo
  aborted both; skipping it would fine-tune an older step than the hosts that read it)."""
  config = glue_config.get_config('runlocal')
  host0, host1 = tmp_path / 'host0', tmp_path / 'host1'
  (host0 / 'predictions').mkdir(parents=True)
  host1.mkdir()
  run = {'scores': {'rte': {'accuracy': 0.5, 'score': 50.0}}}
  (host0 / 'glue_results.json').write_text(json.dumps(
      {'checkpoint': 'CKPT/checkpoints/4', 'config': config.to_dict(),
       'runs': {'rte': {'1': run}, 'cola': {'1': {'scores': {'cola': {'score': 1.0}}}}}}))
  (host0 / 'predictions' / 'rte_seed1.tsv').write_text('idx\tlabel\tprediction\n')
  address = train_fixtures.coordinator_address()
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='3')
  procs = [subprocess.Popen([sys.executable, '-c', _TWO_PROCESS_SCRIPT, address, str(i),
                             str(d), str(workdir)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i, d in enumerate((host0, host1))]
  try:
    outputs = [p.communicate(timeout=180) for p in procs]
  finally:
    for p in procs:
      p.kill()
  results = []
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-3000:]
    results.append(json.loads(stdout.split('RESULT ', 1)[1]))
  for r in results:   # cola's predictions file is missing on host 0: redone everywhere
    assert r['done'] == ['rte/1'] and r['mine'] == 0
    assert r['loaded'].startswith(f'CheckpointReadError: Could not read checkpoint {workdir}/'
                                  'checkpoints/4 (process(es) [1] cannot read it ('), r
    assert 'where the others can: the hosts see different files' in r['loaded'], r
    assert f'{workdir}/checkpoints/4/data_iter' in r['loaded'], r   # process 1's reason
  assert results[0]['error'] == 'ZeroDivisionError: division by zero'
  assert results[1]['error'].startswith('RuntimeError: Process 0 failed, so process 1 '
                                        'stops too: ZeroDivisionError')
  assert results[0]['user_error'].startswith(f'{host0}/none does not exist. Fix: ')
  assert results[1]['user_error'].startswith('Process 0 failed, so process 1 stops too: '
                                             f'FileNotFoundError: {host0}/none does not exist')


def test_mnli_from_tfds_writes_matched_and_mismatched(workdir, tmp_path, monkeypatch):
  """The default TFDS source (TFDS's mock data for glue/mnli): one model, two dev sets."""
  monkeypatch.setattr(glue_data, 'TFDS_DOWNLOAD_HOST', None)   # mock data: no download
  out = tmp_path / 'mnli'
  with tfds.testing.mock_data(num_examples=8):
    results = suite.run_glue(str(workdir), str(out), _config(tasks='mnli', seeds='3',
                                                            glue_dir=''))
  scores = results['runs']['mnli']['3']['scores']
  assert set(scores) == {'mnli_m', 'mnli_mm'}
  for name in ('mnli_m', 'mnli_mm'):
    rows = _read_tsv(out / 'predictions' / f'{name}_seed3.tsv')
    assert len(rows) == 8 and {r['prediction'] for r in rows} <= {'0', '1', '2'}


def test_fresh_head_and_pretrained_encoder(workdir, tmp_path):
  """Encoder weights come from the checkpoint; pooler and classifier are N(0, 0.02)."""
  pretrained = finetune.load_pretrained_encoder(str(workdir))
  config = _config()
  spec = glue_data.TASKS['rte']
  mesh = sharding.make_mesh(config.mesh)
  task = finetune.setup_task(pretrained, spec, 16, config, mesh,
                         sharding.logical_rules(pretrained.config))
  params = task.state.init_params(jax.random.key(1))
  assert set(params) == {'bert', 'classifier'} and set(params['bert']) == {'encoder', 'pooler'}
  kernel = np.asarray(params['bert']['pooler']['dense']['kernel'])
  assert abs(kernel.std() - 0.02) < 0.003
  assert params['classifier']['kernel'].shape == (32, 2)
  assert not np.any(np.asarray(params['classifier']['bias']))
  # What fine-tuning starts from (two seeds stacked): every seed's encoder is the one in
  # the newest checkpoint, as plain orbax reads it; only the head differs between seeds.
  state_dir = workdir / 'checkpoints' / '4' / 'state'
  reader = ocp.PyTreeCheckpointer()
  tree = reader.metadata(state_dir).item_metadata.tree
  saved = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  _, latest, state, _ = finetune._restore_or_init(pretrained, task, [0, 1],
                                               tmp_path / 'group', 'rte')
  assert latest is None
  encoder = jax.device_get(state['params']['bert']['encoder'])
  assert jax.tree.structure(encoder) == jax.tree.structure(saved['params']['encoder'])
  for got, want in zip(jax.tree.leaves(encoder), jax.tree.leaves(saved['params']['encoder'])):
    for seed in range(2):
      np.testing.assert_array_equal(got[seed], want.astype(np.float32))
  heads = np.asarray(state['params']['classifier']['kernel'])
  assert not np.array_equal(heads[0], heads[1])
  # and its dropout masks: each seed has its own key (one shared key, other heads, would
  # make the seeds' spread understate what independent runs show).
  rngs = np.asarray(jax.device_get(state['rng']))
  assert not np.array_equal(rngs[0], rngs[1])


def _handmade_workdir(path, steps=(3,), **overrides):
  """A workdir written with the trainer's checkpoint module, without training; each step
  after the first holds other params (shifted by its index)."""
  config = train_fixtures.tiny_config(**overrides)
  path.mkdir(parents=True)
  checkpoint.write_config(path, config)
  runnable = config.model.copy_and_resolve_references()
  runnable.attention_impl = 'xla'   # a kernel this machine has; the weights are the same
  initial = nn.meta.unbox(model_lib.BertForMaskedLM(runnable).init(
      jax.random.key(0), *model_lib.dummy_inputs())['params'])
  manager = checkpoint.make_manager(path, config.checkpoint)
  for index, step in enumerate(steps):
    params = jax.tree.map(lambda x, i=index: x + i, initial)
    checkpoint.save(manager, step, {
        'params': params, 'opt_state': optax.adamw(1e-3).init(params),
        'step': np.int32(step), 'rng': jax.random.key_data(jax.random.key(0))},
        {'index': step}, force=True)
    manager.wait_until_finished()
  manager.close()
  return path


@pytest.mark.parametrize('attention', ['standard', 'symmetric'])   # pairwise: `workdir`
def test_every_attention_variant_fine_tunes(attention, tmp_path, monkeypatch):
  """Each variant's checkpoint fine-tunes: the loss moves, the classifier learns, the
  score is a valid accuracy. The checkpoints name splash, a TPU kernel, as a run trained
  on a TPU does: GLUE runs its own kernel choice (config.attention_impl=auto)."""
  workdir = _handmade_workdir(tmp_path / attention, model__attention=attention,
                              model__vocab_size=30522, model__attention_impl='splash')
  trained, compiled = [], {}
  real_finetune = suite.finetune_lib.finetune_group
  monkeypatch.setattr(suite.finetune_lib, 'finetune_group',
                      lambda *a, **k: trained.append(real_finetune(*a, **k)) or trained[-1])
  out = tmp_path / 'out'
  results = suite.run_glue(str(workdir), str(out), _config(
      tasks='wnli', max_train_examples=16, max_eval_examples=8, batch_size=4, epochs=2.0,
      learning_rate=1e-3, log_every_steps=1), compiled)
  assert results['model']['attention'] == attention
  run = results['runs']['wnli']['1']
  assert run['dev_examples'] == {'wnli': 8} and run['train_steps'] == 8
  losses = [json.loads(line)['train/loss']
            for line in (out / 'runs' / 'wnli_seed1' / 'metrics.jsonl').read_text().splitlines()
            if 'train/loss' in line]
  assert len(losses) == 8 and all(np.isfinite(losses)) and len(set(losses)) > 1
  (task,) = compiled.values()
  initial = task.state.init_params(jax.random.split(jax.random.key(1))[0])['classifier']
  final = trained[0][0]['classifier']
  assert not np.allclose(np.asarray(initial['kernel']), np.asarray(final['kernel']))
  assert np.any(np.asarray(final['bias']))   # starts at zero
  accuracy = run['scores']['wnli']['accuracy']
  assert 0.0 <= accuracy <= 1.0 and accuracy * 8 == pytest.approx(round(accuracy * 8))


def test_the_kernel_is_glues_own_choice_checked_before_training(monkeypatch):
  """A named kernel that cannot run fails at once with GLUE's own fix: off its backend,
  or splash on a TPU with length buckets shorter than its 128-token tiles, where auto
  takes xla."""
  model_cfg = train_fixtures.tiny_config(model__attention_dropout_rate=0.0).model
  with pytest.raises(ValueError, match=r"^GLUE config.attention_impl='splash' cannot run "
                                       r"here: attention_impl='splash' needs a TPU but the JAX "
                                       r"backend is 'cpu'\. Fix: --config.attention_impl=auto "
                                       r"\(the default\) or xla\.$"):
    suite._glue_kernel(_config(attention_impl='splash'), model_cfg, 'auto')
  monkeypatch.setattr(kernel_choice, 'current_backend', lambda: 'tpu')
  with pytest.raises(ValueError, match=r'multiple of 128, got 16\. Fix: .* or xla, or '
                     r'--config.length_buckets=false \(every batch padded to max_seq_len\)\.$'):
    suite._glue_kernel(_config(attention_impl='splash', length_buckets=True,
                               max_seq_len=128), model_cfg, 'auto')
  assert suite._glue_kernel(_config(attention_impl='splash', max_seq_len=128),
                            model_cfg, 'auto') == 'splash'
  assert suite._glue_kernel(_config(length_buckets=True), model_cfg, 'auto') == 'auto'
  with pytest.raises(ValueError, match=r"one of \('auto', 'xla', 'cudnn', 'pallas', 'splash'\)"):
    suite._glue_kernel(_config(attention_impl='flash'), model_cfg, 'auto')
  # On a GPU auto is xla (it took cuDNN, whose in-kernel dropout masks do not follow the
  # seed, and whose batching rule fails to trace the vmap over seeds trained together).
  monkeypatch.setattr(kernel_choice, 'current_backend', lambda: 'gpu')
  model_cfg.dtype = 'bfloat16'
  for rate in (0.0, 0.1):
    model_cfg.attention_dropout_rate = rate
    assert suite._glue_kernel(_config(), model_cfg, 'auto') == 'xla'
  model_cfg.attention_dropout_rate = 0.0
  with pytest.raises(ValueError, match=r"'cudnn' cannot train seeds together.*"
                                       r"--config.parallel_seeds=false"):
    suite._glue_kernel(_config(attention_impl='cudnn'), model_cfg, 'auto')
  assert suite._glue_kernel(_config(attention_impl='cudnn'), model_cfg, 'false') == 'cudnn'


def test_glue_fine_tunes_with_its_own_dropout_not_the_checkpoints(workdir):
  """A `fast` checkpoint (no attention dropout) fine-tuned without it: the rates came from
  its config.json, where the paper's GLUE runs used 0.1."""
  pretrained, _ = suite._checkpoint_and_tokenizer(   # pylint: disable=protected-access
      str(workdir), _config(dropout_rate=0.05, attention_dropout_rate=0.07), 'auto')
  assert (pretrained.config.model.dropout_rate,
          pretrained.config.model.attention_dropout_rate) == (0.05, 0.07)
  assert glue_config.get_config().attention_dropout_rate == 0.1
  with pytest.raises(ValueError, match='attention_dropout_rate'):
    config_check.check_glue(_config(attention_dropout_rate=1.5))


def test_sweep_skips_a_step_still_being_written(tmp_path, monkeypatch):
  """On gs:// orbax writes checkpoints/<step>/ in place and marks it finished with
  commit_success.txt: a sweep beside a running trainer must not read the partial step."""
  workdir = _handmade_workdir(tmp_path / 'run')                          # step 3, finished
  assert sweep.checkpoint_steps(workdir) == [3]
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gcs_utils, 'is_gcs_path', lambda _: True)       # orbax's gs:// rule
  (workdir / 'checkpoints' / '3' / 'commit_success.txt').write_text('done')
  (workdir / 'checkpoints' / '6' / 'state').mkdir(parents=True)       # save in progress
  assert sweep.checkpoint_steps(workdir) == [3]
  (workdir / 'checkpoints' / '6' / 'commit_success.txt').write_text('done')
  assert sweep.checkpoint_steps(workdir) == [3, 6]


@pytest.mark.parametrize('gone, scored', [(2, 4), (4, 2)])
def test_a_step_rotated_away_during_a_sweep_is_a_gap_not_the_end(workdir, tmp_path,
                                                                  monkeypatch, capsys, gone,
                                                                  scored):
  """Beside a running trainer, keep_last deletes a listed step before the sweep reaches it:
  the sweep stopped there ("checkpoints/2 does not exist. Fix: pass a training workdir"),
  leaving the newer steps unscored. It skips that step with a warning now. The last step
  skipped, the summary no longer names it as still to score."""
  source, workdir = workdir, tmp_path / 'run'
  shutil.copytree(source, workdir)
  listed = sweep.checkpoint_steps

  def list_then_rotate(path):
    steps = listed(path)
    shutil.rmtree(workdir / 'checkpoints' / str(gone))   # the trainer's rotation, just after
    return steps
  monkeypatch.setattr(sweep, 'checkpoint_steps', list_then_rotate)
  out = tmp_path / 'sweep'
  points = sweep.run_sweep(str(workdir), str(out), _config(tasks='mrpc', seeds='1'))['points']
  assert [p['step'] for p in points] == [scored]
  assert f'step {gone} skipped, its checkpoint was deleted' in capsys.readouterr().err
  assert (out / f'step_{scored:08d}' / 'predictions' / 'mrpc_seed1.tsv').exists()
  assert json.loads((out / 'glue_vs_step.json').read_text())['unfinished_steps'] == []


def test_a_newest_step_with_a_truncated_array_file_falls_back_as_export_does(tmp_path,
                                                                            capsys):
  """Its metadata reads, one array file does not: GLUE must not stop on it (choosing the
  step from metadata alone) while export skips it; both take the previous step."""
  workdir = _handmade_workdir(tmp_path / 'run', steps=(3, 6))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['3', '6']
  largest = max((workdir / 'checkpoints' / '6' / 'state').rglob('d/*'),
                key=lambda f: f.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  assert checkpoint.resolve_step_dir(workdir).name == '6'    # its metadata reads
  pretrained = finetune.load_pretrained_encoder(workdir)
  assert pretrained.step == 3 and pretrained.step_dir.endswith('/3')
  # Orbax's own restore of step 3 (no project code), and export's reader, agree with it.
  want = ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / '3' / 'state')
  jax.tree.map(np.testing.assert_array_equal, pretrained.encoder,
               jax.tree.map(np.asarray, want['params']['encoder']))
  jax.tree.map(np.testing.assert_array_equal, pretrained.encoder,
               checkpoint.load_pretrained(workdir)[1]['encoder'])
  assert 'WARNING: checkpoint step 6 cannot be restored' in capsys.readouterr().err


def test_bad_checkpoints_are_clear(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='No finished checkpoint under'):
    suite.run_glue(str(empty), str(tmp_path / 'out'), _config())
  with pytest.raises(FileNotFoundError, match='does not exist'):
    suite.run_glue(str(tmp_path / 'missing'), str(tmp_path / 'out'), _config())
  # tests/train_fixtures' tiny config has a 1000-token vocabulary: not bert-base-uncased.
  small_vocab = _handmade_workdir(tmp_path / 'small_vocab')
  with pytest.raises(ValueError, match=r'Vocabulary mismatch: .* 30522 tokens.*'
                                       r'model.vocab_size=1000'):
    suite.run_glue(str(small_vocab), str(tmp_path / 'out'), _config())
  short = _handmade_workdir(tmp_path / 'short', model__vocab_size=30522,
                           model__max_position_embeddings=64)
  with pytest.raises(ValueError, match=r'max_seq_len=128 exceeds .*=64: .*Fix: '
                                       r'--config.max_seq_len=64'):
    suite.run_glue(str(short), str(tmp_path / 'out'), _config(max_seq_len=128))
  with pytest.raises(FileNotFoundError, match='--sweep needs a training workdir'):
    sweep.run_sweep(str(empty), str(tmp_path / 'out'), _config())
  # Results inside the checkpoints GLUE read were accepted, and deleted with their step by
  # the trainer's keep_last rotation; so were results inside a step folder given alone.
  (step_dir,) = (short / 'checkpoints').iterdir()
  for inside in (step_dir / 'glue', short / 'checkpoints', step_dir.parent / 'x' / '..' / 'y'):
    with pytest.raises(ValueError, match=rf'--output_dir={re.escape(str(inside))} lies inside '
                       rf'{re.escape(str(short / "checkpoints"))}, where the checkpoint GLUE '
                       rf'reads is: .* Fix: an --output_dir outside it, e.g. '
                       rf'{re.escape(str(short))}/glue\.'):
      suite.run_glue(str(short), str(inside), _config(tasks='rte', max_seq_len=64))
    assert not inside.exists() or inside == short / 'checkpoints'
  # checkpoints/ linked to a larger disk: its step folders' parent is named otherwise.
  linked = tmp_path / 'linked'
  linked.mkdir()
  (linked / 'config.json').write_text((short / 'config.json').read_text())
  shutil.copytree(short / 'checkpoints', tmp_path / 'big_disk' / 'ckpts')
  (linked / 'checkpoints').symlink_to(tmp_path / 'big_disk' / 'ckpts')
  with pytest.raises(ValueError, match='lies inside .*, where the checkpoint GLUE reads is'):
    suite.run_glue(str(linked), str(linked / 'checkpoints' / 'glue'),
                   _config(tasks='rte', max_seq_len=64))
  alone = tmp_path / 'copied' / 'kept' / '3'   # a step folder kept outside checkpoints/
  shutil.copytree(step_dir, alone)
  shutil.copy(short / 'config.json', tmp_path / 'copied' / 'config.json')
  with pytest.raises(ValueError, match=rf'lies inside {re.escape(str(alone))}, .*e\.g\. '
                     rf'{re.escape(str(alone.parent))}/glue\.'):
    suite.run_glue(str(alone), str(alone / 'glue'), _config(tasks='rte', max_seq_len=64))
  # One segment embedding (RoBERTa-style): the pair tasks' token type 1 was clamped to 0.
  one_segment = _handmade_workdir(tmp_path / 'one_segment', model__type_vocab_size=1,
                                  model__vocab_size=30522)
  with pytest.raises(ValueError, match=r'type_vocab_size=1: .* second sentence of rte'):
    suite.run_glue(str(one_segment), str(tmp_path / 'out'), _config(tasks='cola,rte'))


def test_a_vocabulary_other_than_the_trained_one_is_refused_by_glue_and_export(workdir,
                                                                               tmp_path):
  """bert-base-uncased with two tokens swapped has the same size, so only the md5 the
  checkpoint recorded tells it from the vocabulary the run trained on: GLUE ran to the
  end on ids of other rows, and export wrote a model with that tokenizer."""
  from bert_sym.input import tokenizer  # pylint: disable=g-import-not-at-top
  lines = Path(tokenizer.default_vocab_file()).read_bytes().split(b'\n')
  lines[2000], lines[2001] = lines[2001], lines[2000]
  swapped = tmp_path / 'swapped_vocab.txt'
  swapped.write_bytes(b'\n'.join(lines))
  refused = (r'swapped_vocab\.txt \(md5 [0-9a-f]{32}\) is not the vocabulary .*/4 was '
             rf'trained on \(md5 {tokenizer.BERT_BASE_UNCASED_MD5}\).*Fix: ')
  with pytest.raises(ValueError, match=refused + r'Pass the vocabulary'):
    suite.run_glue(str(workdir), str(tmp_path / 'out'), _config(vocab_path=str(swapped)))
  assert not (tmp_path / 'out' / 'glue_results.json').exists()
  # Export reads the vocabulary that the run's config.json names.
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  config = json.loads((run / 'config.json').read_text())
  config['data']['vocab_path'] = str(swapped)
  (run / 'config.json').write_text(json.dumps(config))
  command = [sys.executable, '-m', 'bert_sym.hf_export', f'--checkpoint={run}',
             f'--out_dir={tmp_path / "hf"}']
  result = subprocess.run(command, cwd=train_fixtures.REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert re.search(refused + r'.*Nothing was written', result.stderr), result.stderr[-2000:]
  assert not (tmp_path / 'hf').exists()


def test_a_table_padded_past_the_vocabulary_fine_tunes(tmp_path):
  """The trainer accepts model.vocab_size above the vocabulary (30528 rows for 30522
  tokens: a multiple of 64); GLUE refused every such checkpoint, and its fix (pass the
  pre-training vocabulary) could not help."""
  workdir = _handmade_workdir(tmp_path / 'padded', model__vocab_size=30528)
  results = suite.run_glue(str(workdir), str(tmp_path / 'out'), _config(
      tasks='wnli', max_train_examples=8, max_eval_examples=8, batch_size=4, epochs=1.0))
  assert results['runs']['wnli']['1']['dev_examples'] == {'wnli': 8}
  smaller = _handmade_workdir(tmp_path / 'smaller', model__vocab_size=30000)
  with pytest.raises(ValueError, match=r'Vocabulary mismatch: .* 30522 tokens.*'
                                       r'model.vocab_size=30000'):
    suite.run_glue(str(smaller), str(tmp_path / 'out2'), _config())


def test_bad_tasks_fail_before_training(workdir, tmp_path):
  with pytest.raises(ValueError, match=r"Unknown GLUE task\(s\) \['cola2'\]"):
    suite.run_glue(str(workdir), str(tmp_path / 'out'), _config(tasks='cola2'))
  # QQP is not in the fixture directory: the error names the folder and comes before
  # CoLA (listed first) is trained.
  with pytest.raises(glue_data.GlueDataError, match=r'No directory .*/QQP for task qqp'):
    suite.run_glue(str(workdir), str(tmp_path / 'out'), _config(tasks='cola,qqp'))
  assert not (tmp_path / 'out' / 'glue_results.json').exists()
  with pytest.raises(ValueError, match='config.mesh'):
    suite.run_glue(str(workdir), str(tmp_path / 'out'),
                  _config(tasks='rte', mesh={'data': 3, 'fsdp': 1, 'tensor': 1}))


# RTE seeds 1,2 trained together for 60 steps, the run test_ctrl_c_then_sigterm_* stops.
_RTE_GROUP_FLAGS = [
    f'--glue_dir={GLUE_DIR}', '--tasks=rte', '--seeds=1,2', '--config.max_train_examples=32',
    '--config.max_eval_examples=16', '--config.max_seq_len=32', '--config.epochs=15',
    '--config.length_buckets=false', '--config.batch_size=8', '--config.eval_batch_size=8',
    '--config.checkpoint_every_steps=0', '--config.log_every_steps=10',
    '--config.parallel_seeds=true']   # the harder resume: a vmapped group
# Runs the GLUE command line, then prints whether the process imported TensorFlow.
_REPORTS_TF = ('import atexit, runpy, sys; atexit.register(lambda: print("TF imported:", '
               '"tensorflow" in sys.modules)); '
               "runpy.run_module('bert_sym.glue', run_name='__main__', alter_sys=True)")


def _glue_env():
  return dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS='cpu',
              TF_CPP_MIN_LOG_LEVEL='3')


@pytest.fixture(scope='module')
def rte_uninterrupted(workdir, tmp_path_factory):
  """_RTE_GROUP_FLAGS run to the end once per session (read-only), the first run on a
  tokens cache of its own (tokens/): out/ its output dir, tf_imported.txt _REPORTS_TF's
  line. The reference of test_ctrl_c_*, the cold run of test_a_rerun_on_cached_tokens_*."""
  def build(path):
    path.mkdir()
    result = subprocess.run(
        [sys.executable, '-c', _REPORTS_TF, f'--checkpoint={workdir}', *_RTE_GROUP_FLAGS,
         f'--config.tokens_cache_dir={path / "tokens"}', f'--output_dir={path / "out"}'],
        cwd=REPO_ROOT, env=_glue_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path / 'tf_imported.txt').write_text(result.stdout.splitlines()[-1])
  return train_fixtures.built_once(tmp_path_factory, 'glue_rte_uninterrupted', build)


def test_a_rerun_on_cached_tokens_does_not_import_tensorflow(workdir, rte_uninterrupted,
                                                             tmp_path):
  """README's promise: the first run tokenises (TF) and caches the ids; the next run on the
  same texts, another output dir, reads them and never imports TensorFlow."""
  tokens = rte_uninterrupted / 'tokens'
  cached = sorted(p.name for p in tokens.iterdir())
  assert (rte_uninterrupted / 'tf_imported.txt').read_text() == 'TF imported: True'
  assert cached   # the first run's
  warm = subprocess.run(
      [sys.executable, '-c', _REPORTS_TF, f'--checkpoint={workdir}', *_RTE_GROUP_FLAGS,
       f'--config.tokens_cache_dir={tokens}', f'--output_dir={tmp_path / "warm"}'],
      cwd=REPO_ROOT, env=_glue_env(), capture_output=True, text=True, timeout=600)
  assert warm.returncode == 0, warm.stderr[-3000:]
  assert warm.stdout.splitlines()[-1] == 'TF imported: False'
  assert sorted(p.name for p in tokens.iterdir()) == cached   # read, none written
  for seed in (1, 2):
    assert (_read_tsv(tmp_path / 'warm' / 'predictions' / f'rte_seed{seed}.tsv')
            == _read_tsv(rte_uninterrupted / 'out' / 'predictions' / f'rte_seed{seed}.tsv'))


def test_cli_input_errors_are_one_line(workdir, tmp_path):
  out = [f'--checkpoint={workdir}', f'--output_dir={tmp_path / "out"}', '--config.max_seq_len=32']
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  cases = [
      (out + [f'--glue_dir={tmp_path}/nowhere', '--tasks=rte'], 'is not a directory'),
      (out + [f'--glue_dir={GLUE_DIR}', '--tasks=qqp'], 'No directory'),
      (out + [f'--glue_dir={GLUE_DIR}', '--tasks=rte2'], 'Unknown GLUE task'),
      # Was numpy's "expected non-negative integer", after tokenising.
      (out + [f'--glue_dir={GLUE_DIR}', '--tasks=rte', '--seeds=1,-1'],
       'Seeds must be non-negative integers'),
      # Were three chained tracebacks: ml_collections applied the overrides while the flag
      # was defined, before our parsing.
      (out + ['--config.epoch=1'], "unknown config key 'epoch'"),
      # A config file before, and without, GLUE's overrides.
      (['--config=configs/tiny.py'] + out[:2], "no 'tasks': it is not a GLUE config"),
      # An output directory below a file: was an orbax error after RTE's data was read and
      # its step compiled, at the first save.
      ([out[0], out[2], f'--output_dir={blocker}/glue', f'--glue_dir={GLUE_DIR}', '--tasks=rte'],
       f'Cannot write to --output_dir={blocker}/glue')]
  results = test_bad_inputs.drive_cases('bert_sym.glue', cases, tmp_path)
  failures = test_bad_inputs.one_line_failures('bert_sym.glue', cases, results, [])
  assert not failures, '\n\n'.join(failures)
  assert not (tmp_path / 'out' / 'runs').exists()   # refused before any training


def test_tfds_glue_builder_code_path_has_its_runtime_dependencies(tmp_path):
  """TFDS resolves lazy imports (importlib_resources) when it prepares glue/*; the
  README's first GLUE command died there on a fresh install. Offline, this is as far as
  TFDS gets before downloading."""
  builder = tfds.builder('glue/rte', data_dir=str(tmp_path))
  assert type(builder).code_path is not None


def test_a_host_left_by_another_says_so_in_one_line(tmp_path):
  """Two hosts, --glue_dir missing on host 1 only: host 1 stopped on it, and host 0's
  collective failed with gloo's ValueError, which the input-error branch printed as
  'bert_sym.glue: error: UNKNOWN: Gloo AllGather failed: ... Connection closed by peer'.
  It now says, as the trainer does, that another process stopped and where to look.
  (Host 0's side, with the collective's error raised where it was.)"""
  gone = ('UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] '
          'Connection closed by peer [127.0.0.1]:17325')
  host_0 = ('import os, runpy; from bert_sym import cli; from bert_sym.glue import suite\n'
            'cli.one_of_several_processes = lambda: True\n'
            'cli._leave_together = lambda: None\n'
            'def run_glue(*args):\n'
            f'  raise ValueError({gone!r})\n'
            'suite.run_glue = run_glue\n'
            "runpy.run_module('bert_sym.glue', run_name='__main__', alter_sys=True)")
  result = subprocess.run(
      [sys.executable, '-c', host_0, f'--checkpoint={tmp_path}', f'--output_dir={tmp_path}'],
      cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.startswith('bert_sym.glue: error: another process of this run '
                                  'stopped or stalled (ValueError: UNKNOWN: Gloo'), result.stderr


def test_help_shows_how_to_reproduce():
  result = subprocess.run([sys.executable, '-m', 'bert_sym.glue', '--help'], cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                          capture_output=True, text=True, timeout=120)
  for text in ('--checkpoint', '--sweep', '--reference_score', '--glue_dir', '--[no]distributed',
               '--coordinator_address',
               'python -m bert_sym.train --config=configs/tiny.py --workdir=/tmp/tiny_glue_ckpt',
               '--tasks=cola,sst2,mrpc,stsb,rte,wnli'):
    assert text in result.stdout, text


# ----------------------------------------------------------------------------------------
# The shared core in GLUE: on-device non-finite guard, vmapped seeds, resume inside a task.
# ----------------------------------------------------------------------------------------


def _tiny_task(spec_name='rte', **overrides):
  """A TaskSetup on a randomly initialised tiny encoder (no training, no files)."""
  train_config = train_fixtures.tiny_config()
  encoder = nn.meta.unbox(model_lib.BertForMaskedLM(train_config.model).init(
      jax.random.key(0), *model_lib.dummy_inputs())['params'])['encoder']
  pretrained = finetune.Pretrained(train_config, jax.tree.map(np.asarray, encoder), 'tiny', 0)
  config = _config(**overrides)
  mesh = sharding.make_mesh(config.mesh)
  task = finetune.setup_task(pretrained, glue_data.TASKS[spec_name], 160, config, mesh,
                             sharding.logical_rules(train_config))
  return pretrained, task


def _state(pretrained, task, seed):
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  params = checkpoint.with_pretrained_encoder(task.state.init_params(init_key),
                                              pretrained.encoder)
  return task.state.from_params(jax.device_put(params, task.state.param_shardings),
                                dropout_key)


def _batch(seed, poison=False):
  rng = np.random.default_rng(seed)
  batch = {'input_ids': rng.integers(104, 1000, (8, 16)).astype(np.int32),
           'token_type_ids': np.zeros((8, 16), np.int32),
           'attention_mask': np.ones((8, 16), np.int32),
           'labels': rng.integers(0, 2, 8).astype(np.int32),
           'weights': np.ones(8, np.float32)}
  if poison:   # a NaN weight makes the loss and every gradient NaN
    batch['weights'][0] = np.nan
  return batch


def test_the_skip_limit_and_the_peak_are_glues_own_keys():
  """GLUE's stop message names --config.max_consecutive_nonfinite: the key exists, and
  is the limit the meter applies (it was the trainer's default, 10, whatever was set).
  The peak FLOP/s for MFU can be set as in pre-training (an unknown key, it could not)."""
  pretrained, task = _tiny_task()
  config = _config(max_consecutive_nonfinite=3, peak_flops_per_device=2e12)
  meter = finetune._meter(pretrained, task, config, 1, 'rte', None)
  assert meter.health.max_consecutive_skips == 3 and meter.peak_flops == 2e12
  assert 'peak_flops_per_device' not in suite.recipe(config)   # MFU only: no rerun


def test_nonfinite_glue_step_leaves_params_and_adam_unchanged():
  # lr 1e-3 from step 0 (no warm-up): without the guard, the NaN update would be applied.
  pretrained, task = _tiny_task(learning_rate=1e-3, warmup_ratio=0.0)
  state = _state(pretrained, task, 1)
  before = jax.device_get(state)
  state, metrics = task.train_step(state, _batch(0, poison=True))
  assert not np.isfinite(float(metrics['train/loss'])) and metrics['train/finite'] == 0
  after = jax.device_get(state)
  for old, new in zip(jax.tree.leaves(before['params']), jax.tree.leaves(after['params'])):
    np.testing.assert_array_equal(old, new)
  for old, new in zip(jax.tree.leaves(before['opt_state']), jax.tree.leaves(after['opt_state'])):
    if np.ndim(old):   # Adam's moments (the schedule's counter advances, by design)
      np.testing.assert_array_equal(old, new)
  assert int(after['step']) == 1
  state, metrics = task.train_step(state, _batch(0))          # a good batch still trains
  assert metrics['train/finite'] == 1
  moved = jax.device_get(state['params'])
  assert not np.array_equal(moved['classifier']['kernel'], after['params']['classifier']['kernel'])

  # Seeds trained together: the guard is per seed (seed 2's update is applied).
  stacked = jax.device_put(
      steps_lib.stack([_state(pretrained, task, 1), _state(pretrained, task, 2)]),
      steps_lib.stacked(task.state.shardings))
  before = jax.device_get(stacked['params'])
  batch = {k: np.stack([a, b]) for (k, a), b in
           zip(_batch(0, poison=True).items(), _batch(1).values())}
  stacked, metrics = task.parallel_step(stacked, batch)
  assert list(np.asarray(metrics['train/finite'])) == [0.0, 1.0]
  after = jax.device_get(stacked['params'])
  np.testing.assert_array_equal(before['classifier']['kernel'][0], after['classifier']['kernel'][0])
  assert not np.array_equal(before['classifier']['kernel'][1], after['classifier']['kernel'][1])


def test_parallel_seeds_equal_sequential_seeds(workdir, tmp_path):
  """Three seeds in one vmapped step give the models of three runs one by one: the same
  predictions and scores, fp32. Classes are identical; STS-B's regression outputs agree to
  fp32 rounding only (a batched matmul sums in another order than three single ones).
  Length buckets on (the default), at a batch size where the seeds' batches fall in
  different buckets (SST-2: seed 1's 4th and 7th batches need 32 tokens, seeds 2 and 3's
  64; at batch 16 every batch needs 64): dropout masks depend on the padded shape, so the
  padding must not depend on which seeds train together."""
  outputs = {}
  for parallel in (True, False):
    out = tmp_path / f'parallel_{parallel}'
    outputs[parallel] = suite.run_glue(str(workdir), str(out), _config(
        tasks='sst2,stsb', seeds='1,2,3', parallel_seeds=str(parallel), max_train_examples=48,
        epochs=2.0, learning_rate=1e-3, length_buckets=True, max_seq_len=64, batch_size=8))
  read = lambda parallel, task, seed: _read_tsv(
      tmp_path / f'parallel_{parallel}' / 'predictions' / f'{task}_seed{seed}.tsv')
  for seed in ('1', '2', '3'):
    assert read(True, 'sst2', seed) == read(False, 'sst2', seed)
    assert (outputs[True]['runs']['sst2'][seed]['scores']
            == outputs[False]['runs']['sst2'][seed]['scores'])
    together, alone = (np.array([float(r['prediction']) for r in read(p, 'stsb', seed)])
                       for p in (True, False))
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    for name, value in outputs[True]['runs']['stsb'][seed]['scores']['stsb'].items():
      # Not bit-equal: the tiny model's predictions span ~1e-4, so fp32 rounding of them
      # (3e-8 here) moves Pearson by about |difference| / spread (1.2e-4 once), and may swap
      # the ranks of nearly tied ones (Spearman). A seed mix-up moves the predictions
      # themselves, checked above. 'score' is in percent (x100).
      tolerance = 1e-4 + 4 * np.abs(together - alone).max() / np.std(alone)
      tolerance *= 100 if name == 'score' else 1
      assert value == pytest.approx(
          outputs[False]['runs']['stsb'][seed]['scores']['stsb'][name], abs=tolerance)
  assert outputs[True]['runs']['sst2']['1']['trained_with_seeds'] == [1, 2, 3]
  # A finished task leaves no empty runs/<task>/ (its checkpoints and group.json removed).
  assert not (tmp_path / 'parallel_True' / 'runs' / 'sst2').exists()
  # Each seed's curve is its own: trained together, seed k's row is seed k's loss (the
  # seeds' losses differ by ~1e-5 relative here, so the tolerance is tighter than that).
  curve = lambda parallel, seed: [row['train/loss'] for row in map(json.loads, (
      tmp_path / f'parallel_{parallel}' / 'runs' / f'sst2_seed{seed}' / 'metrics.jsonl')
      .read_text().splitlines()) if 'train/loss' in row]
  for seed in ('1', '2', '3'):
    assert curve(True, seed)
    np.testing.assert_allclose(curve(True, seed), curve(False, seed), rtol=1e-6, atol=0)
  # The same command again reuses every run: a seed trained alone was padded as with all
  # of its task's seeds, which its results record (else each rerun redid them all).
  rerun = suite.run_glue(str(workdir), str(tmp_path / 'parallel_False'), _config(
      tasks='sst2,stsb', seeds='1,2,3', parallel_seeds='False', max_train_examples=48,
      epochs=2.0, learning_rate=1e-3, length_buckets=True, max_seq_len=64, batch_size=8))
  assert rerun['runs'] == outputs[False]['runs']
  assert not list((tmp_path / 'parallel_False').glob('replaced-*'))


def test_ctrl_c_then_sigterm_mid_task_save_and_resume_to_the_same_predictions(
    workdir, rte_uninterrupted, tmp_path):
  """Ctrl-C mid-task saves and exits 130; the rerun, stopped by SIGTERM further on, saves
  and exits 42; the third run finishes with the predictions of an uninterrupted run."""
  cmd = [sys.executable, '-m', 'bert_sym.glue', f'--checkpoint={workdir}', *_RTE_GROUP_FLAGS,
         # every text is in it: read only, no run here imports TensorFlow
         f'--config.tokens_cache_dir={rte_uninterrupted / "tokens"}']
  env = _glue_env()
  run = lambda out: subprocess.run(cmd + [f'--output_dir={out}'], cwd=REPO_ROOT, env=env,
                                   capture_output=True, text=True, timeout=600)
  reference = rte_uninterrupted / 'out'

  out = tmp_path / 'preempted'
  ckpts = out / 'runs' / 'rte' / 'checkpoints'
  logged = out / 'runs' / 'rte_seed1' / 'metrics.jsonl'

  def logged_steps():
    lines = logged.read_text().splitlines() if logged.exists() else []
    return [json.loads(line)['step'] for line in lines if line.endswith('}')]

  # Each run to stop is held at a batch a few steps past the row the test waits for, until
  # its signal handler has taken the signal (the handler, wrapped, writes the gate file).
  # Slowed to 300 ms a batch instead, a test process starved for the 15 s left after the
  # row sent its signal to a finished run (exit 0; shown with a 20 s sleep before it).
  held_run = textwrap.dedent("""\
      import os, runpy, time
      from bert_sym import preemption
      from bert_sym.glue import finetune
      gate, held_from = os.environ['GLUE_WAIT_FOR_FILE'], int(os.environ['GLUE_WAIT_AT_BATCH'])
      take, handle = finetune._Batches.__next__, preemption.PreemptionFlag._handle

      def held_next(self):
        while self.step >= held_from and not os.path.exists(gate):
          time.sleep(0.05)
        return take(self)

      def handle_then_open(self, signum, frame):
        handle(self, signum, frame)
        open(gate, 'w').close()

      finetune._Batches.__next__ = held_next
      preemption.PreemptionFlag._handle = handle_then_open
      runpy.run_module('bert_sym.glue', run_name='__main__', alter_sys=True)
      """)

  def stop_after(step, signum, exit_code):
    """Runs the command, sends `signum` once a row past `step` is logged (no periodic
    checkpoints: checkpoint_every_steps=0, so the one left is the signal's save)."""
    # Held at the batch 2 steps past the next row (log_every_steps=10) until signalled.
    held = dict(env, GLUE_WAIT_FOR_FILE=str(tmp_path / f'taken_{signum}'),
                GLUE_WAIT_AT_BATCH=str((step // 10 + 1) * 10 + 2))
    process = subprocess.Popen([sys.executable, '-c', held_run, *cmd[3:],
                                f'--output_dir={out}'], cwd=REPO_ROOT, env=held,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300   # a hang, not a timing: each run waits for its signal
    while not any(s > step for s in logged_steps()):
      assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
      time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == exit_code, stderr[-3000:]
    assert 'Traceback' not in stdout + stderr, stderr[-3000:]
    assert not (out / 'glue_results.json').exists()
    saved = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and step < saved[0] < 60, saved
    return saved[0]

  first = stop_after(0, signal.SIGINT, 130)
  second = stop_after(first, signal.SIGTERM, 42)
  resumed = run(out)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'rte seeds 1,2: resuming from step {second} of 60' in resumed.stdout
  for seed in (1, 2):
    assert (_read_tsv(out / 'predictions' / f'rte_seed{seed}.tsv')
            == _read_tsv(reference / 'predictions' / f'rte_seed{seed}.tsv'))
  assert not ckpts.parent.exists()   # a finished task's checkpoints (and folder) are removed


def test_auto_trains_seeds_together_only_where_it_was_measured_to_pay_off():
  assert suite.seed_groups([1, 2, 3], 'auto', 123_000, 'gpu') == [[1, 2, 3]]   # MNLI
  assert suite.seed_groups([1, 2, 3], 'auto', 10_000, 'tpu') == [[1, 2, 3]]
  assert suite.seed_groups([1, 2, 3], 'auto', 9_999, 'gpu') == [[1], [2], [3]]   # CoLA
  assert suite.seed_groups([1, 2, 3], 'auto', 123_000, 'cpu') == [[1], [2], [3]]
  true = suite.parallel_seeds_mode('True')   # as a command line gives it
  assert suite.seed_groups([4, 5], true, 10, 'cpu') == [[4, 5]]
  assert suite.seed_groups([4, 5], suite.parallel_seeds_mode(False), 10**6, 'gpu') == [[4], [5]]
  with pytest.raises(ValueError, match="parallel_seeds must be true, false or auto, got 'yes'"):
    suite.parallel_seeds_mode('yes')


def test_old_output_dirs_are_reused(tmp_path):
  """glue_results.json written before grad_accum_steps / parallel_seeds /
  checkpoint_every_steps / on_nonfinite existed: the same recipe, so finished runs count."""
  config = glue_config.get_config('runlocal')
  old = config.to_dict()
  for key in ('grad_accum_steps', 'parallel_seeds', 'checkpoint_every_steps', 'on_nonfinite'):
    del old[key]
  (tmp_path / 'predictions').mkdir()
  (tmp_path / 'predictions' / 'rte_seed1.tsv').write_text('idx\tlabel\tprediction\n')
  (tmp_path / 'glue_results.json').write_text(json.dumps(
      {'checkpoint': 'CKPT', 'config': old,
       'runs': {'rte': {'1': {'scores': {'rte': {'accuracy': 0.5, 'score': 50.0}}}}}}))
  assert list(suite.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 1)]
  config.grad_accum_steps = 2                      # a real recipe change is still one
  assert not suite.finished_runs(tmp_path, 'CKPT', config)


@pytest.mark.parametrize('rule, reused', [('hf', False), ('bert', True)])
def test_results_from_before_pair_truncation_are_googles_rule(tmp_path, rule, reused):
  """Written before config.pair_truncation, pairs were cut by Google BERT's rule: such runs
  are reused by a 'bert' recipe only (an 'hf' table would mix both rules)."""
  config = glue_config.get_config('runlocal')
  old = config.to_dict()
  del old['pair_truncation']
  config.pair_truncation = rule
  (tmp_path / 'predictions').mkdir()
  (tmp_path / 'predictions' / 'rte_seed1.tsv').write_text('idx\tlabel\tprediction\n')
  (tmp_path / 'glue_results.json').write_text(json.dumps(
      {'checkpoint': 'CKPT', 'config': old,
       'runs': {'rte': {'1': {'scores': {'rte': {'accuracy': 0.5, 'score': 50.0}}}}}}))
  assert bool(suite.finished_runs(tmp_path, 'CKPT', config)) == reused


# The GLUE keys that decide what a (task, seed) computes, as of 2026-12-06 (results on
# record were written with these or fewer). Edit only with the decision below.
_RECIPE_KEYS_ON_RECORD = set("""
    attention_dropout_rate b1 b2 batch_size dropout_rate epochs eps eval_batch_size glue_dir
    grad_clip_norm learning_rate length_buckets max_eval_examples max_seq_len
    max_train_examples mesh.data mesh.fsdp mesh.tensor tfds_data_dir vocab_path warmup_ratio
    weight_decay""".split())


def test_a_new_glue_config_key_is_classified_for_reuse():
  """A key added to configs/glue.py is missing from every glue_results.json written before
  it: unless reuse knows the value those runs had, no finished run is reused (hours of
  fine-tuning redone), or a changed meaning goes unnoticed. The failure says what to do."""
  def leaves(tree, prefix=''):
    return [key for k, v in tree.items() for key in (
        leaves(v, f'{prefix}{k}.') if isinstance(v, dict) else [prefix + k])]
  keys = set(leaves(glue_config.get_config('runlocal').to_dict()))
  # pylint: disable=protected-access
  unclassified = sorted(k for k in keys - _RECIPE_KEYS_ON_RECORD if k.split('.')[0] not in
                        {*reuse._NOT_RECIPE, *reuse._DEFAULTS_OF_NEWER_KEYS})
  assert not unclassified, (
      f'New GLUE config keys {unclassified}: add each to bert_sym/glue/reuse.py '
      '_DEFAULTS_OF_NEWER_KEYS (the value results had before it existed) or, if it does not '
      'change what a (task, seed) computes, _NOT_RECIPE; then to the set above.')


@pytest.mark.parametrize('text', [
    '{"checkpoint": "CK', '{"checkpoint": "CKPT"}', '[1, 2]',
    '{"checkpoint": "CKPT", "config": {}, "runs": {"rte": {"1": {"seconds": 3}}}}'])
def test_a_results_file_edited_by_hand_is_named_in_the_error(tmp_path, text):
  (tmp_path / 'glue_results.json').write_text(text)
  with pytest.raises(ValueError, match=r'glue_results.json is not results this tool wrote'):
    suite.finished_runs(tmp_path, 'CKPT', glue_config.get_config('runlocal'))
  assert (tmp_path / 'glue_results.json').read_text() == text   # nothing moved or lost


def test_the_same_data_under_another_spelling_is_the_same_recipe(tmp_path, monkeypatch):
  """DIR and DIR/, or DIR relative to the working directory, name the same GLUE copy."""
  config = glue_config.get_config('runlocal')
  config.glue_dir = str(tmp_path / 'glue')
  (tmp_path / 'predictions').mkdir()
  (tmp_path / 'predictions' / 'rte_seed1.tsv').write_text('idx\tlabel\tprediction\n')
  (tmp_path / 'glue_results.json').write_text(json.dumps(
      {'checkpoint': 'CKPT', 'config': config.to_dict(),
       'runs': {'rte': {'1': {'scores': {'rte': {'accuracy': 0.5, 'score': 50.0}}}}}}))
  monkeypatch.chdir(tmp_path)
  for spelling in (f'{tmp_path}/glue/', 'glue', './glue/'):
    config.glue_dir = spelling
    assert list(suite.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 1)], spelling
  assert suite.with_absolute_paths(config).glue_dir == str(tmp_path / 'glue')   # recorded


@pytest.mark.parametrize('change', ['checkpoint', 'rewritten_checkpoint', 'recipe',
                                    'no_resume'])
def test_results_of_another_checkpoint_or_recipe_are_set_aside_not_overwritten(
    tmp_path, caplog, change):
  config = glue_config.get_config('runlocal')
  (tmp_path / 'predictions').mkdir()
  (tmp_path / 'predictions' / 'rte_seed1.tsv').write_text('idx\tlabel\tprediction\n0\t1\t1\n')
  (tmp_path / 'glue_results.md').write_text('| old table |\n')
  (tmp_path / 'runs' / 'rte_seed1').mkdir(parents=True)   # its train and dev curves
  (tmp_path / 'runs' / 'rte_seed1' / 'metrics.jsonl').write_text('{"step": 1}\n')
  # A step directory as orbax commits it: its _CHECKPOINT_METADATA says when.
  ckpt = tmp_path / 'workdir' / 'checkpoints' / '4'
  ckpt.mkdir(parents=True)
  commit = lambda ns: (ckpt / '_CHECKPOINT_METADATA').write_text(
      json.dumps({'init_timestamp_nsecs': ns - 5, 'commit_timestamp_nsecs': ns}))
  commit(1_000)
  old = json.dumps({'checkpoint': str(ckpt), 'checkpoint_written': 1_000,
                    'config': config.to_dict(),
                    'runs': {'rte': {'1': {'scores': {'rte': {'accuracy': 1.0, 'score': 100.0}}}}}})
  (tmp_path / 'glue_results.json').write_text(old)
  assert list(suite.finished_runs(tmp_path, str(ckpt), config)) == [('rte', 1)]   # unchanged
  step_dir = 'OTHER' if change == 'checkpoint' else str(ckpt)
  if change == 'rewritten_checkpoint':   # the workdir rebuilt: another model, the same path
    commit(2_000)
  if change == 'recipe':
    config.learning_rate = 3e-5
  if change == 'no_resume':
    config.resume = False
  with caplog.at_level('WARNING'):
    assert not suite.finished_runs(tmp_path, step_dir, config)
  [aside] = tmp_path.glob('replaced-*')
  assert (aside / 'glue_results.json').read_text() == old
  assert (aside / 'glue_results.md').read_text() == '| old table |\n'
  assert (aside / 'predictions' / 'rte_seed1.tsv').read_text().endswith('0\t1\t1\n')
  assert (aside / 'runs' / 'rte_seed1' / 'metrics.jsonl').read_text() == '{"step": 1}\n'
  assert not (tmp_path / 'glue_results.json').exists()
  assert not list((tmp_path / 'predictions').iterdir())
  assert f'they are kept in {aside}' in caplog.text
  if change == 'recipe':
    assert 'another recipe (learning_rate differ)' in caplog.text
  if change == 'rewritten_checkpoint':
    assert 'another checkpoint' in caplog.text and 'written at 1970-01-01 00:00:00 UTC' in caplog.text


def test_a_run_padded_for_another_seed_list_is_set_aside_and_trained_again(tmp_path):
  """With length buckets every seed of a task is padded to the longest batch among ALL its
  seeds (dropout masks follow the padded shape): seed 1 trained by --seeds=1 is not seed 1
  of --seeds=1,2, yet it was reused, and the table differed from a fresh --seeds=1,2 run."""
  config = glue_config.get_config('runlocal')
  (tmp_path / 'predictions').mkdir()
  (tmp_path / 'predictions' / 'rte_seed1.tsv').write_text('idx\tlabel\tprediction\n')
  (tmp_path / 'runs' / 'rte_seed1').mkdir(parents=True)
  (tmp_path / 'runs' / 'rte_seed1' / 'metrics.jsonl').write_text('{"step": 1}\n')
  run = {'scores': {'rte': {'accuracy': 0.5, 'score': 50.0}}}
  other = {'scores': {'rte': {'accuracy': 0.5, 'score': 50.0}}, 'padded_with_seeds': [3]}
  def results(**values):   # as written by --seeds=1 (seed 3 from an earlier command)
    (tmp_path / 'glue_results.json').write_text(json.dumps(
        {'checkpoint': 'CKPT', 'config': dict(config.to_dict(), seeds='1', **values),
         'seeds': [1], 'runs': {'rte': {'1': run}},
         'runs_of_other_seeds': {'rte': {'3': other}}}))
  results(length_buckets=False)   # padded to max_seq_len: the same run for any seed list
  config.seeds, config.length_buckets = '1,2', False
  assert list(suite.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 1)]
  results(length_buckets=True)
  config.length_buckets = True
  config.seeds = '1'
  assert list(suite.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 1)]
  config.seeds = '1,2'
  assert not suite.finished_runs(tmp_path, 'CKPT', config)
  [aside] = tmp_path.glob('replaced-*')
  aside_results = json.loads((aside / 'glue_results.json').read_text())
  assert aside_results['runs'] == {'rte': {'1': run}} and 'runs_of_other_seeds' not in aside_results
  assert (aside / 'predictions' / 'rte_seed1.tsv').exists()
  assert (aside / 'runs' / 'rte_seed1' / 'metrics.jsonl').exists()
  assert not (tmp_path / 'predictions' / 'rte_seed1.tsv').exists()
  # A run that records its list is reused for that list, whatever the file's own.
  (tmp_path / 'predictions' / 'rte_seed1.tsv').write_text('idx\tlabel\tprediction\n')
  run['padded_with_seeds'] = [1, 2]
  results(length_buckets=True)
  assert list(suite.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 1)]
  config.seeds = '2,1'   # the same padding: the lengths are over the set of seeds
  assert list(suite.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 1)]


def _scored_step(output_dir, workdir, step, run, tasks=('rte',), seeds=(1, 2)):
  """An earlier sweep's results for `step`, of a checkpoint written by trainer start `run`."""
  config = _config()
  folder = output_dir / f'step_{step:08d}'
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'glue_results.json').write_text(json.dumps(
      {'checkpoint': str(workdir / 'checkpoints' / str(step)), 'checkpoint_run': run,
       'config': config.to_dict(), 'tasks': list(tasks), 'seeds': list(seeds),
       'runs': {task: {str(seed): {} for seed in seeds} for task in tasks}}))


def _present_step(workdir, step, lineage):
  """A checkpoint step whose data_iter item records `lineage` (checkpoint.extend_lineage)."""
  (workdir / 'checkpoints' / str(step) / 'data_iter').mkdir(parents=True, exist_ok=True)
  (workdir / 'checkpoints' / str(step) / 'data_iter' / 'metadata').write_text(
      json.dumps({'process_count': 1, 'states': [{}], 'lineage': lineage}))


def test_a_sweep_keeps_rotated_steps_of_this_training_run_only(tmp_path, capsys):
  """A step scored earlier whose checkpoint is gone stays on the curve, but not one of a
  workdir since trained anew (it mixed two models on one curve), and not lost when the
  tasks or seeds are given in another order or the directory holds tasks of other
  commands. Judged by heuristics on commit times before, a rebuilt workdir whose steps all
  came after the old scored ones (old 2 and 4 gone, new 6 and 8) kept the old points."""
  config = _config(tasks='wnli,rte', seeds='2,1')
  workdir, out = tmp_path / 'run', tmp_path / 'sweep'
  _scored_step(out, workdir, 2, 'a', tasks=('rte', 'wnli', 'mrpc'))
  _scored_step(out, workdir, 4, 'a', tasks=('rte', 'wnli'))
  _present_step(workdir, 4, [['a', -1]])   # step 2 rotated away; step 4 as scored
  assert list(sweep.scored_steps_gone(workdir, out, config, {4})) == [2]
  assert 'left off' not in capsys.readouterr().err
  _present_step(workdir, 4, [['b', -1]])   # trained anew: another model at the same path
  assert not sweep.scored_steps_gone(workdir, out, config, {4})
  assert 'step(s) 2 are left off the curve' in capsys.readouterr().err
  shutil.rmtree(workdir / 'checkpoints' / '4')   # the new run's steps are all past the old
  _present_step(workdir, 6, [['b', -1]])
  _present_step(workdir, 8, [['b', -1]])
  assert not sweep.scored_steps_gone(workdir, out, config, {6, 8})
  # The results of other seeds are not this sweep's, whichever run wrote them.
  _present_step(workdir, 8, [['a', -1]])
  assert not sweep.scored_steps_gone(workdir, out, _config(tasks='wnli,rte', seeds='1'), {8})


def test_a_sweep_leaves_out_a_step_it_stopped_in_whose_checkpoint_is_gone(tmp_path, capsys):
  """A sweep stopped (SIGTERM) after RTE of step 2, before SST-2; step 2 was then rotated
  away. Its results file lists both tasks from the first group on, so the point was kept
  on the curve, scored on RTE alone, where it could be "the first step reaching" 95%."""
  config = _config(tasks='rte,sst2', seeds='1')
  workdir, out = tmp_path / 'run', tmp_path / 'sweep'
  _scored_step(out, workdir, 2, 'a', tasks=('rte', 'sst2'), seeds=(1,))
  results = json.loads((out / 'step_00000002' / 'glue_results.json').read_text())
  del results['runs']['sst2']
  (out / 'step_00000002' / 'glue_results.json').write_text(json.dumps(results))
  _scored_step(out, workdir, 4, 'a', tasks=('rte', 'sst2'), seeds=(1,))
  _present_step(workdir, 6, [['a', -1]])   # steps 2 and 4 rotated away
  assert list(sweep.scored_steps_gone(workdir, out, config, {6})) == [4]
  assert ('step(s) 2 were not fully scored when the sweep stopped, and their checkpoints '
          'are gone since') in capsys.readouterr().err


def test_a_sweep_drops_a_diverged_step_and_keeps_the_history_it_branched_from(tmp_path):
  """Steps 2, 4, 6 scored; 6 set aside (diverged or damaged) and the run resumed from 4:
  the old 6 is not the run's step 6, and 2 and 4 stay its history, before and after the
  new 6. A plain restart (resumed from its newest step) keeps every step before it. Before
  the rerun, the set-aside 6 stayed on the curve (found by a review of the lineage)."""
  config = _config(tasks='rte', seeds='1,2')
  workdir, out = tmp_path / 'run', tmp_path / 'sweep'
  for step in (2, 4, 6):
    _scored_step(out, workdir, step, 'a')
  _present_step(workdir, 4, [['a', -1]])
  # Set aside and not trained again yet (the run stopped there): disowned, off the curve.
  diverged = workdir / 'damaged_checkpoints' / '6-1700000000-diverged'
  _present_step(workdir, 6, [['a', -1]])
  diverged.parent.mkdir()
  (workdir / 'checkpoints' / '6').rename(diverged)
  assert sorted(sweep.scored_steps_gone(workdir, out, config, {4})) == [2]
  # ...also when its JSON item is what was damaged: told by orbax's commit time.
  (diverged / 'data_iter' / 'metadata').write_text('{"cut')
  (diverged / '_CHECKPOINT_METADATA').write_text(json.dumps({'commit_timestamp_nsecs': 300}))
  results = json.loads((out / 'step_00000006' / 'glue_results.json').read_text())
  (out / 'step_00000006' / 'glue_results.json').write_text(
      json.dumps(dict(results, checkpoint_written=300)))
  assert sorted(sweep.scored_steps_gone(workdir, out, config, {4})) == [2]
  shutil.rmtree(diverged)
  resumed = [['a', -1], ['b', 4]]
  _present_step(workdir, 8, resumed)   # the new 6 rotated away too
  assert sorted(sweep.scored_steps_gone(workdir, out, config, {4, 8})) == [2]
  shutil.rmtree(workdir / 'checkpoints' / '4')
  assert sorted(sweep.scored_steps_gone(workdir, out, config, {8})) == [2, 4]
  _scored_step(out, workdir, 6, 'b')   # the new 6, scored before it rotated away
  assert sorted(sweep.scored_steps_gone(workdir, out, config, {8})) == [2, 4, 6]
  # Resumed from 4 twice (the first resume wrote 6 and was set aside again): not b's 6.
  _present_step(workdir, 8, resumed + [['c', 4]])
  assert sorted(sweep.scored_steps_gone(workdir, out, config, {8})) == [2, 4]
  # A newest step whose record does not read: the next newest says the history.
  _present_step(workdir, 10, resumed)
  (workdir / 'checkpoints' / '10' / 'data_iter' / 'metadata').write_text('{"cut')
  assert sorted(sweep.scored_steps_gone(workdir, out, config, {8, 10})) == [2, 4]


def test_a_sweep_leaves_out_results_that_name_no_training_run(tmp_path, capsys):
  """Results scored before checkpoints recorded their run, or a workdir whose checkpoints
  record none, cannot be placed in a history: left off the curve, and said."""
  config = _config(tasks='rte', seeds='1,2')
  workdir, out = tmp_path / 'run', tmp_path / 'sweep'
  _scored_step(out, workdir, 2, None)
  _present_step(workdir, 4, [['a', -1]])
  assert not sweep.scored_steps_gone(workdir, out, config, {4})
  _scored_step(out, workdir, 2, 'a')
  _present_step(workdir, 4, None)
  assert not sweep.scored_steps_gone(workdir, out, config, {4})
  assert capsys.readouterr().err.count('step(s) 2 are left off the curve') == 2


def test_lineage_places_each_step_at_the_start_that_wrote_it():
  lineage = [['a', -1], ['b', 4], ['c', 4], ['d', 9]]
  assert [checkpoint.written_by(lineage, s) for s in (0, 4, 5, 9, 10, 10**9)] == [
      'a', 'a', 'c', 'c', 'd', 'd']
  assert checkpoint.written_by([['b', 4]], 3) is None
  fresh = checkpoint.extend_lineage(lineage, None)
  resumed = checkpoint.extend_lineage(lineage, 12)
  assert len(fresh) == 1 and fresh[0][1] == -1 and fresh[0][0] not in str(lineage)
  assert resumed[:4] == lineage and resumed[4][1] == 12 and resumed[4][0] != fresh[0][0]
  assert checkpoint.extend_lineage(None, 12)[0][1] == 12   # a step from before lineages


def test_a_group_marker_cut_short_by_a_crash_is_reclaimed_not_a_crash(tmp_path):
  """group.json says which seeds, checkpoint and recipe a group checkpoint belongs to. A
  truncated one (killed while writing) made every rerun fail with JSONDecodeError."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  group_dir = epath.Path(tmp_path) / 'rte_seeds_1'
  (group_dir / 'checkpoints' / '4').mkdir(parents=True)
  (group_dir / 'group.json').write_text('{"seeds": [1')
  identity = {'seeds': [1], 'checkpoint': 'ckpt', 'recipe': {'learning_rate': 2e-5}}
  finetune._claim_group_dir(group_dir, identity)  # pylint: disable=protected-access
  assert json.loads((group_dir / 'group.json').read_text()) == identity
  assert not (group_dir / 'checkpoints').exists()   # another group's state: not resumed
  (group_dir / 'checkpoints' / '8').mkdir(parents=True)
  finetune._claim_group_dir(group_dir, identity)  # pylint: disable=protected-access
  assert (group_dir / 'checkpoints' / '8').exists()   # its own: kept for the resume


def test_two_set_asides_in_the_same_second_keep_both(tmp_path, monkeypatch):
  monkeypatch.setattr(reuse.time, 'time', lambda: 1_700_000_000.0)
  for text in ('first', 'second'):
    (tmp_path / 'glue_results.json').write_text(json.dumps({'run': text}))
    reuse.set_aside_results(tmp_path, 'another checkpoint')
  kept = sorted(json.loads(p.read_text())['run'] for p in tmp_path.glob('replaced-*/*.json'))
  assert kept == ['first', 'second']


def test_a_set_aside_cut_short_is_finished_by_the_next_one(tmp_path, monkeypatch):
  """glue_results.json moves last: a crash before the end leaves it in place, so the next
  run sees the earlier results and moves the rest; every file ends in a replaced-* one."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  earlier = {'glue_results.json': '{"run": "earlier"}', 'glue_results.md': '| task |',
             'predictions/RTE_seed1.tsv': 'index\tprediction', 'runs/rte_seed1/m': 'curve',
             'runs/mrpc_seed1/m': 'curve'}
  for name, text in earlier.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  path_class = type(epath.Path(tmp_path))
  rename, moves = path_class.rename, []

  def crash_at_the_last_move(path, target):
    moves.append(path)
    if len(moves) == len(earlier):
      raise OSError('killed')
    return rename(path, target)
  monkeypatch.setattr(path_class, 'rename', crash_at_the_last_move)
  with pytest.raises(OSError, match='killed'):
    reuse.set_aside_results(tmp_path, 'another checkpoint')
  monkeypatch.undo()
  assert (tmp_path / 'glue_results.json').exists()   # what tells the next run to move the rest
  reuse.set_aside_results(tmp_path, 'another checkpoint')
  kept = ['/'.join(p.relative_to(tmp_path).parts[1:])   # less the replaced-* directory
          for p in tmp_path.glob('replaced-*/**/*') if p.is_file()]
  assert sorted(kept) == sorted(earlier)
  assert not [p for p in tmp_path.rglob('*') if p.is_file() and 'replaced-' not in str(p)]


def test_tfds_glue_unprepared_offline_is_refused_before_the_output_dir(workdir, tmp_path,
                                                                      monkeypatch):
  """Checked with the other inputs: a refused run leaves no output folder behind (it left
  an empty one, as TFDS was first asked when the first task loaded)."""
  import socket  # pylint: disable=g-import-not-at-top
  # Held bound, never listening, until the probe is refused: a port closed first was free
  # for another xdist worker's listener (a kernel's, gloo's) before the probe reached it.
  with socket.socket() as closed:
    closed.bind(('localhost', 0))
    port = closed.getsockname()[1]
    monkeypatch.setattr(glue_data, 'TFDS_DOWNLOAD_HOST', ('localhost', port))
    config = _config(tasks='rte', seeds='1', glue_dir='', tfds_data_dir=str(tmp_path / 'tfds'))
    with pytest.raises(glue_data.GlueDataError, match='glue/rte is not prepared'):
      suite.run_glue(str(workdir), str(tmp_path / 'out'), config)
  assert not (tmp_path / 'out').exists()


def test_a_group_resumed_with_another_seed_list_starts_again(tmp_path, monkeypatch):
  """Every seed's batch is padded to the longest bucket among ALL the task's seeds at that
  step (dropout masks depend on it): a group checkpoint from a run with --seeds=1,2,3 must
  not be resumed by one with --seeds=1,2, which pads differently from there on."""
  claimed = []

  def claim(group_dir, identity):
    claimed.append(identity)
    raise StopIteration   # what the group would do next is not the point here
  monkeypatch.setattr(finetune, '_claim_group_dir', claim)
  task = type('Task', (), {'spec': type('Spec', (), {'name': 'rte'})()})()
  for length_seeds in ([1, 2, 3], [1, 2]):
    with pytest.raises(StopIteration):
      finetune.finetune_group(None, task, None, None, [2], None, 0, tmp_path,
                              {'checkpoint': 'c'}, length_seeds=length_seeds)
  assert claimed[0] != claimed[1]
  assert [c['length_seeds'] for c in claimed] == [[1, 2, 3], [1, 2]]


def test_dev_predictions_come_back_in_the_dev_sets_order():
  """Dev batches are formed by length (buckets) and the predictions put back: each one
  must be its own example's, as the model applied to that example alone gives it. A
  prediction paired with another example would score every task against wrong labels.
  STS-B's regression head: every example gets its own value, even from a fresh head."""
  spec_name = 'stsb'
  pretrained, task = _tiny_task(spec_name, eval_batch_size=4, length_buckets=True)
  params = jax.device_get(_state(pretrained, task, 0)['params'])
  # A fresh head's outputs differ in the 5th decimal: scaled, examples differ visibly.
  params['classifier']['kernel'] = params['classifier']['kernel'] * 1000.0
  rng = np.random.default_rng(3)
  # Four lengths, in both buckets and tied within batches: each is one compile below.
  lengths = rng.permutation([5, 30, 9, 17, 3, 30, 9, 17, 5, 3, 30])
  dev = glue_data.Encoded(
      input_ids=[np.array([101, *rng.integers(104, 1000, n), 102], np.int32) for n in lengths],
      token_type_ids=[np.zeros(n + 2, np.int32) for n in lengths],
      labels=np.zeros(len(lengths), np.float32), idx=np.arange(len(lengths)))
  config = _config(eval_batch_size=4, length_buckets=True)
  got = finetune.predict(params, task, dev, config, sharding.make_mesh(config.mesh), pad_id=0)
  model = model_lib.BertForSequenceClassification(
      pretrained.config.model, num_labels=glue_data.TASKS[spec_name].num_labels)
  # Jitted, one compile per length: op by op, every op of the model was compiled anew for
  # each length (most of this test's time). The same computation.
  apply = jax.jit(model.apply)
  for i, (ids, segments) in enumerate(zip(dev.input_ids, dev.token_type_ids)):
    logits = apply({'params': params}, ids[None], segments[None], np.ones_like(ids)[None])
    np.testing.assert_allclose(got[i], logits[0, 0], rtol=1e-4, atol=1e-5,
                               err_msg=f'example {i}')
  assert np.isfinite(got).all() and len(set(np.round(got, 2).tolist())) > 5, got


def test_train_batches_reshuffle_every_epoch_as_the_trainer_does():
  """As Hugging Face's Trainer (a RandomSampler re-drawn each epoch, the last partial batch
  kept): every epoch visits each example once, in a new order; seeds differ; the step
  count is ceil(epochs x ceil(n / batch)), a fractional last epoch cut short."""
  n, batch_size = 10, 4
  batches = finetune.train_batches(n, batch_size, 3.0, seed=1)
  assert len(batches) == 9 and [len(b) for b in batches[:3]] == [4, 4, 2]
  epochs = [np.concatenate(batches[e * 3:(e + 1) * 3]) for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch.tolist()) == list(range(n))
  assert len({tuple(e.tolist()) for e in epochs}) == 3
  assert not np.array_equal(np.concatenate(finetune.train_batches(n, batch_size, 3.0, 2)),
                            np.concatenate(batches))
  assert len(finetune.train_batches(n, batch_size, 1.5, seed=1)) == 5


# ---- From a mutation audit: each test fails with the check it names removed ----

def _rows(run_dir):
  path = run_dir / 'metrics.jsonl'
  return [json.loads(l)['step'] for l in path.read_text().splitlines() if l.strip()] \
      if path.exists() else []


def _old_curve(run_dir, steps):
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / 'metrics.jsonl').write_text(
      ''.join(json.dumps({'step': s, 'train/loss': 1.0}) + '\n' for s in steps))


@pytest.mark.parametrize('resumed_at, rows', [(0, [1]), (2, [1, 2, 3])])
def test_a_fresh_run_replaces_old_curves_and_a_resumed_one_cuts_them(tmp_path, resumed_at,
                                                                      rows):
  """A fine-tune from step 0 replaces an earlier attempt's curve; one resumed at step 2
  keeps its rows up to 2 and drops the rest (they are redone)."""
  run_dir = tmp_path / 'runs' / 'rte_seed1'
  _old_curve(run_dir, [1, 2, 3, 4])
  writer = finetune._metric_writer(run_dir, resumed_at)   # pylint: disable=protected-access
  writer.write_scalars(resumed_at + 1, {'train/loss': 0.5})
  writer.close()
  assert _rows(run_dir) == rows


class _Killed(Exception):
  """Stands for kill -9: nothing runs after it but the files already written."""


def _train_rows(path):
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != 'time'} for r in rows if 'train/loss' in r]


def test_the_first_row_after_a_kill_averages_the_steps_of_an_uninterrupted_run(
    workdir, tmp_path, monkeypatch):
  """Killed once step 8's row is written, the rerun resumes from the save at step 6 and
  writes row 8 again, the killed attempt's moving to metrics.jsonl.dropped: the two must
  be the same row. The checkpoint kept no loss meter, and the redone row averaged steps
  7-8 only, where the first one (and an uninterrupted run's) averaged 5-8."""
  config = _config(tasks='wnli', seeds='1', **_SHORT_RUN, epochs=5.0, log_every_steps=4,
                   checkpoint_every_steps=6)
  real_hooks = finetune._hooks   # pylint: disable=protected-access

  def killed_after_row_8(*args, **kwargs):
    hooks = real_hooks(*args, **kwargs)
    log = hooks.log

    def log_then_die(step, *rest):
      log(step, *rest)
      if step == 8:
        raise _Killed
    hooks.log = log_then_die
    return hooks

  monkeypatch.setattr(finetune, '_hooks', killed_after_row_8)
  out = tmp_path / 'out'
  compiled = {}
  with pytest.raises(_Killed):
    suite.run_glue(str(workdir), str(out), config, compiled)
  assert [p.name for p in (out / 'runs' / 'wnli' / 'checkpoints').iterdir()] == ['6']
  monkeypatch.setattr(finetune, '_hooks', real_hooks)
  suite.run_glue(str(workdir), str(out), config, compiled)
  run_dir = out / 'runs' / 'wnli_seed1'
  rows, first_attempt = (_train_rows(run_dir / name)
                         for name in ('metrics.jsonl', 'metrics.jsonl.dropped'))
  assert [r['step'] for r in rows] == [4, 8, 10]
  assert first_attempt == [rows[1]]


def test_results_written_before_a_kill_name_the_runs_still_to_finish(workdir, tmp_path,
                                                                     monkeypatch):
  """--tasks=rte,wnli killed while wnli trains: glue_results.* (written after rte) were
  those of a finished --tasks=rte run, wnli '—' for 'not run'. They now say what is
  unfinished, until the rerun finishes it."""
  out = tmp_path / 'out'
  config = _config(tasks='rte,wnli', seeds='1', **_SHORT_RUN)
  compiled = {}
  real_finetune = suite.finetune_lib.finetune_group

  def killed_in_wnli(*args, **kwargs):
    if args[1].spec.name == 'wnli':
      raise _Killed
    return real_finetune(*args, **kwargs)

  monkeypatch.setattr(suite.finetune_lib, 'finetune_group', killed_in_wnli)
  with pytest.raises(_Killed):
    suite.run_glue(str(workdir), str(out), config, compiled)
  results = json.loads((out / 'glue_results.json').read_text())
  assert set(results['runs']) == {'rte'} and results['unfinished'] == {'wnli': [1]}
  assert ('**Unfinished:** no scores yet for wnli (seed 1), asked for by the command'
          in (out / 'glue_results.md').read_text())
  monkeypatch.setattr(suite.finetune_lib, 'finetune_group', real_finetune)
  suite.run_glue(str(workdir), str(out), config, compiled)
  assert json.loads((out / 'glue_results.json').read_text())['unfinished'] == {}
  assert 'Unfinished' not in (out / 'glue_results.md').read_text()


def test_check_vocab_refuses_a_table_other_than_the_config(tmp_path):
  config = ml_collections.ConfigDict({'model': {'vocab_size': 1000}})
  table = np.zeros((1200, 4), np.float32)   # config says 1000 rows, the table has 1200
  pretrained = finetune.Pretrained(
      config, {'embeddings': {'word_embeddings': {'embedding': table}}}, str(tmp_path), 1)
  tokenizer = types.SimpleNamespace(vocab_file='vocab.txt', md5='x', vocab_size=1000)
  with pytest.raises(ValueError, match='Vocabulary mismatch'):
    finetune.check_vocab(pretrained, tokenizer)
  pretrained.encoder['embeddings']['word_embeddings']['embedding'] = table[:1000]
  finetune.check_vocab(pretrained, tokenizer)   # consistent: accepted


def test_a_seed_alone_is_padded_as_with_all_its_tasks_seeds():
  """With length_buckets a seed trained alone (parallel_seeds=False, or resumed by itself)
  pads each step to the longest batch among ALL the task's seeds, as the vmapped group does:
  dropout masks follow the padded shape."""
  lengths = [4] * 15 + [60]   # one long example: it lands in other steps for other seeds
  train = glue_data.Encoded(
      input_ids=[np.full(n, 7, np.int32) for n in lengths],
      token_type_ids=[np.zeros(n, np.int32) for n in lengths],
      labels=np.zeros(len(lengths), np.int32), idx=np.arange(len(lengths)))
  config = ml_collections.ConfigDict(dict(batch_size=2, epochs=1.0, max_seq_len=64,
                                          length_buckets=True))
  seeds = [1, 2, 3]
  together = finetune._Batches(train, config, seeds, 0, True, 0)   # pylint: disable=protected-access
  alone = {s: finetune._Batches(train, config, [s], 0, False, 0, length_seeds=seeds)   # pylint: disable=protected-access
           for s in seeds}
  steps = finetune.num_train_steps(len(train), config.batch_size, config.epochs)
  for _ in range(steps):
    stacked = next(together)
    for k, s in enumerate(seeds):
      batch = next(alone[s])
      assert batch['input_ids'].shape == stacked['input_ids'].shape[1:]
      np.testing.assert_array_equal(batch['input_ids'], stacked['input_ids'][k])


def _results_file(tmp_path, config, runs):
  (tmp_path / 'glue_results.json').write_text(json.dumps(
      {'checkpoint': 'CKPT', 'config': config.to_dict(), 'runs': runs}))


def test_parse_seeds_drops_repeats_keeping_order():
  assert reuse.parse_seeds('3,1,3, 1,2') == [3, 1, 2]


def test_a_run_missing_one_of_its_prediction_files_is_redone(tmp_path):
  config = glue_config.get_config('runlocal')
  (tmp_path / 'predictions').mkdir()
  (tmp_path / 'predictions' / 'mnli_m_seed1.tsv').write_text('idx\tlabel\tprediction\n')
  score = {'accuracy': 0.5, 'score': 50.0}
  _results_file(tmp_path, config, {'mnli': {'1': {'scores': {'mnli_m': score, 'mnli_mm': score}}}})
  assert not reuse.finished_runs(tmp_path, 'CKPT', config)   # mnli_mm never written
  (tmp_path / 'predictions' / 'mnli_mm_seed1.tsv').write_text('idx\tlabel\tprediction\n')
  assert list(reuse.finished_runs(tmp_path, 'CKPT', config)) == [('mnli', 1)]


def test_predictions_no_results_name_are_set_aside_unless_written_again(tmp_path):
  """`--seeds=1,2` killed after writing its prediction files, before glue_results.json: a
  rerun with `--seeds=1` (or another checkpoint) wrote results naming seed 1 only, and
  rte_seed2.tsv stayed beside them, looking final. It moves to replaced-*/; a file this
  command writes again stays (the same command rerun)."""
  config = glue_config.get_config('runlocal')
  config.update(tasks='rte', seeds='1')
  predictions = tmp_path / 'predictions'
  predictions.mkdir()
  for name in ('rte_seed1.tsv', 'rte_seed2.tsv'):
    (predictions / name).write_text('idx\tlabel\tprediction\n0\t1\t1\n')
  assert not reuse.finished_runs(tmp_path, 'CKPT', config)   # no results yet
  [aside] = tmp_path.glob('replaced-*')
  assert [p.name for p in predictions.iterdir()] == ['rte_seed1.tsv']
  assert [p.name for p in (aside / 'predictions').iterdir()] == ['rte_seed2.tsv']
  shutil.rmtree(aside)
  (predictions / 'wnli_seed1.tsv').write_text('idx\tlabel\tprediction\n0\t1\t1\n')
  _results_file(tmp_path, config, {'rte': {'1': {'scores': {'rte': {'score': 50.0}}}}})
  assert list(reuse.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 1)]
  [aside] = tmp_path.glob('replaced-*')
  assert [p.name for p in predictions.iterdir()] == ['rte_seed1.tsv']
  assert [p.name for p in (aside / 'predictions').iterdir()] == ['wnli_seed1.tsv']


@pytest.mark.parametrize('key, value', [
    ('epochs', 5.0), ('batch_size', 32), ('learning_rate', 1e-4), ('max_seq_len', 64),
    ('warmup_ratio', 0.0), ('weight_decay', 0.1), ('max_train_examples', 7),
    ('max_eval_examples', 7), ('length_buckets', False)])
def test_every_training_knob_is_part_of_the_recipe(tmp_path, key, value):
  config = glue_config.get_config('runlocal')
  assert config[key] != value, key
  (tmp_path / 'predictions').mkdir()
  (tmp_path / 'predictions' / 'rte_seed1.tsv').write_text('idx\tlabel\tprediction\n')
  _results_file(tmp_path, config, {'rte': {'1': {'scores': {'rte': {'accuracy': 0.5,
                                                               'score': 50.0}}}}})
  assert list(reuse.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 1)]
  config[key] = value
  assert not reuse.finished_runs(tmp_path, 'CKPT', config)   # set aside, trained again


def _pretrained(**model):
  config = train_fixtures.tiny_config(**{f'model__{k}': v for k, v in model.items()})
  return finetune.Pretrained(config, {}, '/nowhere/checkpoints/4', 4)


def test_a_max_seq_len_one_past_the_position_table_is_refused(monkeypatch):
  monkeypatch.setattr(suite.finetune_lib, 'load_pretrained_encoder',
                      lambda path: _pretrained(max_position_embeddings=32))
  monkeypatch.setattr(suite.glue_data, 'WordPiece', lambda path, **_: types.SimpleNamespace())
  monkeypatch.setattr(suite.finetune_lib, 'check_vocab', lambda *a: None)
  config = glue_config.get_config('runlocal')
  config.update(dict(max_seq_len=32, length_buckets=False, attention_impl='xla'))
  suite._checkpoint_and_tokenizer('CKPT', config, 'auto')   # pylint: disable=protected-access
  config.max_seq_len = 33
  with pytest.raises(ValueError, match='max_seq_len=33 exceeds'):
    suite._checkpoint_and_tokenizer('CKPT', config, 'auto')   # pylint: disable=protected-access


def test_sentence_pair_tasks_need_a_second_segment_embedding(monkeypatch, tmp_path):
  monkeypatch.setattr(suite, '_checkpoint_and_tokenizer',
                      lambda checkpoint, config, parallel: (_pretrained(type_vocab_size=1), None))
  config = glue_config.get_config('runlocal')
  config.update(dict(tasks='rte', seeds='1', glue_dir=str(real_data.FIXTURE_GLUE_DIR)))
  with pytest.raises(ValueError, match='type_vocab_size=1: no segment embedding'):
    suite.run_glue('CKPT', str(tmp_path / 'out'), config)


def test_reused_tasks_join_the_recorded_task_list():
  """A sweep keeps a rotated step only if its results list this command's tasks."""
  results = {'runs': {}, 'tasks': ['rte']}
  run = {'scores': {'wnli': {'accuracy': 0.5, 'score': 50.0}}}
  suite._keep_finished_runs(results, {('wnli', 1): run, ('rte', 2): run}, [1])   # pylint: disable=protected-access
  assert results['tasks'] == ['rte', 'wnli']
  assert results['runs'] == {'wnli': {'1': run}}
  assert results[suite.OTHER_SEEDS] == {'rte': {'2': run}}


def _sweep_results(score):
  return {'summary': glue_metrics.summarize({1: {'rte': score}})}


def test_the_curve_is_in_step_order_with_rotated_steps_between(tmp_path, monkeypatch):
  """Steps 1000 (kept by keep_every) and 5000 present, 2000 and 3000 scored earlier and
  rotated away: the curve and the first step reaching the reference go by step."""
  monkeypatch.setattr(sweep, 'checkpoint_steps', lambda workdir: [1000, 5000])
  for step in (1000, 5000):   # (a listed step rotated away since is skipped)
    (tmp_path / 'run' / 'checkpoints' / str(step)).mkdir(parents=True)
  monkeypatch.setattr(sweep, 'scored_steps_gone',
                      lambda *a: {2000: _sweep_results(90.0), 3000: _sweep_results(95.0)})
  scores = {'00001000': 99.0, '00005000': 99.0}
  monkeypatch.setattr(sweep.suite, 'run_glue',
                      lambda ckpt, out, config, cache, preemption: _sweep_results(scores[out[-8:]]))
  config = glue_config.get_config('runlocal')
  points = sweep.run_sweep(tmp_path / 'run', tmp_path / 'sweep', config,
                           reference_score=100.0)['points']
  assert [p['step'] for p in points] == [1000, 2000, 3000, 5000]
  summary = json.loads((tmp_path / 'sweep' / 'glue_vs_step.json').read_text())
  assert summary['first_step_reaching_threshold'] == 1000


def test_unreadable_or_foreign_step_folders_are_left_out(tmp_path):
  config = glue_config.get_config('runlocal')
  config.update(dict(tasks='rte', seeds='1'))
  out = tmp_path / 'sweep'
  for name, text in (('step_00000002', '{"cut'), ('step_notes', '{}')):
    (out / name).mkdir(parents=True)
    (out / name / 'glue_results.json').write_text(text)
  assert sweep.scored_steps_gone(tmp_path / 'run', out, config, {4}) == {}


def test_stacked_batches_are_split_over_the_batch_axis_not_the_seeds():
  """Seeds trained together: (seeds, batch, length) arrays split along the batch (3 seeds
  on 2 devices would not divide, and the devices would each train other seeds)."""
  _, task = _tiny_task()
  mesh = sharding.make_mesh(_config().mesh)
  batch = {'input_ids': np.zeros((3, 4, 8), np.int32)}
  spec = finetune.global_batch(batch, mesh, task.rules, stacked=True)['input_ids'].sharding.spec
  assert spec[0] is None and spec[1] == sharding.batch_axes(task.rules)


def test_seed_zero_is_a_seed():
  assert reuse.parse_seeds('0,1') == [0, 1]


def test_the_vocabulary_under_another_spelling_is_the_same_recipe(tmp_path, monkeypatch):
  config = glue_config.get_config('runlocal')
  (tmp_path / 'vocab.txt').write_text('x\n')
  monkeypatch.chdir(tmp_path)
  config.vocab_path = 'vocab.txt'
  same = reuse.recipe(reuse.with_absolute_paths(config))
  for spelling in (str(tmp_path / 'vocab.txt'), './vocab.txt'):
    config.vocab_path = spelling
    assert reuse.recipe(reuse.with_absolute_paths(config)) == same


def _rte_seeds_1_2_padded_together(output_dir, config, runs, others=None):
  """glue_results.json and predictions of RTE seeds 1 and 2, trained together with length
  buckets (each run padded with seeds [1, 2]); `runs`/`others`: the seeds in each section."""
  config.length_buckets, config.seeds = True, '1,2'
  (output_dir / 'predictions').mkdir()
  for seed in (1, 2):
    (output_dir / 'predictions' / f'rte_seed{seed}.tsv').write_text('idx\tlabel\tprediction\n')
  run = lambda: {'scores': {'rte': {'accuracy': 0.5, 'score': 50.0}}, 'padded_with_seeds': [1, 2]}
  results = {'checkpoint': 'CKPT', 'checkpoint_written': None, 'config': config.to_dict(),
             'seeds': [1, 2], 'runs': {'rte': {str(s): run() for s in runs}}}
  if others:
    results[reuse.OTHER_SEEDS] = {'rte': {str(s): run() for s in others}}
  (output_dir / 'glue_results.json').write_text(json.dumps(results))


def test_a_finished_run_of_a_seed_not_asked_for_now_is_kept(tmp_path):
  """Seeds 1,3 asked where 1,2 were trained: seed 2's run is kept for a later command
  (not set aside as padded for another seed list, which only concerns seeds trained now)."""
  config = glue_config.get_config('runlocal')
  _rte_seeds_1_2_padded_together(tmp_path, config, runs=[1], others=[2])
  config.seeds = '1,3'
  reuse.finished_runs(tmp_path, 'CKPT', config)
  assert (tmp_path / 'predictions' / 'rte_seed2.tsv').exists()


def test_a_later_tasks_missing_dev_file_stops_before_any_training(workdir, tmp_path,
                                                                  monkeypatch):
  glue = tmp_path / 'glue'
  shutil.copytree(GLUE_DIR, glue)
  (glue / 'RTE' / 'dev.tsv').unlink()
  trained = []
  monkeypatch.setattr(suite.finetune_lib, 'finetune_group',
                      lambda *a, **k: trained.append(a[4]) or [])
  with pytest.raises(Exception, match='RTE.dev.tsv'):
    suite.run_glue(str(workdir), str(tmp_path / 'out'),
                   _config(tasks='wnli,rte', seeds='1', glue_dir=str(glue)))
  assert not trained


def test_a_sweep_takes_the_checkpoints_folder_as_a_single_run_does(workdir, tmp_path):
  """--checkpoint=WORKDIR/checkpoints is a workdir's checkpoints to a single run and to the
  sweep's listing; the sweep then looked every step up under checkpoints/checkpoints/."""
  out = tmp_path / 'sweep'
  sweep.run_sweep(str(workdir / 'checkpoints'), str(out), _config(tasks='wnli', seeds='1'))
  points = json.loads((out / 'glue_vs_step.json').read_text())['points']
  assert [p['step'] for p in points] == [2, 4]
  assert json.loads((out / 'step_00000004' / 'glue_results.json').read_text())[
      'checkpoint'] == str(workdir / 'checkpoints' / '4')


def test_a_task_not_asked_for_now_keeps_runs_padded_for_another_seed_list(tmp_path):
  """--tasks=wnli --seeds=1 after --tasks=rte --seeds=1,2 (length buckets): RTE is not
  trained now, yet its seed-1 run was set aside as padded for another seed list, so it left
  the table and a later --tasks=rte,wnli --seeds=1,2 fine-tuned it again."""
  config = glue_config.get_config('runlocal')
  config.tasks = 'rte'
  _rte_seeds_1_2_padded_together(tmp_path, config, runs=[1, 2])
  config.tasks, config.seeds = 'wnli', '1'
  assert sorted(reuse.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 1), ('rte', 2)]
  assert not list(tmp_path.glob('replaced-*'))
  assert (tmp_path / 'predictions' / 'rte_seed1.tsv').exists()
  config.tasks = 'rte,wnli'   # RTE trained now with --seeds=1: seed 1 is padded otherwise
  assert list(reuse.finished_runs(tmp_path, 'CKPT', config)) == [('rte', 2)]


def test_seeds_separated_by_spaces_are_refused_not_joined():
  """--seeds='1 2' (spaces for commas) ran seed 12 alone, silently."""
  assert reuse.parse_seeds(' 1 , 2 ') == [1, 2]
  with pytest.raises(ValueError, match="Seeds must be comma-separated integers, got '1 2'"):
    reuse.parse_seeds('1 2')


def test_a_checkpoint_unlike_its_config_is_refused_before_the_output_dir_is_touched(
    workdir, tmp_path):
  """A config.json describing another model than the checkpoint's arrays failed only when
  the first task's training started: after an earlier run's results in --output_dir were
  set aside for this checkpoint, and without a fix."""
  other = tmp_path / 'other'
  shutil.copytree(workdir, other)
  config = json.loads((other / 'config.json').read_text())
  config['model'].update(hidden_size=64, mlp_dim=128)
  (other / 'config.json').write_text(json.dumps(config))
  out = tmp_path / 'out'
  out.mkdir()
  earlier = json.dumps({'checkpoint': str(workdir / 'checkpoints' / '4'), 'runs': {},
                        'config': _config(tasks='rte').to_dict()})
  (out / 'glue_results.json').write_text(earlier)
  with pytest.raises(ValueError, match=r'does not match the model its config.json '
                                       r'describes .*Fix: pass the workdir'):
    suite.run_glue(str(other), str(out), _config(tasks='rte'))
  assert (out / 'glue_results.json').read_text() == earlier
  assert sorted(p.name for p in out.iterdir()) == ['glue_results.json']


@pytest.mark.parametrize('task_dir, file_name', [('RTE', 'dev.tsv'), ('CoLA', 'train.tsv')])
def test_a_later_tasks_file_without_labels_stops_before_any_training(
    workdir, tmp_path, monkeypatch, task_dir, file_name):
  """Only the files' presence was checked up front: a later task's dev.tsv without its
  label column (test.tsv's layout) failed after every task before it had trained."""
  glue = tmp_path / 'glue'
  shutil.copytree(GLUE_DIR, glue)
  path = glue / task_dir / file_name
  rows = path.read_text().splitlines()
  keep = 3 if task_dir == 'RTE' else 1   # RTE: index, sentence1, sentence2; CoLA: source
  path.write_text(''.join('\t'.join(r.split('\t')[:keep]) + '\n' for r in rows))
  trained = []
  monkeypatch.setattr(suite.finetune_lib, 'finetune_group',
                      lambda *a, **k: trained.append(a[4]) or [])
  with pytest.raises(glue_data.GlueDataError, match=f'{task_dir}.{file_name}'):
    suite.run_glue(str(workdir), str(tmp_path / 'out'),
                   _config(tasks=f'wnli,{task_dir.lower()}', seeds='1', glue_dir=str(glue)))
  assert not trained
  assert not (tmp_path / 'out').exists()
