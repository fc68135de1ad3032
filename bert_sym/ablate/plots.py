"""Ablation plots: eval loss against steps, tokens and wall-clock (mean line, min-max band
over seeds per variant), and a GLUE bar chart. Called by `report.summarize`."""

from typing import Sequence

from etils import epath
import numpy as np

from bert_sym import files


def _figure(**kwargs):
  """(figure, axes) without pyplot: pyplot would need a backend, and switching to Agg (as
  these plots did) took a notebook's inline figures away for the rest of its session."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(**kwargs)
  return fig, fig.subplots()


def _save_png(fig, path: epath.Path) -> None:
  files.write_atomically(path, lambda f: fig.savefig(f, format='png'))


def plot(workdir, runs: dict, variants: Sequence[str], target_loss: float,
         summary: dict) -> list[str]:
  """Mean eval loss over seeds (line) and min-max over seeds (band), per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  workdir = epath.Path(workdir)
  colors = dict(zip(variants, matplotlib.rcParams['axes.prop_cycle'].by_key()['color'] * 3))
  written = []
  axes_spec = (('step', 'loss_vs_step.png', 'training step'),
               ('tokens', 'loss_vs_tokens.png', 'tokens seen (step x batch x seq len)'),
               ('time', 'loss_vs_time.png', 'wall-clock seconds since the step-0 eval'))
  for kind, name, xlabel in axes_spec:
    fig, ax = _figure(figsize=(6.4, 4.0), dpi=90)
    top = []
    for v in variants:
      vruns = runs[v]
      steps = sorted(set.intersection(*(set(r.eval_steps) for r in vruns)))
      losses = np.array([[r.eval_loss[r.eval_steps.index(s)] for s in steps] for r in vruns])
      if kind == 'step':
        x = np.array(steps, float)
      elif kind == 'tokens':
        x = np.array(steps, float) * vruns[0].tokens_per_step
      else:   # seeds differ in time per step: the mean time of each eval step
        x = np.array([[r.eval_seconds[r.eval_steps.index(s)] for s in steps]
                      for r in vruns]).mean(axis=0)
      ax.plot(x, losses.mean(axis=0), color=colors[v], label=f'{v} ({len(vruns)} seeds)')
      ax.fill_between(x, losses.min(axis=0), losses.max(axis=0), color=colors[v], alpha=0.2)
      # y-range from the last 3/4 of training: the first drop would flatten the rest.
      late = [i for i, s in enumerate(steps) if s >= 0.25 * steps[-1]] or [len(steps) - 1]
      # A diverged (null, NaN) eval is a gap in its line, not the axis limit.
      top.append(np.nanmax(losses[:, late], initial=-np.inf))
    if np.isfinite(target_loss):
      ax.axhline(target_loss, color='gray', lw=0.8, ls='--', label='target loss')
    low = np.nanmin([l for v in variants for r in runs[v] for l in r.eval_loss] + [np.inf])
    high = max(top)
    if np.isfinite(low) and np.isfinite(high):
      ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
    ax.set_xlabel(xlabel)
    ax.set_ylabel('eval MLM loss')
    ax.set_title('Eval MLM loss: mean over seeds, band = min-max (y clipped to the '
                 'last 3/4 of training)', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, workdir / name)
    written.append(name)

  if _glue_bars(workdir, variants, summary, colors):
    written.append('glue.png')
  return written


def _glue_bars(workdir, variants, summary: dict, colors: dict) -> bool:
  """glue.png: GLUE dev scores per variant (mean ± std over pre-training seeds), if any."""
  names = sorted({n for v in variants for n in summary['per_variant'][v]['glue']},
                 key=lambda n: (n.startswith('glue'), n))
  if not names:
    return False
  fig, ax = _figure(figsize=(max(6.4, 1.2 * len(names) + 2), 4.0), dpi=90)
  width = 0.8 / len(variants)
  for i, v in enumerate(variants):
    glue = summary['per_variant'][v]['glue']
    means = [glue[n]['mean'] if n in glue else np.nan for n in names]
    stds = [(glue[n]['std'] or 0.0) if n in glue else 0.0 for n in names]
    ax.bar(np.arange(len(names)) + i * width, means, width, yerr=stds, capsize=3,
           color=colors[v], label=v)
  ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
  ax.set_xticklabels(names, fontsize=8)
  ax.set_ylabel('dev score (x100)')
  ax.set_title('GLUE dev: mean ± std over pre-training seeds', fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save_png(fig, workdir / 'glue.png')
  return True
