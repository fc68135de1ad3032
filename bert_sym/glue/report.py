"""GLUE outputs: glue_results.json / .md (the paper's table), predictions TSVs, and the
sweep's glue_vs_step.{json,md,png}. Every file is written atomically, by process 0 only.
"""

import io
import json

from etils import epath
import jax

from bert_sym import files
from bert_sym.glue import metrics as glue_metrics

_REFERENCE_FRACTION = 0.95


def write_on_process_0(path, data: str | bytes) -> None:
  """`files.write_atomically` on process 0 only: every process computes the same results."""
  if jax.process_index() == 0:
    files.write_atomically(path, data)


def predictions_tsv(dev, predictions, regression) -> str:
  # 9 significant digits round-trip float32 exactly: scores recomputed from the file match.
  fmt = (lambda v: f'{float(v):.9g}') if regression else (lambda v: str(int(v)))
  rows = ['idx\tlabel\tprediction']
  rows += [f'{i}\t{fmt(l)}\t{fmt(p)}' for i, l, p in zip(dev.idx, dev.labels, predictions)]
  return '\n'.join(rows) + '\n'


def _fmt(value, digits=2):
  return '—' if value is None else f'{value:.{digits}f}'


def _partial(row, key, total):
  """'(partial k/n)': the GLUE mean in this cell covers k of its n tasks."""
  return f'(partial {len(row[f"{key}_tasks"])}/{total})'


def _partial_counts(stat, total, seeds):
  """'k/n' tasks of a partial GLUE over seeds; ', m of s seeds' when not every seed has
  scores."""
  fewer = f', {stat["n"]} of {seeds} seeds' if stat['n'] != seeds else ''
  return f'{len(stat["tasks"])}/{total}{fewer}'


def _glue_cell(row, key, total):
  if row.get(key) is not None:
    return _fmt(row[key])
  if row.get(f'{key}_partial') is not None:
    return f'{row[f"{key}_partial"]:.2f} {_partial(row, key, total)}'
  return '—'


CUT_KEYS = ('max_train_examples', 'max_eval_examples')


def cut_note(config) -> list[str]:
  """The lines that say a table's scores come from cut training or dev sets (none if not).
  `config`: the GLUE config, or any mapping with its CUT_KEYS."""
  cuts = [f'only the first {n} {what} examples' for what, n in (
      ('training', config.get('max_train_examples', 0)),
      ('dev-set', config.get('max_eval_examples', 0))) if n]
  if not cuts:
    return []
  return ['', f'**Cut data, not comparable with the paper:** {"; ".join(cuts)} '
          '(config.max_train_examples / config.max_eval_examples, e.g. runlocal).']


def markdown_table(results: dict) -> str:
  names = glue_metrics.FULL_SCORES
  header = ['seed', 'GLUE', 'GLUE full'] + [glue_metrics.SCORE_TITLES[n] for n in names]
  lines = [f'# GLUE dev results: {results["checkpoint"]}', '',
           f'Model: {results["model"]["attention"]} attention, '
           f'{results["model"]["num_layers"]} layers x {results["model"]["hidden_size"]}; '
           f'pre-training step {results["step"]}. Fine-tuning: {results["recipe"]}.', '']
  if results.get('unfinished'):
    missing = '; '.join(f'{task} (seed{"s" if len(seeds) > 1 else ""} '
                        f'{", ".join(map(str, seeds))})'
                        for task, seeds in results['unfinished'].items())
    lines += [f'**Unfinished:** no scores yet for {missing}, asked for by the command that '
              'wrote this table: it stopped part-way (or is still running). Rerun the same '
              'command to finish; "—" in those cells means not finished yet.', '']
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  summary = results['summary']
  for seed, row in summary['per_seed'].items():
    cells = [str(seed), _glue_cell(row, 'glue', 9), _glue_cell(row, 'glue_full', 10)]
    lines.append('| ' + ' | '.join(cells + [_fmt(row[n]) for n in names]) + ' |')
  stats = summary['over_seeds']

  pm = glue_metrics.format_mean_std
  seeds = len(summary['per_seed'])

  def glue_pm(key, total):
    if stats[key]['n']:   # every seed has every task
      return pm(stats[key])
    partial = stats[f'{key}_partial']
    if partial['n']:
      return f'{pm(partial)} (partial {_partial_counts(partial, total, seeds)})'
    return '—'

  cells = ['mean ± std' if seeds > 1 else 'mean (1 seed)', glue_pm('glue', 9),
           glue_pm('glue_full', 10)]
  lines.append('| ' + ' | '.join(cells + [pm(stats[n]) for n in names]) + ' |')
  lines += cut_note(results.get('config', {}))
  lines += ['', 'GLUE = unweighted mean of MRPC, CoLA, MNLI-m, MNLI-mm, QQP, RTE, STS-B, QNLI, '
            'SST-2 (WNLI excluded); GLUE full adds WNLI. "—" = not run. "partial (k/n)" = '
            'mean over the k tasks present only, not comparable to the paper\'s GLUE; in '
            'the mean row, GLUE is partial unless every seed has every task: over the tasks '
            'every seed has ("m of s seeds": only m have scores). '
            'Scores x100; std over seeds is the sample std (ddof=1).', '']
  return '\n'.join(lines)


def write_results(output_dir, results) -> None:
  by_seed = {seed: {} for seed in results['seeds']}
  for task in results['runs'].values():
    for seed, run in task.items():
      by_seed[int(seed)].update({name: r['score'] for name, r in run['scores'].items()})
  results['summary'] = glue_metrics.summarize(by_seed)
  write_on_process_0(epath.Path(output_dir) / 'glue_results.json',
                   json.dumps(results, indent=2, sort_keys=False) + '\n')
  write_on_process_0(epath.Path(output_dir) / 'glue_results.md', markdown_table(results))


def sweep_point(step, results) -> dict:
  stats = results['summary']['over_seeds']
  if stats['glue']['n']:
    kind, s = 'glue', stats['glue']
  else:
    s = stats['glue_partial']
    kind = f'glue_partial ({_partial_counts(s, 9, len(results["summary"]["per_seed"]))})'
  return {'step': step, 'score': s['mean'], 'std': s['std'], 'score_kind': kind,
          'glue_full': stats['glue_full']['mean'],
          'tasks': {n: stats[n]['mean'] for n in glue_metrics.FULL_SCORES}}


def first_step_reaching(points, threshold):
  reached = (p['step'] for p in points if p['score'] is not None and p['score'] >= threshold)
  return next(reached, None)


def write_sweep(output_dir, workdir, points, reference_score, config=None, unfinished=()):
  """`unfinished`: the checkpoint steps still to score. The files are rewritten after each
  step, and those of a sweep killed part-way read as a finished sweep of fewer steps (its
  "none yet" a verdict on every checkpoint), as glue_results.* did before 'unfinished'."""
  summary = {'workdir': str(workdir), 'points': points, 'unfinished_steps': list(unfinished)}
  lines = [f'# GLUE vs pre-training step: {workdir}', '',
           '| step | score | kind | ' + ' | '.join(
               glue_metrics.SCORE_TITLES[n] for n in glue_metrics.FULL_SCORES) + ' |',
           '|' + '---|' * (3 + len(glue_metrics.FULL_SCORES))]
  for p in points:
    lines.append(f'| {p["step"]} | {_fmt(p["score"])} | {p["score_kind"]} | ' + ' | '.join(
        _fmt(p['tasks'][n]) for n in glue_metrics.FULL_SCORES) + ' |')
  if unfinished:
    lines += ['', f'**Unfinished:** step(s) {", ".join(map(str, unfinished))} not scored yet '
              '(the sweep is running, or was stopped: rerun the same command to score them).']
  threshold = None
  if reference_score is not None:
    threshold = _REFERENCE_FRACTION * reference_score
    reached = first_step_reaching(points, threshold)
    summary.update(reference_score=reference_score, threshold=threshold,
                   first_step_reaching_threshold=reached)
    lines += ['', f'Reference score {reference_score:.2f}; 95% of it = {threshold:.2f}. '
              f'First step reaching it: {reached if reached is not None else "none yet"}.']
    if any(p['score_kind'] != 'glue' for p in points):
      lines.append('Warning: some scores are partial GLUE means (tasks missing); the '
                   'comparison with a full-GLUE reference is only indicative.')
  # The curve is what gets compared with the paper's reference score, so a sweep on cut
  # sets (runlocal) says so here too, not only in each step's glue_results.md.
  lines += cut_note(config or {})
  output_dir = epath.Path(output_dir)
  write_on_process_0(output_dir / 'glue_vs_step.json', json.dumps(summary, indent=2) + '\n')
  write_on_process_0(output_dir / 'glue_vs_step.md', '\n'.join(lines) + '\n')
  plot_sweep(output_dir / 'glue_vs_step.png', points, threshold)


def plot_sweep(path, points, threshold=None):
  """GLUE vs pre-training step as a PNG, with the 95%-of-reference line when given."""
  # A Figure without pyplot needs no display (TPU VMs, CI) and leaves a notebook's own
  # backend alone (matplotlib.use('Agg') took its inline figures away).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  steps = [p['step'] for p in points if p['score'] is not None]
  scores = [p['score'] for p in points if p['score'] is not None]
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  ax.plot(steps, scores, 'o-', label='GLUE (dev)')
  if threshold is not None:
    ax.axhline(threshold, color='gray', linestyle='--', label=f'95% of reference ({threshold:.2f})')
  ax.set_xlabel('pre-training step')
  ax.set_ylabel('GLUE score')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()   # rendered in memory, then written like every other output file
  fig.savefig(png, format='png', dpi=100)
  write_on_process_0(path, png.getvalue())

