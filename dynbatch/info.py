"""``dynbatch info``: versions, devices, and which kernel backends are usable here (and why not)."""
from __future__ import annotations

import platform

import torch


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages a run depends on (recorded in every config.json)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("dynbatch", "torch", "torchvision", "triton", "numpy", "nvidia-ml-py"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, where ``platform.processor()`` is empty): runs on
    different CPUs differ in speed and in native bf16, so each record names its CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def collect() -> dict:
    info = {"versions": package_versions(), "platform": platform.platform(), "cpu": cpu_name(),
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        info["cuda"] = "not available"
    from dynbatch.ops import backend_status

    info["backends"] = backend_status()
    from dynbatch.monitor import default_sources

    sources, notes = default_sources()
    info["utilisation"] = {"sources": [s.name for s in sources], "unavailable": notes}
    return info


def render(info: dict) -> str:
    lines = ["dynbatch " + str(info["versions"].get("dynbatch"))]
    lines += [f"  {k}: {v}" for k, v in info["versions"].items() if k != "dynbatch"]
    lines.append(f"platform: {info['platform']}, {info['cpu']} ({info['cpu_threads']} torch threads)")
    lines.append(f"cuda: {info['cuda']}")
    lines.append("kernel backends:")
    for name, (ok, why) in info["backends"].items():
        lines.append(f"  {name:<7} {'usable' if ok else 'unavailable'}{': ' + why if why else ''}")
    u = info["utilisation"]
    lines.append(f"utilisation sources: {', '.join(u['sources']) or 'none'}")
    lines += [f"  unavailable: {n}" for n in u["unavailable"]]
    return "\n".join(lines)
