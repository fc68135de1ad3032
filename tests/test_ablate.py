"""bert_sym.ablate: the grid through the real trainer, and its statistics recomputed by hand.

Statistics checked here: mean and sample std (ddof=1, `statistics.stdev`), steps to target
by linear interpolation, the ratio only when every seed reached the target, t intervals
against scipy.stats.ttest_1samp / ttest_rel, the ratio's bootstrap interval against
scipy.stats.bootstrap, paired differences by hand.
"""

import json
import os
import statistics
import signal
import subprocess
import sys
import textwrap
import threading
import time

import ml_collections
import numpy as np
import pytest
import scipy.stats

from bert_sym import ablate
from bert_sym.ablate import report as ablate_report
from bert_sym.ablate import runner
from bert_sym.ablate import runs as ablate_runs
from bert_sym.ablate import stats
from tests import ablate_fixtures as fx

# The tiny grid is trained once per test process: under `make test` (pytest-xdist,
# --dist loadgroup) every test that reads it runs in the same worker.
pytestmark = pytest.mark.xdist_group('ablate_grid')


# ----------------------------------------------------------------------------------------
# Units: steps to target, metrics reading, wall-clock gaps.
# ----------------------------------------------------------------------------------------

def test_steps_to_target_interpolates_between_evals():
  steps = [0, 50, 100, 150, 200]
  losses = [10.0, 7.0, 5.0, 4.0, 3.5]
  assert stats.steps_to_target(steps, losses, 5.0) == 100       # equal counts as reached
  assert stats.steps_to_target(steps, losses, 4.5) == 125       # halfway from 5.0 to 4.0
  assert stats.steps_to_target(steps, losses, 6.0) == 75
  assert stats.steps_to_target(steps, losses, 10.0) == 0
  assert stats.steps_to_target(steps, losses, 3.0) is None      # never reached
  # Non-monotone curve: the first crossing counts, even if the loss goes back up.
  assert stats.steps_to_target([0, 10, 20], [5.0, 3.0, 6.0], 4.0) == 5


def test_default_target_is_a_fraction_of_the_reference_drop():
  assert stats.default_target([10.0, 12.0], [4.0, 6.0], fraction=0.9) == pytest.approx(
      11.0 - 0.9 * 6.0)
  # Of the seeds' means: with three seeds a median (11, 5) would give another target.
  assert stats.default_target([10.0, 11.0, 15.0], [4.0, 5.0, 9.0], fraction=0.9) == (
      pytest.approx(12.0 - 0.9 * 6.0))


def _scipy_interval(samples, statistic, level=0.95):
  ci = scipy.stats.bootstrap(tuple(np.asarray(x, float) for x in samples), statistic,
                             n_resamples=100_000, method='percentile', random_state=1,
                             confidence_level=level, vectorized=True).confidence_interval
  return [ci.low, ci.high]


def test_bootstrap_interval_agrees_with_scipy():
  """Within 2.5% of the interval's width of scipy's 95% percentile interval, and not within
  it of the 90% one (a tolerance of a fixed 0.004 let a 90% interval pass as 95%)."""
  values = [5.706, 5.693, 5.732, 5.705, 5.673, 5.718, 5.765, 5.747, 5.665, 5.637, 5.669,
            5.702]
  mean = lambda x, axis=-1: np.mean(x, axis=axis)
  ours = stats.bootstrap_interval([values], np.mean)
  theirs, ninety = _scipy_interval([values], mean), _scipy_interval([values], mean, 0.90)
  tolerance = 0.025 * (theirs[1] - theirs[0])
  assert ours[0] < np.mean(values) < ours[1]
  assert ours == pytest.approx(theirs, abs=tolerance)
  assert ours != pytest.approx(ninety, abs=tolerance)
  assert stats.bootstrap_interval([[5.7]], np.mean) is None


def test_the_ratio_of_unpaired_seeds_is_scipys_two_sample_bootstrap():
  """Variants that ran different seeds: each resampled on its own (scipy's independent
  two-sample bootstrap), not paired by position."""
  variant = {1: 5200.0, 2: 4900.0, 3: 5600.0, 4: 5100.0}
  reference = {5: 6100.0, 6: 6600.0, 7: 5900.0, 8: 6400.0, 9: 6000.0}
  ratio = stats.steps_ratio(variant, reference)
  assert ratio['value'] == pytest.approx(np.mean(list(variant.values()))
                                         / np.mean(list(reference.values())))
  theirs = _scipy_interval([list(variant.values()), list(reference.values())],
                           lambda a, b, axis=-1: np.mean(a, axis) / np.mean(b, axis))
  assert ratio['ci95'] == pytest.approx(theirs, abs=0.025 * (theirs[1] - theirs[0]))


def test_the_ratio_of_paired_seeds_is_scipys_paired_bootstrap_of_the_ratio_of_means():
  """The same seeds: resampled in pairs, the statistic being the ratio reported (mean over
  mean), not the mean of per-seed ratios, whose interval is another; and the same
  interval on every call (a summary rewritten from the same runs is the same file)."""
  variant = {1: 50.0, 2: 400.0, 3: 60.0, 4: 140.0, 5: 100.0, 6: 75.0}
  reference = {1: 100.0, 2: 200.0, 3: 120.0, 4: 150.0, 5: 90.0, 6: 130.0}
  v, r = list(variant.values()), list(reference.values())
  ratio = stats.steps_ratio(variant, reference)
  ci = scipy.stats.bootstrap((np.asarray(v), np.asarray(r)),
                             lambda a, b, axis=-1: np.mean(a, axis) / np.mean(b, axis),
                             paired=True, n_resamples=100_000, method='percentile',
                             random_state=1, vectorized=True).confidence_interval
  width = ci.high - ci.low
  assert ratio['ci95'] == pytest.approx([ci.low, ci.high], abs=0.025 * width)
  mean_of_ratios = _scipy_interval([np.divide(v, r)], lambda x, axis=-1: np.mean(x, axis))
  assert ratio['ci95'] != pytest.approx(mean_of_ratios, abs=0.025 * width)
  assert stats.steps_ratio(variant, reference) == ratio
  assert stats.describe(v) == stats.describe(v)


def test_ratio_only_when_every_seed_of_both_reached():
  reference = {1: 100.0, 2: 120.0, 3: 110.0}
  assert stats.steps_ratio(reference, reference)['value'] == 1.0
  assert stats.steps_ratio(reference, reference)['ci95'] == [1.0, 1.0]
  faster = {1: 50.0, 2: 60.0, 3: 55.0}
  assert stats.steps_ratio(faster, reference)['value'] == pytest.approx(0.5)
  assert stats.steps_ratio({1: 50.0, 2: None, 3: 55.0}, reference)['value'] is None
  assert stats.steps_ratio(faster, {1: 100.0, 2: None, 3: 110.0})['value'] is None


def test_non_finite_values_give_no_interval_and_no_crossing():
  """A NaN eval loss started an interpolation to a NaN step, which counted as reached; a
  NaN seed got a finite interval (from the resamples that missed it) beside a NaN mean;
  a ratio to a zero mean raised IndexError (a percentile of no values)."""
  nan, inf = float('nan'), float('inf')
  assert stats.steps_to_target([0, 100, 200, 300], [10, nan, 2, 1], 3) == 175.0   # 0 -> 200
  assert stats.steps_to_target([0, 100, 200], [10, inf, 2], 3) == 175.0
  assert stats.steps_to_target([0, 100], [nan, nan], 3) is None
  assert stats.describe([1.0, nan, 3.0])['ci95'] is None
  assert stats.describe([nan, nan])['ci95'] is None
  with np.errstate(divide='ignore'):
    assert stats.steps_ratio({1: 1.0, 2: 2.0}, {1: 0.0, 2: 0.0})['ci95'] is None


def test_intervals_of_a_mean_and_a_paired_difference_are_scipys_t_intervals():
  """The replication's symmetric - standard final eval losses (3 seeds, every difference
  positive): the percentile bootstrap's interval was [min, max] of the differences,
  [+0.002, +0.022], and the reading said 'higher than standard'; scipy's paired t test
  gives p = 0.19. Over grids of equal true loss that interval left out 0 on 25% of
  3-seed grids and 17% of 5-seed ones, not 5%."""
  standard = {1: 5.840505, 2: 5.806291, 3: 5.849859}
  symmetric = {1: 5.842296, 2: 5.828483, 3: 5.860854}
  d = stats.paired_difference(symmetric, standard)
  theirs = scipy.stats.ttest_rel(list(symmetric.values()), list(standard.values()))
  assert theirs.pvalue > 0.05
  assert d['ci95'] == pytest.approx(list(theirs.confidence_interval()), abs=1e-12)
  assert d['ci95'][0] < 0 < d['ci95'][1]
  assert ablate_report._verdict(d, 4, 'standard', 'lower', 'higher').endswith(  # pylint: disable=protected-access
      'not separated from standard (the interval includes 0)')
  values = [5.706, 5.693, 5.732, 5.705, 5.673]
  assert stats.describe(values)['ci95'] == pytest.approx(
      list(scipy.stats.ttest_1samp(values, 0).confidence_interval()), abs=1e-12)
  # Two seeds: mean +- t(0.975, 1 df) * std / sqrt(2) = mean +- 12.706 * |a - b| / 2.
  assert stats.describe([2.0, 3.0])['ci95'] == pytest.approx(
      [2.5 - 12.7062047 * 0.5, 2.5 + 12.7062047 * 0.5])
  assert stats.describe([5.7])['ci95'] is None


def test_paired_difference_is_per_seed():
  d = stats.paired_difference({1: 5.0, 2: 6.0, 3: None}, {1: 4.0, 2: 5.5, 3: 4.0})
  assert d['seeds'] == [1, 2] and d['mean'] == pytest.approx(0.75) and d['n'] == 2
  assert d['std'] == pytest.approx(statistics.stdev([1.0, 0.5]))
  # A summary's seeds are its JSON keys, strings: in number order, not text order.
  assert stats.paired_difference({'10': 1.0, '2': 2.0}, {'10': 0.0, '2': 0.0})['seeds'] == [
      '2', '10']


def test_paired_steps_only_when_every_seed_of_both_reached():
  """A variant that misses the target on 2 of 3 seeds must not look faster from its one
  lucky seed: no paired difference of steps then, as no ratio."""
  reference = {1: 100.0, 2: 120.0, 3: 110.0}
  lucky = stats.paired_steps_difference({1: 40.0, 2: None, 3: None}, reference)
  assert lucky['mean'] is None and lucky['n'] == 0 and lucky['why'] == stats.NOT_EVERY_SEED
  assert stats.paired_steps_difference(reference, {1: 90.0, 2: None, 3: 95.0})['mean'] is None
  d = stats.paired_steps_difference({1: 50.0, 2: 65.0, 3: 52.0}, reference)
  differences = np.array([50.0, 65.0, 52.0]) - np.array([100.0, 120.0, 110.0])
  assert d['mean'] == pytest.approx(np.mean(differences)) and d['n'] == 3
  assert d['std'] == pytest.approx(np.std(differences, ddof=1)) and d['seeds'] == [1, 2, 3]


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
  m = ablate_runs.read_metrics(tmp_path)
  assert sorted(m['eval']) == [0, 2] and m['eval'][2]['eval/loss'] == 7.5
  assert m['train'][2]['train/loss'] == 9.5
  assert len(m['rows']) == 5


def test_elapsed_seconds_removes_idle_gap_of_a_restart():
  rows = [{'time': t} for t in (100.0, 110.0, 120.0, 500.0, 510.0)]
  # First process started at 90; the second at 480, 360 s after the last row at 120.
  assert ablate_runs.elapsed_seconds(rows, [90.0, 480.0]) == [0.0, 10.0, 20.0, 40.0, 50.0]
  assert ablate_runs.elapsed_seconds(rows, []) == [0.0, 10.0, 20.0, 400.0, 410.0]


def test_a_config_without_its_shards_is_refused_before_any_run(tmp_path):
  """configs/sym_small.py (the notebook's suggestion for a GPU) without
  --config.data.shards_dir: every run's trainer failed as it started, the grid said
  'Training standard seed 1 failed ... resumes from its last checkpoint', a folder made."""
  with pytest.raises(ablate.AblationError, match='config.data.shards_dir is not set'):
    ablate.run('configs/sym_small.py', 'standard', '1', str(tmp_path / 'abl'),
               ['--config.total_steps=10'], python='false')
  assert not (tmp_path / 'abl').exists()


def test_elapsed_seconds_leave_out_the_first_train_step_compilation():
  """The first process's compilation counted as training time: a variant's first seed
  compiled (12 s of a tiny run's 13 s) and its next seeds read the compilation cache (1 s),
  so train time and loss_vs_time measured the cache. A restart's compilation stays."""
  rows = [{'time': 100.0}, {'time': 115.0, 'perf/compile_seconds': 12.0}, {'time': 116.0},
          {'time': 500.0}, {'time': 530.0, 'perf/compile_seconds': 20.0}, {'time': 531.0}]
  assert ablate_runs.elapsed_seconds(rows, [90.0, 480.0]) == [0.0, 3.0, 4.0, 24.0, 54.0, 55.0]
  # Restarted before its first train row: the compilation logged is the restart's.
  rows = [{'time': 100.0}, {'time': 500.0, 'perf/compile_seconds': 20.0}, {'time': 501.0}]
  assert ablate_runs.elapsed_seconds(rows, [90.0, 480.0]) == [0.0, 20.0, 21.0]


def test_an_eval_before_the_first_train_row_leaves_out_the_compilation_too():
  """With eval_every_steps below log_every_steps, an eval row comes after the compilation
  and before the train row that logs it: that eval kept the compilation and the train row
  after it did not, so time ran backwards (0, 15, 6, 9) in loss_vs_time and train time."""
  rows = [{'step': 0, 'time': 100.0}, {'step': 5, 'time': 115.0},
          {'step': 10, 'time': 118.0, 'perf/compile_seconds': 12.0},
          {'step': 10, 'time': 121.0}]
  assert ablate_runs.elapsed_seconds(rows, []) == [0.0, 3.0, 6.0, 9.0]


def test_two_restarts_after_the_same_last_row_remove_its_idle_time_once():
  """A restart that left no kept row (killed in start-up, or its rows dropped by the next
  resume) and the one after it both started after the row at 150: each subtracted its gap
  from 150, so time ran backwards (60 s -> 10 s)."""
  rows = [{'time': t} for t in (100.0, 110.0, 120.0, 130.0, 140.0, 150.0, 310.0, 320.0)]
  elapsed = ablate_runs.elapsed_seconds(rows, [95.0, 200.0, 300.0])
  assert elapsed == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]
  assert elapsed == sorted(elapsed)


def test_a_non_finite_eval_written_as_null_is_a_diverged_point_not_a_crash(tmp_path):
  """The trainer writes a non-finite eval loss as null (strict JSON): float(None) stopped
  the whole summary."""
  cj = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30']).to_json()
  for seed in (1, 2):
    _fake_run(tmp_path, 'standard', seed, [(0, 12.0), (10, 6.0), (20, 5.0), (30, 4.0)], cj)
    _fake_run(tmp_path, 'symmetric', seed, [(0, 12.0), (10, None), (20, 4.1), (30, 3.9)], cj)
  out = ablate_report.summarize(tmp_path, ['standard', 'symmetric'], [1, 2], total_steps=30)
  sym = out['per_variant']['symmetric']
  # steps to target 4.2 from the finite points only: 0 (12.0) -> 20 (4.1), linear.
  crossing = 0 + (12.0 - 4.2) / (12.0 - 4.1) * 20
  assert out['target_loss']['value'] == pytest.approx(4.2)
  assert sym['steps_to_target']['per_seed'] == {'1': pytest.approx(crossing),
                                                '2': pytest.approx(crossing)}
  assert sym['final_eval_loss']['mean'] == pytest.approx(3.9)
  assert (tmp_path / 'summary.md').exists()
  # The variant with the null first (the plots' y-limits took its NaN), and a null final
  # eval of another seed: still a summary, in strict JSON (NaN written as null).
  _fake_run(tmp_path, 'symmetric', 3, [(0, 12.0), (10, 5.0), (20, 4.1), (30, None)], cj)
  ablate_report.summarize(tmp_path, ['symmetric', 'standard'], [1, 2, 3], total_steps=30)
  def refuse(constant):
    raise ValueError(f'{constant} in summary.json')
  summary = json.loads((tmp_path / 'summary.json').read_text(), parse_constant=refuse)
  assert summary['per_variant']['symmetric']['final_eval_loss_per_seed']['3'] is None
  assert (tmp_path / 'loss_vs_step.png').exists()


def test_the_plots_leave_a_notebooks_backend_alone(tmp_path):
  """ablate's and the GLUE sweep's plots switched matplotlib to Agg: in a notebook, every
  later plt.show() then showed nothing (the attention notebook's default path)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from bert_sym.glue import report as glue_report  # pylint: disable=g-import-not-at-top
  config_json = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=10']).to_json()
  before = matplotlib.get_backend()
  matplotlib.use('svg')   # stands for the notebook's inline backend
  try:
    for seed in (1, 2):
      _fake_run(tmp_path, 'standard', seed, [(0, 12.0), (10, 6.0)], config_json)
    ablate_report.summarize(tmp_path, ['standard'], [1, 2], total_steps=10)
    glue_report.plot_sweep(tmp_path / 'sweep.png', [{'step': 10, 'score': 50.0}])
    assert matplotlib.get_backend() == 'svg'
    assert (tmp_path / 'loss_vs_step.png').read_bytes()[:4] == b'\x89PNG'
    assert (tmp_path / 'sweep.png').read_bytes()[:4] == b'\x89PNG'
  finally:
    matplotlib.use(before)


def test_the_summary_leaves_the_notebooks_jax_backend_unstarted():
  """ablate.run in a notebook kernel: counting the parameters for the summary started JAX's
  backend there (jax.default_backend()), which on Colab holds the GPU or TPU the next
  call's trainers need."""
  code = ('from jax._src import xla_bridge\n'
          'from bert_sym.ablate import report\n'
          'from tests import ablate_fixtures as fx\n'
          'from bert_sym import ablate\n'
          'cost = report._model_cost(ablate.resolve_config(fx.CONFIG, []))\n'
          'print(cost["params_encoder_pooler"] > 0, xla_bridge.backends_are_initialized())\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=fx.REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.stdout.split() == ['True', 'False'], result.stdout + result.stderr[-2000:]


def _fake_run(root, variant, seed, curve, config_json):
  """A finished run on disk without training: config.json, metrics, a finalized step dir."""
  path = root / variant / f'seed{seed}'
  (path / 'checkpoints' / str(curve[-1][0]) / 'state').mkdir(parents=True)
  (path / 'config.json').write_text(config_json)
  (path / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': s, 'time': 1000.0 + s, 'eval/loss': l,
                  'eval/mlm_accuracy': 0.1 + s / 1000})   # a value per step
      + '\n' for s, l in curve))
  return path


def test_summary_not_reached_and_ratio(tmp_path):
  config = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30'])
  cj = config.to_json()
  # Step 0 is the untrained model (12.0). Standard: mean first eval after step 0 = 6.0,
  # mean last 4.0 -> default target 6.0 - 0.9 * 2.0 = 4.2 (from step 0 it would be 4.8).
  curves = {
      ('standard', 1): [(0, 12.0), (10, 6.0), (20, 5.0), (30, 4.0)],
      ('standard', 2): [(0, 12.0), (10, 6.0), (20, 5.0), (30, 4.0)],
      ('pairwise', 1): [(0, 12.0), (10, 4.4), (20, 4.0), (30, 3.0)],
      ('pairwise', 2): [(0, 12.0), (10, 5.0), (20, 4.5), (30, 2.0)],
      ('symmetric', 1): [(0, 12.0), (10, 8.0), (20, 7.0), (30, 4.0)],
      ('symmetric', 2): [(0, 12.0), (10, 8.0), (20, 7.0), (30, 6.0)],   # never reaches 4.2
  }
  for (v, s), c in curves.items():
    _fake_run(tmp_path, v, s, c, cj)
  _fake_run(tmp_path, 'pairwise', 3, [(0, 12.0), (10, 9.0)], cj)   # unfinished (10/30)
  out = ablate_report.summarize(tmp_path, ['standard', 'symmetric', 'pairwise'], [1, 2, 3],
                                total_steps=30)
  target = 6.0 - 0.9 * (6.0 - 4.0)
  assert out['target_loss']['value'] == pytest.approx(target)
  assert 'first eval after step 0' in out['target_loss']['source']
  # The reference reaches its own default target in every seed: ratio 1.0, both counted.
  std = out['per_variant']['standard']['steps_to_target']
  crossing = 20 + (5.0 - target) / (5.0 - 4.0) * 10
  assert std['per_seed'] == {'1': pytest.approx(crossing), '2': pytest.approx(crossing)}
  assert std['reached'] == std['of'] == 2 and std['ratio_to_reference'] == 1.0
  pw = out['per_variant']['pairwise']['steps_to_target']
  pw_hand = [10 + (4.4 - target) / (4.4 - 4.0) * 10, 20 + (4.5 - target) / (4.5 - 2.0) * 10]
  assert [pw['per_seed'][k] for k in ('1', '2')] == pytest.approx(pw_hand)
  assert pw['std'] == pytest.approx(statistics.stdev(pw_hand))
  assert pw['ratio_to_reference'] == pytest.approx(statistics.mean(pw_hand) / crossing)
  paired = out['per_variant']['pairwise']['paired_vs_reference']
  assert paired['final_eval_loss']['mean'] == pytest.approx(statistics.mean([-1.0, -2.0]))
  assert paired['steps_to_target']['mean'] == pytest.approx(statistics.mean(pw_hand) - crossing)
  # One symmetric seed never reaches the target: counted as such, and no ratio.
  sym = out['per_variant']['symmetric']['steps_to_target']
  assert sym['reached'] == 1 and sym['per_seed']['2'] is None
  assert sym['ratio_to_reference'] is None
  assert out['per_variant']['symmetric']['paired_vs_reference']['steps_to_target'][
      'mean'] is None
  assert 'pairwise/seed3' in out['excluded'] and out['runs']['pairwise'] == [1, 2]
  # The final eval's accuracy (step 30's), and the tokens a step reads (loss_vs_tokens' x).
  assert out['per_variant']['pairwise']['final_eval_mlm_accuracy']['mean'] == pytest.approx(0.13)
  assert out['per_variant']['pairwise']['tokens_per_step'] == (
      config.batch_size * config.data.max_seq_len)
  md = (tmp_path / 'summary.md').read_text()
  assert '| symmetric | 1,2 |' in md and '(n=1/2)' in md and 'Columns:' in md
  rows = {}   # the main table's (the first table's) rows, by variant
  for line in md.splitlines():
    if line.startswith('| '):
      rows.setdefault(line.split(' | ')[0][2:], line.split(' | '))
  paired_steps = rows['variant'].index('paired Δ steps')
  assert rows['symmetric'][paired_steps] == '—'     # 1 of 2 seeds reached: not defined
  assert rows['pairwise'][paired_steps].endswith('(n=2)')
  assert 'only when every seed of both reached the target' in md
  assert out['per_variant']['pairwise']['final_eval_loss']['ci95'] == pytest.approx(list(
      scipy.stats.ttest_1samp([2.0, 3.0], 0).confidence_interval()))
  for name in ('loss_vs_step.png', 'loss_vs_tokens.png', 'loss_vs_time.png'):
    assert (tmp_path / name).stat().st_size > 1000
  # --target_loss overrides the default: 6.0 is reached by every seed of every variant.
  out = ablate_report.summarize(tmp_path, ['standard', 'symmetric', 'pairwise'], [1, 2],
                                total_steps=30, target_loss=6.0, plots=False)
  assert out['per_variant']['symmetric']['steps_to_target']['ratio_to_reference'] == (
      pytest.approx(statistics.mean([20 + 10 / 3, 30.0]) / 10.0))


def test_on_a_partial_grid_the_ratio_is_over_the_paired_seeds(tmp_path):
  """Standard finished seeds 1-4, pairwise 1-3 (its seed 4 unfinished). The ratio divided
  pairwise's mean over 1-3 by standard's over 1-4: 1.04, slower, beside a paired difference
  on seeds 1-3 that said faster. Both are over the seeds both finished."""
  cj = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30']).to_json()
  tail = [(20, 4.0), (30, 3.0)]
  first = {('standard', 1): 6.0, ('standard', 2): 7.0, ('standard', 3): 5.5,
           ('standard', 4): 4.5, ('pairwise', 1): 5.8, ('pairwise', 2): 6.5,
           ('pairwise', 3): 5.2}   # eval loss at step 10 (4.5 at step 20 on seed 2)
  curves = {k: dict([(0, 12.0), (10, v)] + ([(20, 4.5), (30, 3.0)] if k[1] == 2 else tail))
            for k, v in first.items()}
  for (v, s), c in curves.items():
    _fake_run(tmp_path, v, s, sorted(c.items()), cj)
  _fake_run(tmp_path, 'pairwise', 4, [(0, 12.0), (10, 9.0)], cj)   # unfinished (10/30)
  out = ablate_report.summarize(tmp_path, ['standard', 'pairwise'], [1, 2, 3, 4],
                                total_steps=30, target_loss=5.0, plots=False)
  hand = {k: _hand_crossing(c, 5.0).expected for k, c in curves.items()}
  std, pw = (np.array([hand[v, s] for s in (1, 2, 3)]) for v in ('standard', 'pairwise'))
  # The case: faster on the same seeds; slower against all of standard's (seed 4 is quick).
  assert np.mean(pw - std) < 0 and np.mean(pw) / np.mean(std.tolist() + [hand['standard', 4]]) > 1
  st = out['per_variant']['pairwise']['steps_to_target']
  paired = out['per_variant']['pairwise']['paired_vs_reference']['steps_to_target']
  assert paired['mean'] == pytest.approx(np.mean(pw - std)) and paired['n'] == 3
  assert st['ratio_to_reference'] == pytest.approx(np.mean(pw) / np.mean(std))
  assert st['ratio_seeds'] == [1, 2, 3]
  ci = scipy.stats.bootstrap((pw, std), lambda a, b, axis=-1: np.mean(a, axis) / np.mean(
      b, axis), paired=True, n_resamples=100_000, method='percentile', random_state=1,
                             vectorized=True).confidence_interval
  assert st['ratio_ci95'] == pytest.approx([ci.low, ci.high], abs=0.025 * (ci.high - ci.low))
  row = next(line.split(' | ') for line in (tmp_path / 'summary.md').read_text().splitlines()
             if line.startswith('| pairwise |'))
  assert row[8].startswith('-1 [') and row[9].startswith(f'{np.mean(pw) / np.mean(std):.2f} [')


def test_a_finished_checkpoint_without_its_final_eval_is_not_a_finished_run(tmp_path):
  """A run preempted in its last step saves, then evaluates; killed in that eval it has its
  final checkpoint but no final eval row. It counted as finished: the summary stopped on
  'The runs end at different steps [20, 30] ... pass the same --config.total_steps', and a
  run without metrics.jsonl was an IndexError traceback."""
  cj = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30']).to_json()
  curve = [(0, 12.0), (10, 6.0), (20, 5.0), (30, 4.0)]
  for seed in (1, 2, 3):
    _fake_run(tmp_path, 'standard', seed, curve, cj)
  killed_in_eval, lost = (tmp_path / 'standard' / f'seed{s}' for s in (2, 3))
  (killed_in_eval / 'metrics.jsonl').write_text(''.join(
      (killed_in_eval / 'metrics.jsonl').read_text().splitlines(keepends=True)[:-1]))
  (lost / 'metrics.jsonl').unlink()
  assert ablate.run_status(killed_in_eval, 30) == (
      False, 'checkpoint at step 30 but no eval at it in metrics.jsonl (stopped during its '
      'final eval; the runner reruns the trainer, which adds it)')
  out = ablate_report.summarize(tmp_path, ['standard'], [1, 2, 3], total_steps=30,
                                plots=False)
  assert out['runs'] == {'standard': [1]}
  assert set(out['excluded']) == {'standard/seed2', 'standard/seed3'}
  assert out['excluded']['standard/seed3'].startswith(
      'checkpoint at step 30 but no metrics.jsonl: its eval curve is lost.')


def test_the_runner_refuses_a_run_whose_eval_curve_is_lost(tmp_path):
  """Rerun by the trainer, a finished run without metrics.jsonl got its final eval alone:
  a one-point curve, averaged with the others unseen."""
  cj = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30', '--config.seed=1',
                                         '--config.model.attention=standard']).to_json()
  (_fake_run(tmp_path, 'standard', 1, [(0, 12.0), (30, 4.0)], cj) / 'metrics.jsonl').unlink()
  python = _fake_trainer(tmp_path, [0])
  with pytest.raises(ablate.AblationError, match='standard/seed1.*no metrics.jsonl.*move'):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.total_steps=30'],
               python=python)
  assert not (tmp_path / 'calls').exists()   # nothing trained


def test_config_differences_name_the_changed_keys():
  requested = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30'])
  saved = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30', '--config.seed=2',
                                            '--config.model.attention=standard',
                                            '--config.optimizer.learning_rate=0.5'])
  assert ablate.config_differences(requested, saved, 'standard', 2) == [
      'optimizer.learning_rate']


def test_a_relative_data_path_is_no_config_difference(tmp_path, monkeypatch):
  """The trainer saves data paths made absolute; the same relative path asked again is the
  same config, not a 'trained with a config that differs' note on every rerun."""
  monkeypatch.chdir(tmp_path)
  relative = ['--config.data.task=bert_sym_mlm_text_files',
              '--config.data.text_files=corpus/train.txt', '--config.data.source=shards',
              '--config.data.shards_dir=shards']
  requested = ablate.resolve_config(os.path.join(fx.REPO_ROOT, fx.CONFIG), relative)
  saved = ml_collections.ConfigDict(json.loads(json.dumps(requested.to_dict())))
  saved.model.attention, saved.seed = 'pairwise', 3   # as the runner's run wrote it
  assert saved.data.text_files == str(tmp_path / 'corpus' / 'train.txt')
  assert ablate.config_differences(requested, saved, 'pairwise', 3) == []
  saved.data.shards_dir = str(tmp_path / 'other')
  assert ablate.config_differences(requested, saved, 'pairwise', 3) == ['data.shards_dir']


def _fake_trainer(tmp_path, exit_codes):
  """A stand-in for `python -m bert_sym.train`: exits with the next of `exit_codes` on each
  call (the real trainer's codes are checked in tests/test_train.py)."""
  script = tmp_path / 'fake_python'
  script.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import pathlib, sys
      calls = pathlib.Path({str(tmp_path / 'calls')!r})
      n = len(calls.read_text().splitlines()) if calls.exists() else 0
      with calls.open('a') as f:
        f.write(' '.join(sys.argv[1:]) + '\\n')
      print('trainer call', n + 1)
      sys.exit({list(exit_codes)!r}[n])
      """))
  script.chmod(0o755)
  return str(script)


def test_a_preempted_run_is_rerun_until_it_finishes(tmp_path, capsys):
  python = _fake_trainer(tmp_path, [42, 42, 0])
  runner.train_run('configs/tiny.py', ['--config.total_steps=6'], 'pairwise', 3,
                   tmp_path / 'run', runner._Stop(), python=python)
  calls = (tmp_path / 'calls').read_text().splitlines()
  assert len(calls) == 3 and len(set(calls)) == 1   # the same command each time: it resumes
  assert calls[0] == (f'-m bert_sym.train --config=configs/tiny.py --workdir={tmp_path / "run"} '
                      '--config.model.attention=pairwise --config.seed=3 --config.total_steps=6')
  assert capsys.readouterr().out.count('pairwise seed 3: preempted (exit 42); resuming.') == 2
  assert (tmp_path / 'run' / 'train.log').read_text().count('trainer call') == 3


def test_a_runs_train_log_shows_each_line_as_the_trainer_writes_it(tmp_path):
  """`tail -f train.log` showed a running trainer's output in 8 KB blocks (the log file was
  block-buffered): here the trainer waits, after its first line, until the test has read
  that line from the log."""
  go = tmp_path / 'go'
  script = tmp_path / 'waiting_python'
  script.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import pathlib, time
      print('first line', flush=True)
      deadline = time.monotonic() + 300   # the test's own deadline ends this one's wait
      while not pathlib.Path({str(go)!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
      print('last line')
      """))
  script.chmod(0o755)
  log = tmp_path / 'run' / 'train.log'
  trainer = threading.Thread(target=runner.train_run, args=(
      'configs/tiny.py', [], 'standard', 1, tmp_path / 'run', runner._Stop(), str(script)))
  trainer.start()
  try:
    deadline = time.monotonic() + 120   # generous: only a block-buffered log gets there
    while time.monotonic() < deadline and not (log.exists()
                                               and 'first line' in log.read_text()):
      time.sleep(0.05)
    assert 'first line' in log.read_text() and trainer.is_alive()
  finally:
    go.touch()
    trainer.join(timeout=300)
  assert log.read_text().endswith('first line\nlast line\n')


@pytest.mark.parametrize('codes, stop_requested, expected', [
    ([130], False, 'stopped 130'),      # Ctrl-C: the trainer saved; the grid stops
    ([42], True, 'stopped 42'),         # SIGTERM to the runner itself: no rerun
    ([1], False, 'failed'),             # a failed run stops the grid, naming its log
    ([42] * 3, False, 'preempted 2 times in a row'),
])
def test_a_run_that_cannot_go_on_stops_the_grid(tmp_path, codes, stop_requested, expected):
  stop = runner._Stop()
  stop.requested = stop_requested
  with pytest.raises((runner.Stopped, runner.AblationError)) as error:
    runner.train_run('configs/tiny.py', [], 'standard', 1, tmp_path / 'run', stop,
                     python=_fake_trainer(tmp_path, codes), max_restarts=2)
  if expected.startswith('stopped'):
    assert isinstance(error.value, runner.Stopped)
    assert error.value.exit_code == int(expected.split()[1])
  else:
    assert isinstance(error.value, runner.AblationError)
    assert expected in str(error.value)
    if expected == 'failed':
      assert str(tmp_path / 'run' / 'train.log') in str(error.value)
  assert len((tmp_path / 'calls').read_text().splitlines()) == len(codes)


@pytest.mark.parametrize('codes, stop_requested, expected', [
    ([130], False, 'stopped 130'),      # Ctrl-C: GLUE saved (bert_sym.glue exits 130)
    ([42], True, 'stopped 42'),         # SIGTERM to the runner itself: no rerun
    ([42, 42, 0], False, 'scored'),     # GLUE alone preempted: rerun, it resumes
    ([1], False, 'failed'),
])
def test_glue_stops_and_resumes_as_training_does(tmp_path, codes, stop_requested, expected):
  """The grid's GLUE step reads bert_sym.glue's exit codes as train_run reads the trainer's."""
  stop = runner._Stop()
  stop.requested = stop_requested
  run = tmp_path / 'run'
  run.mkdir()
  glue = dict(glue_dir='', tasks='rte', seeds='1', glue_args=[], stop=stop,
              python=_fake_trainer(tmp_path, codes), max_restarts=2)
  if expected == 'scored':
    runner.glue_run(run, **glue)
    assert (run / 'glue' / 'ablate_request.json').exists()
  else:
    with pytest.raises((runner.Stopped, runner.AblationError)) as error:
      runner.glue_run(run, **glue)
    if expected == 'failed':
      assert isinstance(error.value, runner.AblationError)
      assert str(run / 'glue' / 'glue.log') in str(error.value)
    else:
      assert isinstance(error.value, runner.Stopped)
      assert error.value.exit_code == int(expected.split()[1])
    assert not (run / 'glue' / 'ablate_request.json').exists()   # not scored: redone
  calls = (tmp_path / 'calls').read_text().splitlines()
  assert len(calls) == len(codes) and len(set(calls)) == 1   # the same command: it resumes


def test_bad_override_fails_before_training(tmp_path):
  """In the trainer's words: a mistyped key was a Python repr (quotes, a newline), and a
  bad value passed to each run's trainer, which refused it after the run's folder existed."""
  with pytest.raises(ablate.AblationError) as error:
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.model.atention=x'])
  assert str(error.value) == (
      "unknown config key 'atention' in --config.model.atention=x. Fix: did you mean "
      "'attention'? Every key must exist in the config file (python -m bert_sym.train "
      f'--config={fx.CONFIG} --help lists them).')
  with pytest.raises(ablate.AblationError, match=r'config.total_steps=-5 must be'):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.total_steps=-5'])
  with pytest.raises(ablate.AblationError, match='--variants'):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.seed=3'])
  # A key looked up inside a value: a TypeError traceback, or "unknown key 'Attribute'".
  with pytest.raises(ablate.AblationError, match=r"config.model.attention is a value"):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.model.attention.impl=x'])
  with pytest.raises(ablate.AblationError, match=r'config.model.remat is a value'):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.model.remat.policy=x'])
  # Runs without eval rows trained the whole grid, then the summary failed (IndexError).
  with pytest.raises(ablate.AblationError, match=r'eval_steps=0: .* Fix: eval_steps >= 1'):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.eval_steps=0'])
  # A group as a dict replaced it whole: "unknown config key 'fsdp'", though none was typed.
  with pytest.raises(ablate.AblationError, match=r'replaces the whole group config.mesh and '
                     r'leaves out fsdp, tensor. Fix: set its keys one by one: --config.mesh.data=2'):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ["--config.mesh={'data': 2}"])
  with pytest.raises(ablate.AblationError, match=r'names no config key'):   # the trainer's line
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.model..attention=x'])
  assert not list(tmp_path.iterdir())


def test_the_command_line_names_its_required_config_and_refuses_glue_dir_alone(tmp_path):
  """`--help` never mentioned --config, which is required; `--glue_dir` without
  `--glue_tasks` trained the grid and silently scored no GLUE at all."""
  command = [sys.executable, '-m', 'bert_sym.ablate']
  help_text = subprocess.run(command + ['--help'], cwd=fx.REPO_ROOT, capture_output=True,
                             text=True, timeout=120).stdout
  assert '--config (required)' in help_text and '--glue_tasks=rte,mrpc' in help_text
  result = subprocess.run(command + [f'--config={fx.CONFIG}', f'--workdir={tmp_path / "g"}',
                                     f'--glue_dir={tmp_path}'],
                          cwd=fx.REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
  assert 'no --glue_tasks' in result.stderr and not (tmp_path / 'g').exists()


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


def _hand_crossing(curve, target):
  steps = sorted(curve)
  for i, step in enumerate(steps):
    if curve[step] <= target:
      if i == 0:
        return pytest.approx(step)
      s0 = steps[i - 1]
      return pytest.approx(s0 + (curve[s0] - target) / (curve[s0] - curve[step]) * (step - s0))
  return None


def _assert_both_ratio_branches(workdir, curves):
  """Targets chosen from the curves themselves, so both branches run whatever training did:
  one every seed reaches (a ratio, equal to the hand value), one a pairwise seed misses."""
  every_seed_reaches = max(min(c.values()) for c in curves.values())
  out = ablate_report.summarize(workdir, fx.VARIANTS, fx.SEEDS, target_loss=every_seed_reaches,
                                plots=False)
  hand = {v: statistics.mean(_hand_crossing(curves[v, s], every_seed_reaches).expected
                             for s in fx.SEEDS) for v in fx.VARIANTS}
  pw = out['per_variant']['pairwise']['steps_to_target']
  assert pw['reached'] == len(fx.SEEDS)
  assert pw['ratio_to_reference'] == pytest.approx(hand['pairwise'] / hand['standard'])
  pairwise_misses = min(curves['pairwise', fx.SEEDS[0]].values()) - 1e-6
  out = ablate_report.summarize(workdir, fx.VARIANTS, fx.SEEDS, target_loss=pairwise_misses,
                                plots=False)
  pw = out['per_variant']['pairwise']['steps_to_target']
  assert pw['reached'] < len(fx.SEEDS) and pw['ratio_to_reference'] is None
  ablate_report.summarize(workdir, fx.VARIANTS, fx.SEEDS)   # the default summary back


def test_the_reading_says_which_paired_intervals_exclude_zero():
  """summary.md's answer to the paper's claim, checked against scipy's paired t test of
  the same losses: below 0, above 0, straddling 0, and no statistic at all."""
  seeds = [1, 2, 3, 4, 5, 6]
  rng = np.random.default_rng(0)
  standard = {s: 7.0 + 0.1 * rng.standard_normal() for s in seeds}
  losses = {'symmetric': {s: standard[s] - 0.05 + 0.005 * rng.standard_normal() for s in seeds},
            'pairwise': {s: standard[s] + (0.01 if s % 2 else -0.01) for s in seeds},
            'pairwise_diagonal': {s: standard[s] + 0.05 + 0.005 * rng.standard_normal()
                                  for s in seeds}}
  steps_standard = {s: 100.0 + s for s in seeds}
  per_variant = {v: {'paired_vs_reference': {
      'final_eval_loss': stats.paired_difference(loss, standard),
      'steps_to_target': stats.paired_steps_difference(
          {s: (None if v == 'pairwise' and s == 1 else 90.0 + s) for s in seeds},
          steps_standard)}} for v, loss in losses.items()}
  summary = {'target_loss': {'reference_variant': 'standard'}, 'final_step': 600,
             'variants': ['standard', *losses], 'runs': {v: seeds for v in losses},
             'per_variant': {'standard': {}, **per_variant}}
  lines = ablate_report.reading(summary)
  for v, loss in losses.items():
    low, high = scipy.stats.ttest_rel([loss[s] for s in seeds],
                                      [standard[s] for s in seeds]).confidence_interval()
    expected = ('lower than standard' if high < 0 else 'higher than standard' if low > 0
                else 'not separated from standard (the interval includes 0)')
    [line] = [l for l in lines if l.startswith(f'- {v} - standard, final eval loss:')]
    assert line.endswith(expected + '.'), (line, low, high)
  assert '- symmetric - standard, steps to target: -10 [-10, -10] over 6 seeds: fewer than ' \
         'standard.' in lines
  assert ('- pairwise - standard, steps to target: none (not every seed of both variants '
          'reached the target).') in lines
  assert not any(l.startswith('- No variant is separated') for l in lines)
  assert not any('a lead for more seeds' in l for l in lines)   # 6 seeds: no caveat
  # A separation smaller than the table's 4 decimals (the tiny grid's pairwise ended 3e-5
  # above standard on both seeds) was printed '+0.0000 [+0.0000, +0.0000] ...: higher'.
  tiny = stats.paired_difference({1: 7.00003, 2: 7.00004, 3: 7.000035},
                                 {1: 7.0, 2: 7.0, 3: 7.0})
  assert ablate_report._verdict(tiny, 4, 'standard', 'lower', 'higher') == (  # pylint: disable=protected-access
      '+3.5e-05 [+2.3e-05, +4.7e-05] over 3 seeds: higher than standard')
  # The caveat counts the seeds behind the intervals (a variant with 2 of the reference's
  # 6 finished), not the grid's largest count; a diverged run says so.
  two = dict(per_variant['symmetric']['paired_vs_reference'])
  two['final_eval_loss'] = stats.paired_difference({1: 6.9, 2: 6.9}, standard)
  lonely = dict(summary, variants=['standard', 'symmetric'],
                per_variant={'standard': {}, 'symmetric': {'paired_vs_reference': two}})
  assert ablate_report.reading(lonely)[-1] == (
      '- With 2 seed(s) the t interval rests on the differences being near normal, which '
      'so few cannot show: read a separation as a lead for more seeds, not a result.')
  nan = stats.paired_difference({1: float('nan'), 2: 7.0, 3: 7.1}, standard)
  assert ablate_report._verdict(nan, 4, 'standard', 'lower', 'higher') == (  # pylint: disable=protected-access
      'not finite over 3 seeds (a run diverged): nothing separated')
  # Nothing separated: the hint, with the grid's step and seeds.
  summary['variants'], summary['runs'] = ['standard', 'pairwise'], {v: seeds for v in losses}
  lines = ablate_report.reading(summary)
  assert lines[-1] == ('- No variant is separated from standard at step 600 with 6 seed(s). '
                       'More seeds (--seeds) narrow the intervals; more steps '
                       '(--config.total_steps) let the curves part.')


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
    low, high = scipy.stats.ttest_1samp(final, 0).confidence_interval()
    cell = f'{statistics.mean(final):.4f} [{low:.4f}, {high:.4f}]'
    assert f'| {v} | 1,2 |' in md and cell in md
    assert pv['final_eval_loss']['std'] == pytest.approx(statistics.stdev(final), abs=1e-9)
  # Steps to target by hand: the default target from standard's first eval after step 0
  # (step 2) and its last.
  first = statistics.mean(curves['standard', s][2] for s in fx.SEEDS)
  last = statistics.mean(curves['standard', s][fx.TOTAL_STEPS] for s in fx.SEEDS)
  target = first - stats.TARGET_FRACTION * (first - last)
  assert summary['target_loss']['value'] == pytest.approx(target, abs=1e-9)
  for v in fx.VARIANTS:
    st = summary['per_variant'][v]['steps_to_target']
    for s in fx.SEEDS:
      assert st['per_seed'][str(s)] == _hand_crossing(curves[v, s], target)
  _assert_both_ratio_branches(workdir, curves)
  # The reading: a line per variant and measure, in summary.json and summary.md alike.
  assert len(summary['reading']) >= 2 * (len(fx.VARIANTS) - 1)
  assert '\n'.join(summary['reading']) in md
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
  out = ablate.run(fx.CONFIG, 'standard,symmetric', '1', workdir, fx.overrides(),
                   summarize_only=True)
  assert out['actions'] == {'standard/seed1': 'skipped', 'symmetric/seed1': 'missing'}
  assert not os.path.exists(os.path.join(workdir, 'symmetric'))
  # The summary still covers the whole grid (the other tests read it).
  assert out['runs'] == {v: list(fx.SEEDS) for v in fx.VARIANTS}, out['runs']


def test_summarize_only_without_the_grids_overrides_names_them(tmp_path, capsys):
  """Runs finished at their own total_steps=30, summarized without --config.total_steps=30:
  each was 'checkpoint at step 30/N ... left out', not saying which flag was missing."""
  config = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30'])
  _fake_run(tmp_path, 'standard', 1, [(0, 12.0), (30, 4.0)], config.to_json())
  assert ablate.resolve_config(fx.CONFIG, []).total_steps != 30
  with pytest.raises(ablate.AblationError, match='No finished run'):
    ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), [], summarize_only=True)
  assert ('It finished its own total_steps=30: summarize with the overrides the grid was run '
          'with (--config.total_steps=30, ...)') in capsys.readouterr().out


def test_glue_scoring_through_the_runner():
  """glue_run, the GLUE columns of the summary and glue.png, on a tiny RTE directory."""
  workdir, _ = fx.tiny_grid()
  glue_args = ('--config.epochs=1 --config.max_seq_len=32 --config.batch_size=8 '
               '--config.progress_bar=False')
  out = ablate.run(fx.CONFIG, 'standard', '1', workdir, fx.overrides(),
                   glue_dir=fx.tiny_glue_dir(), glue_tasks='rte', glue_seeds='1',
                   glue_args=glue_args)
  glue = out['per_variant']['standard']['glue']
  assert 0.0 <= glue['rte']['mean'] <= 100.0
  scored = json.load(open(os.path.join(workdir, 'standard', 'seed1', 'glue',
                                       'glue_results.json')))
  assert out['per_variant']['standard']['glue_per_seed']['1']['rte'] == pytest.approx(
      scored['summary']['over_seeds']['rte']['mean'])
  assert os.path.getsize(os.path.join(workdir, 'glue.png')) > 1000
  assert '| standard | ' in open(os.path.join(workdir, 'summary.md')).read().split(
      'GLUE dev')[1]
  ablate.run(fx.CONFIG, ','.join(fx.VARIANTS), '1,2', workdir, fx.overrides(),
             summarize_only=True)


def test_glue_results_of_an_unfinished_glue_run_are_not_reported(tmp_path):
  """bert_sym.glue rewrites glue_results.json after each group of fine-tuning seeds. After
  a crash one run's RTE was the mean of 1 of 3 seeds, shown beside another's mean of 3
  unmarked. Only GLUE that ended (its request written back) counts, on the run's latest
  checkpoint."""
  config = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30'])
  curve = [(0, 12.0), (10, 6.0), (20, 5.0), (30, 4.0)]
  runs = {v: _fake_run(tmp_path, v, 1, curve, config.to_json()) for v in ('standard', 'pairwise')}
  for variant, rte in (('standard', 62.0), ('pairwise', 70.0)):
    (runs[variant] / 'glue').mkdir()
    (runs[variant] / 'glue' / 'glue_results.json').write_text(json.dumps(
        {'summary': {'over_seeds': {'rte': {'mean': rte, 'std': 0.0, 'n': 3}}}}))
  (runs['standard'] / 'glue' / 'ablate_request.json').write_text(json.dumps({'step': 30}))
  out = ablate_report.summarize(tmp_path, ['standard', 'pairwise'], [1], total_steps=30)
  assert out['per_variant']['standard']['glue']['rte']['mean'] == 62.0
  assert 'rte' not in out['per_variant']['pairwise']['glue'], out['per_variant']['pairwise']
  # Scored at step 20, then trained on to 30: that GLUE is not the run's.
  (runs['pairwise'] / 'glue' / 'ablate_request.json').write_text(json.dumps({'step': 20}))
  out = ablate_report.summarize(tmp_path, ['standard', 'pairwise'], [1], total_steps=30)
  assert 'rte' not in out['per_variant']['pairwise']['glue'], out['per_variant']['pairwise']
  (runs['pairwise'] / 'glue' / 'ablate_request.json').write_text(json.dumps({'step': 30}))
  out = ablate_report.summarize(tmp_path, ['standard', 'pairwise'], [1], total_steps=30)
  assert out['per_variant']['pairwise']['glue']['rte']['mean'] == 70.0
  assert 'Cut data' not in (tmp_path / 'summary.md').read_text()


def test_the_glue_table_says_when_its_scores_come_from_cut_sets(tmp_path):
  """GLUE run with runlocal's max_train_examples: each run's glue_results.md said "Cut
  data, not comparable with the paper", the ablation's summary.md, which sets the
  variants side by side, did not."""
  config = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30'])
  run = _fake_run(tmp_path, 'standard', 1, [(0, 12.0), (30, 4.0)], config.to_json())
  (run / 'glue').mkdir()
  (run / 'glue' / 'glue_results.json').write_text(json.dumps(
      {'summary': {'over_seeds': {'rte': {'mean': 62.0, 'std': 0.0, 'n': 1}}},
       'config': {'max_train_examples': 256, 'max_eval_examples': 0}}))
  (run / 'glue' / 'ablate_request.json').write_text(json.dumps({'step': 30}))
  out = ablate_report.summarize(tmp_path, ['standard'], [1], total_steps=30)
  assert list(out['per_variant']['standard']['glue']) == ['rte']   # not a score column
  table = (tmp_path / 'summary.md').read_text().split('GLUE dev')[1]
  assert '**Cut data, not comparable with the paper:** only the first 256 training ' \
      'examples' in table


def test_a_glue_rerun_with_another_request_unmarks_the_old_results_first(tmp_path):
  """A rerun with more seeds: while it runs, the old request's marker said "scored"."""
  run = tmp_path / 'run'
  (run / 'glue').mkdir(parents=True)
  (run / 'glue' / 'ablate_request.json').write_text(json.dumps({'seeds': '1'}))
  (run / 'glue' / 'glue_results.json').write_text('{}')
  seen = tmp_path / 'seen'
  python = _fake(tmp_path, f"""\
      import os, pathlib
      marker = {str(run / 'glue' / 'ablate_request.json')!r}
      pathlib.Path({str(seen)!r}).write_text(str(os.path.exists(marker)))
      """)
  runner.glue_run(run, glue_dir='', tasks='rte', seeds='1,2,3', glue_args=[],
                  stop=runner._Stop(), python=python)
  assert seen.read_text() == 'False'
  assert json.loads((run / 'glue' / 'ablate_request.json').read_text())['seeds'] == '1,2,3'


def test_a_glue_mean_over_fewer_pre_training_runs_says_so():
  """Seed 1 of a variant has its full GLUE, seed 2 only a partial one: the 'glue' column
  was seed 1's alone, shown as the variant's."""
  from bert_sym.ablate import report  # pylint: disable=g-import-not-at-top
  from bert_sym.glue import metrics as glue_metrics  # pylint: disable=g-import-not-at-top
  per_seed = {'1': {'glue': 80.0, 'rte': 60.0}, '2': {'glue_partial': 70.0, 'rte': 64.0}}
  names = ('glue', 'glue_partial', 'rte')
  summary = {'variants': ['pairwise'], 'per_variant': {'pairwise': {
      'steps_to_target': {'of': 2},
      'glue': {n: glue_metrics.mean_std([s.get(n) for s in per_seed.values()])
               for n in names}}}}
  [row] = [l for l in report._glue_table(summary) if l.startswith('| pairwise')]  # pylint: disable=protected-access
  assert row == '| pairwise | 62.00 ± 2.83 | 80.00 (n=1/2) | 70.00 (n=1/2) |'


def test_a_curve_already_below_target_at_its_first_eval_reaches_it_there():
  """Not interpolated from another eval (the last one gave -200), nor a division by zero."""
  assert stats.steps_to_target([0, 100], [3.0, 2.0], 5.0) == 0
  assert stats.steps_to_target([50], [3.0], 5.0) == 50


def test_unpaired_ratio_has_an_interval_when_one_side_has_a_single_seed():
  ratio = stats.steps_ratio({1: 50.0}, {2: 100.0, 3: 120.0})
  assert ratio['value'] == pytest.approx(50 / 110)
  assert ratio['ci95'] is not None and ratio['ci95'][0] < ratio['ci95'][1]


def _fake(tmp_path, body):
  script = tmp_path / 'fake_python'
  script.write_text(f'#!{sys.executable}\n' + textwrap.dedent(body))
  script.chmod(0o755)
  return str(script)


def test_a_trainer_killed_by_sigint_stops_the_grid(tmp_path):
  """A trainer killed by SIGINT before its own handler was in place is a Ctrl-C (the grid
  stops with 130), not a failed run."""
  python = _fake(tmp_path, """\
      import os, signal
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGINT)
      """)
  with pytest.raises(runner.Stopped) as error:
    runner.train_run('configs/tiny.py', [], 'standard', 1, tmp_path / 'run', runner._Stop(),
                     python=python)
  assert error.value.exit_code == runner.INTERRUPTED_EXIT_CODE


def test_a_trainer_killed_by_our_forwarded_sigterm_is_a_stop_not_a_failure(tmp_path):
  """A SIGTERM to the runner while its trainer starts up or prints its last lines (no
  handler of its own then) killed the trainer by the signal: the grid reported 'Training
  ... failed (exit code -15) ... Fix the cause', for a stop it had been asked for."""
  stop = runner._Stop()
  stop.requested = True
  python = _fake(tmp_path, """\
      import os, signal
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)
      """)
  with pytest.raises(runner.Stopped) as error:
    runner.train_run('configs/tiny.py', [], 'standard', 1, tmp_path / 'run', stop,
                     python=python)
  assert error.value.exit_code == runner.PREEMPTED_EXIT_CODE


def test_a_sigterm_while_a_trainer_finishes_stops_the_grid_before_the_next_run(tmp_path):
  """A SIGTERM that reached the runner as its trainer was finishing (the trainer exits 0)
  or between two runs was swallowed: the grid trained on and exited 0."""
  python = _fake(tmp_path, f"""\
      import os, signal
      with open({str(tmp_path / 'calls')!r}, 'a') as f:
        f.write('call\\n')
      signal.signal(signal.SIGTERM, signal.SIG_IGN)   # past its last step: it ends well
      os.kill(os.getppid(), signal.SIGTERM)   # and the runner is stopped meanwhile
      """)
  with pytest.raises(runner.Stopped) as error:
    ablate.run('configs/tiny.py', 'standard,pairwise', '1', str(tmp_path / 'grid'),
               python=python)
  assert error.value.exit_code == runner.PREEMPTED_EXIT_CODE
  assert (tmp_path / 'calls').read_text().splitlines() == ['call']   # no second run


def _ctrl_c_counting_trainer(tmp_path, send_to_group: bool) -> str:
  """A trainer that sends SIGINT to its runner (or the runner's process group), writes
  'SIGINT' once for each it receives, and exits 130 as after a save (0 if none came)."""
  target = 'os.killpg(os.getpgid(os.getppid()), ' if send_to_group else 'os.kill(os.getppid(), '
  return _fake(tmp_path, f"""\
      import os, signal, sys, time
      log = open({str(tmp_path / 'calls')!r}, 'a')
      log.write('call\\n'); log.flush()
      signal.signal(signal.SIGINT, lambda *_: (log.write('SIGINT\\n'), log.flush()))
      {target}signal.SIGINT)
      # Only a hang ends this wait: a starved runner forwards the Ctrl-C late, and one 5 s
      # deadline on a loaded CI machine let this trainer exit 0 before it came.
      end = time.time() + 100   # under the subprocess's 120 s timeout
      while time.time() < end and 'SIGINT' not in open(log.name).read():
        time.sleep(0.05)
      time.sleep(0.5)   # time for a second one to come
      sys.exit(130 if 'SIGINT' in open(log.name).read() else 0)
      """)


def test_a_ctrl_c_to_the_runner_alone_reaches_its_trainer_and_stops_the_grid(tmp_path):
  """A SIGINT to the runner alone (kill -INT, a notebook's interrupt) never reached the
  trainer: the runner said it waited for a save, waited for the trainer's last step, then
  trained the next run and exited 0."""
  python = _ctrl_c_counting_trainer(tmp_path, send_to_group=False)
  with pytest.raises(runner.Stopped) as error:
    ablate.run('configs/tiny.py', 'standard,pairwise', '1', str(tmp_path / 'grid'),
               python=python)
  assert error.value.exit_code == runner.INTERRUPTED_EXIT_CODE
  assert (tmp_path / 'calls').read_text().splitlines() == ['call', 'SIGINT']


def test_a_ctrl_c_while_a_trainer_starts_reaches_it(tmp_path, monkeypatch):
  """A Ctrl-C after the trainer started but before Popen returned (a runner descheduled
  there on a loaded machine): the runner, knowing no child yet, raised KeyboardInterrupt,
  and the trainer, in a group of its own, trained on unsignalled."""
  python = _fake(tmp_path, """\
      import time
      time.sleep(60)   # training; the forwarded Ctrl-C ends it (exit -2)
      """)
  real_popen = subprocess.Popen

  def popen_then_ctrl_c(cmd, *args, **kwargs):
    proc = real_popen(cmd, *args, **kwargs)
    if cmd[0] == python:
      os.kill(os.getpid(), signal.SIGINT)   # before the runner knows its trainer
    return proc
  monkeypatch.setattr(runner.subprocess, 'Popen', popen_then_ctrl_c)
  try:
    ablate.run('configs/tiny.py', 'standard', '1', str(tmp_path / 'grid'), python=python)
    error = None
  except BaseException as e:  # pylint: disable=broad-except
    error = e   # a KeyboardInterrupt too: here, not in pytest
  assert isinstance(error, runner.Stopped), repr(error)
  assert error.exit_code == runner.INTERRUPTED_EXIT_CODE


def test_a_ctrl_c_at_the_terminal_reaches_the_trainer_once(tmp_path):
  """A Ctrl-C to the runner's process group (a terminal's) that the runner forwards must
  not reach the trainer twice: a second Ctrl-C quits it without saving."""
  python = _ctrl_c_counting_trainer(tmp_path, send_to_group=True)
  script = textwrap.dedent(f"""\
      import sys
      from bert_sym.ablate import runner
      try:
        runner.run('configs/tiny.py', 'standard,pairwise', '1', {str(tmp_path / 'grid')!r},
                   python={python!r})
      except runner.Stopped as e:
        sys.exit(e.exit_code)
      """)
  proc = subprocess.run([sys.executable, '-c', script], cwd=fx.REPO_ROOT, capture_output=True,
                        text=True, timeout=120, start_new_session=True)   # a group of its own
  assert proc.returncode == runner.INTERRUPTED_EXIT_CODE, proc.stdout + proc.stderr
  assert (tmp_path / 'calls').read_text().splitlines() == ['call', 'SIGINT']


def test_a_run_does_not_outlive_a_runner_killed_with_its_process_group(tmp_path):
  """The run is in a process group of its own (so that a Ctrl-C reaches it once): a kill of
  the runner's group (kill -9 -PGID, a Jupyter kernel restart) left it training on,
  orphaned and holding its workdir. It now gets a SIGTERM when the runner dies, which the
  real trainer answers by saving and exiting 42."""
  python = _fake(tmp_path, f"""\
      import os, signal, sys, time
      sys.path.insert(0, {str(fx.REPO_ROOT)!r})
      from bert_sym import early_signals
      early_signals.take_them_until_started()
      def saved(*_):   # the real run's handler saves here (tests/test_train.py)
        open({str(tmp_path / 'signal')!r}, 'w').write('SIGTERM')
        os._exit(42)
      signal.signal(signal.SIGTERM, saved)
      # Whole when it appears (renamed into place): the test reads it as soon as it exists,
      # and read between open and write it was empty (int('') failed).
      with open({str(tmp_path / 'pid.tmp')!r}, 'w') as f:
        f.write(str(os.getpid()))
      os.replace({str(tmp_path / 'pid.tmp')!r}, {str(tmp_path / 'pid')!r})
      time.sleep(120)   # training
      """)
  script = textwrap.dedent(f"""\
      from bert_sym.ablate import runner
      runner.run('configs/tiny.py', 'standard', '1', {str(tmp_path / 'grid')!r},
                 python={python!r})
      """)
  grid_runner = subprocess.Popen([sys.executable, '-c', script], cwd=fx.REPO_ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)   # a terminal's group of its own
  pid_file = tmp_path / 'pid'
  deadline = time.time() + 60
  while not pid_file.exists() and time.time() < deadline:
    time.sleep(0.05)
  trainer = int(pid_file.read_text())
  os.killpg(grid_runner.pid, signal.SIGKILL)
  grid_runner.wait(timeout=60)
  deadline = time.time() + 30
  while os.path.exists(f'/proc/{trainer}') and time.time() < deadline:
    time.sleep(0.05)
  alive = os.path.exists(f'/proc/{trainer}')
  if alive:
    os.kill(trainer, signal.SIGKILL)
  assert not alive, 'the run outlived its runner'
  assert (tmp_path / 'signal').read_text() == 'SIGTERM'


def test_a_run_whose_runner_died_saves_though_its_output_pipe_is_closed(tmp_path):
  """After the runner died, the run's first line written (a progress line, its stop line)
  met the closed pipe: a BrokenPipeError ended it before it saved. What it writes is
  dropped; its checkpoint is saved."""
  script = textwrap.dedent(f"""\
      import os, sys
      sys.path.insert(0, {str(fx.REPO_ROOT)!r})
      os.environ['BERT_SYM_STOP_WITH_PARENT'] = str(os.getppid())
      from bert_sym import early_signals
      early_signals.stop_with_parent()
      sys.stdin.read()   # until the reader of its output has gone
      print('step 10/100 | loss 7.0', flush=True)
      sys.stderr.write('a warning\\n')
      open({str(tmp_path / 'saved')!r}, 'w').write('saved')
      """)
  child = subprocess.Popen([sys.executable, '-c', script], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  child.stdout.close()   # the runner's end of the pipe, gone with it
  child.stdin.close()
  child.wait(timeout=60)
  assert (tmp_path / 'saved').exists()


def test_the_runner_shows_its_runs_warnings_and_keeps_info_lines_for_the_log(tmp_path,
                                                                            capsys):
  """absl's WARNING lines of a run (e.g. a text file read as a few huge documents) went to
  train.log only, where the trainer itself shows them on the console."""
  python = _fake(tmp_path, """\
      print('I1208 00:00:00.000001 1 train.py:1] an info line')
      print('W1208 00:00:00.000002 1 sources.py:254] corpus.txt is read as documents ...')
      print('step 1/1 | loss 7.0')
      """)
  stop = runner._Stop()
  code = runner._stream([python], tmp_path / 'train.log', stop)
  shown = capsys.readouterr().out
  assert code == 0 and 'step 1/1' in shown and 'sources.py:254] corpus.txt' in shown, shown
  assert 'an info line' not in shown and 'an info line' in (tmp_path / 'train.log').read_text()


def test_glue_killed_by_our_forwarded_sigterm_is_a_stop_not_a_failure(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  stop = runner._Stop()
  stop.requested = True
  with pytest.raises(runner.Stopped) as error:
    runner.glue_run(run, glue_dir='', tasks='rte', seeds='1', glue_args=[], stop=stop,
                    python=_fake(tmp_path, 'import sys; sys.exit(-15 & 0xff)\n'))
  assert error.value.exit_code == runner.PREEMPTED_EXIT_CODE


def test_glue_is_rerun_when_its_marker_exists_but_its_results_do_not(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  calls = tmp_path / 'calls'
  python = _fake(tmp_path, f"""\
      import pathlib
      pathlib.Path({str(calls)!r}).open('a').write('x\\n')
      """)
  glue = dict(glue_dir='', tasks='rte', seeds='1', glue_args=[], stop=runner._Stop(),
              python=python)
  runner.glue_run(run, **glue)          # writes the marker; the fake writes no results
  assert (run / 'glue' / 'ablate_request.json').exists()
  runner.glue_run(run, **glue)          # no glue_results.json: not "already scored"
  assert len(calls.read_text().splitlines()) == 2


def test_an_unknown_variant_fails_before_training(tmp_path):
  calls = tmp_path / 'calls'
  python = _fake(tmp_path, f"""\
      import pathlib, sys
      pathlib.Path({str(calls)!r}).open('a').write('x\\n')
      sys.exit(1)
      """)
  with pytest.raises(runner.AblationError, match='Unknown variant'):
    runner.run('configs/tiny.py', 'no_such_variant', '1', str(tmp_path / 'grid'),
               python=python)
  assert not calls.exists()


def test_a_seed_or_variant_listed_twice_is_one_run_in_the_summary(tmp_path):
  """Lists (the notebook's SEEDS, VARIANTS) were taken as given, not as '1,1' is: seed 1
  listed twice was counted twice, in every mean (here 4.0 of seeds 1, 1, 2, not 5.0) and
  every interval."""
  for variant in ('standard', 'pairwise'):
    for seed, final in ((1, 3.0), (2, 7.0)):
      config = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30'])
      config.model.attention, config.seed = variant, seed
      _fake_run(tmp_path, variant, seed, [(0, 12.0), (10, 9.0), (30, final)], config.to_json())
  out = ablate.run(fx.CONFIG, ['standard', 'pairwise', 'standard'], [1, 1, 2], str(tmp_path),
                   ['--config.total_steps=30'], summarize_only=True)
  assert out['variants'] == ['standard', 'pairwise']
  assert out['runs'] == {'standard': [1, 2], 'pairwise': [1, 2]}
  assert out['per_variant']['standard']['final_eval_loss']['mean'] == 5.0
  assert out['per_variant']['standard']['final_eval_loss']['n'] == 2


def test_a_seed_that_is_not_an_integer_fails_in_one_line(tmp_path):
  """--seeds=1,x was a ValueError traceback."""
  with pytest.raises(runner.AblationError) as error:
    runner.run('configs/tiny.py', 'standard', '1,x', str(tmp_path / 'grid'))
  assert str(error.value) == ("Seeds must be comma-separated integers, got '1,x'. Fix: e.g. "
                              '--seeds=1,2,3.')
  assert not list(tmp_path.iterdir())


def test_a_negative_seed_is_refused_before_anything_trains(tmp_path):
  """--seeds=-1 trained into seed-1, a folder the whole grid's summary did not read as a
  seed: a later command's summary left that run out, unnamed."""
  result = subprocess.run(   # (--summarize_only: the old code's failure was quick too)
      [sys.executable, '-m', 'bert_sym.ablate', f'--config={fx.CONFIG}', '--seeds=1,-1',
       f'--workdir={tmp_path / "grid"}', '--summarize_only'], cwd=fx.REPO_ROOT,
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and result.stderr.strip() == (
      'bert_sym.ablate: error: --seeds: seeds must be non-negative integers (each names its '
      'run folder, seed<S>), got -1. Fix: e.g. --seeds=1,2,3.'), result.stderr
  python = _fake_trainer(tmp_path, [0, 0])
  with pytest.raises(runner.AblationError, match='--seeds: .* got -3. Fix'):   # a notebook's
    runner.run('configs/tiny.py', 'standard', [2, -3], str(tmp_path / 'grid'), python=python)
  assert not (tmp_path / 'calls').exists() and not (tmp_path / 'grid').exists()


def test_an_empty_seed_or_variant_list_names_its_flag_and_a_fix(tmp_path):
  """--seeds= (or --variants=,) said "Empty list: ''." and nothing else."""
  for variants, seeds, said in (('standard', '', "--seeds is empty ('')"),
                                (',', '1', "--variants is empty (',')")):
    with pytest.raises(runner.AblationError) as error:
      runner.run('configs/tiny.py', variants, seeds, str(tmp_path / 'grid'))
    assert str(error.value).startswith(said) and 'Fix: name at least one, e.g. --' in str(
        error.value)
  assert not list(tmp_path.iterdir())


def test_glue_inputs_are_checked_before_the_grid_trains(tmp_path):
  """A wrong --glue_dir, task or GLUE seed failed only in the first run's GLUE step, after
  its pre-training (hours at scale); the GLUE module's own checks now run first."""
  grid = tmp_path / 'grid'
  glue_dir = fx.tiny_glue_dir()
  for kwargs, message in (
      (dict(glue_dir=str(tmp_path / 'nowhere')), 'GLUE data, checked before training: '
       f'--glue_dir {tmp_path / "nowhere"} is not a directory'),
      (dict(glue_dir=glue_dir, glue_tasks='rtx'), r"Unknown GLUE task\(s\) \['rtx'\]"),
      (dict(glue_dir=glue_dir, glue_seeds='x'), 'Seeds must be comma-separated integers'),
      (dict(glue_dir=glue_dir, glue_tasks='rte,mrpc'), 'GLUE data, checked before training: '
       '.*MRPC')):   # the tiny GLUE directory holds RTE alone
    with pytest.raises(runner.AblationError, match=message):
      runner.run('configs/tiny.py', 'standard', '1', str(grid),
                 **{'glue_tasks': 'rte', **kwargs})
    assert not list(tmp_path.iterdir())
  # GLUE's own config may name its data: the runner leaves that to bert_sym.glue (a
  # directory that does not exist here would fail the check, were it made).
  for args in ([f'--config.glue_dir={tmp_path / "nowhere"}'], ['--config', 'my_glue.py'],
               [f'--glue_dir={tmp_path / "nowhere"}']):
    runner.check_glue_inputs(str(tmp_path / 'nowhere'), 'rte', '1', args, data=True)


def test_a_scored_grid_needs_no_glue_data_to_summarize_again(tmp_path, capsys):
  """Rerunning a finished grid whose GLUE is scored reads no GLUE data (it may be on
  another machine, or TFDS offline): the check before training is only for training."""
  config = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30'])
  config.model.attention, config.seed = 'standard', 1   # what the runner gives the run
  run = _fake_run(tmp_path, 'standard', 1, [(0, 12.0), (30, 4.0)], config.to_json())
  nowhere = str(tmp_path / 'nowhere')
  (run / 'glue').mkdir()
  (run / 'glue' / 'glue_results.json').write_text(json.dumps(
      {'summary': {'over_seeds': {'rte': {'mean': 60.0, 'std': 0.0, 'n': 1}}}}))
  (run / 'glue' / 'ablate_request.json').write_text(json.dumps(
      {'glue_dir': nowhere, 'tasks': 'rte', 'seeds': '1', 'args': [], 'step': 30}))
  out = ablate.run(fx.CONFIG, 'standard', '1', str(tmp_path), ['--config.total_steps=30'],
                   glue_dir=nowhere, glue_tasks='rte')
  assert out['actions'] == {'standard/seed1': 'skipped'}
  assert 'GLUE already scored, skipped' in capsys.readouterr().out


def test_a_difference_that_rounds_to_zero_has_no_sign():
  """'-0 [-0, 0]' read as a difference in the paired Δ steps column."""
  cell = ablate_report._fmt_ci  # pylint: disable=protected-access
  assert cell({'mean': -0.3, 'ci95': [-0.4, 0.2], 'n': 3}, 0, True) == '0 [0, 0] (n=3)'
  assert cell({'mean': -0.00004, 'ci95': [-1.23456, 0.00001]}, 4) == '0.0000 [-1.2346, 0.0000]'
  assert cell({'mean': -2.6, 'ci95': None}, 0) == '-3'


def test_a_tiny_paired_loss_difference_keeps_its_digits_in_the_table():
  """The main table printed the tiny grid's paired Δ loss (3e-5 on both seeds) as
  '0.0000 [0.0000, 0.0000]' while the reading below it said 'higher than standard'."""
  cell = ablate_report._fmt_paired  # pylint: disable=protected-access
  tiny = stats.paired_difference({1: 7.00003, 2: 7.00004, 3: 7.000035},
                                 {1: 7.0, 2: 7.0, 3: 7.0})
  assert cell(tiny, 4) == '+3.5e-05 [+2.3e-05, +4.7e-05]'
  assert cell({'mean': -0.01234, 'ci95': [-0.02, 0.0]}, 4) == '-0.0123 [-0.0200, +0.0000]'
  assert cell({'mean': 0.5, 'ci95': None}, 4) == '+0.5000'
  assert cell({'mean': None}, 4) == '—'


def test_a_paired_steps_difference_under_one_step_keeps_its_digits_in_the_table(tmp_path):
  """The paired Δ steps column rounded to whole steps: pairwise crossing the target 0.2
  steps before standard on every seed read '0 [0, 0] (n=3)' in the table, while the
  reading below it said 'fewer than standard'."""
  cj = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30']).to_json()
  for seed in (1, 2, 3):
    _fake_run(tmp_path, 'standard', seed, [(0, 12.0), (10, 6.0), (20, 5.0), (30, 4.0)], cj)
    _fake_run(tmp_path, 'pairwise', seed,
              [(0, 12.0), (10, 6.0), (20, 5.0 - 0.01 * (seed + 2)), (30, 4.0 - 0.001 * seed)],
              cj)
  out = ablate_report.summarize(tmp_path, ['standard', 'pairwise'], [1, 2, 3],
                                total_steps=30, target_loss=4.5)
  paired = out['per_variant']['pairwise']['paired_vs_reference']['steps_to_target']
  assert -0.5 < paired['mean'] < 0 and paired['ci95'][1] < 0
  (reading,) = [line for line in out['reading'] if 'steps to target' in line]
  assert 'fewer than standard' in reading
  md = (tmp_path / 'summary.md').read_text()
  header, row = [line.split(' | ') for line in md.splitlines()
                 if line.startswith(('| variant |', '| pairwise |'))][:2]
  cell = row[header.index('paired Δ steps')]
  assert cell.endswith(' (n=3)') and cell.removesuffix(' (n=3)') in reading, (cell, reading)


def test_a_run_trained_with_another_config_is_never_averaged_with_the_grid(tmp_path, capsys):
  """A finished run whose config.json differs from the grid's (here its learning rate) was
  skipped with a note and then averaged with the rest in summary.json / summary.md."""
  overrides = ['--config.total_steps=30']
  curve = [(0, 12.0), (10, 6.0), (20, 5.0), (30, 4.0)]
  for variant in ('standard', 'pairwise'):
    for seed in (1, 2):
      odd = ['--config.optimizer.learning_rate=0.5'] if (variant, seed) == ('pairwise', 2) else []
      # How a run was carried out (its checkpoint cadence, remat) is not another experiment.
      how = (['--config.checkpoint.keep_last=7', '--config.model.remat=True']
             if (variant, seed) == ('standard', 2) else [])
      config = ablate.resolve_config(fx.CONFIG, overrides + odd + how)
      config.model.attention, config.seed = variant, seed
      written = json.loads(config.to_json())
      if (variant, seed) == ('pairwise', 1):   # written before prng_impl existed (threefry)
        del written['prng_impl']
      _fake_run(tmp_path, variant, seed, curve if not odd else [(s, l - 1) for s, l in curve],
                json.dumps(written))
  out = ablate.run(fx.CONFIG, 'standard,pairwise', '1,2', str(tmp_path), overrides,
                   summarize_only=True)
  assert out['runs'] == {'standard': [1, 2], 'pairwise': [1]}
  assert 'optimizer.learning_rate' in out['excluded']['pairwise/seed2']
  assert out['per_variant']['pairwise']['final_eval_loss']['mean'] == 4.0
  assert 'pairwise/seed2 (trained with another config' in (tmp_path / 'summary.md').read_text()
  assert 'left out of the summary' in capsys.readouterr().out
  # Without the grid's config, runs that disagree are refused rather than averaged.
  with pytest.raises(ablate.AblationError, match='optimizer.learning_rate'):
    ablate_report.summarize(tmp_path, ['standard', 'pairwise'], [1, 2], total_steps=30,
                            plots=False)


def test_a_command_that_adds_to_a_grid_summarizes_the_whole_grid(tmp_path, capsys):
  """A grid grown by a second command (`--variants=symmetric`, or one more seed) had its
  summary.* replaced by that command's part: symmetric compared with itself, the
  standard reference and the first command's rows gone from the files."""
  overrides = ['--config.total_steps=30']
  for variant, seed in (('standard', 1), ('standard', 2), ('symmetric', 1), ('symmetric', 2)):
    config = ablate.resolve_config(fx.CONFIG, overrides)
    config.model.attention, config.seed = variant, seed
    _fake_run(tmp_path, variant, seed, [(0, 12.0), (10, 6.0), (30, 4.0 + seed / 10)],
              config.to_json())
  (tmp_path / 'pairwise' / 'seed9').mkdir(parents=True)   # no config.json: not a run
  out = ablate.run(fx.CONFIG, 'symmetric', '2', str(tmp_path), overrides, summarize_only=True)
  assert out['runs'] == {'symmetric': [1, 2], 'standard': [1, 2]}, out['runs']
  assert out['seeds'] == [1, 2] and 'pairwise/seed9' not in out['excluded'], out
  paired = out['per_variant']['symmetric']['paired_vs_reference']['final_eval_loss']
  assert paired['n'] == 2, paired   # against standard, over both seeds
  assert json.loads((tmp_path / 'summary.json').read_text())['runs'] == out['runs']
  assert ('Summary over every run in ' in capsys.readouterr().out)


def test_runs_a_changed_setting_leaves_out_are_named_with_how_to_retrain_them(tmp_path,
                                                                             capsys):
  """A changed setting plus a new seed trains the new seed alone; the grid's older seeds,
  trained with the old setting, are left out of its summary. Not named by the command, they
  were dropped without a word on the console (its 'Summary over every run ... seeds 1, 2, 3'
  read as if they counted), and nothing said how to retrain them."""
  old, new = ['--config.total_steps=30'], ['--config.total_steps=30',
                                           '--config.optimizer.learning_rate=5e-4']
  for seed, overrides in ((1, old), (2, old), (3, new)):
    config = ablate.resolve_config(fx.CONFIG, overrides)
    config.model.attention, config.seed = 'standard', seed
    _fake_run(tmp_path, 'standard', seed, [(0, 12.0), (10, 6.0), (30, 4.0)], config.to_json())
  out = ablate.run(fx.CONFIG, 'standard', '3', str(tmp_path), new, summarize_only=True)
  assert out['runs'] == {'standard': [3]}
  said = [line for line in capsys.readouterr().out.splitlines() if 'left out' in line]
  assert said == [
      'Note: 2 finished run(s) are left out of the summary, trained with a config that '
      'differs from the requested one in: standard/seed1 (optimizer.learning_rate); '
      'standard/seed2 (optimizer.learning_rate). To retrain them with this one, move their '
      'folders away and rerun naming them (--variants=standard --seeds=1,2 without '
      '--summarize_only); to summarize '
      'them, rerun with the config they were trained with.'], said


# Every key that decides what a grid run computes, as of 2026-12-06 (the grid's runs on
# record were written with these or fewer). Edit only with the decision below.
_EXPERIMENT_KEYS_ON_RECORD = set("""
    batch_size data.mask_rate data.max_predictions_per_seq data.max_seq_len data.shards_dir
    data.shuffle data.source data.task data.text_files data.validation_files data.vocab_path
    data.whole_word_masking eval_every_steps eval_steps model.attention
    model.attention_dropout_rate model.dropout_rate model.dtype model.hidden_size
    model.initializer_range model.layer_norm_eps model.max_position_embeddings model.mlp_dim
    model.num_heads model.num_layers model.pairwise_init_std model.sparse_mlm
    model.type_vocab_size model.vocab_size optimizer.b1 optimizer.b2 optimizer.eps
    optimizer.grad_accum_steps optimizer.grad_clip_norm optimizer.learning_rate
    optimizer.warmup_steps optimizer.weight_decay seed total_steps""".split())


def _leaf_keys(tree, prefix=''):
  return [key for k, v in tree.items() for key in (
      _leaf_keys(v, f'{prefix}{k}.') if isinstance(v, dict) else [prefix + k])]


def test_a_new_training_config_key_is_classified_for_the_grid():
  """A key added to the training config is missing from every config.json written before
  it: unless the grid knows the value those runs had, config_differences names it and every
  older run is left out of the summary (prng_impl did that). The failure says what to do."""
  keys = set(_leaf_keys(ablate.resolve_config(fx.CONFIG, []).to_dict()))
  unclassified = sorted(k for k in keys - _EXPERIMENT_KEYS_ON_RECORD
                        if not k.startswith(ablate_runs.NOT_THE_EXPERIMENT)
                        and k not in ablate_runs.DEFAULTS_OF_NEWER_KEYS)
  assert not unclassified, (
      f'New config keys {unclassified}: add each to bert_sym/ablate/runs.py '
      'DEFAULTS_OF_NEWER_KEYS (with the value runs had before it existed) or, if it only '
      'changes how a run is carried out, NOT_THE_EXPERIMENT; then to the set above.')
  # An older run without the newer keys is still one of the grid (and one with another
  # value of a newer key is not).
  config = ablate.resolve_config(fx.CONFIG, [])
  written = ml_collections.ConfigDict(config.to_dict())
  for key in ablate_runs.DEFAULTS_OF_NEWER_KEYS:
    config[key] = ablate_runs.DEFAULTS_OF_NEWER_KEYS[key]
    del written[key]
  assert ablate_runs.config_differences(config, written) == []


def test_an_unfinished_run_of_another_config_is_not_resumed_into_a_mix(tmp_path):
  """The runner resumed an unfinished run whatever config its checkpoint was trained with:
  the trainer only logs the difference (a W line the runner keeps off the console) and
  rewrites config.json, so the run went on as a mix that the summary could not see."""
  overrides = ['--config.total_steps=30']
  old = ablate.resolve_config(fx.CONFIG, overrides + ['--config.optimizer.learning_rate=0.5'])
  old.model.attention, old.seed = 'standard', 1
  _fake_run(tmp_path / 'grid', 'standard', 1, [(0, 12.0), (10, 6.0)], old.to_json())
  python = _fake_trainer(tmp_path, [0])
  with pytest.raises(ablate.AblationError, match=r'standard/seed1 \(checkpoint at step 10; '
                     r'optimizer.learning_rate\)'):
    runner.run(fx.CONFIG, 'standard', '1', str(tmp_path / 'grid'), overrides, python=python)
  assert not (tmp_path / 'calls').exists()   # nothing trained


def test_a_reference_seed_with_a_non_finite_final_eval_leaves_the_default_target_finite(
    tmp_path):
  """One standard seed whose last eval is NaN made the default target NaN: every variant
  then read 'not reached', pairwise too, whose curves end far below any target."""
  cj = ablate.resolve_config(fx.CONFIG, ['--config.total_steps=30']).to_json()
  _fake_run(tmp_path, 'standard', 1, [(0, 12.0), (10, 6.0), (20, 5.0), (30, 4.0)], cj)
  _fake_run(tmp_path, 'standard', 2, [(0, 12.0), (10, 6.0), (20, 5.0), (30, None)], cj)
  for seed in (1, 2):
    _fake_run(tmp_path, 'pairwise', seed, [(0, 12.0), (10, 5.0), (20, 4.0), (30, 3.0)], cj)
  out = ablate_report.summarize(tmp_path, ['standard', 'pairwise'], [1, 2], total_steps=30,
                                plots=False)
  assert out['target_loss']['value'] == pytest.approx(6.0 - 0.9 * (6.0 - 4.0))
  assert 'left out: 2' in out['target_loss']['source']
  pw = out['per_variant']['pairwise']['steps_to_target']
  assert pw['reached'] == 2 and pw['per_seed']['1'] == pytest.approx(10 + 0.8 / 1.0 * 10)
