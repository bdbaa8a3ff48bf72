import os
import sys
from pathlib import Path

# Four simulated CPU devices for the sharding tests; must be set before JAX starts.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Float64 for comparisons against dense references."""
    with jax.enable_x64(True):
        yield
