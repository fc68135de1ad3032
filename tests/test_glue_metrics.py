"""glue_metrics: scores against values worked out by hand; GLUE aggregation rules.

Production calls scikit-learn and scipy; the expected numbers here are computed by hand (in
the comments), so the test does not compare a library call with itself.
"""

import math

import numpy as np
import pytest
from scipy import stats

from bert_sym.glue import metrics as glue_metrics

# A binary dev set of 10: TP = 3, FN = 1, FP = 1, TN = 5.
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PREDICTIONS = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])


def test_classification_scores_by_hand():
  # accuracy = (3 + 5) / 10 = 0.8;  F1 = 2 TP / (2 TP + FP + FN) = 6 / 8 = 0.75;
  # MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (15 - 1) / sqrt(4*4*6*6)
  #     = 14 / 24.
  for name in ('mrpc', 'qqp'):   # the paper: mean of accuracy and F1
    assert glue_metrics.score(name, LABELS, PREDICTIONS) == pytest.approx(
        {'accuracy': 0.8, 'f1': 0.75, 'score': 77.5})
  assert glue_metrics.score('cola', LABELS, PREDICTIONS) == pytest.approx(
      {'matthews_corrcoef': 14 / 24, 'score': 100 * 14 / 24})
  for name in ('mnli_m', 'mnli_mm', 'qnli', 'rte', 'sst2', 'wnli'):
    assert glue_metrics.score(name, LABELS, PREDICTIONS) == pytest.approx(
        {'accuracy': 0.8, 'score': 80.0})


def test_degenerate_classification_scores():
  # Every answer wrong: MCC = (0 - 2 * 2) / sqrt(2 * 2 * 2 * 2) = -1.
  assert glue_metrics.score('cola', [0, 0, 1, 1], [1, 1, 0, 0])['score'] == pytest.approx(-100)
  # One predicted class: MCC's denominator is 0, reported as 0.0 (not NaN).
  assert glue_metrics.score('cola', LABELS, np.zeros(10, int))['score'] == 0.0
  # No positive label or prediction: F1 = 0 / 0, reported as 0.0; accuracy 1.
  assert glue_metrics.score('mrpc', [0, 0, 0], [0, 0, 0]) == {
      'accuracy': 1.0, 'f1': 0.0, 'score': 50.0}


def test_stsb_correlations_by_hand():
  # x - mean = (-2, -1, 0, 1, 2), y - mean = (-2, 0, 1, 0, 1): Pearson = 6 / sqrt(10 * 6).
  # Tied ranks share their mean: rank(y) = (1, 2.5, 4.5, 2.5, 4.5), centred
  # (-2, -0.5, 1.5, -0.5, 1.5): Spearman = 7 / sqrt(10 * 9).
  result = glue_metrics.score('stsb', [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 5.0, 4.0, 5.0])
  pearson, spearman = 6 / math.sqrt(60), 7 / math.sqrt(90)
  assert result == pytest.approx(
      {'pearson': pearson, 'spearman': spearman, 'score': 100 * (pearson + spearman) / 2})


STSB_LABELS = np.array([0.0, 1.2, 2.4, 3.0, 4.4, 5.0, 1.8])


@pytest.mark.parametrize('constant', [np.full(7, 0.1), np.full(7, 3.0), np.zeros(7)])
def test_correlation_with_a_constant_vector_is_zero_not_nan(constant):
  """scipy's NaN (with a ConstantInputWarning) would make STS-B, and GLUE, NaN: 0.0 here.

  0.1 is not exactly representable, so np.mean of the seven copies differs from 0.1: the
  constancy check must not rely on the centred values being exactly zero.
  """
  with pytest.warns(stats.ConstantInputWarning):
    assert np.isnan(stats.pearsonr(STSB_LABELS, constant).statistic)   # the rule replaced
  for x, y in ((STSB_LABELS, constant), (constant, STSB_LABELS), (constant, constant)):
    assert glue_metrics.score('stsb', x, y) == {'pearson': 0.0, 'spearman': 0.0, 'score': 0.0}
  summary = glue_metrics.summarize({1: {'stsb': 0.0, 'rte': 60.0}})
  assert summary['per_seed'][1]['glue_partial'] == pytest.approx(30.0)   # finite


def test_correlations_near_constant_are_not_zeroed():
  """One differing value is not constant: the true correlation, not the 0.0 rule."""
  almost = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.5])
  # almost - mean = 0.5 * (e_7 - 1/7), so Pearson = 0.5 dx_7 / sqrt(sum(dx^2) * 0.25 * 6/7),
  # dx = labels - mean. Ranks: labels' 7th (1.8) ranks 3 of 7, centred -1, sum of squares
  # 28; almost's ranks (3.5 x 6, 7) centred (-0.5 x 6, 3), sum of squares 10.5; Spearman =
  # 3.5 * -1 / sqrt(28 * 10.5) = -0.5 / sqrt(6).
  dx = STSB_LABELS - STSB_LABELS.mean()
  result = glue_metrics.score('stsb', STSB_LABELS, almost)
  assert result['pearson'] == pytest.approx(0.5 * dx[6] / math.sqrt(dx @ dx * 1.5 / 7))
  assert result['spearman'] == pytest.approx(-0.5 / math.sqrt(6))
  assert result['pearson'] < 0 and result['spearman'] < 0


def test_score_input_errors():
  with pytest.raises(ValueError, match='Unknown GLUE score'):
    glue_metrics.score('mnli', LABELS, PREDICTIONS)
  with pytest.raises(ValueError, match='labels but'):
    glue_metrics.score('rte', LABELS, PREDICTIONS[:-1])
  with pytest.raises(ValueError, match='empty dev set'):
    glue_metrics.score('stsb', [], [])


def test_glue_is_mean_of_nine_and_full_adds_wnli():
  scores = dict(zip(glue_metrics.FULL_SCORES, np.arange(10.0) * 7 + 1))
  agg = glue_metrics.glue_aggregates(scores)
  nine = [scores[n] for n in glue_metrics.GLUE_SCORES]
  assert agg['glue'] == pytest.approx(np.mean(nine))
  assert agg['glue_full'] == pytest.approx(np.mean(nine + [scores['wnli']]))
  assert agg['glue_partial'] is None and agg['glue_full_partial'] is None


def test_the_paper_table_row_reproduces_its_glue():
  # base pairwise row of the paper's GLUE table (Courtois et al., Findings of ACL 2024): the 9 numbers average to the published 79.36.
  row = dict(mrpc=87.83, cola=46.91, mnli_m=81.60, mnli_mm=82.02, qqp=88.89, rte=60.58,
             stsb=86.88, qnli=88.78, sst2=90.78, wnli=34.93)
  assert glue_metrics.glue_aggregates(row)['glue'] == pytest.approx(79.36, abs=0.005)


def test_missing_task_is_never_a_zero():
  scores = {'cola': 40.0, 'rte': 60.0, 'wnli': 30.0}
  agg = glue_metrics.glue_aggregates(scores)
  assert agg['glue'] is None and agg['glue_full'] is None
  assert agg['glue_partial'] == pytest.approx(50.0)           # not (40 + 60) / 9
  assert agg['glue_full_partial'] == pytest.approx(130 / 3)
  assert agg['glue_tasks'] == ['cola', 'rte']


def test_summary_over_seeds():
  per_seed = {1: {'cola': 40.0, 'rte': 60.0}, 2: {'cola': 44.0, 'rte': 62.0}, 3: {'cola': 42.0}}
  summary = glue_metrics.summarize(per_seed)
  assert summary['over_seeds']['cola'] == {'mean': 42.0, 'std': pytest.approx(2.0), 'n': 3}
  assert summary['over_seeds']['rte']['n'] == 2
  assert summary['over_seeds']['mrpc'] == {'mean': None, 'std': None, 'n': 0}
  assert summary['per_seed'][3]['glue_partial'] == 42.0
  one_seed = glue_metrics.summarize({1: {'cola': 40.0}})['over_seeds']['cola']
  assert one_seed == {'mean': 40.0, 'std': None, 'n': 1}      # no spread from one seed


def test_glue_over_seeds_is_complete_only_when_every_seed_is(tmp_path):
  """--tasks=mnli --seeds=1, then the other 8 tasks with --seeds=1,2,3 into one directory:
  seed 1's GLUE alone must not stand unmarked as the mean over seeds beside task columns
  over 3 seeds. The mean row is partial: over the 7 tasks every seed has."""
  from bert_sym.glue import report   # pylint: disable=g-import-not-at-top
  base = {'mrpc': 80.0, 'cola': 40.0, 'qqp': 85.0, 'rte': 60.0, 'stsb': 85.0, 'qnli': 88.0,
          'sst2': 90.0, 'wnli': 50.0}
  per_seed = {s: {n: v + 10.0 * s for n, v in base.items()} for s in (1, 2, 3)}
  per_seed[1].update(mnli_m=80.0, mnli_mm=81.0)
  over = glue_metrics.summarize(per_seed)['over_seeds']
  assert over['glue'] == {'mean': None, 'std': None, 'n': 0}
  seven = ['mrpc', 'cola', 'qqp', 'rte', 'stsb', 'qnli', 'sst2']
  by_seed = np.array([[per_seed[s][n] for n in seven] for s in (1, 2, 3)]).mean(axis=1)
  partial = over['glue_partial']
  assert partial['mean'] == pytest.approx(np.mean(by_seed)) and partial['n'] == 3
  assert partial['std'] == pytest.approx(np.std(by_seed, ddof=1))
  assert partial['tasks'] == seven and partial['seeds'] == [1, 2, 3]
  assert over['glue_full_partial']['tasks'] == seven + ['wnli']
  runs = {n: {str(s): {'scores': {n: {'score': per_seed[s][n]}}} for s in (1, 2, 3)
              if n in per_seed[s]} for n in glue_metrics.FULL_SCORES}
  results = {'checkpoint': 'CKPT', 'step': 1, 'recipe': 'r', 'seeds': [1, 2, 3], 'runs': runs,
             'model': {'attention': 'standard', 'num_layers': 2, 'hidden_size': 8}}
  report.write_results(tmp_path, results)
  mean_row = next(line for line in (tmp_path / 'glue_results.md').read_text().splitlines()
                  if line.startswith('| mean ± std'))
  assert mean_row.split(' | ')[1] == (f'{np.mean(by_seed):.2f} ± '
                                      f'{np.std(by_seed, ddof=1):.2f} (partial 7/9)')
  assert report.sweep_point(1, results)['score_kind'] == 'glue_partial (7/9)'
  # Every task of seed 1 and none of seed 2 yet: 1 of 2 seeds, said so.
  summary = glue_metrics.summarize({1: {n: 50.0 for n in glue_metrics.FULL_SCORES}, 2: {}})
  assert summary['over_seeds']['glue']['n'] == 0
  assert summary['over_seeds']['glue_partial']['seeds'] == [1]
  point = report.sweep_point(1, {'summary': summary})
  assert point['score'] == 50.0 and point['score_kind'] == 'glue_partial (9/9, 1 of 2 seeds)'
  # Every seed complete: GLUE over seeds as before, no partial.
  complete = {s: {n: 50.0 + s for n in glue_metrics.FULL_SCORES} for s in (1, 2)}
  over = glue_metrics.summarize(complete)['over_seeds']
  assert over['glue']['mean'] == pytest.approx(51.5) and over['glue']['n'] == 2
  assert over['glue_partial']['n'] == 0


def test_the_table_cells_of_one_seed_of_two_tasks(tmp_path):
  """Per-seed rows count partial GLUE over 9 tasks, a capped dev set is said, and the mean
  row names how many seeds it is over."""
  from bert_sym.glue import report   # pylint: disable=g-import-not-at-top
  runs = {n: {'1': {'scores': {n: {'score': 51.0}}}} for n in ('cola', 'rte')}
  report.write_results(tmp_path, {
      'checkpoint': 'C', 'step': 1, 'recipe': 'r', 'seeds': [1], 'runs': runs,
      'model': {'attention': 'standard', 'num_layers': 2, 'hidden_size': 8},
      'config': {'max_train_examples': 24, 'max_eval_examples': 20}})
  table = (tmp_path / 'glue_results.md').read_text()
  seed_row = next(line for line in table.splitlines() if line.startswith('| 1 |'))
  assert seed_row.split(' | ')[1] == '51.00 (partial 2/9)'
  assert 'only the first 20 dev-set examples' in table and '| mean (1 seed) |' in table
  # Full data (0 = every example, the paper's runs) is not called cut; one cut is itself.
  for cut, said in (({'max_train_examples': 0, 'max_eval_examples': 0}, None),
                    ({'max_train_examples': 0, 'max_eval_examples': 20},
                     'only the first 20 dev-set examples (config')):
    report.write_results(tmp_path, {
        'checkpoint': 'C', 'step': 1, 'recipe': 'r', 'seeds': [1], 'runs': runs,
        'model': {'attention': 'standard', 'num_layers': 2, 'hidden_size': 8},
        'config': cut})
    table = (tmp_path / 'glue_results.md').read_text()
    assert ('Cut data' in table) == (said is not None) and (said is None or said in table)


def test_a_sweep_points_full_glue_counts_wnli():
  from bert_sym.glue import report   # pylint: disable=g-import-not-at-top
  scores = dict({n: 50.0 for n in glue_metrics.FULL_SCORES}, wnli=0.0)
  point = report.sweep_point(1, {'summary': glue_metrics.summarize({1: scores})})
  assert point['score'] == 50.0
  assert point['glue_full'] == pytest.approx(np.mean([scores[n] for n in glue_metrics.FULL_SCORES]))


def test_regression_predictions_and_labels_round_trip_float32():
  from bert_sym.glue import data as glue_data   # pylint: disable=g-import-not-at-top
  from bert_sym.glue import report   # pylint: disable=g-import-not-at-top
  dev = glue_data.Examples(np.arange(1), ([''],), np.array([1.2345678], np.float32))
  prediction = np.array([3.14159274], np.float32)
  row = report.predictions_tsv(dev, prediction, True).splitlines()[1].split('\t')
  assert np.float32(row[2]) == prediction[0] and np.float32(row[1]) == dev.labels[0]


def test_only_process_0_writes_the_outputs(tmp_path, monkeypatch):
  from bert_sym.glue import report   # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(report.jax, 'process_index', lambda: 1)
  report.write_on_process_0(tmp_path / 'x', 'y')
  assert not (tmp_path / 'x').exists()
  monkeypatch.setattr(report.jax, 'process_index', lambda: 0)
  report.write_on_process_0(tmp_path / 'x', 'y')
  assert (tmp_path / 'x').read_text() == 'y'


# From a mutation audit (a partial GLUE table is not a complete one).

def test_one_missing_task_keeps_glue_partial():
  # All nine GLUE tasks but no WNLI: 'glue' is complete, 'glue_full' is not (9 of 10).
  scores = {n: float(i + 1) for i, n in enumerate(glue_metrics.GLUE_SCORES)}
  agg = glue_metrics.glue_aggregates(scores)
  assert agg['glue'] == pytest.approx(5.0) and agg['glue_partial'] is None
  assert agg['glue_full'] is None
  assert agg['glue_full_partial'] == pytest.approx(5.0)
  assert agg['glue_full_tasks'] == list(glue_metrics.GLUE_SCORES)
  # Eight of nine: no headline GLUE either.
  del scores['sst2']
  agg = glue_metrics.glue_aggregates(scores)
  assert agg['glue'] is None and agg['glue_partial'] == pytest.approx(4.5)
