"""SASRec on the demo data: what GEAR's behaviors and times add over the item sequence.

Command:
  python -m gear_jax.train --config configs/demo_sasrec.py --workdir runs/demo_sasrec
Data, split, negatives, metrics and training recipe: configs/demo.py's. Model: SASRec
(model.name='sasrec'; 2 blocks, 1 head, d_model 32, dropout 0.2, padding hidden).
"""

import importlib.util
import os


def get_config():
  # configs/demo.py by path: config files are loaded by path, not as a package
  spec = importlib.util.spec_from_file_location(
      'demo', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.py'))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config()
  config.model.name = 'sasrec'
  config.model.n_head = 1
  config.model.mask_padding = True
  return config
