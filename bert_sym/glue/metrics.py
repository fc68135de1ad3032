"""GLUE metrics (scikit-learn, scipy) and the paper's score definitions (README.md, GLUE).

Scores are percentages (x100), as in the paper's tables. A task that was not run is missing,
never a 0: while any averaged task is missing the GLUE score itself is `None`, and a
separately named *partial* mean (with its task list) stands in, so a partial number can
never be mistaken for the paper's headline.

A correlation with a constant vector (e.g. an early checkpoint whose STS-B head predicts one
value for every pair) is undefined: scipy returns NaN, which would turn STS-B and with it
the whole GLUE mean into NaN. Here it is 0.0 ("no association"), the convention of
scikit-learn's `matthews_corrcoef` for its own degenerate case.
"""

from collections.abc import Mapping, Sequence

import numpy as np

# Score names, in the column order of the paper's results table.
GLUE_SCORES = ('mrpc', 'cola', 'mnli_m', 'mnli_mm', 'qqp', 'rte', 'stsb', 'qnli', 'sst2')
FULL_SCORES = GLUE_SCORES + ('wnli',)

SCORE_TITLES = {
    'mrpc': 'MRPC', 'cola': 'CoLA', 'mnli_m': 'MNLI-m', 'mnli_mm': 'MNLI-mm', 'qqp': 'QQP',
    'rte': 'RTE', 'stsb': 'STS-B', 'qnli': 'QNLI', 'sst2': 'SST-2', 'wnli': 'WNLI',
}


def _correlation(correlate, x, y) -> float:
  """scipy's `correlate(x, y).statistic`; 0.0 when either side is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  # Tested on the values themselves, not on the centred sum of squares: the float mean of
  # identical values need not equal them (np.mean([0.1] * 7) != 0.1).
  if np.all(x == x[0]) or np.all(y == y[0]):
    return 0.0
  return float(correlate(x, y).statistic)


def _fractions(name: str, labels, predictions) -> dict[str, float]:
  """The metrics of one dev set as fractions; 'score' is the paper's number for it."""
  # Imported at the first score, not at start: scipy.stats and sklearn take ~1 s that
  # `--help`, a refused flag or a missing file would otherwise wait for.
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  if name == 'cola':
    mcc = float(metrics.matthews_corrcoef(labels, predictions))
    return {'matthews_corrcoef': mcc, 'score': mcc}
  if name == 'stsb':
    pearson = _correlation(stats.pearsonr, labels, predictions)
    spearman = _correlation(stats.spearmanr, labels, predictions)
    return {'pearson': pearson, 'spearman': spearman, 'score': (pearson + spearman) / 2}
  accuracy = float(metrics.accuracy_score(labels, predictions))
  if name in ('mrpc', 'qqp'):
    # F1 of the positive class (1); 0.0 when there is no positive label or prediction.
    f1 = float(metrics.f1_score(labels, predictions, zero_division=0))
    return {'accuracy': accuracy, 'f1': f1, 'score': (accuracy + f1) / 2}
  return {'accuracy': accuracy, 'score': accuracy}


def score(name: str, labels, predictions) -> dict[str, float]:
  """All metrics of one dev set, as fractions, plus 'score' in percent (the table number)."""
  if name not in FULL_SCORES:
    raise ValueError(f'Unknown GLUE score {name!r}; expected one of {sorted(FULL_SCORES)}.')
  if len(labels) != len(predictions):
    raise ValueError(f'{name}: {len(labels)} labels but {len(predictions)} predictions.')
  if not len(labels):
    raise ValueError(f'{name}: cannot score an empty dev set.')
  result = _fractions(name, labels, predictions)
  result['score'] = 100.0 * result['score']
  return result


def glue_aggregates(scores: Mapping[str, float]) -> dict:
  """{'glue', 'glue_full'} (None unless complete) and their partial counterparts."""
  out = {}
  for key, names in (('glue', GLUE_SCORES), ('glue_full', FULL_SCORES)):
    present = [n for n in names if scores.get(n) is not None]
    mean = float(np.mean([scores[n] for n in present])) if present else None
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


def _glue_over_seeds(rows: Mapping[int, dict], key: str, names: Sequence[str]) -> dict:
  """{key: mean_std, key_partial: mean_std + 'tasks', 'seeds'} over seeds.

  `key` only when every seed has every task: a mean over the complete seeds alone would sit
  unmarked beside task columns averaged over more seeds. Otherwise the partial mean: per
  seed the mean over the tasks that every seed with scores has (the same tasks for each),
  then over those seeds; 'tasks' and 'seeds' say what it covers.
  """
  if rows and all(row[key] is not None for row in rows.values()):
    return {key: mean_std([row[key] for row in rows.values()]),
            f'{key}_partial': {**mean_std([]), 'tasks': [], 'seeds': []}}
  scored = {seed: row for seed, row in rows.items() if row[f'{key}_tasks']}
  tasks = [n for n in names if scored and all(row[n] is not None for row in scored.values())]
  seeds = sorted(scored) if tasks else []
  partial = mean_std([float(np.mean([scored[s][n] for n in tasks])) for s in seeds])
  return {key: mean_std([]), f'{key}_partial': {**partial, 'tasks': tasks, 'seeds': seeds}}


def summarize(per_seed: Mapping[int, Mapping[str, float]]) -> dict:
  """Per-seed score dicts (score name -> percent) -> per seed aggregates and seed statistics.

  Returns {'per_seed': {seed: {scores..., glue..., }}, 'over_seeds': {name: mean_std}};
  GLUE over seeds as `_glue_over_seeds` says.
  """
  rows = {seed: {**{n: scores.get(n) for n in FULL_SCORES}, **glue_aggregates(scores)}
          for seed, scores in per_seed.items()}
  over_seeds = {n: mean_std([row[n] for row in rows.values()]) for n in FULL_SCORES}
  for key, names in (('glue', GLUE_SCORES), ('glue_full', FULL_SCORES)):
    over_seeds.update(_glue_over_seeds(rows, key, names))
  return {'per_seed': rows, 'over_seeds': over_seeds}
