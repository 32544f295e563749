"""gear_jax: GEAR (multi-behavior sequential recommendation) in JAX/Flax."""
