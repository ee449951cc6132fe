"""What machine and software a figure was measured on: every record carries this."""
from __future__ import annotations

import datetime
import os
import platform


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"), read where the OS exposes it; the
    architecture ("x86_64") only when it does not."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            import subprocess

            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
            if name:
                return name
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` from its metadata (a module's ``__version__``
    can disagree with what pip installed), None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | None = None) -> dict:
    """Device, driver, versions and date, as recorded next to every measurement."""
    import torch

    device = torch.device(device or "cpu")
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        try:
            import subprocess

            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            info["driver"] = None
    from robcomp._version import __version__

    info["robcomp"] = __version__
    return info


def triton_status() -> str:
    """One line: can Triton kernels run here, and how."""
    import torch

    try:
        import triton
    except Exception as e:
        return f"unavailable (triton does not import: {e})"
    if torch.cuda.is_available():
        return f"GPU kernels on {torch.cuda.get_device_name()} (triton {triton.__version__})"
    return (f"no GPU: kernels run only in the CPU interpreter (TRITON_INTERPRET=1, slow; "
            f"triton {triton.__version__}); on CPU backend=\"auto\" runs robcomp's CPU kernels (kernels/cpu.py)")
