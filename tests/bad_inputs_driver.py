"""Runs several command lines of one bert_sym entry point in one process (tests/test_bad_inputs.py).

  python -m tests.bad_inputs_driver MODULE CASES.json

Each case is the module's real `if __name__ == '__main__':` block (runpy), with its own
sys.argv and fresh flag definitions, so TF/JAX are imported once per entry point instead
of once per case. An exception that escapes the entry point is printed as the traceback
Python would print (a bug: user errors must end in one `prog: error:` line). Prints one
JSON list of {argv, code, seconds, stdout, stderr} as the last line.
"""

import contextlib
import io
import json
import runpy
import sys
import time
import traceback

from absl import app
from absl import flags


def _exit_code(e: SystemExit, stderr) -> int:
  if e.code is None:
    return 0
  if isinstance(e.code, int):
    return e.code
  print(e.code, file=stderr)   # what Python does with sys.exit('message')
  return 1


def run_case(module: str, argv: list[str], builtin_flags: set[str]) -> dict:
  for name in set(flags.FLAGS) - builtin_flags:   # the previous case's definitions
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  app._register_and_parse_flags_with_usage.done = False  # pylint: disable=protected-access
  sys.argv = [module, *argv]
  out, err = io.StringIO(), io.StringIO()
  start = time.perf_counter()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      runpy.run_module(module, run_name='__main__', alter_sys=True)
    except SystemExit as e:
      code = _exit_code(e, err)
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc(file=err)
      code = 1
  return dict(argv=argv, code=code, seconds=round(time.perf_counter() - start, 2),
              stdout=out.getvalue(), stderr=err.getvalue())


def main() -> None:
  module, cases_file = sys.argv[1:3]
  with open(cases_file) as f:
    cases = json.load(f)
  app.define_help_flags()   # absl's own --help/--helpfull stay defined across cases
  builtin_flags = set(flags.FLAGS)
  results = [run_case(module, argv, builtin_flags) for argv in cases]
  sys.stdout.write('\n' + json.dumps(results) + '\n')


if __name__ == '__main__':
  main()
