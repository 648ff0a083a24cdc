"""Policies: who acts in an episode. `make_student` / `make_teacher` (factory.py) build them from
the config; base.py says what a policy is.

    base.py            Policy, EpisodeView, LabelError
    factory.py         make_student (jax | sglang engine), make_teacher (oracle | openai)
    jax_policy.py      the student sampled in process
    sglang.py          the student behind an SGLang server (batched /generate, weight sync)
    launch.py          rollout servers as processes (start, wait for /health, stop)
    serve.py           `dagger-jax serve`: SGLang's API and OpenAI's chat API over the JAX sampler
    openai_teacher.py  a teacher behind any OpenAI-compatible chat endpoint
    oracle.py          the scripted teacher that knows the gold patch
    cli.py             `dagger-jax generate`, `dagger-jax serve`
"""

from dagger_jax.policies.factory import make_student, make_teacher  # noqa: F401  (public API)
