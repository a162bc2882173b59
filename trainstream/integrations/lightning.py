"""
A PyTorch Lightning logger that publishes to trainstream::

    from trainstream.integrations.lightning import TrainstreamLogger

    logger = TrainstreamLogger(run="resnet-3")                        # embedded server
    logger = TrainstreamLogger(url="http://127.0.0.1:8890", run="resnet-3")  # remote
    trainer = lightning.pytorch.Trainer(logger=logger)

``TrainstreamLogger`` subclasses ``lightning.pytorch.loggers.Logger`` (or,
when only the older ``pytorch_lightning`` package is installed, its
``Logger``). With both installed, a ``pytorch_lightning.Trainer`` needs
``PLTrainstreamLogger``, the same logger on ``pytorch_lightning``'s base.

How Lightning's calls map onto trainstream:

- ``log_hyperparams(params)`` → an ``hparams`` event: nested dicts are
  flattened with ``/``, strings, numbers, bools and ``None`` kept, anything
  else left out.
- ``log_metrics(metrics, step)`` → ``run.log`` at ``step`` (tensors become
  numbers; names are sanitized: ``"val loss"`` → ``"val_loss"``); when the
  ``epoch`` metric Lightning adds changes, a ``running`` status with it.
- ``finalize("success")`` → ``finished``; ``finalize("failed")`` → ``failed``
  with the exception's message (``RuntimeError: boom``); both flush. The run
  stays open (``trainer.test`` may log more: that marks it ``running``
  again); ``close()`` flushes and releases the embedded server.
- ``save()`` → flush. ``experiment`` → the run (:class:`~trainstream.integrations._target.Target`,
  with the Run API: ``log``, ``status``, ``text``, ``hparams``...), opened on
  first use and on rank 0 only.
"""

from __future__ import annotations

import sys
from argparse import Namespace
from collections.abc import Callable, Mapping
from typing import Any, cast

from trainstream.integrations._failure import failure_message
from trainstream.integrations._target import (
    LazyRun,
    Target,
    metrics_of,
    number,
    params_of,
)

# (ignores: CI's type check may run where no Lightning is installed)
_Logger: Any
try:
    from lightning.pytorch.loggers import Logger as _Logger  # type: ignore[import-not-found, no-redef, unused-ignore]
    from lightning.pytorch.utilities import rank_zero_only as _rank_zero_only  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # only the older package name is installed
    from pytorch_lightning.loggers import Logger as _Logger  # type: ignore[import-not-found, no-redef, unused-ignore]
    from pytorch_lightning.utilities import rank_zero_only as _rank_zero_only  # type: ignore[import-not-found, no-redef, unused-ignore]

__all__ = ["TrainstreamLogger"]  # and PLTrainstreamLogger, made on first use


class _Publishing:
    """The logger's behaviour, whichever Lightning package supplies the base class."""

    #: ``rank_zero_only`` of the Lightning package in use (its ``rank`` is the process's).
    _rank_zero: Any = None

    def __init__(
        self,
        run: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        server_config: Any = None,
        version: int | str | None = None,
        flush_timeout: float | None = 30.0,
        system_metrics: bool | float | None = None,
    ) -> None:
        super().__init__()
        self._trainstream = LazyRun(
            "TrainstreamLogger",
            run,
            "lightning",
            url,
            token,
            server_config,
            flush_timeout,
            system_metrics=system_metrics,
        )
        self._version = version
        self._epoch: int | None = None
        self._ended = False
        self._step = 0

    def _is_rank_zero(self) -> bool:
        return getattr(type(self)._rank_zero, "rank", 0) in (0, None)

    @property
    def name(self) -> str:
        """The run's name (sanitized once the run is opened)."""
        return str(self._trainstream.name)

    @property
    def version(self) -> int | str | None:
        return self._version

    @property
    def experiment(self) -> Target | None:
        """The run (opened on first use), or ``None`` on ranks other than 0."""
        if not self._is_rank_zero():
            return None
        return self._trainstream.open()

    def log_hyperparams(
        self, params: Mapping[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        run = self.experiment
        if run is None:
            return
        if isinstance(params, Namespace):
            params = vars(params)
        clean = params_of(params)
        if clean:
            run.hparams(clean)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        run = self.experiment
        if run is None:
            return
        if self._ended:  # e.g. trainer.test() after fit(): the run goes on
            self._ended = False
            run.status("running", epoch=self._epoch)
        epoch = number(metrics.get("epoch"))
        if epoch is not None and int(epoch) != self._epoch:
            self._epoch = int(epoch)
            run.status("running", epoch=self._epoch)
        if step is None:
            step = self._step
        step = max(int(step), 0)
        self._step = step + 1
        clean = metrics_of(metrics)
        if clean:
            run.log(clean, step)

    def save(self) -> None:
        self._trainstream.flush()

    def finalize(self, status: str) -> None:
        if self._trainstream.target is None or self._ended:
            return
        self._ended = True
        # "success", or "finished" when a cluster requeues the job, is a finish
        failure = None
        if status == "failed":
            # Lightning calls this in its except block: the exception is at hand
            error = sys.exc_info()[1]
            failure = failure_message(error) if error is not None else "Lightning: training failed"
        self._trainstream.end(failure)

    def close(self) -> None:
        """Flush and close the run (releasing the embedded server)."""
        self._trainstream.close()


class TrainstreamLogger(_Publishing, _Logger):  # type: ignore[misc]
    """
    Publish a Lightning run to trainstream.

    :param run: the run's name (sanitized); ``lightning-YYYYmmdd-HHMMSS`` if not given.
    :param version: what ``version`` answers (Lightning shows it; not sent).
    :param url, token, server_config, flush_timeout: where the run goes, as for every
        adapter (:func:`~trainstream.integrations._target.open_run`).
    :param system_metrics: ``system/*`` metrics (CPU, memory, GPUs) every 5 s
        (``True``) or that many seconds (:mod:`trainstream.system`).
    """

    _rank_zero = _rank_zero_only


def _pytorch_lightning_logger() -> type:
    import pytorch_lightning.loggers  # type: ignore[import-not-found, unused-ignore]
    import pytorch_lightning.utilities  # type: ignore[import-not-found, unused-ignore]

    if _Logger is cast(Any, pytorch_lightning.loggers.Logger):
        return TrainstreamLogger

    class PLTrainstreamLogger(_Publishing, pytorch_lightning.loggers.Logger):  # type: ignore[misc]
        """``TrainstreamLogger`` for ``pytorch_lightning.Trainer``."""

        _rank_zero = pytorch_lightning.utilities.rank_zero_only

    PLTrainstreamLogger.__module__ = __name__
    return PLTrainstreamLogger


_LAZY: dict[str, Callable[[], type]] = {"PLTrainstreamLogger": _pytorch_lightning_logger}


def __getattr__(name: str) -> Any:
    """``PLTrainstreamLogger`` is made (importing ``pytorch_lightning``) on first use."""
    make = _LAZY.get(name)
    if make is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = make()
    globals()[name] = cls
    return cls
