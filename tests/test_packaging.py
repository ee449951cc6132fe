"""The regular (non-editable) build ships ``kernels/`` as ``robcomp.kernels`` and the console script."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_maps_kernels_into_robcomp(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("robcomp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "robcomp/kernels/reference.py" in names
    assert not any(n.startswith("kernels/") for n in names)  # no top-level `kernels` package clash
    # every module of every subpackage, and the default study, ship (pyproject lists the packages)
    source = {f"robcomp/{q.relative_to(ROOT / 'robcomp').as_posix()}" for q in (ROOT / "robcomp").rglob("*.py")
              if q.relative_to(ROOT / "robcomp").parts[0] != "kernels"}
    assert source <= names, sorted(source - names)
    assert "robcomp/study/default_study.toml" in names
    assert "robcomp/study/memory_bound_study.toml" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "robcomp = robcomp.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
