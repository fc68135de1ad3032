"""The TPU preflight table: bert-base compiled for TPU slices on this (CPU) host.

  python benchmarks/tpu_aot_table.py --out_dir=runs/tpu_aot [--update_results]

Each row is one `python -m bert_sym.aot --noeval_step` run (the train step, the larger
of the two; its own process, so a compiler crash or out-of-memory costs one row): configs/sym_base.py and configs/std_base.py, the paper and
fast recipes, seq 128 and 512 at the paper's batch 256, on v4-8, v5e-16, v5p-8 and
v5e-256, all with model.scan_layers=True (compile time independent of depth; the
trainer's scanned layout). A row that does not fit is retried with the knobs of
bert_sym.aot's advice, one at a time, and the first that fits is recorded as the smallest
change. Rows are appended to OUT_DIR/rows.jsonl as they finish; a rerun skips rows
already there. --update_results (re)writes the "TPU preflight" section of
benchmarks/RESULTS.md from the JSONL; nothing else touches RESULTS.md.

Needs libtpu (pip install -r requirements-tpu.txt). Every speed figure is the compiler
and roofline ESTIMATE of bert_sym.aot, not a measurement on a TPU.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / 'benchmarks' / 'RESULTS.md'
SECTION = '## TPU preflight: bert-base compiled for TPU slices on a CPU host (`bert_sym.aot`)'

TOPOLOGIES = ('v5e-16', 'v4-8', 'v5p-8', 'v5e-256')
CONFIGS = ('sym_base', 'std_base')
RECIPES = ('paper', 'fast')
SEQ_LENS = (512, 128)
BATCH = 256
# Masked positions the sparse MLM head sees: 15% of the length plus slack, as original
# BERT (20 at 128) and configs/common.py (80 at 512).
PREDICTIONS = {128: 20, 512: 80}
# Tried one at a time, in order, on a row that does not fit: the first that fits is the
# smallest change (accumulation keeps the recipe's batch; remat and FSDP keep the maths).
FIT_CHANGES = (
    ('optimizer.grad_accum_steps=2', ['--config.optimizer.grad_accum_steps=2']),
    ('model.remat=True', ['--config.model.remat=True']),
    ('optimizer.grad_accum_steps=4', ['--config.optimizer.grad_accum_steps=4']),
    ('mesh.fsdp=-1, mesh.data=1', ['--config.mesh.fsdp=-1', '--config.mesh.data=1']),
    ('optimizer.grad_accum_steps=4, model.remat=True',
     ['--config.optimizer.grad_accum_steps=4', '--config.model.remat=True']),
)


def rows():
  """Most telling first (a run out of time drops the last): seq 512, the headline
  pairwise model, the fast recipe, on every slice."""
  for seq in SEQ_LENS:
    for config in CONFIGS:
      for recipe in reversed(RECIPES):
        for topology in TOPOLOGIES:
          yield dict(config=config, recipe=recipe, seq=seq, topology=topology)


def key(row):
  return (row['config'], row['recipe'], row['seq'], row['topology'])


def run_aot(row, extra, timeout_s):
  config = f'configs/{row["config"]}.py' + (':fast' if row['recipe'] == 'fast' else '')
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'report.json')
    command = [sys.executable, '-m', 'bert_sym.aot', f'--config={config}',
               f'--topology={row["topology"]}', f'--out={out}',
               f'--config.data.max_seq_len={row["seq"]}', f'--config.batch_size={BATCH}',
               f'--config.data.max_predictions_per_seq={PREDICTIONS[row["seq"]]}',
               '--config.model.scan_layers=True', '--noeval_step', *extra]
    start = time.perf_counter()
    try:
      proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout_s)
    except subprocess.TimeoutExpired:
      return {'error': f'timed out after {timeout_s} s'}, time.perf_counter() - start
    wall = time.perf_counter() - start
    report = json.loads(pathlib.Path(out).read_text()) if os.path.exists(out) else {}
    if proc.returncode and not report:
      errors = [l for l in proc.stderr.splitlines() if 'error' in l.lower()]
      report = {'error': (errors or proc.stderr.splitlines() or ['?'])[-1][:400]}
    return report, wall


def measure(args):
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  jsonl = out_dir / 'rows.jsonl'
  done = finished_keys(jsonl, key)
  for row in rows():
    if key(row) in done:
      continue
    report, wall = run_aot(row, [], args.timeout_s)
    row.update(report=report, wall_s=wall, change=None)
    if report.get('fits') is False or 'compiler_out_of_memory' in json.dumps(report):
      for name, extra in FIT_CHANGES:
        fixed, fixed_wall = run_aot(row, extra, args.timeout_s)
        if fixed.get('fits'):
          row.update(change=name, fixed_report=fixed, fixed_wall_s=fixed_wall)
          break
    row['date'] = datetime.date.today().isoformat()
    row['host'] = f'{platform.machine()} CPU, {os.cpu_count()} cores (no TPU)'
    with jsonl.open('a') as f:
      f.write(json.dumps(row) + '\n')
    print(format_row(row), flush=True)


def _gib(n):
  return f'{n / 1024 ** 3:.2f}'


def format_row(row):
  r = row['report']
  name = f"{row['config']} | {row['recipe']} | {row['seq']} | {row['topology']}"
  if 'error' in r or 'train_step' not in r:
    return f"| {name} | error: {r.get('error', '?')} | | | | | |"
  train = r['train_step']
  if 'memory' not in train:
    over = r.get('bytes_over_hbm')
    memory = ('compiler out of memory' + (f', {_gib(over)} GiB over' if over else ''))
  else:
    memory = f"{_gib(train['memory']['total'])} / {_gib(r['hbm_bytes_per_chip'])}"
  fit = 'yes'
  if not r['fits']:
    fixed = (row.get('fixed_report') or {}).get('train_step', {}).get('memory')
    fit = (f"no; fits with {row['change']} ({_gib(fixed['total'])} GiB)" if fixed
           else 'no; none of the tried changes fits')
  shown = r if r['fits'] else row.get('fixed_report') or r
  est = shown.get('estimate')
  compile_s = train.get('compile_s')
  speed = days = '-'
  if est:
    speed = f"{est['tokens_per_s_per_chip']:,.0f}"
    days = f"{est['step_s'] * 200_000 / 86400:.2f}"
  compile_text = f'{compile_s:.0f}' if compile_s is not None else '-'
  return (f"| {name} | {r['chips']} | {r['kernel']} | {memory} | {fit} | "
          f"{compile_text} | {speed} | {days} |")


def bound_note(table) -> str:
  bounds = {r['report']['estimate']['bound'] for r in table
            if 'estimate' in r.get('report', {})}
  if bounds == {'compute'}:
    return 'every estimate here is compute-bound.'
  return f'estimates are {" or ".join(sorted(bounds))}-bound (JSON: estimate.bound).'


def update_results(args):
  jsonl = pathlib.Path(args.out_dir) / 'rows.jsonl'
  table = [json.loads(l) for l in jsonl.read_text().splitlines() if l.strip()]
  order = {key(r): i for i, r in enumerate(rows())}
  table.sort(key=lambda r: order.get(key(r), len(order)))
  missing = [k for k in order if k not in {key(r) for r in table}]
  dates = sorted({r['date'] for r in table})
  lines = [
      SECTION, '',
      f"{', '.join(dates)}, {table[0]['host']}; jax {table[0]['report'].get('jax', '?')} "
      f"with libtpu; `python benchmarks/tpu_aot_table.py --out_dir=... --update_results`.",
      'Batch 256 (the paper\'s), model.scan_layers=True for every row (compile time '
      'independent of depth). Memory is the TPU compiler\'s per-chip total for the train '
      'step (arguments + outputs - donated aliases + temporaries) against the chip\'s HBM. '
      'Compile s: the train step, on this contended 2-core CPU. **Tokens/s per chip and '
      'days for 200k steps are compiler/roofline ESTIMATES, not measurements**: max(model '
      'FLOPs / peak bf16 FLOP/s, compiler bytes / HBM bandwidth), the chip figures in '
      '`bert_sym/tpu.py`; a real run reaches a fraction of it (its MFU). With scanned '
      'layers the compiler counts the loop body once, so the memory term is a lower '
      f'bound; {bound_note(table)} The estimate counts model FLOPs, the same for both '
      'recipes: it does not see what the paper recipe\'s explicit attention scores cost '
      '(on an H200 its step was 1.56x slower at seq 512, "Accelerator benchmark" above). '
      'A row that does not fit shows the smallest change that does (tried in the order '
      'of `FIT_CHANGES` in the script) and that change\'s estimate. sym_base is pairwise '
      'attention (the paper\'s headline), std_base standard; seq 128 rows use '
      'max_predictions_per_seq=20.', '',
      '| config | recipe | seq | slice | chips | kernel | GiB per chip / HBM | fits '
      '| compile s | est. tokens/s per chip | est. days, 200k steps |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  lines += [format_row(r) for r in table]
  if missing:
    lines += ['', 'Not run (out of time): ' + '; '.join(
        f'{c} {r} seq {s} {t}' for c, r, s, t in missing) + '.']
  write_section(SECTION, lines)


def write_section(title: str, lines: list[str]) -> None:
  """Replaces the section of RESULTS.md headed `title` (appends it if absent)."""
  text = RESULTS.read_text()
  section = '\n'.join(lines) + '\n'
  if title in text:
    head, tail = text.split(title, 1)
    rest = tail.split('\n## ', 1)
    text = head + section + ('\n## ' + rest[1] if len(rest) > 1 else '')
  else:
    text = text.rstrip('\n') + '\n\n' + section
  RESULTS.write_text(text)
  print(section)


def finished_keys(jsonl: pathlib.Path, key) -> set:
  """The keys of the rows already in `jsonl` (a rerun skips them)."""
  if not jsonl.exists():
    return set()
  return {key(json.loads(l)) for l in jsonl.read_text().splitlines() if l.strip()}


def main(doc=__doc__, out_dir='runs/tpu_aot', timeout_s=1800, measure_fn=None, update_fn=None):
  """The command line of this table and of gpu_aot_table.py (which passes its own)."""
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  parser.add_argument('--out_dir', default=out_dir)
  parser.add_argument('--timeout_s', type=int, default=timeout_s, help='per bert_sym.aot run')
  parser.add_argument('--update_results', action='store_true',
                      help='only (re)write the RESULTS.md section from OUT_DIR/rows.jsonl')
  args = parser.parse_args()
  if args.update_results:
    (update_fn or update_results)(args)
  else:
    (measure_fn or measure)(args)


if __name__ == '__main__':
  main()
