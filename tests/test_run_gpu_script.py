"""benchmarks/run_gpu.sh is run only where a GPU is lent, with minutes to spare: a typo in
one of its benchmark commands would cost that session's only chance. Each `bench` line is
parsed here by the benchmark's own argument parser and expanded into its configurations."""

import os
import shlex
import subprocess
import sys

import pytest

from tests.train_fixtures import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, 'benchmarks', 'run_gpu.sh')
sys.path.insert(0, os.path.join(REPO_ROOT, 'benchmarks'))
import accelerator  # pylint: disable=g-import-not-at-top,wrong-import-position


def _bench_lines():
  """The benchmark arguments of every `bench NAME MAX JSON ARGS...` call, with the
  script's loop variable and path variables filled in."""
  text = open(SCRIPT).read().replace('\\\n', ' ')
  calls = []
  for line in (raw.strip() for raw in text.splitlines()):
    if not line.startswith('bench '):
      continue
    impls = ('rbg', 'unsafe_rbg') if '$impl' in line else (None,)
    for impl in impls:
      words = shlex.split(line.replace('$impl', impl or ''))
      calls.append(pytest.param(words[4:], id=words[1]))
  return calls


def test_script_is_valid_bash():
  subprocess.run(['bash', '-n', SCRIPT], check=True)


def test_there_are_bench_lines():
  names = [call.id for call in _bench_lines()]
  assert len(names) == 7 and any('profile' in name for name in names), names


@pytest.mark.parametrize('args', _bench_lines())
def test_every_bench_command_parses_into_configurations(args, monkeypatch):
  # bench() adds these itself; --out is the JSON path it is given.
  argv = ['accelerator.py', '--size=base', '--steps=10', '--timeout_s=70', '--budget_s=50',
          '--out=x.json', *args]
  monkeypatch.setattr(sys, 'argv', argv)
  parsed = accelerator.parse_args()   # exits on an unknown flag or --prng_impl
  specs = accelerator.configurations(parsed)
  ours = [s for s in specs if s['impl'] == 'ours']
  assert ours, args
  for spec in ours:
    assert spec['attention'] in accelerator.VARIANTS and spec['path'] in accelerator.PATHS
    assert spec['seq'] > 0 and spec['batch'] > 0
  if parsed.profile:
    assert 'profile_dir' in ours[0]


def test_a_typo_is_refused_before_anything_runs(monkeypatch):
  for bad, message in (('--variants=pairwse', 'unknown variant'),
                       ('--paths=fusd', 'unknown path'), ('--shapes=128by256', 'SEQxBATCH')):
    monkeypatch.setattr(sys, 'argv', ['accelerator.py', bad])
    parsed = accelerator.parse_args()
    with pytest.raises(SystemExit, match=message):
      accelerator.configurations(parsed)
  monkeypatch.setattr(sys, 'argv', ['accelerator.py', '--prng_impl=rgb'])
  with pytest.raises(SystemExit):   # argparse's choices
    accelerator.parse_args()


_PYTHON_STAND_IN = r'''#!/bin/bash
# python3 for run_gpu.sh without a GPU: each benchmark writes its --out JSON (and the
# profile its table), as the real ones do.
case "$*" in
  *'import ml_collections'*|*'import jax'*|*'-m pytest'*) echo "stand-in: $*"; exit 0;;
esac
out=
for arg in "$@"; do case "$arg" in --out=*) out=${arg#--out=};; esac; done
if [[ " $* " == *' --profile '* ]]; then
  mkdir -p benchmarks/results/profile_standard_fused_128x256
  echo 'top 30 device ops' > benchmarks/results/profile_standard_fused_128x256/top_ops.txt
fi
[ -n "$out" ] && echo '{"stand_in": true}' > "$out"
exit 0
'''


def test_what_comes_back_fits_the_device_tools_eight_files(tmp_path):
  """The device tool hands back at most 8 files from $OUT. The script writes 9 results
  and its log: they come back as the log and one tar holding every result."""
  import tarfile  # pylint: disable=g-import-not-at-top
  repo, stubs, out = tmp_path / 'repo', tmp_path / 'bin', tmp_path / 'out'
  (repo / 'benchmarks').mkdir(parents=True)
  stubs.mkdir()
  out.mkdir()
  (repo / 'benchmarks' / 'run_gpu.sh').write_text(open(SCRIPT).read())
  for name, text in (('python3', _PYTHON_STAND_IN), ('nvidia-smi', '#!/bin/bash\necho H200\n')):
    (stubs / name).write_text(text)
    (stubs / name).chmod(0o755)
  env = dict(os.environ, OUT=str(out), PATH=f'{stubs}:{os.environ["PATH"]}')
  subprocess.run(['bash', str(repo / 'benchmarks' / 'run_gpu.sh')], env=env, check=True,
                 capture_output=True, timeout=120)
  assert sorted(p.name for p in out.iterdir()) == ['results.tar', 'run_gpu.log']
  with tarfile.open(out / 'results.tar') as tar:
    names = tar.getnames()
  results = sorted((repo / 'benchmarks' / 'results').rglob('*.json'))
  assert len(results) == 8 and 'profile_standard_fused_128x256/top_ops.txt' in names
  assert sorted(names) == sorted(str(p.relative_to(repo / 'benchmarks' / 'results'))
                                 for p in results + [repo / 'benchmarks' / 'results' /
                                                     'profile_standard_fused_128x256' /
                                                     'top_ops.txt'])
