"""Import a reference (PyTorch) GEAR model as an orbax checkpoint.

  python -m gear_jax.convert --input FILE --output DIR [--config configs/retail.py]
      [--verify]

FILE is an ``.npz`` of the PyTorch state_dict (PyTorch key names, optionally prefixed
with ``param/`` as in the parity fixture and/or Lightning's ``backbone.``), or a
Lightning ``.ckpt`` when torch is importable. Sizes come from the arrays; n_head,
max_len and alpha come from the file's ``config_json`` entry when present, otherwise
from --config. DIR receives ``checkpoints/0`` and ``config.json``, so
``python -m gear_jax.evaluate --workdir DIR`` evaluates it (point ``data.path`` at
the data set it was trained on).

With --verify and ``input/*`` + ``output/*`` arrays in FILE, the converted model is
run on those inputs and one JSON line is printed:
  {"max_abs_error": {"logits_item", "logits_behavior", "scores", "loss", "grad"},
   "ok": true|false}; the exit status is 1 when any error exceeds 1e-4.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from gear_jax import cli

FLAGS = flags.FLAGS


def define_flags():
  cli.define_config_file('Config for what the weights do not tell (n_head, max_len, '
                         'alpha) and for evaluation.', required=False)
  flags.DEFINE_string('input', None, 'Reference model: .npz state_dict or .ckpt.')
  flags.DEFINE_string('output', None, 'Directory for the orbax checkpoint.')
  flags.DEFINE_bool('verify', False, 'Check outputs and gradients against the '
                    'reference arrays in --input.')
  flags.mark_flags_as_required(['input', 'output'])


@cli.main
def main(argv):
  cli.no_arguments(argv)
  from gear_jax import converter, defaults
  config = cli.config_from_flag() or defaults.get_default_config()
  report = converter.convert(FLAGS.input, FLAGS.output, config, do_verify=FLAGS.verify)
  verdict = report.pop('verify', None)
  print(f'converted {FLAGS.input} -> {report["output"]} ({report["num_params"]:,} '
        f'parameters, {report["num_items"]:,} items, d_model {report["d_model"]}, '
        f'{report["n_layer"]} upper layers, {report["n_head"]} heads)', file=sys.stderr)
  if verdict is not None:
    print(json.dumps(verdict))
    if not verdict['ok']:
      sys.exit(1)


if __name__ == '__main__':
  cli.run(main, define_flags)
