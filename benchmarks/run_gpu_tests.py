r"""The GPU-only tests (marked `gpu`), in as few processes as their crashes allow.

  python3 benchmarks/run_gpu_tests.py tests/test_cudnn_dropout.py tests/test_attention.py \
      [--quiet_s=90]

benchmarks/run_gpu.sh runs it first. A test can take its process down with it: cuDNN's
dropout backward aborted pytest on an H100 (jax 0.11.2), and every test after it went
unrun. A process per test cost each of them JAX's start-up on the GPU (16 of them, most
of two minutes of an eight-minute budget). So the tests run in one pytest process, which
reports each outcome as it ends (-v); when the process dies, the test it was in is reported
as crashed, with its exit status and Python's fatal error line (a death between tests, in a
teardown or from a late GPU error, is reported after the test that ended last), and the
tests after it go on in a new process: N crashes cost N + 1 start-ups. A process that
prints nothing for --quiet_s seconds (a test hung in a kernel) is killed and its test
reported as hung.

Prints a line per test as it ends, then a summary; exit status 1 if any test failed,
crashed or hung (or none was found), else 0.
"""

import argparse
import os
import subprocess
import sys
import threading

OUTCOMES = ('PASSED', 'FAILED', 'SKIPPED', 'ERROR', 'XFAIL', 'XPASS')
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
  """The ids of the gpu tests in `paths`, in pytest's order (a parameter may hold spaces)."""
  done = subprocess.run([*PYTEST, '-q', '--collect-only', *paths], capture_output=True,
                        text=True, check=False, env=_ENV)
  ids = [l.strip() for l in done.stdout.splitlines() if '::' in l]
  if done.returncode not in (0, 5):   # 5: nothing collected
    sys.exit(f'pytest could not collect {paths} (exit {done.returncode}):\n'
             f'{done.stdout[-2000:]}{done.stderr[-2000:]}')
  return ids


def _read(line: str, ids: list[str]):
  """(test id, outcome or None) of a -v line that starts a test ('ID ') or ends one
  ('ID PASSED ...'); (None, None) for any other line."""
  test = max((i for i in ids if line.startswith(i + ' ') or line.rstrip() == i),
             key=len, default=None)
  if test is None:
    return None, None
  word = line[len(test):].split()[:1]
  return test, (word[0] if word and word[0] in OUTCOMES else None)


def run_until_it_ends_or_dies(ids: list[str], quiet_s: float):
  """Runs `ids` in one pytest process, echoing its output. Returns (outcomes by id, the
  test started and not ended when the output stopped (None: between tests), exit status,
  its last lines, whether it was killed for going quiet)."""
  process = subprocess.Popen([*PYTEST, '-v', '--tb=short', '-rfE', *ids], env=_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  went_quiet = threading.Event()

  def kill_when_quiet():
    went_quiet.set()
    process.kill()

  outcomes, tail, running = {}, [], None
  timer = threading.Timer(quiet_s, kill_when_quiet)
  timer.start()
  try:
    for line in process.stdout:
      # Any line restarts the clock (a slow start-up or collection is not a hang); -v
      # ends a test's line only with its outcome, so a hung test prints nothing.
      timer.cancel()
      timer = threading.Timer(quiet_s, kill_when_quiet)
      timer.start()
      print(line, end='', flush=True)
      tail = (tail + [line.rstrip()])[-60:]
      test, outcome = _read(line, ids)
      if test is not None and outcome is None and test not in outcomes:
        running = test
      elif outcome is not None:
        outcomes[test], running = outcome, None
  finally:
    timer.cancel()
  return outcomes, running, process.wait(), tail, went_quiet.is_set()


def _cause(tail: list[str]) -> str:
  """What a dead process said last: Python's fatal error line if any (printed wherever the
  output stood, even after a test's id or progress), else its last line."""
  for line in tail:
    for marker in ('Fatal Python error', 'Segmentation fault'):
      if marker in line:
        return line[line.index(marker):].strip()[:200]
  lines = [l.strip() for l in tail if l.strip()]
  return (lines[-1:] or ['no output'])[0][:200]


def run(paths: list[str], quiet_s: float) -> dict[str, str]:
  pending = collect(paths)
  results = {}
  while pending:
    outcomes, running, status, tail, went_quiet = run_until_it_ends_or_dies(pending, quiet_s)
    results.update(outcomes)
    pending = [i for i in pending if i not in outcomes]
    if not pending:
      break
    if status in (0, 1) and not went_quiet:   # pytest ended on its own yet skipped some
      for test in pending:
        results[test] = f'NOT RUN (pytest exit {status})'
      break
    why = (f'no output in {quiet_s:.0f} s; killed' if went_quiet else
           f'exit {status}: {_cause(tail)}')
    if running is not None:   # the test it was in
      results[running] = f'{"HUNG" if went_quiet else "CRASHED"} ({why})'
      pending.remove(running)
      print(f'\n{running} {results[running]}', flush=True)
    elif outcomes:   # between tests: a teardown or a late error; the tests after still run
      last = list(outcomes)[-1]
      results[f'(after {last})'] = f'CRASHED ({why})'
      print(f'\nthe process died after {last} ended ({why})', flush=True)
    else:   # before its first test (an import or a collection): no test will run
      for test in pending:
        results[test] = f'NOT RUN (the process died before its first test: {why})'
      break
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('paths', nargs='+', help='test files or ids')
  parser.add_argument('--quiet_s', type=float, default=90.0,
                      help='kill a pytest process that prints nothing for this long')
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
