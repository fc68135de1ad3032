r"""The GPU-only tests (marked `gpu`), in as few processes as their crashes allow.

  python3 benchmarks/run_gpu_tests.py tests/test_cudnn_dropout.py tests/test_attention.py \
      [--quiet_s=90]

benchmarks/run_gpu.sh runs it first. A test can take its process down with it: cuDNN's
dropout backward aborted pytest on an H100 (jax 0.11.2), and every test after it went
unrun. A process per test cost each of them JAX's start-up on the GPU (16 of them, most
of two minutes of an eight-minute budget). So the tests run in one pytest process, which
reports each outcome as it ends (-v); when the process dies, the test it was in is reported
as crashed, with its exit status and last lines, and the tests after it go on in a new
process: N crashes cost N + 1 start-ups. A process that reports nothing for --quiet_s
seconds (a test hung in a kernel) is killed, and its test reported as hung.

Prints a line per test as it ends, then a summary; exit status 1 if any test failed,
crashed or hung (or none was found), else 0.
"""

import argparse
import os
import re
import subprocess
import sys
import threading

OUTCOME = re.compile(r'^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b')
# This module is also a pytest plugin (-p run_gpu_tests, from this folder): a failure's
# traceback is printed as it happens, not at the session's end, which a later crash or
# hang would never reach.
PYTEST = (sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-p', 'run_gpu_tests',
          '-m', 'gpu')
_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.abspath(__file__))] +
    [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))


def pytest_runtest_logreport(report):
  if report.failed:
    print(f'\n{report.nodeid} failed in its {report.when}:\n{report.longreprtext}', flush=True)


def collect(paths: list[str]) -> list[str]:
  """The ids of the gpu tests in `paths`, in pytest's order."""
  done = subprocess.run([*PYTEST, '-q', '--collect-only', *paths], capture_output=True,
                        text=True, check=False, env=_ENV)
  ids = [l for l in done.stdout.splitlines() if '::' in l and ' ' not in l]
  if done.returncode not in (0, 5):   # 5: nothing collected
    sys.exit(f'pytest could not collect {paths} (exit {done.returncode}):\n'
             f'{done.stdout[-2000:]}{done.stderr[-2000:]}')
  return ids


def run_until_it_ends_or_dies(ids: list[str], quiet_s: float):
  """Runs `ids` in one pytest process, echoing its output. Returns (outcomes by id,
  exit status, its last lines, whether it was killed for going quiet)."""
  process = subprocess.Popen([*PYTEST, '-v', '--tb=short', '-rfE', *ids], env=_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  went_quiet = threading.Event()

  def kill_when_quiet():
    went_quiet.set()
    process.kill()

  outcomes, tail = {}, []
  timer = threading.Timer(quiet_s, kill_when_quiet)
  timer.start()
  try:
    for line in process.stdout:
      print(line, end='', flush=True)
      tail = (tail + [line.rstrip()])[-60:]
      if match := OUTCOME.match(line):
        outcomes[match.group(1)] = match.group(2)
        timer.cancel()   # the next test gets its own quiet_s
        timer = threading.Timer(quiet_s, kill_when_quiet)
        timer.start()
  finally:
    timer.cancel()
  return outcomes, process.wait(), tail, went_quiet.is_set()


def _cause(tail: list[str], test: str) -> str:
  """What a dead process said last: Python's fatal error line if any (its traceback
  follows it), else its last line; without the test's own id, which -v printed first."""
  lines = [l.replace(test, '').strip() for l in tail]
  lines = [l for l in lines if l]
  fatal = [l for l in lines if l.startswith(('Fatal Python error', 'Segmentation fault'))]
  return (fatal or lines[-1:] or ['no output'])[0][:200]


def run(paths: list[str], quiet_s: float) -> dict[str, str]:
  pending = collect(paths)
  results = {}
  while pending:
    outcomes, status, tail, went_quiet = run_until_it_ends_or_dies(pending, quiet_s)
    results.update(outcomes)
    pending = [i for i in pending if i not in outcomes]
    if not pending:
      break
    if status in (0, 1) and not went_quiet:   # pytest ended on its own yet skipped some
      for test in pending:
        results[test] = f'NOT RUN (pytest exit {status})'
      break
    test, pending = pending[0], pending[1:]
    results[test] = (f'HUNG (no outcome in {quiet_s:.0f} s; killed)' if went_quiet else
                     f'CRASHED (exit {status}: {_cause(tail, test)})')
    print(f'\n{test} {results[test]}', flush=True)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('paths', nargs='+', help='test files or ids')
  parser.add_argument('--quiet_s', type=float, default=90.0,
                      help='kill a process that reports no outcome for this long')
  args = parser.parse_args()
  results = run(args.paths, args.quiet_s)
  counts = {}
  for outcome in results.values():
    counts[outcome.split(' ')[0]] = counts.get(outcome.split(' ')[0], 0) + 1
  print('gpu tests: ' + (', '.join(f'{n} {k.lower()}' for k, n in sorted(counts.items()))
                         or 'none found'), flush=True)
  bad = [t for t, o in results.items() if o.split(' ')[0] not in ('PASSED', 'SKIPPED', 'XFAIL')]
  for test in bad:
    print(f'  {test}: {results[test]}', flush=True)
  sys.exit(1 if bad or not results else 0)


if __name__ == '__main__':
  main()
