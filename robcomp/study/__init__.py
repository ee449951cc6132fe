"""Studies: sweeps of models x recipes x attacks (``spec``), run resumably (``runner``) into result
files the report reads; the cache of trained checkpoints and the progress display.
"""
