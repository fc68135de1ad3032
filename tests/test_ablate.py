"""bert_sym.ablate: the grid through the real trainer, and its statistics recomputed by hand.

Statistics convention checked here: mean and sample std (ddof=1, `statistics.stdev`).
"""

import json
import os
import statistics
import subprocess

import pytest

from bert_sym import ablate
from bert_sym import ablate_report
from tests import ablate_fixtures as fx

# The tiny grid is trained once per test process: under `make test` (pytest-xdist,
# --dist loadgroup) every test that reads it runs in the same worker.
pytestmark = pytest.mark.xdist_group('ablate_grid')


# ----------------------------------------------------------------------------------------
# Units: steps to target, metrics reading, wall-clock gaps.
# ----------------------------------------------------------------------------------------

def test_steps_to_target_hand_made_curves():
  steps = [0, 50, 100, 150, 200]
  losses = [10.0, 7.0, 5.0, 4.0, 3.5]
  assert ablate_report.steps_to_target(steps, losses, 5.0) == 100     # equal counts as reached
  assert ablate_report.steps_to_target(steps, losses, 4.5) == 150
  assert ablate_report.steps_to_target(steps, losses, 10.0) == 0
  assert ablate_report.steps_to_target(steps, losses, 3.0) is None    # never reached
  # Non-monotone curve: the first crossing counts, even if the loss goes back up.
  assert ablate_report.steps_to_target([0, 10, 20], [5.0, 3.0, 6.0], 4.0) == 10


def test_read_metrics_deduplicates_and_skips_partial_line(tmp_path):
  rows = [
      {'step': 0, 'time': 1.0, 'eval/loss': 10.0, 'eval/mlm_accuracy': 0.0},
      {'step': 2, 'time': 2.0, 'train/loss': 9.0},
      {'step': 2, 'time': 3.0, 'eval/loss': 8.0, 'eval/mlm_accuracy': 0.1},
      # a resume re-logs step 2
      {'step': 2, 'time': 10.0, 'train/loss': 9.5},
      {'step': 2, 'time': 11.0, 'eval/loss': 7.5, 'eval/mlm_accuracy': 0.2},
  ]
  text = '\n'.join(json.dumps(r) for r in rows) + '\n{"step": 4, "ti'
  (tmp_path / 'metrics.jsonl').write_text(text)
  m = ablate_report.read_metrics(tmp_path)
  assert sorted(m['eval']) == [0, 2] and m['eval'][2]['eval/loss'] == 7.5
  assert m['train'][2]['train/loss'] == 9.5
  assert len(m['rows']) == 5


def test_elapsed_seconds_removes_idle_gap_of_a_restart():
  rows = [{'time': t} for t in (100.0, 110.0, 120.0, 500.0, 510.0)]
  # First process started at 90; the second at 480, 360 s after the last row at 120.
  assert ablate_report.elapsed_seconds(rows, [90.0, 480.0]) == [0.0, 10.0, 20.0, 40.0, 50.0]
  assert ablate_report.elapsed_seconds(rows, []) == [0.0, 10.0, 20.0, 400.0, 410.0]


def _fake_run(root, variant, seed, curve, config_json):
  """A finished run on disk without training: config.json, metrics, a finalized step dir."""
  path = root / variant / f'seed{seed}'
  (path / 'checkpoints' / str(curve[-1][0]) / 'state').mkdir(parents=True)
  (path / 'config.json').write_text(config_json)
  (path / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': s, 'time': 1000.0 + s, 'eval/loss': l, 'eval/mlm_accuracy': 0.1})
      + '\n' for s, l in curve))
  return path


def test_summary_not_reached_and_ratio(tmp_path):
  config = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30'])
  cj = config.to_json()
  curves = {
      ('standard', 1): [(0, 10.0), (10, 6.0), (20, 5.0), (30, 4.0)],
      ('standard', 2): [(0, 10.0), (10, 6.0), (20, 5.0), (30, 5.0)],   # mean final: 4.5
      ('pairwise', 1): [(0, 10.0), (10, 4.4), (20, 4.0), (30, 3.0)],
      ('pairwise', 2): [(0, 10.0), (10, 5.0), (20, 4.5), (30, 3.0)],
      ('symmetric', 1): [(0, 10.0), (10, 8.0), (20, 7.0), (30, 6.0)],   # never reaches 4.5
      ('symmetric', 2): [(0, 10.0), (10, 8.0), (20, 7.0), (30, 6.0)],
  }
  for (v, s), c in curves.items():
    _fake_run(tmp_path, v, s, c, cj)
  _fake_run(tmp_path, 'pairwise', 3, [(0, 10.0), (10, 9.0)], cj)   # unfinished (10/30)
  out = ablate_report.summarize(tmp_path, ['standard', 'symmetric', 'pairwise'], [1, 2, 3],
                         total_steps=30)
  assert out['target_loss']['value'] == pytest.approx(4.5)
  std = out['per_variant']['standard']['steps_to_target']
  assert std['per_seed'] == {'1': 30, '2': None} and std['reached'] == 1
  assert std['mean'] == 30 and std['std'] is None
  pw = out['per_variant']['pairwise']['steps_to_target']
  assert pw['per_seed'] == {'1': 10, '2': 20}
  assert pw['mean'] == 15 and pw['std'] == pytest.approx(statistics.stdev([10, 20]))
  assert pw['ratio_to_reference'] == pytest.approx(0.5)
  sym = out['per_variant']['symmetric']['steps_to_target']
  assert sym['reached'] == 0 and sym['mean'] is None and sym['ratio_to_reference'] is None
  assert 'pairwise/seed3' in out['excluded'] and out['runs']['pairwise'] == [1, 2]
  md = (tmp_path / 'summary.md').read_text()
  assert '| symmetric | 1,2 |' in md and 'not reached' in md
  assert '30 (reached in 1/2 seeds)' in md
  for name in ('loss_vs_step.png', 'loss_vs_tokens.png', 'loss_vs_time.png'):
    assert (tmp_path / name).stat().st_size > 1000


def test_config_differences_name_the_changed_keys():
  requested = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30'])
  saved = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30', '--config.seed=2',
                                            '--config.model.attention=standard',
                                            '--config.optimizer.learning_rate=0.5'])
  assert ablate.config_differences(requested, saved, 'standard', 2) == [
      'optimizer.learning_rate']


def test_bad_override_fails_before_training(tmp_path):
  with pytest.raises(ablate.AblationError, match='no_such_key'):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.no_such_key=1'])
  with pytest.raises(ablate.AblationError, match='--variants'):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.seed=3'])
  assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------
# End to end: the tiny grid through the command line.
# ----------------------------------------------------------------------------------------

def _raw_eval_curve(path):
  """Independent of bert_sym.ablate: last row per (step, kind) from the raw JSON lines."""
  last = {}
  with open(os.path.join(path, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      kind = 'eval' if 'eval/loss' in row else 'train'
      last[row['step'], kind] = row
  return {step: row['eval/loss'] for (step, kind), row in last.items() if kind == 'eval'}


def test_grid_end_to_end_summary_matches_hand_recomputation():
  workdir, stdout = fx.tiny_grid()
  assert stdout.count('; training.') == len(fx.VARIANTS) * len(fx.SEEDS)
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  curves = {(v, s): _raw_eval_curve(os.path.join(workdir, v, f'seed{s}'))
            for v in fx.VARIANTS for s in fx.SEEDS}
  common = sorted(set.intersection(*(set(c) for c in curves.values())))
  assert common == [0, 2, 4, 6] == summary['eval_steps']
  assert summary['final_step'] == fx.TOTAL_STEPS
  md = open(os.path.join(workdir, 'summary.md')).read()
  for v in fx.VARIANTS:
    pv = summary['per_variant'][v]
    for step in common:
      values = [curves[v, s][step] for s in fx.SEEDS]
      got = pv['eval_loss_at_step'][str(step)]
      assert got['mean'] == pytest.approx(statistics.mean(values), abs=1e-9)
      assert got['std'] == pytest.approx(statistics.stdev(values), abs=1e-9)
    final = [curves[v, s][fx.TOTAL_STEPS] for s in fx.SEEDS]
    cell = f'{statistics.mean(final):.4f} ± {statistics.stdev(final):.4f}'
    assert f'| {v} | 1,2 |' in md and cell in md
  # Steps to target by hand: target = standard's mean final loss; first eval step <= it.
  target = statistics.mean(curves['standard', s][fx.TOTAL_STEPS] for s in fx.SEEDS)
  assert summary['target_loss']['value'] == pytest.approx(target, abs=1e-9)
  means = {}
  for v in fx.VARIANTS:
    hand = {}
    for s in fx.SEEDS:
      hits = [step for step in sorted(curves[v, s]) if curves[v, s][step] <= target]
      hand[str(s)] = hits[0] if hits else None
    st = summary['per_variant'][v]['steps_to_target']
    assert st['per_seed'] == hand
    reached = [x for x in hand.values() if x is not None]
    means[v] = statistics.mean(reached) if reached else None
    assert st['mean'] == means[v]
  if means['pairwise'] is not None and means['standard']:
    assert summary['per_variant']['pairwise']['steps_to_target']['ratio_to_reference'] == (
        pytest.approx(means['pairwise'] / means['standard']))
  for name in ('loss_vs_step.png', 'loss_vs_tokens.png', 'loss_vs_time.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  assert summary['per_variant']['standard']['params_encoder_pooler'] > 0


def test_rerun_skips_finished_runs():
  workdir, _ = fx.tiny_grid()
  sizes = {(v, s): os.path.getsize(os.path.join(workdir, v, f'seed{s}', 'metrics.jsonl'))
           for v in fx.VARIANTS for s in fx.SEEDS}
  proc = subprocess.run(fx.ablate_command(workdir), cwd=fx.REPO_ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'bert_sym.train' not in proc.stdout and '; training.' not in proc.stdout
  assert proc.stdout.count('skipped.') == len(sizes)
  assert sizes == {(v, s): os.path.getsize(os.path.join(workdir, v, f'seed{s}', 'metrics.jsonl'))
                   for v in fx.VARIANTS for s in fx.SEEDS}


def test_summarize_only_trains_nothing(tmp_path):
  workdir, _ = fx.tiny_grid()
  out = ablate.run(fx.CONFIG, 'standard,symmetric', '1', workdir, fx.OVERRIDES,
                   summarize_only=True)
  assert out['actions'] == {'standard/seed1': 'skipped', 'symmetric/seed1': 'missing'}
  assert not os.path.exists(os.path.join(workdir, 'symmetric'))
  # Put the whole grid's summary back for the other tests.
  ablate.run(fx.CONFIG, ','.join(fx.VARIANTS), '1,2', workdir, fx.OVERRIDES,
             summarize_only=True)


@pytest.mark.skipif(not os.path.isdir(fx.GLUE_DIR), reason=f'{fx.GLUE_DIR} not present')
@pytest.mark.skipif(not os.environ.get('BERT_SYM_SLOW_TESTS'),
                    reason='about 1 min more (one GLUE fine-tuning subprocess); set '
                           'BERT_SYM_SLOW_TESTS=1')
def test_glue_scoring_through_the_runner(tmp_path):
  workdir, _ = fx.tiny_grid()
  glue_args = ('--config.max_train_examples=16 --config.max_eval_examples=16 '
               '--config.epochs=1 --config.max_seq_len=32 --config.batch_size=8 '
               '--config.progress_bar=False')
  out = ablate.run(fx.CONFIG, 'standard', '1', workdir, fx.OVERRIDES, glue_dir=fx.GLUE_DIR,
                   glue_tasks='rte', glue_seeds='1', glue_args=glue_args)
  glue = out['per_variant']['standard']['glue']
  assert 0.0 <= glue['rte']['mean'] <= 100.0
  assert os.path.exists(os.path.join(workdir, 'glue.png'))
  assert 'GLUE dev' in open(os.path.join(workdir, 'summary.md')).read()
  ablate.run(fx.CONFIG, ','.join(fx.VARIANTS), '1,2', workdir, fx.OVERRIDES,
             summarize_only=True)
