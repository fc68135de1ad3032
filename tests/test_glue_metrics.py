"""glue_metrics: metrics against hand-computed values and the definitions; GLUE aggregation.

Production calls scikit-learn and scipy, so the references here are independent: values
worked out by hand, the textbook formulas in NumPy, and the paper's published numbers.
"""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics

from bert_sym.glue import metrics as glue_metrics


def test_binary_metrics_equal_the_hand_computed_confusion_matrix():
  labels = [1, 1, 1, 0, 0, 0, 1, 0]
  predictions = [1, 1, 0, 0, 0, 1, 1, 1]
  # TP = 3 (positions 0, 1, 6), FN = 1 (2), FP = 2 (5, 7), TN = 2 (3, 4).
  assert glue_metrics.accuracy(labels, predictions) == pytest.approx(5 / 8)
  assert glue_metrics.f1(labels, predictions) == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
  # (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)) = 4 / sqrt(5 * 4 * 4 * 3)
  assert glue_metrics.matthews_corrcoef(labels, predictions) == pytest.approx(
      4 / np.sqrt(240))


def _gorodkin_rk(labels, predictions):
  """Multi-class MCC (Gorodkin 2004) from its confusion-matrix definition."""
  k = max(max(labels), max(predictions)) + 1
  c = np.zeros((k, k))
  np.add.at(c, (labels, predictions), 1)
  t, p, n = c.sum(1), c.sum(0), c.sum()
  denominator = np.sqrt((n * n - t @ t) * (n * n - p @ p))
  return 0.0 if denominator == 0 else (np.trace(c) * n - t @ p) / denominator


@pytest.mark.parametrize('n,k', [(50, 2), (200, 3), (17, 2)])
def test_matthews_equals_its_definition_and_degenerate_cases_are_zero(n, k):
  rng = np.random.default_rng(n)
  labels = rng.integers(0, k, n)
  noisy = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
  for predictions in (noisy, labels, np.zeros(n, int)):
    assert glue_metrics.matthews_corrcoef(labels, predictions) == pytest.approx(
        _gorodkin_rk(labels, predictions), abs=1e-12)
  assert glue_metrics.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
  assert glue_metrics.matthews_corrcoef(labels, np.zeros(n, int)) == 0.0   # one class
  assert glue_metrics.f1([0, 0, 0], [0, 0, 0]) == 0.0    # no positive label or prediction


def test_correlations_equal_their_definitions_with_ties():
  x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
  # Ranks are the values: rho = 1 - 6 sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 120.
  assert glue_metrics.spearman(x, y) == pytest.approx(0.8)
  assert glue_metrics.pearson(x, y) == pytest.approx(0.8)
  rng = np.random.default_rng(1)
  labels = np.round(rng.uniform(0, 5, 500) * 5) / 5   # STS-B gold: multiples of 0.2, ties
  predictions = np.round(labels + rng.normal(0, 1.5, 500))
  assert glue_metrics.pearson(labels, predictions) == pytest.approx(
      np.corrcoef(labels, predictions)[0, 1], abs=1e-12)
  # Ties share the mean of their ranks: [1.0, 2.2, 2.2, 3.0] ranks as [1, 2.5, 2.5, 4].
  assert glue_metrics.spearman([1.0, 2.2, 2.2, 3.0], [1, 2, 3, 4]) == pytest.approx(
      np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])


@pytest.mark.parametrize('constant', [np.full(7, 0.1), np.full(7, 3.0), np.zeros(7)])
def test_correlation_with_a_constant_vector_is_zero_not_nan(constant):
  """scipy's NaN (with a ConstantInputWarning) would make STS-B, and GLUE, NaN: 0.0 here.

  0.1 is not exactly representable, so np.mean of the seven copies differs from 0.1: the
  constancy check must not rely on the centred values being exactly zero.
  """
  labels = np.array([0.0, 1.2, 2.4, 3.0, 4.4, 5.0, 1.8])
  with pytest.warns(stats.ConstantInputWarning):
    assert np.isnan(stats.pearsonr(labels, constant).statistic)   # the rule replaced
  for x, y in ((labels, constant), (constant, labels), (constant, constant)):
    assert glue_metrics.pearson(x, y) == 0.0
    assert glue_metrics.spearman(x, y) == 0.0
  result = glue_metrics.score('stsb', labels, constant)
  assert result == {'pearson': 0.0, 'spearman': 0.0, 'score': 0.0}
  summary = glue_metrics.summarize({1: {'stsb': result['score'], 'rte': 60.0}})
  assert summary['per_seed'][1]['glue_partial'] == pytest.approx(30.0)   # finite


def test_correlations_near_constant_are_not_the_zero_rule():
  """One differing value is not constant: the correlation itself, not the 0.0 rule."""
  labels = np.array([0.0, 1.2, 2.4, 3.0, 4.4, 5.0, 1.8])
  almost = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.5])
  assert glue_metrics.pearson(labels, almost) == pytest.approx(
      np.corrcoef(labels, almost)[0, 1], abs=1e-12)
  assert glue_metrics.pearson(labels, almost) != 0.0
  with pytest.raises(ValueError, match='one length'):
    glue_metrics.pearson(labels, almost[:-1])


def test_task_scores_follow_the_paper():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 2, 300)
  p = np.where(rng.random(300) < 0.8, y, 1 - y)
  acc, f1 = metrics.accuracy_score(y, p), metrics.f1_score(y, p)
  for name in ('mrpc', 'qqp'):
    assert glue_metrics.score(name, y, p)['score'] == pytest.approx(100 * (acc + f1) / 2)
  assert glue_metrics.score('cola', y, p)['score'] == pytest.approx(
      100 * metrics.matthews_corrcoef(y, p))
  for name in ('mnli_m', 'mnli_mm', 'qnli', 'rte', 'sst2', 'wnli'):
    assert glue_metrics.score(name, y, p)['score'] == pytest.approx(100 * acc)
  s, t = rng.uniform(0, 5, 100), rng.uniform(0, 5, 100)
  assert glue_metrics.score('stsb', s, t)['score'] == pytest.approx(
      100 * (stats.pearsonr(s, t).statistic + stats.spearmanr(s, t).statistic) / 2)
  with pytest.raises(ValueError, match='Unknown GLUE score'):
    glue_metrics.score('mnli', y, p)
  with pytest.raises(ValueError, match='labels but'):
    glue_metrics.score('rte', y, p[:-1])


def test_glue_is_mean_of_nine_and_full_adds_wnli():
  scores = dict(zip(glue_metrics.FULL_SCORES, np.arange(10.0) * 7 + 1))
  agg = glue_metrics.glue_aggregates(scores)
  nine = [scores[n] for n in glue_metrics.GLUE_SCORES]
  assert agg['glue'] == pytest.approx(np.mean(nine))
  assert agg['glue_full'] == pytest.approx(np.mean(nine + [scores['wnli']]))
  assert agg['glue_partial'] is None and agg['glue_full_partial'] is None


def test_the_paper_table_row_reproduces_its_glue():
  # base pairwise row of PAPER.md: the 9 numbers average to the published 79.36.
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
