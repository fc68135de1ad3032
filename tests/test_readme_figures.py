"""The README's measured figures are the recorded ones (benchmarks/results/*.json and
benchmarks/RESULTS.md): a rerun that records new numbers fails here until the README says
them too. Ranges are min-max over the records, at the README's rounding."""

import decimal
import json
import pathlib
import re

import pytest

from bert_sym import aot

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ' '.join((ROOT / 'README.md').read_text().split())   # line breaks as spaces
RESULTS = ROOT / 'benchmarks' / 'results'


def _load(name):
  return json.loads((RESULTS / name).read_text())


def _h200_rows():
  """Our train step on one H200, 2026-11-26 (seq 128 and seq 512 were two runs)."""
  return [r for name in ('accelerator_nvidia-h200_2026-11-26.json',
                         'accelerator_nvidia-h200_2026-11-26_seq512.json')
          for r in _load(name)['results'] if r.get('impl') == 'ours']


def _range(values, fmt):
  return f'{fmt(min(values))}-{fmt(max(values))}'


def test_glue_seeds_speedups():
  cpu = [_load(p.name)['speedup_parallel_over_sequential']
         for p in RESULTS.glob('glue_seeds_cpu*.json')]
  assert len(cpu) >= 2
  assert f'not faster ({_range(cpu, lambda v: f"{v:.2f}x")},' in README
  gpu = _load('glue_seeds_gpu_base.json')
  assert f'together is {gpu["speedup_parallel_over_sequential"]:.2f}x faster' in README
  extra = (gpu['first_run_seconds_with_compile']['parallel']
           - gpu['first_run_seconds_with_compile']['sequential'])
  assert f'compiles about {round(extra, -1):.0f} s longer' in README


def _per_core(prefix):
  """The tokens/s per core column of every RESULTS.md table row starting with `prefix`."""
  rows = [line for line in (ROOT / 'benchmarks' / 'RESULTS.md').read_text().splitlines()
          if line.startswith(f'| {prefix}')]
  return [float(row.strip('|').split('|')[-1].replace(',', '')) / 1e6 for row in rows]


def test_input_pipeline_ranges():
  millions = lambda v: f'{v:.1f}'
  shards, streaming = _per_core('exported shards'), _per_core('streaming')
  assert len(shards) >= 3 and len(streaming) >= 9
  assert f'The shard reader serves {_range(shards, millions)}M tokens/s per core' in README
  assert f'the streaming reader {_range(streaming, millions)}M tokens/s per core' in README


@pytest.mark.parametrize('path,seq,batch,figure', [
    ('fused', 128, 256, '{} the Hugging Face PyTorch model'),
    ('fused', 512, 32, 'and {} at seq 512'),
    ('xla', 128, 256, 'is {} HF at seq 128'),
    ('xla', 512, 32, 'and {} at seq 512; MFU'),
])
def test_h200_ratios_against_hugging_face(path, seq, batch, figure):
  rows = [r for r in _h200_rows()
          if r['path'] == path and r['seq'] == seq and r['batch'] == batch]
  assert {r['attention'] for r in rows} == {'standard', 'symmetric', 'pairwise'}
  ratios = [r['vs_hf'] for r in rows]
  assert figure.format(_range(ratios, lambda v: f'{v:.2f}x').replace('x-', '-')) in README


def test_h200_fast_recipe_tokens_per_second_and_mfu():
  rows = _h200_rows()
  k = {r['attention']: f'{round(r["tokens_per_s"] / 1e3)}k' for r in rows
       if r['path'] == 'fused' and r['seq'] == 128}
  assert (f'runs {k["standard"]} tokens/s for standard, {k["symmetric"]} symmetric and '
          f'{k["pairwise"]} pairwise at seq 128 x 256') in README
  percent = lambda v: f'{100 * v:.0f}'
  fast = [r['mfu'] for r in rows if r['path'] == 'fused']
  paper = [r['mfu'] for r in rows if r['path'] == 'xla']
  assert (f'MFU {_range(fast, percent)}% on the fast recipe and {_range(paper, percent)}% '
          'on the paper recipe') in README


def test_demo_training_figures():
  """The opening paragraph's demo run, as benchmarks/demo.py recorded it."""
  install = _load('demo_cpu-2core.json')['install']
  assert (f'about {5 * round(install["seconds"] / 5):.0f} s of installing (a '
          f'{install["venv_gb"]:.1f} GB `.venv`') in README
  demo = _load('demo_cpu-2core.json')['train']
  assert demo['steps'] == 300 and demo['eval_loss_first_step'] == 0
  assert (f'about {5 * round(demo["train_seconds"] / 5):.0f} s of training (300 steps; '
          f'validation MLM loss {demo["eval_loss_first"]:.2f} -> '
          f'{demo["eval_loss_last"]:.2f};') in README


def test_demo_glue_figures():
  """`make glue-local`'s time and the GLUE table of the demo model, as recorded."""
  record = _load('demo_cpu-2core.json')
  local = record['glue_local']
  assert local['flags'] == ['--tasks=rte,mrpc', '--seeds=1', '--config=configs/glue.py:runlocal',
                            '--config.max_seq_len=64']   # the Makefile's glue-local
  assert f'from a local GLUE copy (about {10 * round(local["seconds"] / 10):.0f} s)' in README
  table = record['glue_table']
  assert (f'took about {round(table["seconds"] / 60)} minutes for the three seeds' in README)
  for flag in table['flags']:
    assert flag in README   # the README's command is the one measured
  stats = table['over_seeds']
  cell = lambda s: f'{s["mean"]:.2f} +- {s["std"]:.2f}'
  row = ' | '.join(['1-3', f'{cell(stats["glue_partial"])} (partial 5/9)',
                    f'{cell(stats["glue_full_partial"])} (partial 6/10)'] +
                   [cell(stats[task]) for task in ('mrpc', 'cola', 'rte', 'stsb', 'sst2', 'wnli')])
  assert f'| {row} |' in README


def test_fast_recipe_against_paper_recipe():
  """CPU: the two recipes' final MLM loss (RESULTS.md); H200: the fast step's speed and
  memory against the paper step's, per attention variant."""
  results_md = (ROOT / 'benchmarks' / 'RESULTS.md').read_text()
  final = {name: re.search(rf'^\| [\d.]+ \({name}\) .*\| ([\d.]+) \(([\d.]+)\) \|$',
                           results_md, re.MULTILINE) for name in ('paper', 'fast')}
  spread = max(float(m[2]) for m in final.values())
  assert (f'({final["fast"][1]} vs {final["paper"][1]}, seed spread {spread:.2f};'
          in README)
  rows = {(r['path'], r['seq'], r['attention']): r for r in _h200_rows()}
  speedup, less_memory = {}, {}
  for seq in (128, 512):
    pairs = [(rows[('fused', seq, a)], rows[('xla', seq, a)])
             for a in ('standard', 'symmetric', 'pairwise')]
    speedup[seq] = _range([f['tokens_per_s'] / x['tokens_per_s'] for f, x in pairs],
                          lambda v: f'{v:.2f}')
    less_memory[seq] = [x['peak_memory_gib'] - f['peak_memory_gib'] for f, x in pairs]
  assert (f'is {speedup[128]}x (seq 128) and {speedup[512]}x (seq 512) faster than '
          "`paper`'s over the three variants") in README
  low, high = min(less_memory[128] + less_memory[512]), max(less_memory[128] + less_memory[512])
  assert f'with {low:.0f}-{high:.0f} GiB less memory' in README


def test_streaming_rates_on_loaded_and_idle_machines():
  """The two ranges of the input section: RESULTS.md sections that say the machine was
  idle, and the others."""
  sections = re.split(r'^###? ', (ROOT / 'benchmarks' / 'RESULTS.md').read_text(),
                      flags=re.MULTILINE)
  rates = {True: [], False: []}
  for section in sections:
    for line in section.splitlines():
      if line.startswith('| streaming'):
        rates['idle' in section].append(float(line.strip('|').split('|')[-1]
                                              .replace(',', '')) / 1e6)
  millions = lambda v: f'{v:.1f}M'
  assert (f'Measured: {_range(rates[False], millions).replace("M-", "-")} tokens/s per core '
          f'at seq 512 with masking on a loaded machine, '
          f'{_range(rates[True], millions).replace("M-", "-")} on an idle one') in README


def test_tpu_v4_8_preflight_figures():
  rows = [json.loads(line) for line in
          (RESULTS / 'tpu_aot_cpu-2core_2026-12-02.jsonl').read_text().splitlines()]
  pick = lambda recipe: next(r['report'] for r in rows if r['config'] == 'sym_base' and
                             r['recipe'] == recipe and r['seq'] == 512 and
                             r['topology'] == 'v4-8')
  fast, paper = pick('fast'), pick('paper')
  gib = lambda b: b / 2**30
  assert fast['fits'] and not paper['fits']
  assert (f'on a v4-8 the fast recipe fits ({gib(fast["train_step"]["memory"]["total"]):.1f} '
          f'of {gib(fast["hbm_bytes_per_chip"]):.0f} GiB per chip)') in README
  accumulated = re.search(r'fits with optimizer\.grad_accum_steps=2 \(([\d.]+) GiB\)',
                          (ROOT / 'benchmarks' / 'RESULTS.md').read_text())[1]
  rounded = decimal.Decimal(accumulated).quantize(decimal.Decimal('0.1'),
                                                   rounding=decimal.ROUND_HALF_UP)
  assert f'`--config.optimizer.grad_accum_steps=2` ({rounded} GiB)' in README


def test_fsdp_memory_figures():
  """bert-base on v4-8, TPU compiler: the newest FSDP row of RESULTS.md's table (rows in
  the order the code changed), data parallelism's, and FSDP's before the constraints."""
  text = (ROOT / 'benchmarks' / 'RESULTS.md').read_text()
  table = text.split('### FSDP, 2026-12-04')[1].split('\n\n')[2]
  rows = [(name.strip(), float(gib)) for name, gib in
          re.findall(r'^\| ([^|]+) \| ([\d.]+) GiB \|', table, re.M)]
  fsdp = [gib for name, gib in rows if name.startswith('fsdp=4')]
  data = [gib for name, gib in rows if name.startswith('data=4')]
  assert len(fsdp) >= 3 and len(data) == 1
  assert (f'bert-base on v4-8: {fsdp[-1]:.1f} GiB a chip with FSDP, {data[0]:.1f} with data '
          f'parallelism, where FSDP needed {fsdp[0]:.1f} before') in README


def test_cpu_attention_variant_step_times():
  results = _load('attention_variants_cpu-2core_quiet.json')['results']
  fewer = 1 - results['pairwise']['xla_gflops_per_step'] / results['standard'][
      'xla_gflops_per_step']
  assert (f'the pairwise step does {100 * fewer:.1f}% fewer FLOPs (as XLA counts them) than '
          f'standard but takes '
          f'{results["pairwise"]["ratio_to_standard"]:.3f}x its time, symmetric '
          f'{results["symmetric"]["ratio_to_standard"]:.3f}x') in README


def test_gpu_preflight_figures():
  record = sorted(RESULTS.glob('gpu_aot_*.jsonl'))[-1]   # the newest, as run_gpu.sh's test
  rows = [json.loads(line) for line in record.read_text().splitlines()]
  total_gib = lambda r: r['report']['train_step']['memory']['total'] / 2**30
  differences = [abs(total_gib(r) / r['measured_peak_gib'] - 1) for r in rows
                 if r['measured_peak_gib']]
  assert len(differences) == 8
  assert f'within {max(differences):.1%} of the peak an H200 measured for each of the eight' \
      in README
  paper = {r['scan']: r for r in rows if (r['attention'], r['path'], r['seq'], r['batch'])
           == ('standard', 'xla', 512, 256)}
  hbm = paper[True]['report']['hbm_bytes_per_chip'] / 2**30
  assert not paper[True]['report']['fits'] and paper[False]['report']['fits']
  assert (f'with scanned layers needs {total_gib(paper[True]):.1f} GiB, over an H200\'s '
          f'{hbm:.1f} (unscanned: {total_gib(paper[False]):.1f} GiB)') in README
  # Our Pallas kernel: its forward and backward Triton kernels in every layer of the step.
  pallas = [r['report'] for r in rows if r['path'] == 'pallas_dropout']
  assert pallas and all(r['kernel'] == 'pallas' and r['fits'] and
                        list(r['train_step']['custom_calls'].values()) == [2 * 12] and
                        set(r['train_step']['custom_calls']) <= set(aot.TRITON_CALLS)
                        for r in pallas), pallas
  assert 'compiles its forward and backward Triton kernels inside the bert-base train step' \
      in README
  fast = {r['scan']: r for r in rows if (r['attention'], r['path'], r['seq'], r['batch'])
          == ('standard', 'fused', 128, 256)}
  assert total_gib(fast[True]) > total_gib(fast[False])
  assert (f'seq 128 x 256 {total_gib(fast[True]):.1f} GiB against '
          f'{total_gib(fast[False]):.1f} unscanned') in README


def test_the_read_retries_are_the_ones_the_readme_names():
  from bert_sym.checkpoint import restoring  # pylint: disable=g-import-not-at-top
  waits = [restoring.BACKOFF_SECONDS * 2 ** i for i in range(restoring.READ_ATTEMPTS - 1)]
  assert (f'Retried {restoring.READ_ATTEMPTS - 1} times with back-off '
          f'({", ".join(f"{w:g}" for w in waits)} s)') in README


def test_h100_figures():
  """One H100, 2026-12-06: each ratio from its own record (HF in the same run)."""
  rows = [r for name in ('accelerator_nvidia-h100_2026-12-06.json',
                         'accelerator_nvidia-h100_512x32_2026-12-06.json',
                         'accelerator_nvidia-h100_pairwise_2026-12-06.json')
          for r in _load(name)['results'] if r.get('impl') == 'ours' and 'step_ms' in r]
  ours = {(r['attention'], r['path'], r['seq'], r['batch']): r for r in rows}
  ratio = lambda *key: f'{ours[("standard",) + key]["vs_hf"]:.2f}x'
  assert (f'the fast recipe is {ratio("fused", 128, 256)} HF at seq 128 x 256, '
          f'{ratio("fused", 512, 128)} at 512 x 128 and {ratio("fused", 512, 32)} at 512 x 32'
          ) in README
  fast = [r['mfu'] for r in rows if r['path'] == 'fused' and r['attention'] == 'standard']
  percent = lambda v: f'{100 * v:.0f}'
  assert f'(MFU {_range(fast, percent)}%), the paper recipe on xla {ratio("xla", 128, 256)}' \
      in README
  pairwise = [ours[('pairwise', 'fused', s, b)]['step_ms'] / ours[('standard', 'fused', s, b)]
              ['step_ms'] for s, b in ((128, 256), (512, 128))]
  assert f"pairwise's fast step {_range(pairwise, lambda v: f'{v:.2f}x').split('-')[0]}" \
      in README and max(pairwise) < 0.995
  failed = [r for r in _load('accelerator_nvidia-h100_2026-12-06.json')['results']
            if r.get('path') == 'fused_dropout' and r.get('impl') == 'ours']
  assert failed and all('step_ms' not in r for r in failed)   # "did not finish a step"


def test_lean_backward_tpu_figures():
  """The v4-8 paper-recipe compile with and without model.lean_backward, as README says."""
  record = json.loads((RESULTS / 'tpu_aot_lean_backward_cpu-2core_2026-12-06.json').read_text())
  lean, autodiff = record['reports']['True'], record['reports']['False']
  assert lean['fits'] and not autodiff['fits']
  assert lean['attention_impl'] == autodiff['attention_impl'] == 'xla'
  assert (lean['topology'], lean['batch_size'], lean['seq_len']) == ('v4-8', 256, 512)
  readme = ' '.join(README.split())
  assert (f'the paper recipe fits the v4-8 scanned too, '
          f'{lean["train_step"]["memory"]["total"] / 2**30:.1f} GiB per chip, where '
          f'autodiff\'s is {autodiff["bytes_over_hbm"] / 2**30:.1f} GiB over') in readme
