"""GPU (NVML) and host (psutil) utilisation tracking."""
from dynbatch.monitor.utilisation import UtilisationMonitor, default_sources, summarise

__all__ = ["UtilisationMonitor", "default_sources", "summarise"]
