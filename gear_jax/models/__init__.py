"""The models: shared blocks (`layers`, `kernels`), one module per model (`gear`,
`sasrec`), and `registry`, which maps ``config.model.name`` to a model and builds it.

This file imports nothing: import the member you need (``from gear_jax.models import
registry``). See docs/development.md, "Adding a model"."""
