"""
A Keras 3 callback that publishes ``model.fit`` to trainstream::

    from trainstream.integrations.keras import TrainstreamCallback

    model.fit(x, y, epochs=5, callbacks=[TrainstreamCallback(run="mlp")])   # embedded
    model.fit(x, y, callbacks=[TrainstreamCallback(url="http://127.0.0.1:8890")])

Any Keras backend works (``KERAS_BACKEND=torch`` or ``jax`` avoids TensorFlow).

How ``fit`` maps onto trainstream. The step is a counter of training
batches over the whole run (it goes on across ``fit`` calls):

- ``on_train_begin`` → the run is opened (named ``run=``, else
  ``keras-YYYYmmdd-HHMMSS``; sanitized), an ``hparams`` event from
  ``self.params`` (``epochs``, ``steps``, ``verbose``) and the optimizer's
  config as ``optimizer/NAME`` (strings, numbers, bools, ``None``), and a
  ``running`` status.
- ``on_train_batch_end`` → the numeric ``logs`` (``loss``, metrics) at the
  batch's step, every ``update_freq`` batches (``"epoch"``: never).
- ``on_epoch_end`` → the numeric ``logs`` prefixed ``epoch/``
  (``epoch/loss``, ``epoch/val_loss``...) at the number of batches trained
  so far, and a ``running`` status with the epoch (1-based: epochs done).
- ``on_train_end`` → ``finished``, then a flush. The run stays open for a
  later ``fit``; ``close()`` flushes and releases the embedded server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras  # type: ignore[import-untyped, import-not-found, unused-ignore]

from trainstream.integrations._target import (
    LazyRun,
    Target,
    metrics_of,
    params_of,
)

__all__ = ["TrainstreamCallback"]


class TrainstreamCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """
    Publish a Keras ``fit`` to trainstream.

    :param run: the run's name (sanitized); ``keras-YYYYmmdd-HHMMSS`` if not given.
    :param update_freq: log batch metrics every N batches, or ``"epoch"`` for
        epoch metrics only (as Keras' ``TensorBoard`` callback).
    :param url, token, server_config, flush_timeout: where the run goes, as for every
        adapter (:func:`~trainstream.integrations._target.open_run`).
    :param system_metrics: ``system/*`` metrics (CPU, memory, GPUs) every 5 s
        (``True``) or that many seconds (:mod:`trainstream.system`).
    """

    def __init__(
        self,
        run: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        server_config: Any = None,
        update_freq: int | str = 1,
        flush_timeout: float | None = 30.0,
        system_metrics: bool | float | None = None,
    ) -> None:
        super().__init__()
        self._trainstream = LazyRun(
            "TrainstreamCallback",
            run,
            "keras",
            url,
            token,
            server_config,
            flush_timeout,
            system_metrics=system_metrics,
        )
        if update_freq != "epoch" and not (isinstance(update_freq, int) and update_freq >= 1):
            raise ValueError(
                f'TrainstreamCallback: update_freq must be an integer >= 1 or "epoch", '
                f"got {update_freq!r}"
            )
        self._update_freq = update_freq
        #: Training batches seen so far, over every ``fit`` of this callback.
        self.step = 0

    @property
    def run(self) -> Target | None:
        """The run (:class:`~trainstream.integrations._target.Target`), once training began."""
        return self._trainstream.target

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        run = self._trainstream.open()
        params = params_of(dict(self.params or {}))
        optimizer = getattr(getattr(self, "model", None), "optimizer", None)
        if optimizer is not None:
            try:
                params.update(params_of(optimizer.get_config(), "optimizer/"))
            except Exception:  # an optimizer whose config cannot be read: skip it
                pass
        if params:
            run.hparams(params)
        run.status("running")

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        step = self.step
        self.step += 1
        if self._update_freq == "epoch" or not logs:
            return
        assert isinstance(self._update_freq, int)
        if step % self._update_freq:
            return
        metrics = metrics_of(logs)
        if metrics:
            self._trainstream.open().log(metrics, step)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        run = self._trainstream.open()
        metrics = metrics_of(logs or {}, "epoch/")
        if metrics:
            run.log(metrics, self.step)
        run.status("running", epoch=int(epoch) + 1)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._trainstream.end()

    def close(self) -> None:
        """Flush and close the run (releasing the embedded server)."""
        self._trainstream.close()
