"""dagger_jax: DAgger for LLM software-engineering agents, JAX/TPU-native."""

__version__ = "0.1.0"
