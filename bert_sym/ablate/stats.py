"""The ablation's statistics over pre-training seeds, in one place.

* Steps to target: per seed, the first crossing of the eval curve below the target,
  linearly interpolated between the two evals around it (so its resolution is not the
  eval interval); None when the curve never gets there.
* Intervals of a mean and of a paired difference: Student t over seeds (95%, n - 1
  degrees of freedom, sample std). A percentile bootstrap of the mean is about
  mean +- 1.96 * std(ddof=0) / sqrt(n): for two variants of equal loss its interval left
  out 0 on 25% of 3-seed grids, 17% at 5 seeds, 9% at 10, where a 95% one does on 5%.
* The ratio of mean steps has no closed form: percentile bootstrap over seeds (fixed
  resampling seed, so a summary is reproducible), as narrow as above with few seeds.
* Paired differences: seed s gives every variant the same data order and masking, so
  variant - reference per seed removes the data's share of the noise.
* Ratio and paired difference of steps to target: only when every seed of both variants
  reached the target (a mean over the seeds that happened to get there would favour the
  lucky ones); in a summary, both over the seeds both variants finished.
"""

from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# Default target: the reference's mean eval loss after this fraction of its mean drop from
# its first eval after step 0 to the last one (report._first_trained_loss says why not
# from step 0); every reference seed that trains normally gets there.
TARGET_FRACTION = 0.9


def steps_to_target(steps: Sequence[int], losses: Sequence[float],
                    target: float) -> float | None:
  """The step at which the eval curve first reaches `target` (linear between evals).
  A non-finite eval (a diverged run) neither reaches it nor starts an interpolation."""
  finite = [(s, l) for s, l in zip(steps, losses) if np.isfinite(l)]
  for i, (step, loss) in enumerate(finite):
    if loss <= target:
      if i == 0:
        return float(step)
      s0, l0 = finite[i - 1]
      return float(s0 + (l0 - target) / (l0 - loss) * (step - s0))
  return None


def default_target(first_losses: Sequence[float], last_losses: Sequence[float],
                   fraction: float = TARGET_FRACTION) -> float:
  """first - fraction * (first - last), of the reference's mean first and last eval loss."""
  first, last = float(np.mean(first_losses)), float(np.mean(last_losses))
  return first - fraction * (first - last)


def bootstrap_interval(samples: Sequence[Sequence[float]],
                       statistic: Callable[..., float]) -> list[float] | None:
  """95% percentile interval of statistic(*samples), the samples resampled together.

  `samples` are equal-length columns indexed by seed (paired data resample the same seeds
  in every column). None with fewer than 2 seeds.
  """
  columns = [np.asarray(c, float) for c in samples]
  n = len(columns[0])
  if n < 2:
    return None
  rng = np.random.default_rng(BOOTSTRAP_SEED)
  picks = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
  values = np.array([statistic(*(c[p] for c in columns)) for p in picks])
  if not np.isfinite(columns).all():   # the interval would be of the resamples that
    return None                         # happened to miss the NaN, beside a NaN mean
  values = values[np.isfinite(values)]
  if not values.size:                   # e.g. a ratio to a zero mean
    return None
  tail = 100 * (1 - CONFIDENCE) / 2
  return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def t_interval(values: Sequence[float]) -> list[float] | None:
  """95% Student t interval of the mean; None with fewer than 2 values or a non-finite one."""
  x = np.asarray(values, float)
  if x.size < 2 or not np.isfinite(x).all():
    return None
  # Not scipy's t.interval: with no spread (every seed the same difference) it gives nan.
  half = (scipy_stats.t.ppf((1 + CONFIDENCE) / 2, x.size - 1) * np.std(x, ddof=1)
          / np.sqrt(x.size))
  return [float(np.mean(x) - half), float(np.mean(x) + half)]


def describe(values: Sequence[float | None]) -> dict:
  """Mean, sample std (ddof=1), n, and the t interval of the mean, over the values
  present (None = missing)."""
  present = [float(v) for v in values if v is not None]
  n = len(present)
  return {'mean': float(np.mean(present)) if n else None,
          'std': float(np.std(present, ddof=1)) if n > 1 else None, 'n': n,
          'ci95': t_interval(present)}


def paired_difference(variant: dict, reference: dict) -> dict:
  """variant - reference over the seeds both have a value for ({seed: value} dicts)."""
  seeds = sorted((s for s in variant
                  if variant[s] is not None and reference.get(s) is not None), key=int)
  out = describe([variant[s] - reference[s] for s in seeds])
  out['seeds'] = seeds
  return out


NOT_EVERY_SEED = 'not every seed of both variants reached the target'


def _every_seed_reached(variant: dict, reference: dict) -> bool:
  v, r = list(variant.values()), list(reference.values())
  return bool(v) and bool(r) and None not in v and None not in r


def paired_steps_difference(variant: dict, reference: dict) -> dict:
  """`paired_difference` of steps to target, only if every seed of both got there; else
  its mean is None and 'why' says so. Over the seeds where both happened to get there, a
  variant that misses on 2 of 3 seeds would look faster from its one lucky seed."""
  if not _every_seed_reached(variant, reference):
    return {'mean': None, 'std': None, 'n': 0, 'ci95': None, 'seeds': [],
            'why': NOT_EVERY_SEED}
  return {**paired_difference(variant, reference), 'why': None}


def steps_ratio(variant: dict, reference: dict) -> dict:
  """mean steps(variant) / mean steps(reference), only if every seed of both got there.

  Resampled by seed pairs when both variants ran the same seeds (the usual grid),
  each variant on its own otherwise.
  """
  if not _every_seed_reached(variant, reference):
    return {'value': None, 'ci95': None, 'why': NOT_EVERY_SEED}
  v, r = list(variant.values()), list(reference.values())
  value = float(np.mean(v) / np.mean(r))
  if sorted(variant) == sorted(reference):
    seeds = sorted(variant)
    ci = bootstrap_interval([[variant[s] for s in seeds], [reference[s] for s in seeds]],
                            lambda a, b: np.mean(a) / np.mean(b))
  else:
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    a, b = np.asarray(v, float), np.asarray(r, float)
    ratios = (rng.choice(a, (BOOTSTRAP_RESAMPLES, len(a))).mean(axis=1)
              / rng.choice(b, (BOOTSTRAP_RESAMPLES, len(b))).mean(axis=1))
    tail = 100 * (1 - CONFIDENCE) / 2
    ci = ([float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))]
          if len(a) > 1 or len(b) > 1 else None)
  return {'value': value, 'ci95': ci, 'why': None}


def compare_to_reference(per_variant: dict, reference: str) -> None:
  """Adds the ratio of steps to target and the paired differences to every variant of a
  summary's 'per_variant' (bert_sym.ablate.report's)."""
  ref = per_variant[reference]
  ref_steps = ref['steps_to_target']['per_seed']
  for p in per_variant.values():
    st = p['steps_to_target']
    paired_steps = paired_steps_difference(st['per_seed'], ref_steps)
    # Over the seeds of the paired difference (both finished them): over all of each, a
    # partial grid's ratio set the variant's seeds against the reference's others too, and
    # could say slower where the paired difference on the same seeds said faster.
    seeds = paired_steps['seeds']
    ratio = (steps_ratio({s: st['per_seed'][s] for s in seeds},
                         {s: ref_steps[s] for s in seeds})
             if seeds else {'value': None, 'ci95': None})
    st['ratio_to_reference'], st['ratio_ci95'] = ratio['value'], ratio['ci95']
    st['ratio_seeds'] = [int(s) for s in seeds]
    p['paired_vs_reference'] = {
        'final_eval_loss': paired_difference(p['final_eval_loss_per_seed'],
                                             ref['final_eval_loss_per_seed']),
        'steps_to_target': paired_steps,
    }
