"""GEAR on Tmall "ijcai" (IJCAI-15) with the published hyper-parameters.

Command:
  python -m gear_jax.train --config configs/ijcai.py --workdir runs/ijcai
Data: data/ijcai.txt in the reference format; 423,423 users / 874,306 items after
preprocessing. The published recipe uses batches of 32 with 4-step gradient
accumulation (an effective batch of 128).
Expected: sampled Val NDCG@10 in the range the paper reports for ijcai. Runtime: the
item head dominates (874k items); the chunked loss keeps memory bounded
(docs/performance.md); a GPU is strongly recommended.
"""

from gear_jax.defaults import get_default_config


def get_config(model: str = 'gear'):
  config = get_default_config(model)
  config.data.path = 'data/ijcai.txt'
  config.train.batch_size = 32
  config.train.grad_accum = 4  # 32 x 4 = 128 sequences per Adam update
  config.train.num_epochs = 500
  # the item-loss chunk budget stays auto (train.loss_memory_mb = 0): 256 MB on CPU,
  # where 512 measured no faster at 874k items; 1/8 of the device's memory on a GPU
  config.eval.other_protocol = True
  config.eval.full_chunk = 65536
  return config
