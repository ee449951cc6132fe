"""The test session never touches a user's cache."""
import os
import tempfile
from pathlib import Path

from robcomp._io import cache_dir


def test_cache_dir_is_a_fresh_temporary_directory():
    root = Path(tempfile.gettempdir()).resolve()
    assert cache_dir().resolve().is_relative_to(root)
    assert Path(os.environ["ROBCOMP_CACHE_DIR"]).name.startswith("robcomp-test-cache-")
