"""The embedded corpus (README.md, "Data"): gensim's shortened Wikipedia dump, an installed
package's data, so the demo and the tests need no download.

It is turned into plain text the way one would for a full dump: gensim's `extract_pages` +
`filter_wiki` remove templates, tables, references and link syntax, and we keep casing and
punctuation (BERT's tokeniser needs real text, not gensim's lower-cased token lists).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import re

from bert_sym.input import import_tensorflow

SPLITS = ('train', 'validation')   # (sources.SPLITS: every source has these two)
EMBEDDED_DUMP = 'enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'

# Every `VALIDATION_EVERY`-th article (by a hash of its title, so the split does not move
# when the dump's order does) is held out for validation.
VALIDATION_EVERY = 10

# Trailing sections that are lists of citations and links rather than prose.
_BACK_MATTER = re.compile(
    r'^==+\s*(references|notes|see also|external links|further reading|bibliography|'
    r'sources|footnotes|citations)\s*==+\s*$', re.IGNORECASE | re.MULTILINE)
_HEADING = re.compile(r'^=+[^=\n].*=+\s*$', re.MULTILINE)
_EMPHASIS = re.compile(r"'{2,}")  # ''italic'', '''bold'''
_LIST_MARKER = re.compile(r'^[*#:;]+\s*', re.MULTILINE)
_SPACES = re.compile(r'[ \t\u00a0]+')
_MIN_PARAGRAPH_WORDS = 4  # drops image captions and leftovers of stripped templates


def wiki_to_text(markup: str) -> str:
  """Plain text of one article's wiki markup: paragraphs separated by '\n'."""
  from gensim.corpora import wikicorpus  # pylint: disable=import-outside-toplevel
  text = wikicorpus.filter_wiki(markup)
  back_matter = _BACK_MATTER.search(text)
  if back_matter:
    text = text[:back_matter.start()]
  text = html.unescape(text)
  text = _HEADING.sub('', text)
  text = _EMPHASIS.sub('', text)
  text = _LIST_MARKER.sub('', text)
  paragraphs = (_SPACES.sub(' ', line).strip() for line in text.split('\n'))
  return '\n'.join(p for p in paragraphs if len(p.split()) >= _MIN_PARAGRAPH_WORDS)


def is_validation_title(title: str) -> bool:
  digest = hashlib.md5(title.encode('utf-8')).digest()
  return int.from_bytes(digest[:4], 'little') % VALIDATION_EVERY == 0


@functools.cache
def embedded_articles() -> tuple[tuple[str, str], ...]:
  """(title, plain text) of every non-redirect article of the embedded dump, dump order."""
  from gensim.corpora import wikicorpus  # pylint: disable=import-outside-toplevel
  from gensim.test import utils  # pylint: disable=import-outside-toplevel
  path = utils.datapath(EMBEDDED_DUMP)
  articles = []
  with bz2.open(path, 'rb') as f:
    for title, markup, _ in wikicorpus.extract_pages(f, filter_namespaces=('0',)):
      if markup.lstrip().lower().startswith('#redirect'):
        continue
      text = wiki_to_text(markup)
      if text:
        articles.append((title, text))
  if not articles:
    raise ValueError(f'{path}: no articles with text in the embedded Wikipedia dump')
  return tuple(articles)


def embedded_documents(split: str) -> list[str]:
  """The embedded corpus's documents (one per article) of `split`, deterministic order."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r} for the embedded corpus; use one of {SPLITS}')
  want_validation = split == 'validation'
  return [text for title, text in embedded_articles()
          if is_validation_title(title) == want_validation]


def embedded_dataset(split: str, shuffle_files: bool = False, seed: int | None = None):
  """The embedded corpus's documents of `split` as a tf.data dataset of {'text'}."""
  del shuffle_files, seed  # a handful of articles: order is fixed, blocks are shuffled later
  tf = import_tensorflow()
  return tf.data.Dataset.from_tensor_slices({'text': embedded_documents(split)})
