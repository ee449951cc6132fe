"""What the README and docs/study.md say about the default study matches the study that runs."""
import re
from pathlib import Path

from robcomp.study.spec import default_spec, quick_spec

ROOT = Path(__file__).resolve().parent.parent


def _baselines(points):
    return len({(p.model, p.width, p.base, p.seed, str(sorted(p.train.items()))) for p in points})


def test_documented_point_counts_match_the_default_study():
    full, quick = default_spec().points(), quick_spec().points()
    expected = {len(full), len(quick)}
    for doc in ("README.md", "docs/study.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        counts = {int(n) for n in re.findall(r"\b(\d+)[ -]points?\b", text)} - {3}  # "3 points" = critical_drop
        assert counts, f"{doc} states no point count"
        assert counts <= expected, f"{doc} states {sorted(counts)} points; the studies have {sorted(expected)}"
        for n in re.findall(r"\b(\d+) (?:dense )?baselines\b", text):
            assert int(n) in {_baselines(full), _baselines(quick)}, (doc, n)
    study = (ROOT / "docs/study.md").read_text(encoding="utf-8")
    assert f"{len(full)} points" in study and re.search(rf"\b{len(quick)}[ -]point", study)
