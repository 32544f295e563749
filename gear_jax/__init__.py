"""gear_jax: GEAR (multi-behavior sequential recommendation) in JAX/Flax."""

from gear_jax import hostalloc as _hostalloc

# Before numpy or jax start threads; see gear_jax/hostalloc.py (opt out:
# GEAR_JAX_HOST_ALLOCATOR=0).
_hostalloc.configure()
