"""The README's demo figures, measured: `make demo`'s training run and, given a local GLUE
copy, `make glue-local` and the README's GLUE table command on its checkpoint, each as a
user types it.

  python benchmarks/demo.py --out_dir=runs/demo_bench [--glue_dir=/data/glue_data] [--record]
  python benchmarks/demo.py --out_dir=runs/demo_glue --parts=glue_local \
      --checkpoint=runs/demo_bench/tiny_demo --glue_dir=/data/glue_data --record

Parts:
- install: a fresh venv with requirements.txt, as `make demo` creates it (pip's cache off,
  so the wheels are downloaded): wall time and the venv's size on disk;
- train: `python -m bert_sym.train --config=configs/tiny.py` in a fresh workdir (a
  subprocess, as `make demo` runs it; the compilation cache off, so the time includes
  compiling); from its metrics.jsonl, the validation MLM loss before training and at the
  end, and the wall time;
- glue_local: `make glue-local`'s command (RTE and MRPC, one seed, short recipe);
- glue_table: the README's GLUE command (six tasks, three seeds) and its table.
Prints JSON; --record also writes the parts run into benchmarks/results/demo_cpu-<N>core.json
(keeping the parts not rerun), which tests/test_readme_figures.py holds the README to.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bert_sym import files  # noqa: E402
# The README's GLUE table command, minus the paths.
GLUE_FLAGS = ['--tasks=cola,sst2,mrpc,stsb,rte,wnli', '--seeds=1,2,3', '--config.epochs=1',
              '--config.max_seq_len=64', '--config.learning_rate=1e-4']
# `make glue-local`'s (Makefile), minus the paths.
GLUE_LOCAL_FLAGS = ['--tasks=rte,mrpc', '--seeds=1', '--config=configs/glue.py:runlocal',
                    '--config.max_seq_len=64']
PARTS = ('install', 'train', 'glue_local', 'glue_table')


def _run(cmd, log_path) -> float:
  """Runs `cmd` from the checkout, output to `log_path`; returns its wall time."""
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, JAX_PLATFORMS='cpu'))
  seconds = time.perf_counter() - start
  if result.returncode != 0:
    sys.exit(f'{" ".join(cmd)} failed with exit code {result.returncode}; see {log_path}')
  return seconds


def install(out_dir: pathlib.Path) -> dict:
  venv = out_dir / 'venv'
  if venv.exists():
    sys.exit(f'{venv} exists: the install must start from nothing. Remove it or pick '
             'another --out_dir.')
  env = dict(os.environ, PIP_NO_CACHE_DIR='1')
  start = time.perf_counter()
  with open(out_dir / 'install.log', 'w') as log:
    for cmd in ([sys.executable, '-m', 'venv', str(venv)],
                [str(venv / 'bin' / 'pip'), 'install', '-q', '--upgrade', 'pip'],
                [str(venv / 'bin' / 'pip'), 'install', '-q', '-r', 'requirements.txt']):
      if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
        sys.exit(f'{" ".join(cmd)} failed; see {out_dir / "install.log"}')
  seconds = time.perf_counter() - start
  size = sum(p.stat().st_size for p in venv.rglob('*') if p.is_file() and not p.is_symlink())
  return {'seconds': seconds, 'venv_gb': size / 1e9}


def train_demo(out_dir: pathlib.Path) -> dict:
  workdir = out_dir / 'tiny_demo'
  if workdir.exists():
    sys.exit(f'{workdir} exists: the demo must start from an empty workdir (a rerun would '
             'resume). Remove it or pick another --out_dir.')
  seconds = _run([sys.executable, '-m', 'bert_sym.train', '--config=configs/tiny.py',
                  f'--workdir={workdir}', '--config.compilation_cache_dir='],
                 out_dir / 'train.log')
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = [(r['step'], r['eval/loss']) for r in rows if 'eval/loss' in r]
  return {'workdir': str(workdir), 'steps': rows[-1]['step'], 'train_seconds': seconds,
          'eval_loss_first': evals[0][1], 'eval_loss_first_step': evals[0][0],
          'eval_loss_last': evals[-1][1], 'eval_loss_last_step': evals[-1][0]}


def glue_on_demo(out_dir: pathlib.Path, name: str, flags, workdir: str,
                 glue_dir: str) -> dict:
  glue_out = out_dir / name
  seconds = _run([sys.executable, '-m', 'bert_sym.glue', f'--checkpoint={workdir}',
                  f'--output_dir={glue_out}', f'--glue_dir={glue_dir}', *flags],
                 out_dir / f'{name}.log')
  results = json.loads((glue_out / 'glue_results.json').read_text())
  # The record names no path of this machine.
  table = ((glue_out / 'glue_results.md').read_text().replace(str(workdir), 'CHECKPOINT')
           .replace(str(glue_dir), 'GLUE_DIR'))
  return {'flags': list(flags), 'seconds': seconds,
          'over_seeds': results['summary']['over_seeds'], 'table': table}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out_dir', required=True, help='a new directory for the runs')
  parser.add_argument('--glue_dir', default='', help='a local GLUE copy (download-script '
                      'layout); without it only the pre-training run is measured')
  parser.add_argument('--parts', default='',
                      help=f'comma-separated, of {",".join(PARTS)} (default: train, and the '
                      'GLUE parts when --glue_dir is given)')
  parser.add_argument('--checkpoint', default='',
                      help='the demo workdir the GLUE parts read when train is not run')
  parser.add_argument('--record', action='store_true',
                      help='also write the parts into benchmarks/results/demo_cpu-<N>core.json')
  args = parser.parse_args()
  parts = args.parts.split(',') if args.parts else (
      ['train', 'glue_local', 'glue_table'] if args.glue_dir else ['train'])
  if set(parts) - set(PARTS):
    parser.error(f'--parts: unknown {sorted(set(parts) - set(PARTS))}; use {PARTS}')
  if set(parts) & {'glue_local', 'glue_table'} and not args.glue_dir:
    parser.error('the GLUE parts need --glue_dir (a local GLUE copy)')
  if (set(parts) & {'glue_local', 'glue_table'} and 'train' not in parts
      and not args.checkpoint):
    parser.error('the GLUE parts without the train part need --checkpoint (a finished demo '
                 'workdir)')
  out_dir = pathlib.Path(args.out_dir).absolute()
  out_dir.mkdir(parents=True, exist_ok=True)
  result = {'date': datetime.date.today().isoformat(), 'machine': platform.machine(),
            'cpu_count': os.cpu_count()}
  # The commands run from the repository root: relative paths are the caller's, like --out_dir.
  checkpoint = args.checkpoint and str(pathlib.Path(args.checkpoint).absolute())
  glue_dir = args.glue_dir and str(pathlib.Path(args.glue_dir).absolute())
  if 'install' in parts:
    result['install'] = install(out_dir)
    print(json.dumps(result['install']), flush=True)
  if 'train' in parts:
    result['train'] = train_demo(out_dir)
    checkpoint = result['train'].pop('workdir')   # machine paths stay out of the record
    print(json.dumps(result['train']), flush=True)
  for part, flags in (('glue_local', GLUE_LOCAL_FLAGS), ('glue_table', GLUE_FLAGS)):
    if part in parts:
      result[part] = glue_on_demo(out_dir, part, flags, checkpoint, glue_dir)
      print(result[part]['table'], flush=True)
  print(json.dumps(result, indent=2))
  if args.record:
    path = ROOT / 'benchmarks' / 'results' / f'demo_cpu-{os.cpu_count()}core.json'
    record = json.loads(path.read_text()) if path.exists() else {}
    for part in parts:   # each part keeps the date and machine it was measured on
      record[part] = dict(result[part], date=result['date'], machine=result['machine'],
                          cpu_count=result['cpu_count'])
    files.write_atomically(path, json.dumps(record, indent=2) + '\n')
    print(f'recorded {",".join(parts)} in {path.relative_to(ROOT)}')


if __name__ == '__main__':
  main()
