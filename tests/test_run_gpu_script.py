"""benchmarks/run_gpu.sh is run only where a GPU is lent, with minutes to spare: a typo in
one of its benchmark commands would cost that session's only chance. Each `bench` line is
parsed here by the benchmark's own argument parser and expanded into its configurations."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.train_fixtures import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, 'benchmarks', 'run_gpu.sh')
sys.path.insert(0, os.path.join(REPO_ROOT, 'benchmarks'))
import accelerator  # pylint: disable=g-import-not-at-top,wrong-import-position


def _bench_lines():
  """The benchmark arguments of every `bench NAME MAX JSON ARGS...` call."""
  text = open(SCRIPT).read().replace('\\\n', ' ')
  calls = []
  for line in (raw.strip() for raw in text.splitlines()):
    if not line.startswith('bench '):
      continue
    words = shlex.split(line)
    calls.append(pytest.param(words[4:], id=words[1]))
  return calls


def test_script_is_valid_bash():
  subprocess.run(['bash', '-n', SCRIPT], check=True)


def test_there_are_bench_lines():
  names = [call.id for call in _bench_lines()]
  assert len(names) == 8 and any('profile' in name for name in names), names
  # Every step in the trainer's layout but the one A/B against it (the H100 run of
  # 2026-12-06 timed scanned layers only, which the trainer does not run by default).
  scanned = [call.id for call in _bench_lines() if '--scan_layers=1' in call.values[0]]
  assert scanned == ['A/B: scanned layers (fast and paper, 128 x 256)'], names
  assert not [c for c in _bench_lines() if '--scan_layers=0' in c.values[0]]
  # The trainer's backward (model.lean_backward) everywhere but in the one A/B against it.
  autodiff = [call.id for call in _bench_lines() if '--lean_backward=0' in call.values[0]]
  assert autodiff == ['A/B: autodiff backward (lean_backward=0; fast and paper, 128 x 256)']


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


def _specs(args, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['accelerator.py', '--size=base', '--out=x.json', *args])
  return [s for s in accelerator.configurations(accelerator.parse_args()) if s['impl'] == 'ours']


def test_the_profile_compiles_from_the_cache_the_step_before_it_filled(monkeypatch):
  """The profile times the main run's first configuration again; from the same cache
  (emptied before the main run, whose compiles stay cold) it skips the second compile."""
  calls = {call.id: call.values[0] for call in _bench_lines()}
  [main] = [a for name, a in calls.items() if name.startswith('train step vs HF: seq 128')]
  [profile] = [a for name, a in calls.items() if name.startswith('profile')]
  main_first, profiled = _specs(main, monkeypatch)[0], _specs(profile, monkeypatch)[0]
  drop = ('profile_dir',)
  assert ({k: v for k, v in main_first.items() if k not in drop} ==
          {k: v for k, v in profiled.items() if k not in drop})
  cache = main_first['compilation_cache_dir']
  assert cache == '$JAX_CACHE', cache
  text = open(SCRIPT).read()
  assert text.index('rm -rf "$JAX_CACHE"') < text.index("bench 'train step vs HF: seq 128")


def test_a_typo_is_refused_before_anything_runs(monkeypatch):
  for bad, message in (('--variants=pairwse', 'unknown variant'),
                       ('--paths=fusd', 'unknown path'), ('--shapes=128by256', 'SEQxBATCH'),
                       # each worker compiled, then divided by zero: every row an error
                       ('--shapes=128x0', 'SEQxBATCH'), ('--steps=0', 'steps >= 1')):
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
  """The device tool hands back at most 8 files from $OUT. The script writes 10 results
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
  assert len(results) == 9 and 'profile_standard_fused_128x256/top_ops.txt' in names
  assert sorted(names) == sorted(str(p.relative_to(repo / 'benchmarks' / 'results'))
                                 for p in results + [repo / 'benchmarks' / 'results' /
                                                     'profile_standard_fused_128x256' /
                                                     'top_ops.txt'])


def _run_script(tmp_path, python_stand_in, **env_vars):
  """run_gpu.sh from a copy of the repository's layout, with stand-ins for python3 and
  nvidia-smi; returns (exit status, log, the python3 command lines it ran)."""
  repo, stubs, out = tmp_path / 'repo', tmp_path / 'bin', tmp_path / 'out'
  (repo / 'benchmarks').mkdir(parents=True)
  stubs.mkdir()
  out.mkdir()
  (repo / 'benchmarks' / 'run_gpu.sh').write_text(open(SCRIPT).read())
  calls = tmp_path / 'calls'
  logged = python_stand_in.replace('#!/bin/bash\n', f'#!/bin/bash\necho "$*" >> {calls}\n', 1)
  for name, text in (('python3', logged), ('nvidia-smi', '#!/bin/bash\necho H200\n')):
    (stubs / name).write_text(text)
    (stubs / name).chmod(0o755)
  env = dict(os.environ, OUT=str(out), PATH=f'{stubs}:{os.environ["PATH"]}', **env_vars)
  done = subprocess.run(['bash', str(repo / 'benchmarks' / 'run_gpu.sh')], env=env,
                        capture_output=True, text=True, timeout=120)
  ran = calls.read_text().splitlines() if calls.exists() else []
  return done.returncode, (out / 'run_gpu.log').read_text(), ran


def test_without_a_gpu_under_jax_it_stops_before_measuring(tmp_path):
  """A CUDA plugin that did not load leaves JAX on the CPU: every step then timed
  bert-base on the host until the budget ran out."""
  on_cpu = _PYTHON_STAND_IN.replace("*'import ml_collections'*|*'import jax'*|",
                                    "*'import jax'*) exit 1;;\n  *'import ml_collections'*|")
  status, log, ran = _run_script(tmp_path, on_cpu)
  assert status == 1 and 'JAX does not run on a GPU here' in log, log
  assert not [c for c in ran if 'benchmarks/' in c or 'pytest' in c], ran
  status, log, ran = _run_script(tmp_path / 'dry', on_cpu, RUN_GPU_ALLOW_CPU='1')
  assert status == 0 and any('benchmarks/accelerator.py' in c for c in ran), log


def test_the_newest_of_the_carried_ml_collections_wheels_is_installed(tmp_path):
  """Two versions in .whl (a second `pip download` later) made pip refuse both, before
  anything was measured; none at all names the command that fetches one."""
  without = _PYTHON_STAND_IN.replace("*'import ml_collections'*|", "*'import ml_collections'*) exit 1;;\n  ")
  wheels = tmp_path / 'repo' / '.whl'
  wheels.mkdir(parents=True)
  for version in ('0.1.1', '1.0.0', '1.1.0'):
    (wheels / f'ml_collections-{version}-py3-none-any.whl').write_text('')
  status, log, ran = _run_script(tmp_path, without)
  [install] = [c for c in ran if '-m pip install' in c]
  assert status == 0 and install.split()[-1] == '.whl/ml_collections-1.1.0-py3-none-any.whl', (
      install, log)
  status, log, ran = _run_script(tmp_path / 'none', without)
  assert status == 1 and 'pip download --no-deps ml-collections -d .whl' in log, log
  assert not [c for c in ran if '-m pip install' in c or 'benchmarks/' in c], ran


def test_the_glue_step_runs_only_with_the_time_to_finish(tmp_path):
  """benchmarks/glue_seeds.py writes nothing until it ends (about 165 s on the H200):
  started with 30-165 s left it was always killed, and its time lost."""
  _, log, ran = _run_script(tmp_path, _PYTHON_STAND_IN)
  assert any('glue_seeds.py' in c for c in ran), log
  _, log, ran = _run_script(tmp_path / 'short', _PYTHON_STAND_IN, RUN_GPU_LIMIT_S='150')
  assert not any('glue_seeds.py' in c for c in ran)
  assert '== glue seeds: SKIPPED' in log and 'it needs 180s' in log, log
  assert any('accelerator.py' in c for c in ran)   # the benchmarks before it still ran


def test_every_timed_step_fits_an_h200_as_compiled(monkeypatch):
  """Each configuration the script times was compiled for an H200 on a CPU host
  (benchmarks/gpu_aot_table.py, the record in benchmarks/results/gpu_aot_*.jsonl) and fits
  JAX's default 75% share of it (the script lets JAX have 95%): a step that cannot fit would spend the GPU session's
  minutes compiling towards an out-of-memory error (the paper recipe at 512 x 256 did)."""
  import pathlib  # pylint: disable=g-import-not-at-top
  record = sorted(pathlib.Path(REPO_ROOT, 'benchmarks', 'results').glob('gpu_aot_*.jsonl'))[-1]
  compiled = {}
  for row in map(json.loads, record.read_text().splitlines()):
    report = row['report']
    share = report['train_step']['memory']['total'] / report['hbm_bytes_per_chip']
    compiled[(row['attention'], row['path'], row['seq'], row['batch'], row['scan'])] = (
        report['fits'] and share <= 0.75)
  timed = set()
  for call in _bench_lines():
    argv = ['accelerator.py', '--size=base', '--out=x.json', *call.values[0]]
    monkeypatch.setattr(sys, 'argv', argv)
    for spec in accelerator.configurations(accelerator.parse_args()):
      if spec['impl'] == 'ours':
        scanned = bool(spec['scan_layers']) and spec['path'] != 'fused_dropout'
        timed.add((spec['attention'], spec['path'], spec['seq'], spec['batch'], scanned))
  assert timed and timed <= set(compiled), sorted(timed - set(compiled))
  assert all(compiled[step] for step in timed), [s for s in timed if not compiled[s]]


# What the GPU image lacks of requirements*.txt: it has jax, flax, optax, orbax, torch and
# transformers (with their own dependencies), pytest, and ml-collections from the carried
# wheel; the rest of our runtime requirements are not there.
_NOT_ON_THE_GPU_IMAGE = ('tensorflow', 'tensorflow_text', 'tensorflow_datasets', 'seqio',
                         'gensim', 'blingfire', 'matplotlib', 'tensorboard', 'sklearn',
                         'gcsfs', 'nbclient', 'nbformat', 'xdist')
_IMAGE_SITECUSTOMIZE = f'''
import importlib.abc, importlib.util, sys
MISSING = {_NOT_ON_THE_GPU_IMAGE!r}
missing = lambda name: name.split('.')[0] in MISSING
class NotInstalled(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if missing(name):
      raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
sys.meta_path.insert(0, NotInstalled())
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if missing(name) else find_spec(name, package))
'''


def _gpu_test_files() -> list[str]:
  return re.search(r'^GPU_TESTS="([^"]*)"', open(SCRIPT).read(), re.M).group(1).split()


def test_every_file_with_a_gpu_test_is_run_on_the_gpu():
  """tests/test_objectives.py's cuDNN all-padding-row test (marked gpu) was left out of
  the script's list, so no GPU run ever ran it."""
  mark = re.compile(r'^\s*@pytest\.mark\.gpu\b|marks=\[?[\w, .]*pytest\.mark\.gpu\b', re.M)
  marked = {f'tests/{p.name}' for p in pathlib.Path(REPO_ROOT, 'tests').glob('test_*.py')
            if mark.search(p.read_text())}
  # Its gpu-marked tests are the CPU side of a choice: they skip where CUDA is.
  cpu_side_only = {'tests/test_conftest_rules.py'}
  assert 'tests/test_objectives.py' in marked
  assert sorted(_gpu_test_files()) == sorted(marked - cpu_side_only)


# The tiny benchmark run of run_gpu.sh's `bench` step under the GPU image's stand-in, with
# the HF peer and the profile: test_its_python_steps_run_with_only_what_the_gpu_image_has
# checks that it ran with what the image has, and
# tests/test_accelerator_benchmark.py::test_accelerator_benchmark_runs_at_tiny_size_and_writes_json
# what it measured. One run for both, once per session (tests/train_fixtures.built_once).
BENCH_STEPS, BENCH_WARMUP, BENCH_BATCH, BENCH_SEQ = 2, 1, 2, 64


def tiny_benchmark_on_the_gpu_image(tmp_path_factory):
  """(folder, run) of the shared tiny benchmark: the folder holds bench.json and the
  profile's folder; run is {returncode, stdout, stderr, wall_s} (wall_s measured around
  the command, independently of the benchmark). Read-only: copy it to change it."""
  from tests.train_fixtures import built_once  # pylint: disable=g-import-not-at-top

  def build(path):
    (path / 'site').mkdir(parents=True)
    (path / 'site' / 'sitecustomize.py').write_text(_IMAGE_SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=f'{path / "site"}:{REPO_ROOT}', JAX_PLATFORMS='cpu')
    command = [sys.executable, os.path.join(REPO_ROOT, 'benchmarks', 'accelerator.py'),
               '--size=tiny', f'--shapes={BENCH_SEQ}x{BENCH_BATCH}', '--variants=symmetric',
               '--paths=fused', f'--steps={BENCH_STEPS}', f'--warmup={BENCH_WARMUP}',
               '--profile', f'--profile_root={path}',
               f'--out={path}/bench.json',
               # The GPU run's limits (75 s a configuration) are for an idle accelerator: a
               # shared 2-core CPU under the rest of the suite took 133 s for the two.
               '--timeout_s=400', '--budget_s=800']
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                         env=env)
    (path / 'run.json').write_text(json.dumps(dict(
        returncode=run.returncode, stdout=run.stdout, stderr=run.stderr,
        wall_s=time.perf_counter() - start)))
  path = built_once(tmp_path_factory, 'tiny_accelerator_benchmark_on_the_gpu_image', build)
  return path, json.loads((path / 'run.json').read_text())


def test_its_python_steps_run_with_only_what_the_gpu_image_has(tmp_path, tmp_path_factory):
  """The GPU image has no TensorFlow, seqio, gensim, matplotlib, scikit-learn...: a
  top-level or lazy import of one in the GPU tests, the benchmark (ours and the HF peer),
  its profile or the GLUE seeds benchmark would cost the lent GPU's minutes. Each runs
  here, tiny, on the CPU, with those packages made uninstalled (sitecustomize)."""
  (tmp_path / 'sitecustomize.py').write_text(_IMAGE_SITECUSTOMIZE)
  env = dict(os.environ, PYTHONPATH=f'{tmp_path}:{REPO_ROOT}', JAX_PLATFORMS='cpu')
  run = lambda *argv: subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env,
                                     capture_output=True, text=True, timeout=300)
  for module in _NOT_ON_THE_GPU_IMAGE:   # the stand-in works
    assert "No module named" in run('-c', f'import {module}').stderr, module
  gpu_tests = run('benchmarks/run_gpu_tests.py', '--quiet_s=240', *_gpu_test_files())
  summary = gpu_tests.stdout[gpu_tests.stdout.rfind('gpu tests: '):]
  assert gpu_tests.returncode == 0 and ' passed' in summary, gpu_tests.stdout[-3000:]
  assert 'crashed' not in summary and 'failed' not in summary, summary
  out, bench = tiny_benchmark_on_the_gpu_image(tmp_path_factory)
  assert (out / 'site' / 'sitecustomize.py').read_text() == _IMAGE_SITECUSTOMIZE
  assert bench['returncode'] == 0, bench['stderr'][-3000:]
  rows = json.loads((out / 'bench.json').read_text())['results']
  assert [(r['impl'], r['status'], r.get('error')) for r in rows] == [
      ('ours', 'ok', None), ('hf', 'ok', None)], rows
  assert (out / f'profile_symmetric_fused_{BENCH_SEQ}x{BENCH_BATCH}' / 'top_ops.txt'
          ).stat().st_size > 0
  glue = run('benchmarks/glue_seeds.py', '--size=tiny', '--seq_len=16', '--seeds=2',
             '--steps=2', '--rounds=1', f'--out={tmp_path}/glue.json')
  assert glue.returncode == 0 and (tmp_path / 'glue.json').exists(), glue.stderr[-3000:]


_FAKE_GPU_TESTS = """
import os, time, pytest
pytestmark = pytest.mark.gpu
@pytest.fixture
def aborts_in_teardown():
  yield
  os.abort()
def test_a_passes(): pass
def test_b_aborts(): os.abort()
def test_c_fails(): assert 1 == 2, 'the reason, printed as it fails'
def test_d_hangs(): time.sleep(120)
def test_e_skips(): pytest.skip('no GPU')
def test_f_passes(aborts_in_teardown): pass
@pytest.mark.parametrize('p', ['a b'])
def test_g_spaced(p): pass
"""


def test_a_gpu_test_that_aborts_or_hangs_does_not_hide_the_others(tmp_path):
  """On an H100 (jax 0.11.2) cuDNN's dropout backward test aborted pytest, and the GPU
  tests after it never ran. Real pytest, real abort and hang: each is reported as such,
  every other test still runs, a failure's reason is in the log though the process that
  ran it was later killed, and the runner fails."""
  (tmp_path / 'pytest.ini').write_text('[pytest]\nmarkers =\n  gpu: needs a GPU\n')
  (tmp_path / 'test_fake_gpu.py').write_text(_FAKE_GPU_TESTS)
  (tmp_path / 'test_not_gpu.py').write_text('def test_not_marked(): pass\n')
  done = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, 'benchmarks', 'run_gpu_tests.py'),
       '--quiet_s=12', 'test_fake_gpu.py', 'test_not_gpu.py'],
      cwd=tmp_path, capture_output=True, text=True, timeout=120)
  log = done.stdout
  assert done.returncode == 1, log + done.stderr
  summary = log[log.index('gpu tests: '):]
  assert summary.splitlines()[0] == (
      'gpu tests: 2 crashed, 1 failed, 1 hung, 3 passed, 1 skipped'), log
  assert ('test_fake_gpu.py::test_b_aborts: CRASHED (exit -6: Fatal Python error: Aborted)'
          in summary), log
  assert 'test_fake_gpu.py::test_d_hangs: HUNG (no output in 12 s; killed)' in summary, log
  assert 'test_fake_gpu.py::test_c_fails: FAILED' in summary, log
  assert 'the reason, printed as it fails' in log[:log.index('test_d_hangs')], log
  # A crash after a test's outcome (its teardown) is the process's, not the next test's,
  # which still runs (it was blamed and dropped); an id with a space is run too.
  assert ('(after test_fake_gpu.py::test_f_passes): CRASHED (exit -6: Fatal Python error: '
          'Aborted)') in summary, log
  assert 'test_fake_gpu.py::test_g_spaced[a b] PASSED' in log and 'test_not_marked' not in log
  # Four processes for two crashes and one hang, not one per test.
  assert log.count('test session starts') == 4, log


def test_the_script_runs_the_gpu_tests_through_the_runner(tmp_path):
  _, log, ran = _run_script(tmp_path, _PYTHON_STAND_IN)
  [tests] = [c for c in ran if 'run_gpu_tests.py' in c]
  assert tests.split()[1:] == ['--quiet_s=60', *_gpu_test_files()], tests
  assert '== gpu tests: exit 0' in log, log
