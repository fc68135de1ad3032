r"""GLUE: fine-tune a pre-trained bert_sym checkpoint on every task and score the dev sets.

The paper's recipe (configs/glue.py): per task and seed, a fresh pooler + classifier
(N(0, 0.02)) on the pre-trained encoder, 5 epochs of AdamW at lr 1e-5 (10% warm-up, then
linear decay), batch 16, length 128; the dev score after the last epoch. The model (size,
attention variant, vocabulary) is read from the checkpoint's workdir, never retyped.

  # All nine tasks from TFDS glue/*, seeds 1-5 (the paper's table):
  python -m bert_sym.glue --checkpoint=WORKDIR --output_dir=/tmp/glue

  # Local files in the GLUE download-script layout, a few tasks, one seed:
  python -m bert_sym.glue --checkpoint=WORKDIR/checkpoints/600 --output_dir=/tmp/glue \
      --glue_dir=/path/to/glue_data --tasks=cola,mrpc,rte --seeds=1

  # GLUE vs pre-training step (every checkpoint in WORKDIR), and the first step that
  # reaches 95% of a reference score (the paper's "half the training steps"):
  python -m bert_sym.glue --checkpoint=WORKDIR --output_dir=/tmp/sweep --sweep \
      --seeds=1 --reference_score=79.36

  # The tiny-model CPU run reported in the README (3 seeds: about 19 min on 2 CPU cores),
  # after python -m bert_sym.train --config=configs/tiny.py --workdir=/tmp/tiny_glue_ckpt
  python -m bert_sym.glue --checkpoint=/tmp/tiny_glue_ckpt --output_dir=/tmp/tiny_glue \
      --glue_dir=/path/to/glue_data --tasks=cola,sst2,mrpc,stsb,rte,wnli --seeds=1,2,3 \
      --config.epochs=1 --config.max_seq_len=64 --config.learning_rate=1e-4

Outputs in --output_dir, local or gs://, each written whole (a temporary file renamed
locally; on gs:// an object appears only once its upload completes):
  glue_results.json   every metric per task and seed, GLUE per seed, mean +- std
                      (finished seeds not asked for this time: runs_of_other_seeds;
                      those asked for and not finished yet: unfinished)
  glue_results.md     the paper's table: one row per seed, then mean +- std
  predictions/<name>_seed<k>.tsv   idx, label, prediction per dev example
                                   (MNLI: mnli_m_seed<k>.tsv and mnli_mm_seed<k>.tsv)
  runs/<task>_seed<k>/             TensorBoard events (train loss, learning rate, dev
                                   metrics) and the same scalars in metrics.jsonl
  runs/<task>/checkpoints/         while a task trains: its checkpoint (every
                                   config.checkpoint_every_steps and on SIGTERM / Ctrl-C,
                                   then exit 42 / 130); the rerun continues from it
With --sweep: a folder per checkpoint, step_<N in 8 digits>/ (step_00000300/), holding the
above, and glue_vs_step.{json,md,png}.

Scores, GLUE vs "GLUE full" vs partial means, and parallel seeds: README.md, section GLUE.
Multi-host: every host runs this same command; process 0 decides what is finished (hosts.py).
"""

import functools
from pathlib import Path
import sys
import time
import types

from bert_sym import early_signals

if __name__ == '__main__':   # before JAX and TensorFlow import (seconds): exit 42, not 143
  early_signals.take_them_until_started()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from etils import epath
import jax
from ml_collections import config_flags

from bert_sym import checkpoint
from bert_sym import cli as cli_lib   # `cli` is main's flags
from bert_sym import config_check
from bert_sym import distributed
from bert_sym import loop
from bert_sym import metrics_writer
from bert_sym.glue import data as glue_data
from bert_sym.glue import suite
from bert_sym.glue import sweep


def define_flags() -> types.SimpleNamespace:
  """The command line, defined only when this module runs as the program.

  Defining flags at import would clash with `bert_sym.train`'s `--config` as soon as one
  process imports both (a notebook, the test suite).
  """
  multiprocess = distributed.define_flags()
  flags.adopt_module_key_flags(distributed)   # --help lists them (absl: this module's only)
  return types.SimpleNamespace(
      multiprocess=multiprocess,
      # No default here: ml_collections would load a default at definition, before
      # parsing, and apply the --config.KEY overrides then, where a mistyped key is a
      # traceback. The default file is put on the command line instead (`_with_config`).
      config=config_flags.DEFINE_config_file(
          'config', None,
          'GLUE fine-tuning config (default: configs/glue.py); override any knob with '
          '--config.KEY=VALUE.'),
      checkpoint=flags.DEFINE_string(
          'checkpoint', None, 'A training workdir (its latest checkpoint; with --sweep: all '
          'of them) or one step directory WORKDIR/checkpoints/STEP.'),
      output_dir=flags.DEFINE_string('output_dir', None, 'Where results are written.'),
      tasks=flags.DEFINE_string(
          'tasks', None, f'Comma-separated TFDS task names (default: config.tasks = '
          f'{",".join(glue_data.TASKS)}).'),
      seeds=flags.DEFINE_string(
          'seeds', None, 'Comma-separated seeds (default: config.seeds = 1,2,3,4,5).'),
      glue_dir=flags.DEFINE_string(
          'glue_dir', None, 'Local GLUE directory (CoLA/train.tsv, MNLI/dev_matched.tsv, '
          '...) instead of TFDS glue/*.'),
      sweep=flags.DEFINE_bool('sweep', False, 'Score every checkpoint step of the workdir.'),
      reference_score=flags.DEFINE_float(
          'reference_score', None, 'With --sweep: report the first step reaching 95% of '
          'this GLUE score (e.g. 79.36, the paper\'s final base pairwise score).'),
  )


def main(argv, cli):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not (cli.checkpoint.value or '').strip() or not (cli.output_dir.value or '').strip():
    # a blank value (--output_dir=' ') was taken as a folder named ' '
    raise app.UsageError('--checkpoint and --output_dir are required (see --help).')
  config = cli.config.value
  config_check.check_glue(config)   # the trainer's config given here fails in one line
  for name in ('tasks', 'seeds', 'glue_dir'):   # flags that override a config knob
    if getattr(cli, name).value is not None:
      config[name] = getattr(cli, name).value
  if cli.reference_score.value is not None and not cli.sweep.value:
    raise app.UsageError('--reference_score only applies with --sweep.')
  # TF only where a text set is not in the tokens cache (or TFDS reads GLUE): imported there.
  metrics_writer.quiet_logs(flags.FLAGS['verbosity'].present, import_tf=False)
  distributed.initialize(cli.multiprocess)   # every host runs this same command
  start = time.time()
  try:
    if cli.sweep.value:
      sweep.run_sweep(cli.checkpoint.value, cli.output_dir.value, config, cli.reference_score.value)
      table = 'glue_vs_step.md'
    else:
      suite.run_glue(cli.checkpoint.value, cli.output_dir.value, config)
      table = 'glue_results.md'
  except loop.Preempted as e:
    loop.exit_on(e)
  except (ValueError, FileNotFoundError, PermissionError, loop.NonFiniteError,
          checkpoint.CheckpointSaveError) as e:
    # Our input checks (GlueDataError, a bad checkpoint or task) say what to fix; a failed
    # save (disk full, permission) names the step, the path and the cause.
    if cli_lib.another_process_stopped(str(e)):   # gloo's ValueError: cli names the cause
      raise
    raise SystemExit(f'bert_sym.glue: error: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    if not cli_lib.raised_in(e, 'tensorflow_datasets'):
      raise
    # TFDS could not download or prepare glue/*: offline, or no prepared copy.
    raise SystemExit(
        f'bert_sym.glue: error: TFDS could not load GLUE ({type(e).__name__}: '
        f'{str(e)[:200]}). Fix: prepare it where there is internet (tfds build glue '
        '--data_dir=DIR) and pass --config.tfds_data_dir=DIR, or use a local copy in '
        'the GLUE download-script layout with --glue_dir=DIR.') from None
  if jax.process_index() == 0:   # the only process that writes results
    print((epath.Path(cli.output_dir.value) / table).read_text())
    print(f'GLUE finished in {time.time() - start:.0f} s; outputs in {cli.output_dir.value}')


_DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / 'configs' / 'glue.py'


def _with_config(argv: list[str]) -> list[str]:
  if any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    return argv
  return [argv[0], f'--config={_DEFAULT_CONFIG}', *argv[1:]]


if __name__ == '__main__':
  early_signals.hand_ctrl_c_back()   # the imports are done: KeyboardInterrupt from here on
  cli_lib.run(functools.partial(main, cli=define_flags()), prog='bert_sym.glue',
              argv=_with_config(sys.argv),
              flags_parser=functools.partial(config_check.parse_flags,
                                             default_config='glue.py'))
