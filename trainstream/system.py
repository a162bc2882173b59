"""
System metrics of a run, on request: CPU, memory, and each NVIDIA GPU's
utilisation and memory, logged as ``system/*`` metrics every few seconds by
a daemon thread of their own (never the training thread, never the reactor).

``trainstream.init(system_metrics=True)``, the adapters' ``system_metrics=``,
or ``TRAINSTREAM_SYSTEM_METRICS=1`` for every run a process opens
(``TRAINSTREAM_SYSTEM_INTERVAL`` sets the seconds, 5 by default).

The metrics (the step is the sample's number, 0, 1, 2...; each point has its
time: the dashboard's time axis lines them up with training):

- ``system/cpu_percent``: the machine's CPU use (all cores, 0..100);
- ``system/process_cpu_percent``: this process's (100 per busy core);
- ``system/memory_percent``: the machine's memory in use;
- ``system/process_rss_mb``: this process's resident memory (MiB);
- ``system/gpu{i}/utilization_percent``, ``system/gpu{i}/memory_percent``,
  ``system/gpu{i}/memory_used_mb``: per GPU, where the NVIDIA management
  library answers (``nvidia-ml-py``'s ``pynvml``; no GPU, no driver or no
  package: no GPU metrics).

Needs ``psutil`` (``pip install 'trainstream[system]'``); without it one
warning says so, and no thread starts.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any

from trainstream.api import RunAPI

__all__ = [
    "DEFAULT_INTERVAL",
    "ENV",
    "INTERVAL_ENV",
    "SystemMonitor",
    "interval_from",
    "sample",
]

_logger = logging.getLogger(__name__)

#: Seconds between samples by default.
DEFAULT_INTERVAL = 5.0
#: Turns system metrics on for every run the process opens (``1``, ``true``, ``yes``, ``on``).
ENV = "TRAINSTREAM_SYSTEM_METRICS"
#: Seconds between samples when turned on by :data:`ENV`.
INTERVAL_ENV = "TRAINSTREAM_SYSTEM_INTERVAL"
_MIB = 1024 * 1024
_warned = False


def interval_from(option: bool | float | None) -> float | None:
    """
    The sampling interval asked for, or ``None`` for no system metrics.

    :param option: ``True`` (every :data:`DEFAULT_INTERVAL` s), a number of
        seconds (> 0), ``False``/``0`` (off), or ``None``: the environment
        (:data:`ENV`, :data:`INTERVAL_ENV`).
    :raises ValueError: for a negative or non-numeric interval (naming it).
    """
    if option is None:
        raw = os.environ.get(ENV, "").strip().lower()
        if raw not in ("1", "true", "yes", "on"):
            return None
        text = os.environ.get(INTERVAL_ENV, "").strip()
        if not text:
            return DEFAULT_INTERVAL
        try:
            option = float(text)
        except ValueError:
            raise ValueError(f"${INTERVAL_ENV} must be a number of seconds, not {text!r}") from None
    if option is True:
        return DEFAULT_INTERVAL
    if option is False:
        return None
    if not isinstance(option, (int, float)) or option != option or option < 0:
        raise ValueError(f"system_metrics must be True, False or seconds > 0, not {option!r}")
    return float(option) or None


def _import_psutil() -> Any:
    global _warned
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        if not _warned:
            _warned = True
            warnings.warn(
                "trainstream: system metrics need psutil: pip install 'trainstream[system]'",
                stacklevel=4,
            )
        return None
    return psutil


def _import_nvml() -> Any:
    try:
        import pynvml  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no driver, no GPU: no GPU metrics
        _logger.debug("trainstream: no GPU metrics (%s)", e)
        return None
    return pynvml


class _Gpus:
    """The NVIDIA GPUs, through an initialised ``pynvml``."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        count = int(nvml.nvmlDeviceGetCount())
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        nvml = self.nvml
        for i, handle in enumerate(self.handles):
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as e:  # a GPU that stops answering: skip it this time
                _logger.debug("trainstream: GPU %d: %s", i, e)
                continue
            out[f"system/gpu{i}/utilization_percent"] = float(rates.gpu)
            out[f"system/gpu{i}/memory_used_mb"] = float(memory.used) / _MIB
            if memory.total:
                out[f"system/gpu{i}/memory_percent"] = (
                    100.0 * float(memory.used) / float(memory.total)
                )
        return out

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


def sample(psutil: Any, process: Any, gpus: _Gpus | None) -> dict[str, float]:
    """One sample of every metric (see the module's docstring)."""
    metrics: dict[str, float] = {
        "system/cpu_percent": float(psutil.cpu_percent(None)),
        "system/memory_percent": float(psutil.virtual_memory().percent),
    }
    with process.oneshot():
        metrics["system/process_cpu_percent"] = float(process.cpu_percent(None))
        metrics["system/process_rss_mb"] = float(process.memory_info().rss) / _MIB
    if gpus is not None:
        metrics.update(gpus.sample())
    return metrics


class SystemMonitor:
    """
    Logs :func:`sample` on ``run`` every ``interval`` seconds from a daemon
    thread, from :meth:`start` to :meth:`stop`.

    :param run: where the metrics go (any Run API: ``log`` is thread-safe).
    :param interval: seconds between samples.
    """

    def __init__(self, run: RunAPI, interval: float = DEFAULT_INTERVAL) -> None:
        self.run = run
        self.interval = interval
        #: samples logged so far (the next sample's step)
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> bool:
        """Start sampling; ``False`` (one warning) when ``psutil`` is missing."""
        if self.running:
            return True
        psutil = _import_psutil()
        if psutil is None:
            return False
        self._stop = threading.Event()
        thread = threading.Thread(
            target=self._loop,
            args=(psutil, self._stop),
            name=f"trainstream-system-{self.run.name}",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sampling; returns once the thread ended (or ``timeout``). Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self, psutil: Any, stop: threading.Event) -> None:
        process = psutil.Process()
        psutil.cpu_percent(None)  # the first call starts the measure: it says 0.0
        process.cpu_percent(None)
        nvml = _import_nvml()
        gpus: _Gpus | None = None
        try:
            if nvml is not None:
                try:
                    gpus = _Gpus(nvml)
                except Exception as e:
                    _logger.debug("trainstream: no GPU metrics (%s)", e)
            while not stop.wait(self.interval):
                try:
                    self.run.log(sample(psutil, process, gpus), self.samples)
                except Exception as e:  # a run closed under us, psutil failing: stop quietly
                    _logger.warning("trainstream: system metrics stopped: %s", e)
                    return
                self.samples += 1
        finally:
            if gpus is not None:
                gpus.close()
            elif nvml is not None:
                try:
                    nvml.nvmlShutdown()
                except Exception:
                    pass
