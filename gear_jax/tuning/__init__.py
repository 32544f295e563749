"""Hyper-parameter search on Optuna (the library behind ``python -m gear_jax.tune``):
`space` (the search space of a config), `study` (storage, sampler, pruner, the study
and its checks), `runner` (the trial loop), `report` (report.md, best.json)."""
