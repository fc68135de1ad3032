"""The GPU preflight table: bert-base compiled for an H200 on this (CPU) host.

  make gpu-compiler
  PYTHONPATH=.venv/gpu-compiler python benchmarks/gpu_aot_table.py --out_dir=runs/gpu_aot \
      [--update_results]

Each row is one `python -m bert_sym.aot --topology=h200 --noeval_step` run (its own
process) of a step that `benchmarks/run_gpu.sh` times: standard and pairwise attention, the
attention paths of benchmarks/accelerator.py (`fused`: auto, no attention dropout; `xla`:
the paper recipe; `fused_dropout` / `pallas_dropout`: attention dropout inside cuDNN / our
Pallas kernel), at its shapes, in both layouts (layers unscanned, the trainer's default,
and scanned; the dropout kernels unscanned only, cuDNN's because it cannot run in scanned
layers). It records the compiled per-GPU memory, the attention kernel's calls (cuDNN's,
or Triton's for ours), whether the step fits the GPU and
JAX's default 75% share of it, and, where the H200 run of 2026-11-26 measured the same
step, that run's peak memory beside it. Rows are appended to OUT_DIR/rows.jsonl as they
finish; a rerun skips rows already there. --update_results (re)writes the "GPU preflight"
section of benchmarks/RESULTS.md from the JSONL.
"""

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

import accelerator
from bert_sym import aot
from bert_sym import gpu
import tpu_aot_table

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTION = '## GPU preflight: bert-base compiled for an H200 on a CPU host (`bert_sym.aot`)'
TOPOLOGY = 'h200'
SHAPES = ((128, 256), (512, 32), (512, 128), (512, 256))   # (seq, batch), as run_gpu.sh
MEASURED = [REPO_ROOT / 'benchmarks' / 'results' / f'accelerator_nvidia-h200_2026-11-26{s}.json'
            for s in ('', '_seq512')]


def rows():
  for seq, batch in SHAPES:
    for attention in ('standard', 'pairwise'):
      for path in ('fused', 'xla', 'fused_dropout', 'pallas_dropout'):
        # Both layouts: the benchmark times the trainer's (unscanned) and scanned as an A/B.
        for scan in ((True, False) if path in ('fused', 'xla') else (False,)):
          yield dict(attention=attention, path=path, seq=seq, batch=batch, scan=scan)


def key(row):
  return (row['attention'], row['path'], row['seq'], row['batch'], row.get('scan', True))


def measured_peaks() -> dict:
  peaks = {}
  for path in MEASURED:
    for r in json.loads(path.read_text())['results']:
      if r['impl'] == 'ours' and r.get('status') == 'ok':
        peaks[(r['attention'], r['path'], r['seq'], r['batch'], bool(r['scan_layers']))] = (
            r['peak_memory_gib'])
  return peaks


def run_aot(row, timeout_s):
  impl, rate = accelerator.PATHS[row['path']]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'report.json')
    command = [sys.executable, '-m', 'bert_sym.aot', '--config=configs/sym_base.py',
               f'--topology={TOPOLOGY}', f'--out={out}', '--noeval_step',
               f'--config.model.attention={row["attention"]}',
               f'--config.data.max_seq_len={row["seq"]}', f'--config.batch_size={row["batch"]}',
               f'--config.data.max_predictions_per_seq={accelerator.predictions_per_seq(row["seq"])}',
               f'--config.model.attention_impl={impl}',
               f'--config.model.attention_dropout_rate={rate}',
               f'--config.model.scan_layers={row["scan"]}']
    try:
      proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout_s)
    except subprocess.TimeoutExpired:
      return {'error': f'timed out after {timeout_s} s'}
    if os.path.exists(out):
      return json.loads(pathlib.Path(out).read_text())
    errors = [l for l in proc.stderr.splitlines() if 'error' in l.lower()]
    return {'error': (errors or proc.stderr.splitlines() or ['?'])[-1][:400]}


def measure(args):
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  jsonl = out_dir / 'rows.jsonl'
  done = tpu_aot_table.finished_keys(jsonl, key)
  peaks = measured_peaks()
  for row in rows():
    if key(row) in done:
      continue
    row.update(report=run_aot(row, args.timeout_s), measured_peak_gib=peaks.get(key(row)),
               date=datetime.date.today().isoformat(),
               host=f'{platform.machine()} CPU, {os.cpu_count()} cores (no GPU)')
    with jsonl.open('a') as f:
      f.write(json.dumps(row) + '\n')
    print(format_row(row), flush=True)


def format_row(row):
  r = row['report']
  name = (f"{row['attention']} | {row['path']} | {row['seq']} x {row['batch']} | "
          f"{'yes' if row['scan'] else 'no'}")
  if 'error' in r or 'memory' not in r.get('train_step', {}):
    return f"| {name} | error: {r.get('error', 'compiler out of memory')} | | | |"
  total = r['train_step']['memory']['total']
  # The attention kernel's own calls: cuDNN's, or Triton's for our Pallas kernel.
  library = 'Triton' if r['kernel'] == 'pallas' else 'cuDNN'
  calls = sum(n for k, n in r['train_step']['custom_calls'].items()
              if k.startswith('__cudnn$fmha') or (library == 'Triton' and k in aot.TRITON_CALLS))
  share = total / r['hbm_bytes_per_chip']
  fraction = gpu.memory_fraction_needed(total, gpu.GPUS[TOPOLOGY])
  fits = ('no' if not r['fits'] or fraction == float('inf') else 'yes' if fraction is None
          else f'with XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:.2f}')
  peak = row['measured_peak_gib']
  measured = f"{peak:.2f} ({total / 2 ** 30 / peak - 1:+.1%})" if peak else '-'
  return (f"| {name} | {r['kernel']} ({calls} {library} calls) | {total / 2 ** 30:.2f} "
          f"({share:.0%}) | {measured} | {fits} |")


def update_results(args):
  jsonl = pathlib.Path(args.out_dir) / 'rows.jsonl'
  table = [json.loads(l) for l in jsonl.read_text().splitlines() if l.strip()]
  order = {key(r): i for i, r in enumerate(rows())}
  table.sort(key=lambda r: order.get(key(r), len(order)))
  first = table[0]['report']
  lines = [
      SECTION, '',
      f"{', '.join(sorted({r['date'] for r in table}))}, {table[0]['host']}; jax "
      f"{first.get('jax', '?')} with its CUDA plugin and cuDNN (`make gpu-compiler`); "
      '`PYTHONPATH=.venv/gpu-compiler python benchmarks/gpu_aot_table.py --out_dir=... '
      '--update_results`.',
      'bert-base (configs/sym_base.py, the attention named), the train step of each '
      '`benchmarks/run_gpu.sh` configuration compiled by XLA\'s GPU compiler for an H200 '
      f"({first['hbm_bytes_per_chip'] / 2 ** 30:.2f} GiB) described by its spec "
      '(`bert_sym/gpu.py`), no GPU. Paths as in `benchmarks/accelerator.py`: `fused` = '
      'auto with attention dropout 0 (the fast recipe), `xla` = the paper recipe, '
      '`fused_dropout` = attention dropout 0.1 inside cuDNN (unscanned: cuDNN\'s dropout '
      'cannot run in scanned layers), `pallas_dropout` = attention dropout 0.1 inside our '
      'Pallas (Triton) flash attention, unscanned as the trainer runs; the others in both layouts: unscanned, as the '
      'trainer runs and the benchmark times by default, and scanned (a scanned step shows '
      'one cuDNN call per pass: the loop body). GiB: the '
      'compiler\'s total (arguments + outputs - donated aliases + temporaries) and its '
      'share of the GPU. Measured: the peak the H200 reported for the same step on '
      '2026-11-26 (jax 0.11.2) and the compiled figure\'s difference from it. Fits: JAX '
      'takes 75% of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says more (up to 95%: CUDA '
      'needs its own; `bert_sym/gpu.py`). Without a '
      'GPU the compiler does not autotune (its matmuls are Triton fusions), so no speed '
      'is estimated here.', '',
      '| attention | path | seq x batch | scanned | kernel | GiB (share) | measured GiB | fits |',
      '|---|---|---|---|---|---|---|---|',
  ]
  lines += [format_row(r) for r in table]
  missing = [k for k in order if k not in {key(r) for r in table}]
  if missing:
    lines += ['', 'Not run: ' + '; '.join(f'{a} {p} {s} x {b}' for a, p, s, b, _ in missing) + '.']
  tpu_aot_table.write_section(SECTION, lines)


if __name__ == '__main__':
  tpu_aot_table.main(__doc__, 'runs/gpu_aot', 900, measure, update_results)
