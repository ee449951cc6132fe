"""Studies: sweeps of models x recipes x attacks (``spec``), run resumably (``runner``) into result
files the report reads; the cache of trained checkpoints and the progress display.

``robcomp.study.run_study(spec, out)`` is the Python entry of ``robcomp run``; it is resolved on
first use so that importing ``robcomp.study.spec`` (which the report reads) stays light.
"""

__all__ = ["run_study"]


def __getattr__(name):
    if name == "run_study":
        from robcomp.study.runner import run_study

        return run_study
    raise AttributeError(f"module 'robcomp.study' has no attribute {name!r}")
