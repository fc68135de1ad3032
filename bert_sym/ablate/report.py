"""Ablation report: reads the finished runs of a grid and writes summary.json,
summary.md and the plots (`bert_sym.ablate` runs the grid, then calls `summarize`).

Statistics over seeds (steps to target by interpolation, t and bootstrap intervals, paired
differences against the reference, when a ratio is given): `bert_sym.ablate.stats`.

Each run is read by `bert_sym.ablate.runs` (metrics rows, wall-clock time without the time
a resumed run sat stopped).
"""

import json
from typing import Sequence

from etils import epath
import numpy as np

from bert_sym import files
from bert_sym.glue import metrics as glue_metrics
from bert_sym.glue import report as glue_report
from bert_sym import model as model_lib
from bert_sym.ablate import stats
from bert_sym.ablate.runs import (Run, config_differences, latest_finished_step, load_run,
                                  run_dir, run_status)

REFERENCE_VARIANT = 'standard'
FEW_SEEDS = 5   # below it, the reading's separations are leads, not results
SUMMARY_JSON = 'summary.json'
SUMMARY_MD = 'summary.md'
GLUE_SUBDIR = 'glue'
GLUE_DONE = 'ablate_request.json'   # GLUE's request, written when it exits 0


class AblationError(Exception):
  """A run failed or the inputs are inconsistent: reported without a traceback."""


# ---- Summary: summary.json, summary.md, plots ----

mean_std = glue_metrics.mean_std   # mean and sample std (ddof=1) of the values present
_fmt_stat = glue_metrics.format_mean_std

# One line in summary.md (and summary.json) that says which statistic each column is.
STATISTICS_LINE = (
    'Columns: final eval loss and steps to target = mean [95% t interval over seeds] (n = seeds '
    'that reached the target); steps to target = first crossing of the eval curve, linear '
    'between evals; paired Δ = mean over the seeds both finished of (variant - {ref}) on the '
    'same seed [t interval]; paired Δ steps (n = seeds) only when every seed of both reached the '
    'target (— otherwise: a mean over the seeds that got there favours the lucky ones); ratio = '
    'mean steps / {ref} mean steps over the seeds of paired Δ steps [bootstrap interval over '
    'those seed pairs].')


def _fmt_int(value) -> str:
  return '—' if value is None else f'{value:,.0f}'


def _fmt_ci(stat: dict, digits: int, with_n: bool = False) -> str:
  """'mean [low, high]' of a `stats.describe` dict; the mean alone without an interval."""
  if stat['mean'] is None:
    return '—'
  # '+ 0.0' turns a -0.3 rounded to '-0' into '0' (a sign on nothing reads as a difference).
  number = lambda x: f'{round(x, digits) + 0.0:.{digits}f}'
  text = number(stat['mean'])
  if stat.get('ci95'):
    text += ' [{}, {}]'.format(*map(number, stat['ci95']))
  return text + (f' (n={stat["n"]})' if with_n else '')


def _fmt_paired(stat: dict, digits: int, with_n: bool = False) -> str:
  """A paired difference, signed, as the reading below the table prints it: one smaller than
  `digits` decimals keeps 2 significant digits, not '0.0000' (or steps' '0 [0, 0]')."""
  if stat['mean'] is None:
    return '—'
  text = _signed(stat['mean'], digits)
  if stat.get('ci95'):
    text += ' [{}, {}]'.format(*(_signed(x, digits) for x in stat['ci95']))
  return text + (f' (n={stat["n"]})' if with_n else '')


def _table_steps(common: list[int], final: int, max_columns: int = 6) -> list[int]:
  """A readable subset of the common eval steps for the Markdown table (all in JSON)."""
  inner = [s for s in common if 0 < s < final]
  if len(inner) > max_columns - 1:
    picks = np.linspace(0, len(inner) - 1, max_columns - 1).round().astype(int)
    inner = [inner[i] for i in sorted(set(picks))]
  return inner + [final]


def _glue_scores(path) -> dict | None:
  """{score name: mean over fine-tuning seeds} of one pre-training run, or None: no GLUE
  finished on its latest checkpoint. bert_sym.glue rewrites its results after every group
  of seeds, so after a crash (or part-way through a rerun with more tasks or seeds) they
  held some of the fine-tuning seeds, and showed beside other runs' full means unmarked."""
  file, done = (epath.Path(path) / GLUE_SUBDIR / name for name in ('glue_results.json',
                                                                   GLUE_DONE))
  if not (file.exists() and done.exists()):
    return None
  if json.loads(done.read_text()).get('step') != latest_finished_step(path):
    return None   # scored an earlier checkpoint: the run trained on since
  results = json.loads(file.read_text())
  over = results.get('summary', {}).get('over_seeds', {})
  # Task scores and GLUE (or its partial mean; 'glue_full*' only adds WNLI to the same), and
  # the config's cut of the training and dev sets (runlocal), which the table names.
  cut = {key: results.get('config', {}).get(key, 0) for key in glue_report.CUT_KEYS}
  return cut | {name: stat['mean'] for name, stat in over.items()
                if stat.get('mean') is not None and not name.startswith('glue_full')}


def _model_cost(config) -> dict:
  seq_len = config.data.max_seq_len
  return {'params_encoder_pooler': int(model_lib.encoder_plus_pooler_params(config.model)),
          'train_flops_per_token': float(model_lib.train_flops_per_token(
              config.model, seq_len, model_lib.mlm_predicted_fraction(config))),
          'seq_len': int(seq_len), 'batch_size': int(config.batch_size)}


def _loss_at(run: Run, step: int) -> float:
  return run.eval_loss[run.eval_steps.index(step)]


def load_finished_runs(workdir, variants, seeds, total_steps,
                       requested=None) -> tuple[dict, dict]:
  """({variant: [Run]}, {'variant/seedS': why not included}) of the finished runs.

  A run trained with a config other than `requested` (given the run's variant and seed)
  is left out and named: averaged with the rest, it shifted every statistic unseen.
  Without `requested`, runs whose configs differ from one another are refused.
  """
  runs, excluded, first = {}, {}, None
  for variant in variants:
    for seed in seeds:
      path, name = run_dir(workdir, variant, seed), f'{variant}/seed{seed}'
      finished, why = run_status(path, total_steps)
      if not finished:
        excluded[name] = why
        continue
      run = load_run(variant, seed, path)
      first = first or (name, run.config)
      changed = (config_differences(first[1], run.config) if requested is None
                 else config_differences(requested, run.config, variant, seed))
      if changed and requested is None:
        raise AblationError(
            f'{name} was trained with a config that differs from {first[0]}\'s in '
            f'{", ".join(changed)}: they cannot be averaged together. Summarize with the '
            f'grid\'s --config and overrides (other runs are then left out and named).')
      if changed:
        excluded[name] = f'trained with another config: {", ".join(changed)}'
      else:
        runs.setdefault(variant, []).append(run)
  if not runs:
    raise AblationError(f'No finished run under {workdir} for variants {list(variants)} and '
                        f'seeds {list(seeds)}: {excluded}. Fix: run (or summarize) with the '
                        'config and overrides of the grid, or use another --workdir.')
  return runs, excluded


def common_eval_steps(all_runs: Sequence[Run]) -> tuple[list[int], int]:
  """(eval steps present in every run, the final step all of them end at)."""
  common = sorted(set.intersection(*(set(r.eval_steps) for r in all_runs)))
  final_steps = {r.eval_steps[-1] for r in all_runs}
  if len(final_steps) != 1:
    raise AblationError(f'The runs end at different steps {sorted(final_steps)}: summarize '
                        f'runs of one total_steps (pass the same --config.total_steps).')
  return common, final_steps.pop()


def _first_trained_loss(run: Run) -> float:
  """The first eval after step 0 (the step-0 eval, if any, when there is no other).

  The step-0 eval is the untrained model, near ln(vocabulary size). A drop measured from
  it is mostly the first few hundred steps, in which every variant learns the token
  frequencies at the same pace: 90% of it fell in that early descent (eval loss 6.25 at
  step ~380 of 2,000 in the replication), where no variant can be told from another.
  """
  trained = [loss for step, loss in zip(run.eval_steps, run.eval_loss) if step > 0]
  return trained[0] if trained else run.eval_loss[0]


def choose_target(reference_runs: Sequence[Run], reference: str,
                  target_loss: float | None) -> dict:
  """The target eval loss and where it came from (given, or `stats.default_target`)."""
  if target_loss is not None:
    value, source = float(target_loss), 'given (--target_loss)'
  else:
    # A seed with a non-finite first or last eval made the target NaN: every variant then
    # read 'not reached'. The target comes from the others; the source names it.
    ends = {r.seed: (_first_trained_loss(r), r.eval_loss[-1]) for r in reference_runs}
    used = {s: e for s, e in ends.items() if np.isfinite(e).all()} or ends
    value = stats.default_target(*zip(*used.values()))
    source = (f"{reference}'s mean eval loss at its first eval after step 0 minus "
              f'{stats.TARGET_FRACTION:.0%} of its mean drop from there to the last eval'
              + ('' if len(used) == len(ends) else ' (seeds with a non-finite eval left '
                 f'out: {", ".join(str(s) for s in ends if s not in used)})'))
  return {'value': value, 'source': source, 'reference_variant': reference,
          'rule': 'first crossing of eval/loss below the target, linear between evals, '
                  'per seed'}


def variant_summary(vruns: Sequence[Run], common: list[int], final: int,
                    target: float) -> dict:
  """Everything summary.json says about one variant; per-seed values keyed by seed."""
  per_seed_steps = {r.seed: stats.steps_to_target(r.eval_steps, r.eval_loss, target)
                    for r in vruns}
  glue = {r.seed: _glue_scores(r.path) or {} for r in vruns}
  cut = {key: max(scores.pop(key, 0) for scores in glue.values()) for key in glue_report.CUT_KEYS}
  glue = {seed: scores for seed, scores in glue.items() if scores}
  glue_names = sorted({n for scores in glue.values() for n in scores})
  return {
      **_model_cost(vruns[0].config),
      'eval_loss_at_step': {str(s): mean_std([_loss_at(r, s) for r in vruns]) for s in common},
      'final_eval_loss': stats.describe([_loss_at(r, final) for r in vruns]),
      'final_eval_loss_per_seed': {str(r.seed): _loss_at(r, final) for r in vruns},
      'final_eval_mlm_accuracy': stats.describe(
          [r.eval_accuracy[r.eval_steps.index(final)] for r in vruns]),
      'steps_to_target': {'per_seed': {str(k): v for k, v in per_seed_steps.items()},
                          'reached': sum(v is not None for v in per_seed_steps.values()),
                          'of': len(vruns), **stats.describe(list(per_seed_steps.values()))},
      'train_seconds': mean_std([r.train_seconds for r in vruns]),
      'tokens_per_step': vruns[0].tokens_per_step,
      'glue': {n: mean_std([glue[s].get(n) for s in glue]) for n in glue_names},
      'glue_per_seed': {str(s): scores for s, scores in glue.items()}, 'glue_cut': cut,
  }


def summarize(workdir, variants: Sequence[str], seeds: Sequence[int], *,
              total_steps: int | None = None, target_loss: float | None = None,
              plots: bool = True, requested=None) -> dict:
  """Reads every finished run, writes summary.json / summary.md / plots, returns the dict.
  `requested`: the grid's config (`load_finished_runs` leaves out runs trained otherwise)."""
  workdir = epath.Path(workdir)
  runs, excluded = load_finished_runs(workdir, variants, seeds, total_steps, requested)
  present = [v for v in variants if v in runs]
  common, final = common_eval_steps([r for v in present for r in runs[v]])
  reference = REFERENCE_VARIANT if REFERENCE_VARIANT in runs else present[0]
  target = choose_target(runs[reference], reference, target_loss)
  out = {'workdir': str(workdir), 'variants': present, 'seeds': list(seeds),
         'runs': {v: [r.seed for r in runs[v]] for v in present}, 'excluded': excluded,
         'statistic': STATISTICS_LINE.format(ref=reference),
         'final_step': final, 'eval_steps': common, 'target_loss': target,
         'per_variant': {v: variant_summary(runs[v], common, final, target['value'])
                         for v in present}}
  stats.compare_to_reference(out['per_variant'], reference)
  out['reading'] = reading(out)
  if plots:
    from bert_sym.ablate import plots as plots_lib  # pylint: disable=g-import-not-at-top  (matplotlib)
    out['plots'] = plots_lib.plot(workdir, runs, present, target['value'], out)
  files.write_atomically(workdir / SUMMARY_MD, markdown(out))
  files.write_atomically(workdir / SUMMARY_JSON,
                         json.dumps(_strict_json(out), indent=2, allow_nan=False) + '\n')
  return out


def _strict_json(value):
  """NaN / inf (a diverged run's loss) as null, as the trainer's metrics rows write them."""
  if isinstance(value, dict):
    return {k: _strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict_json(v) for v in value]
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


# ---- summary.md ----

def _steps_cell(st: dict) -> str:
  if st['reached'] == 0:
    return 'not reached'
  return _fmt_ci(st, 0) + f' (n={st["reached"]}/{st["of"]})'


def _ratio_cell(st: dict) -> str:
  if st['ratio_to_reference'] is None:
    return '—'
  text = f'{st["ratio_to_reference"]:.2f}'
  if st['ratio_ci95']:
    text += ' [{:.2f}, {:.2f}]'.format(*st['ratio_ci95'])
  return text


def _main_table(summary: dict) -> list[str]:
  ref = summary['target_loss']['reference_variant']
  lines = ['| variant | seeds | params (enc+pooler) | train FLOPs/token | final eval loss | '
           f'paired Δ loss vs {ref} | final MLM acc | steps to target | paired Δ steps | '
           f'ratio vs {ref} | train time (s) |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for v in summary['variants']:
    p = summary['per_variant'][v]
    st, paired = p['steps_to_target'], p['paired_vs_reference']
    same = v == ref
    lines.append(
        f'| {v} | {",".join(map(str, summary["runs"][v]))} | '
        f'{_fmt_int(p["params_encoder_pooler"])} | {p["train_flops_per_token"]:.3e} | '
        f'{_fmt_ci(p["final_eval_loss"], 4)} | '
        f'{"—" if same else _fmt_paired(paired["final_eval_loss"], 4)} | '
        f'{_fmt_stat(p["final_eval_mlm_accuracy"], 4)} | {_steps_cell(st)} | '
        f'{"—" if same else _fmt_paired(paired["steps_to_target"], 0, True)} | '
        f'{_ratio_cell(st)} | {_fmt_stat(p["train_seconds"], 0)} |')
  return lines


def _loss_at_step_table(summary: dict) -> list[str]:
  shown = _table_steps(summary['eval_steps'], summary['final_step'])
  lines = ['', 'Eval MLM loss at step, mean ± std over seeds (every common eval step is in '
           'summary.json):', '',
           '| variant | ' + ' | '.join(f'step {s}' for s in shown) + ' |',
           '|---|' + '---:|' * len(shown)]
  for v in summary['variants']:
    cells = [_fmt_stat(summary['per_variant'][v]['eval_loss_at_step'][str(s)], 3)
             for s in shown]
    lines.append(f'| {v} | ' + ' | '.join(cells) + ' |')
  return lines


def _glue_table(summary: dict) -> list[str]:
  pv, variants = summary['per_variant'], summary['variants']
  names = sorted({n for v in variants for n in pv[v]['glue']},
                 key=lambda n: (n.startswith('glue'), n))
  if not names:
    return []
  lines = ['', 'GLUE dev (x100; per pre-training seed: mean over fine-tuning seeds; then '
           'mean ± std over pre-training seeds; (n=k/m): only k of the m pre-training runs '
           'have that score yet):', '',
           '| variant | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
  for v in variants:   # a mean over fewer runs than the variant has says so
    runs, stats_ = pv[v]['steps_to_target']['of'], [pv[v]['glue'].get(n) for n in names]
    lines.append(f'| {v} | ' + ' | '.join(
        '—' if not st or st['mean'] is None else _fmt_stat(st, 2) + (
            f' (n={st["n"]}/{runs})' if st['n'] < runs else '') for st in stats_) + ' |')
  cut = lambda k: max(pv[v].get('glue_cut', {}).get(k, 0) for v in variants)   # any one's
  return lines + glue_report.cut_note({k: cut(k) for k in glue_report.CUT_KEYS})


def _signed(value: float, digits: int) -> str:
  """+0.0123; a difference too small for `digits` decimals in 2 significant digits
  (+3.1e-05), so that a separation is never printed as '+0.0000 [+0.0000, +0.0000]'."""
  if value != 0 and abs(value) < 0.5 * 10 ** -digits:
    return f'{value:+.1e}'
  return f'{value:+.{digits}f}'


def _verdict(stat: dict, digits: int, ref: str, below: str, above: str) -> str:
  """'mean [low, high] over n seeds: what the interval says', or why there is none."""
  if stat['mean'] is None:
    return f'none ({stat.get("why") or "no seed has a value for both"})'
  if not np.isfinite(stat['mean']):
    return f'not finite over {stat["n"]} seeds (a run diverged): nothing separated'
  if not stat['ci95']:
    return f'{_fmt_paired(stat, digits)} from {stat["n"]} seed: no interval, nothing separated'
  low, high = stat['ci95']
  text = f'{_fmt_paired(stat, digits)} over {stat["n"]} seeds: '
  if low > 0:
    return text + f'{above} than {ref}'
  if high < 0:
    return text + f'{below} than {ref}'
  return text + f'not separated from {ref} (the interval includes 0)'


def reading(summary: dict) -> list[str]:
  """What the grid says of the paper's claim, variant by variant: whether each paired
  interval (variant - reference, same seeds) excludes 0; if none does, what would help."""
  ref = summary['target_loss']['reference_variant']
  lines, separated, paired_seeds = [], False, []
  for v in summary['variants']:
    if v == ref:
      continue
    paired = summary['per_variant'][v]['paired_vs_reference']
    for name, stat, digits, below, above in (
        ('final eval loss', paired['final_eval_loss'], 4, 'lower', 'higher'),
        ('steps to target', paired['steps_to_target'], 0, 'fewer', 'more')):
      verdict = _verdict(stat, digits, ref, below, above)
      separated |= verdict.endswith(f'than {ref}')
      lines.append(f'- {v} - {ref}, {name}: {verdict}.')
      if stat['mean'] is not None:
        paired_seeds.append(stat['n'])
  # The seeds behind the intervals: those both runs of a pair finished, not the grid's.
  seeds = min(paired_seeds, default=0)
  if lines and not separated:
    lines.append(f'- No variant is separated from {ref} at step {summary["final_step"]} '
                 f'with {seeds} seed(s). More seeds (--seeds) narrow the intervals; more '
                 'steps (--config.total_steps) let the curves part.')
  elif lines and seeds < FEW_SEEDS:
    # A t interval is exact for normal differences; a handful of seeds cannot show that
    # theirs are (one outlying seed widens or shifts it).
    lines.append(f'- With {seeds} seed(s) the t interval rests on the differences being '
                 f'near normal, which so few cannot show: read a separation as a lead for '
                 f'more seeds, not a result.')
  return lines


def markdown(summary: dict) -> str:
  target = summary['target_loss']
  lines = [f'# Ablation: {", ".join(summary["variants"])}', '',
           f'Runs in `{summary["workdir"]}`; final step {summary["final_step"]}.', '']
  if summary['excluded']:
    lines += ['Not included: ' + ', '.join(
        f'{k} ({v})' for k, v in summary['excluded'].items()), '']
  lines += [f'Target eval loss {target["value"]:.4f} ({target["source"]}).', '',
            summary['statistic'], '']
  lines += _main_table(summary)
  if summary.get('reading'):
    lines += ['', 'Reading (paired 95% t intervals; one that excludes 0 separates '
              'the variant from the reference):', ''] + summary['reading']
  lines += _loss_at_step_table(summary) + _glue_table(summary)
  return '\n'.join(lines) + '\n'
