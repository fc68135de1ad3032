"""GLUE metrics (scikit-learn, scipy) and the paper's score definitions.

Scores are reported as percentages (x100), as in the paper's tables:

  CoLA            Matthews correlation
  STS-B           mean of Pearson and Spearman correlation
  MRPC, QQP       mean of accuracy and F1 (positive class = 1)
  MNLI-m/-mm, QNLI, RTE, SST-2, WNLI   accuracy

  GLUE (headline) = unweighted mean of the 9 numbers MRPC, CoLA, MNLI-m, MNLI-mm, QQP, RTE,
                    STS-B, QNLI, SST-2 (WNLI excluded);  GLUE full = those 9 plus WNLI.

A task that was not run is missing, never a 0. When any of the averaged tasks is missing the
GLUE score itself is `None` and a separately named *partial* score (mean over the tasks
present, with their list) is given instead, so a partial number can never be mistaken for
the paper's headline.

Degenerate input: a correlation with a constant vector (e.g. an early pre-training
checkpoint whose STS-B head predicts one value for every pair) is undefined; scipy returns
NaN, which would turn the STS-B score and with it the whole GLUE mean into NaN. Here it is
0.0 ("no association"), the convention scikit-learn's `matthews_corrcoef` uses for its own
degenerate case. F1 with no positive label or prediction is 0.0 too (zero_division=0).
"""

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

# Score names, in the column order of the paper's results table.
GLUE_SCORES = ('mrpc', 'cola', 'mnli_m', 'mnli_mm', 'qqp', 'rte', 'stsb', 'qnli', 'sst2')
FULL_SCORES = GLUE_SCORES + ('wnli',)

SCORE_TITLES = {
    'mrpc': 'MRPC', 'cola': 'CoLA', 'mnli_m': 'MNLI-m', 'mnli_mm': 'MNLI-mm', 'qqp': 'QQP',
    'rte': 'RTE', 'stsb': 'STS-B', 'qnli': 'QNLI', 'sst2': 'SST-2', 'wnli': 'WNLI',
}


def accuracy(labels, predictions) -> float:
  return float(sk_metrics.accuracy_score(labels, predictions))


def f1(labels, predictions) -> float:
  """Binary F1 of class 1; 0.0 when there is no positive label or prediction."""
  positive = lambda x: np.asarray(x) == 1
  return float(sk_metrics.f1_score(positive(labels), positive(predictions),
                                   labels=[False, True], zero_division=0.0))


def matthews_corrcoef(labels, predictions) -> float:
  return float(sk_metrics.matthews_corrcoef(labels, predictions))


def _correlation(statistic, x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) != len(y) or not len(x):
    raise ValueError(f'A correlation needs two non-empty vectors of one length, got '
                     f'{len(x)} and {len(y)} values.')
  # Tested on the values themselves, not on the centred sum of squares: the float mean of
  # identical values need not equal them (np.mean([0.1] * 7) != 0.1).
  if np.all(x == x[0]) or np.all(y == y[0]):
    return 0.0
  return float(statistic(x, y).statistic)


def pearson(x, y) -> float:
  return _correlation(stats.pearsonr, x, y)


def spearman(x, y) -> float:
  """Spearman's rho, tied values sharing the mean of their ranks."""
  return _correlation(stats.spearmanr, x, y)


# ---- Per-task scores ----

def _acc_and_f1(labels, predictions):
  acc, f1_score = accuracy(labels, predictions), f1(labels, predictions)
  return {'accuracy': acc, 'f1': f1_score, 'score': (acc + f1_score) / 2}


def _pearson_spearman(labels, predictions):
  p, s = pearson(labels, predictions), spearman(labels, predictions)
  return {'pearson': p, 'spearman': s, 'score': (p + s) / 2}


def _matthews(labels, predictions):
  mcc = matthews_corrcoef(labels, predictions)
  return {'matthews_corrcoef': mcc, 'score': mcc}


def _accuracy(labels, predictions):
  acc = accuracy(labels, predictions)
  return {'accuracy': acc, 'score': acc}


METRIC_OF_SCORE = {
    'cola': _matthews, 'stsb': _pearson_spearman, 'mrpc': _acc_and_f1, 'qqp': _acc_and_f1,
    'mnli_m': _accuracy, 'mnli_mm': _accuracy, 'qnli': _accuracy, 'rte': _accuracy,
    'sst2': _accuracy, 'wnli': _accuracy,
}


def score(name: str, labels, predictions) -> dict[str, float]:
  """All metrics of one dev set, as fractions, plus 'score' in percent (the table number)."""
  if name not in METRIC_OF_SCORE:
    raise ValueError(f'Unknown GLUE score {name!r}; expected one of {sorted(METRIC_OF_SCORE)}.')
  if len(labels) != len(predictions):
    raise ValueError(f'{name}: {len(labels)} labels but {len(predictions)} predictions.')
  if not len(labels):
    raise ValueError(f'{name}: cannot score an empty dev set.')
  result = METRIC_OF_SCORE[name](labels, predictions)
  result['score'] = 100.0 * result['score']
  return result


# ---- Aggregates: GLUE per seed, and mean +- std over seeds ----

def _mean_over(scores: Mapping[str, float], names: Sequence[str]):
  present = [n for n in names if scores.get(n) is not None]
  mean = float(np.mean([scores[n] for n in present])) if present else None
  return mean, present


def glue_aggregates(scores: Mapping[str, float]) -> dict:
  """{'glue', 'glue_full'} (None unless complete) and their partial counterparts."""
  out = {}
  for key, names in (('glue', GLUE_SCORES), ('glue_full', FULL_SCORES)):
    mean, present = _mean_over(scores, names)
    complete = len(present) == len(names)
    out[key] = mean if complete else None
    out[f'{key}_partial'] = None if complete else mean
    out[f'{key}_tasks'] = present
  return out


def mean_std(values: Sequence[float | None]) -> dict:
  """Mean and sample standard deviation (ddof=1) of the values present.

  With one value the std is None (undefined), not 0: one seed says nothing about spread.
  """
  present = [v for v in values if v is not None]
  if not present:
    return {'mean': None, 'std': None, 'n': 0}
  std = float(np.std(present, ddof=1)) if len(present) > 1 else None
  return {'mean': float(np.mean(present)), 'std': std, 'n': len(present)}


def format_mean_std(stat: dict, digits: int = 2) -> str:
  """'mean ± std' of a `mean_std` dict; the mean alone for one value, '—' for none."""
  if stat['mean'] is None:
    return '—'
  text = f'{stat["mean"]:.{digits}f}'
  return text if stat['std'] is None else f'{text} ± {stat["std"]:.{digits}f}'


def summarize(per_seed: Mapping[int, Mapping[str, float]]) -> dict:
  """Per-seed score dicts (score name -> percent) -> per seed aggregates and seed statistics.

  Returns {'per_seed': {seed: {scores..., glue..., }}, 'over_seeds': {name: mean_std}}.
  """
  rows = {}
  for seed, scores in per_seed.items():
    row = {n: scores.get(n) for n in FULL_SCORES}
    row.update(glue_aggregates(scores))
    rows[seed] = row
  over_seeds = {}
  for name in FULL_SCORES + ('glue', 'glue_full', 'glue_partial', 'glue_full_partial'):
    over_seeds[name] = mean_std([row[name] for row in rows.values()])
  return {'per_seed': rows, 'over_seeds': over_seeds}
