"""Helpers shared by the evaluation tests: a record without what varies run to run."""

#: the record entries that are measurements of time, memory or the machine (they differ run to run)
TIMING_KEYS = {"attack_time_s", "latency", "peak_memory", "energy", "env"}


def strip(record: dict) -> dict:
    """``record`` without its timing entries (also the ensemble members' ``time_s``)."""
    out = {k: v for k, v in record.items() if k not in TIMING_KEYS}
    for ens in out.get("ensembles", {}).values():
        for m in ens["members"]:
            m.pop("time_s")
    return out
