import os
import sys
from pathlib import Path

# The caller's XLA flags (--xla_cpu_max_isa=SSE4_2 or AVX2 round float32 as another CPU does: README,
# "Tests and versions"), kept for the subprocesses that set their own device count.
CALLER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
# Four simulated CPU devices for the sharding tests; must be set before JAX starts.
os.environ["XLA_FLAGS"] = CALLER_XLA_FLAGS + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# float32's machine epsilon (2^-23 ≈ 1.2e-7). A float32 comparison between two computations (jit and
# eager, two graphs, two device counts) allows a multiple of it sized by the depth of the computation:
# XLA compiles for the CPU it runs on (vector width, FMA, fusion), so the last bits differ across CPUs.
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture
def x64():
    """Float64 for comparisons against dense references."""
    with jax.enable_x64(True):
        yield


# Seconds each file takes on 2 busy cores (`pytest --durations=0`), longest first. pytest-xdist hands
# whole files to its workers in collection order (--dist loadfile --no-loadscope-reorder in
# pyproject.toml): started longest first, the two workers finish within a minute of each other, where
# xdist's own order (most tests first) starts the 4-minute paper-path file last. A file not listed
# runs after these.
FILE_SECONDS = {"test_paper_path.py": 216, "test_spectra.py": 72, "test_multiprocess.py": 68, "test_figures.py": 64,
                "test_train.py": 59, "test_bench.py": 47, "test_rules.py": 47, "test_probe.py": 37,
                "test_curvature.py": 29, "test_data.py": 22, "test_activations.py": 18, "test_models.py": 18}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: each file keeps its order


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the engine, data, scripts and bench (deselect: -m 'not slow')")
    config.addinivalue_line("markers", "optimized: compile with XLA's optimisations (FLOP and memory counts)")


@pytest.fixture(autouse=True)
def _fast_compiles(request):
    """Tests compile many small programs once each: XLA's optimisations cost more time there than
    they save, and change no value beyond rounding. Tests marked `optimized` (XLA's FLOP counts)
    compile as a run does."""
    jax.config.update("jax_disable_most_optimizations", request.node.get_closest_marker("optimized") is None)
    yield


import common  # noqa: E402

use_compile_cache = common.use_compile_cache  # the real one, for the test that checks it


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    """Scripts keep compiled steps in the user's cache folder; tests leave it alone."""
    monkeypatch.setattr(common, "use_compile_cache", lambda path: None)
