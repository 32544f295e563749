"""Run reports and comparisons, made from what a run directory holds.

  python -m gear_jax.report --workdir runs/demo [--output DIR]
  python -m gear_jax.report --workdir runs/a runs/b ... --output DIR

One workdir: ``report.md`` and its figures (``report_curves.png``, ``report_at_k.png``)
in the workdir (or --output). The workdir of a study (``gear_jax.tune``, it holds
tune.json): the study's report.md, figures and best.json in the workdir. Several: one
comparison table and overlaid curves, seeds grouped as mean ± std. The trainer writes the report at the end of every run; this
command regenerates it at any time, also while a run is going (the report then says it
is partial). The library is `gear_jax.reporting` (docs/reports.md).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from gear_jax import cli
from gear_jax.errors import UserError


def define_flags():
  flags.DEFINE_list('workdir', None, 'Run directories (several: a comparison); also '
                    'given as extra arguments.')
  flags.DEFINE_string('output', None, 'Where report.md and the figures go (default: the '
                      'workdir; required for a comparison).')
  flags.mark_flag_as_required('workdir')


@cli.main
def main(argv):
  from gear_jax import reporting
  f = flags.FLAGS
  workdirs = list(f.workdir) + list(argv[1:])
  if len(workdirs) == 1 and _is_study(workdirs[0]):
    from gear_jax.tuning import report
    if f.output:
      raise UserError('the report of a study is written in its workdir; drop --output')
    path, best = report.write(workdirs[0])
    print(f'wrote {path}' + (f' and {best}' if best else ''), file=sys.stderr)
    return
  if len(workdirs) == 1:
    record = reporting.load_run(workdirs[0])
    for n in record.notices:
      print(f'notice: {n}', file=sys.stderr)
    path = reporting.write_report(workdirs[0], f.output, record)
  else:
    if not f.output:
      raise UserError('a comparison of several runs needs --output DIR')
    path = reporting.write_comparison(workdirs, f.output)
  print(f'wrote {path}', file=sys.stderr)


def _is_study(workdir: str) -> bool:
  from gear_jax.tuning import runner
  return os.path.exists(os.path.join(workdir, runner.TUNE_RECORD))


if __name__ == '__main__':
  cli.run(main, define_flags)
