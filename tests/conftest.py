"""Test configuration. TRITON_INTERPRET must be set before triton is imported anywhere, so that
``backend="triton"`` on CPU tensors runs the real kernels in Triton's interpreter."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# Always a fresh cache: tests must neither read nor fill a user's exported ROBCOMP_CACHE_DIR.
_CACHE = tempfile.mkdtemp(prefix="robcomp-test-cache-")
os.environ["ROBCOMP_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests use tiny models: a second thread only contends (CI has 2 cores), and one thread keeps
# CPU results reproducible run to run.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    """The embedded digits split: x_train, y_train, x_test, y_test."""
    from robcomp.zoo.data import load_digits_split

    return load_digits_split(seed=0)


@pytest.fixture(scope="session")
def mlp(digits):
    """A small MLP trained for a few epochs on the digits, shared by the attack and evaluation tests."""
    from robcomp.zoo.models import build_model
    from robcomp.training.train import TrainConfig, train

    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    return train(build_model("mlp", 64), xtr, ytr, TrainConfig(epochs=8, seed=0), progress=False)
