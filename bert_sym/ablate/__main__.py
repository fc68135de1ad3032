r"""The ablation runner: one pre-training run per (attention variant, seed), then a report.

  python -m bert_sym.ablate --config=configs/tiny.py --variants=standard,symmetric,pairwise \
      --seeds=1,2,3 --workdir=runs/abl [--config.KEY=VALUE ...] \
      [--glue_dir=/path/to/glue_data --glue_tasks=rte,mrpc]

--config (required) and every --config.KEY=VALUE are the trainer's, passed to each run
unchanged; --summarize_only needs the same ones, as it compares the runs against them.
Details: bert_sym/ablate/__init__.py and the README's "Ablations".
"""

import sys
from typing import Sequence

from absl import app
from absl import flags
from etils import epath

from bert_sym.ablate.report import AblationError, SUMMARY_JSON, SUMMARY_MD
from bert_sym.ablate.runner import Stopped, run
from bert_sym.loop import INTERRUPTED_EXIT_CODE


def define_flags():
  """The runner's own flags; its --config and --config.* are read from argv as typed.

  Defined only when this module is the program, so notebooks and tests can import it
  beside `bert_sym.train` (which owns the global --config flag).
  """
  return dict(
      variants=flags.DEFINE_string('variants', 'standard,symmetric,pairwise',
                                   'Comma-separated attention variants.'),
      seeds=flags.DEFINE_string('seeds', '1,2,3', 'Comma-separated pre-training seeds.'),
      workdir=flags.DEFINE_string('workdir', None, 'Grid root: {workdir}/{variant}/seed{S}.'),
      summarize_only=flags.DEFINE_bool('summarize_only', False,
                                       'Only build the report from the finished runs.'),
      glue_dir=flags.DEFINE_string('glue_dir', '', 'Local GLUE directory (else TFDS).'),
      glue_tasks=flags.DEFINE_string('glue_tasks', '', 'GLUE tasks to score ("" = none).'),
      glue_seeds=flags.DEFINE_string('glue_seeds', '1', 'GLUE fine-tuning seeds per run.'),
      glue_args=flags.DEFINE_string(
          'glue_args', '', "Extra bert_sym.glue flags, e.g. '--config.epochs=1'."),
      target_loss=flags.DEFINE_float(
          'target_loss', None, "Target eval loss for steps-to-target (default: standard's "
          'mean eval loss at its first eval after step 0, minus 90% of its mean drop from '
          'there to the last eval).'),
  )


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
  """argv -> (--config value, --config.* overrides, the other arguments)."""
  config, overrides, rest = None, [], []
  for arg in argv:
    if arg.startswith('--config='):
      if config is not None:   # as the trainer: the last one silently won
        raise app.UsageError(f'--config is given twice (--config={config}, {arg}): one per '
                             'ablation.')
      config = arg.split('=', 1)[1]
    elif arg.startswith('--config.'):
      if '=' not in arg:
        raise app.UsageError(f'Write overrides as --config.KEY=VALUE, got {arg!r}.')
      overrides.append(arg)
    elif arg == '--config':
      raise app.UsageError('Write --config=PATH (with "=").')
    else:
      rest.append(arg)
  return config, overrides, rest


def main(argv, cli, config, overrides):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not cli['workdir'].value:
    raise app.UsageError('--workdir is required.')
  if not config:
    raise app.UsageError('--config=configs/....py is required.')
  if cli['glue_dir'].value and not cli['glue_tasks'].value:   # would score nothing, silently
    raise app.UsageError('--glue_dir is given but no --glue_tasks: name the tasks to score, '
                         'e.g. --glue_tasks=rte,mrpc.')
  try:
    summary = run(config, cli['variants'].value, cli['seeds'].value, cli['workdir'].value,
                  overrides, summarize_only=cli['summarize_only'].value,
                  glue_dir=cli['glue_dir'].value, glue_tasks=cli['glue_tasks'].value,
                  glue_seeds=cli['glue_seeds'].value, glue_args=cli['glue_args'].value,
                  target_loss=cli['target_loss'].value)
  except AblationError as e:
    print(f'bert_sym.ablate: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  except Stopped as e:
    how = 'Ctrl-C' if e.exit_code == INTERRUPTED_EXIT_CODE else 'SIGTERM'
    print(f'bert_sym.ablate: stopped ({how}) after the current run saved; rerun the same '
          f'command to resume.', file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  print((epath.Path(cli['workdir'].value) / SUMMARY_MD).read_text())
  print(f'Summary and plots in {cli["workdir"].value}: {SUMMARY_JSON}, {SUMMARY_MD}, '
        + ', '.join(summary.get('plots', [])))


if __name__ == '__main__':
  from bert_sym import cli  # pylint: disable=g-import-not-at-top
  with cli.guard('bert_sym.ablate'):   # e.g. --config.KEY without =VALUE
    _config, _overrides, _rest = split_config_args(cli.locate_config_files(sys.argv))
  _cli = define_flags()
  cli.run(lambda argv: main(argv, _cli, _config, _overrides), prog='bert_sym.ablate',
          argv=_rest)
