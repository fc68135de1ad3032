r"""Eval noise of a checkpoint: how far the eval loss moves with the slice of validation read.

  python benchmarks/replication/eval_noise.py --checkpoint=runs/replication/standard/seed1 \
      [--paired_with=runs/replication/pairwise/seed1]

Reads the whole validation split once (the run's own config and masking seed), keeps the
MLM loss sum and target count of every batch, and reports for eval slices of 8, 64 and
256 batches: the standard error of the slice's loss (batches resampled with replacement;
the eval loss is a ratio sum(loss) / sum(targets)) and the spread between disjoint slices.
The same masks and slice are read by every variant of one seed, so this noise is common to
a paired difference; it is not common to seeds (each masks validation with its own seed).
With --paired_with (another variant of the same seed), the same for the difference of the
two eval losses, batch for batch.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bert_sym import checkpoint  # pylint: disable=wrong-import-position
from bert_sym import model as model_lib  # pylint: disable=wrong-import-position
from bert_sym import objectives  # pylint: disable=wrong-import-position
from bert_sym.input import iterator  # pylint: disable=wrong-import-position
from bert_sym.input import seqio_tasks  # pylint: disable=wrong-import-position


def per_batch_sums(config, params) -> np.ndarray:
  """[batches, 2]: (MLM loss sum, targets) of every whole batch of the validation split."""
  model = model_lib.BertForMaskedLM(config.model)
  num_predictions = config.data.max_predictions_per_seq
  sums = jax.jit(lambda p, b: objectives.mlm_sums(model, p, b, sparse=True,
                                                  num_predictions=num_predictions))
  it = iterator.make_mlm_iterator(config.data, batch_size=config.batch_size,
                                  split='validation', seed=config.seed, process_index=0,
                                  process_count=1, documents=seqio_tasks.task_documents)
  out = []
  for _ in range(it.num_blocks // config.batch_size):
    batch = objectives.host_mlm_positions(next(it), num_predictions)
    loss, _, weight = jax.device_get(sums(params, batch))
    out.append((float(loss), float(weight)))
  return np.array(out)


def _loss(sums: np.ndarray, other: np.ndarray | None, rows) -> np.ndarray:
  """Eval loss of the batches `rows` (minus the other checkpoint's on the same batches)."""
  loss = sums[rows, 0].sum(-1) / sums[rows, 1].sum(-1)
  return loss if other is None else loss - other[rows, 0].sum(-1) / other[rows, 1].sum(-1)


def noise(sums: np.ndarray, slice_batches: int, other: np.ndarray | None = None,
          resamples: int = 2000) -> dict:
  rng = np.random.default_rng(0)
  picks = rng.integers(0, len(sums), (resamples, slice_batches))
  resampled = _loss(sums, other, picks)
  losses = [_loss(sums, other, np.arange(i, i + slice_batches))
            for i in range(0, len(sums) - slice_batches + 1, slice_batches)]
  return {'batches': slice_batches, 'standard_error': float(resampled.std(ddof=1)),
          'disjoint_slices': len(losses),
          'disjoint_std': float(np.std(losses, ddof=1)) if len(losses) > 1 else None}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--checkpoint', required=True, help='a run workdir or step directory')
  parser.add_argument('--paired_with', default='', help='another run of the same seed')
  args = parser.parse_args()
  config, params = checkpoint.load_pretrained(args.checkpoint)
  sums = per_batch_sums(config, params)
  result = {'checkpoint': os.path.basename(os.path.normpath(args.checkpoint)),
            'whole_split_batches': len(sums),
            'whole_split_loss': float(sums[:, 0].sum() / sums[:, 1].sum()),
            'slices': [noise(sums, n) for n in (8, 64, 256) if n <= len(sums)]}
  if args.paired_with:
    other_config, other_params = checkpoint.load_pretrained(args.paired_with)
    if other_config.seed != config.seed:
      raise SystemExit(f'--paired_with is seed {other_config.seed}, --checkpoint seed '
                       f'{config.seed}: pair runs of the same seed (same masks).')
    other = per_batch_sums(other_config, other_params)
    result['paired_difference'] = {
        'whole_split': float(_loss(sums, other, np.arange(len(sums)))),
        'slices': [noise(sums, n, other) for n in (8, 64, 256) if n <= len(sums)]}
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
