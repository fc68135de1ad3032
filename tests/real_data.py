"""Where the tests find real-size data, and the rule for when it must be there.

Every end-to-end test runs on the committed fixtures (tests/glue_fixture: a few rows of
each GLUE task in the download-script layout, with its quirks). Only the tests that check
real sizes and real text (row counts of the full GLUE files, tokenisation of real
sentences) need the real data, marked `real_data`:

- BERT_SYM_DATA_DIR set: the data is expected there (glue/ in the GLUE download-script
  layout, wikitext-2/); if the directory is missing, the test session stops with an error.
- not set: `shared/data` beside the repository is used when it exists; otherwise the
  `real_data` tests are not collected (the summary says so), so a fresh clone runs
  everything else and reports no skips.
"""

import os
from pathlib import Path

ENV = 'BERT_SYM_DATA_DIR'
REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_GLUE_DIR = Path(__file__).resolve().parent / 'glue_fixture'


def expected() -> bool:
  return bool(os.environ.get(ENV))


def data_dir() -> Path:
  return Path(os.environ[ENV]) if expected() else REPO_ROOT.parent / 'shared' / 'data'


def available() -> bool:
  return data_dir().is_dir()


GLUE_DIR = data_dir() / 'glue'
