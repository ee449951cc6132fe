"""Test configuration. TRITON_INTERPRET must be set before triton is imported anywhere, so that
``backend="triton"`` on CPU tensors runs the real kernels in Triton's interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ROBCOMP_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "robcomp"))

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
    from robcomp.data import load_digits_split

    return load_digits_split(seed=0)


@pytest.fixture(scope="session")
def mlp(digits):
    """A small MLP trained for a few epochs on the digits, shared by the attack and evaluation tests."""
    from robcomp.models import build_model
    from robcomp.train import TrainConfig, train

    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    return train(build_model("mlp", 64), xtr, ytr, TrainConfig(epochs=8, seed=0), progress=False)
