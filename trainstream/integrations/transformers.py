"""
A Hugging Face ``transformers`` callback that publishes a ``Trainer`` run to trainstream::

    from trainstream.integrations.transformers import TrainstreamCallback

    trainer = Trainer(..., callbacks=[TrainstreamCallback()])                 # embedded server
    trainer = Trainer(..., callbacks=[TrainstreamCallback(url="http://127.0.0.1:8890")])

Pass ``report_to="none"`` in ``TrainingArguments`` if no other logger is wanted.

How the Trainer's events map onto trainstream (main process only):

- ``on_train_begin`` → the run is opened (named ``run=``, else
  ``args.run_name``, else ``transformers-YYYYmmdd-HHMMSS``; sanitized), an
  ``hparams`` event from ``args.to_dict()`` (strings, numbers, bools and
  ``None``; lists and objects left out) and a ``running`` status.
- ``on_log`` → the numeric entries of ``logs`` (``loss``, ``grad_norm``,
  ``learning_rate``, ``epoch``, ``eval_*``...) logged at ``state.global_step``;
  anything else is skipped.
- ``on_epoch_end`` → a ``running`` status with the epoch (``round(state.epoch)``).
- ``on_train_end`` → ``finished``, then a flush. The run stays open for a
  later ``train()``; ``close()`` flushes and releases the embedded server.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback  # type: ignore[import-untyped, import-not-found, unused-ignore]

from trainstream.integrations._target import (
    LazyRun,
    Target,
    default_run_name,
    metrics_of,
    params_of,
)

__all__ = ["TrainstreamCallback"]


class TrainstreamCallback(TrainerCallback):  # type: ignore[misc]
    """
    Publish a ``transformers.Trainer`` run to trainstream.

    :param run: the run's name; else ``args.run_name``; else a dated default.
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
        flush_timeout: float | None = 30.0,
        system_metrics: bool | float | None = None,
    ) -> None:
        self._trainstream = LazyRun(
            "TrainstreamCallback",
            run,
            None,
            url,
            token,
            server_config,
            flush_timeout,
            system_metrics=system_metrics,
        )

    @property
    def run(self) -> Target | None:
        """The run (:class:`~trainstream.integrations._target.Target`), once training began."""
        return self._trainstream.target

    def _open(self, args: Any) -> Target:
        return self._trainstream.open(
            getattr(args, "run_name", None) or default_run_name("transformers")
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        run = self._open(args)
        params = params_of(args.to_dict())
        if params:
            run.hparams(params)
        run.status("running", epoch=int(state.epoch or 0))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        metrics = metrics_of(logs)
        if metrics:
            self._open(args).log(metrics, max(int(state.global_step), 0))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._open(args).status("running", epoch=round(state.epoch or 0))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._trainstream.end()

    def close(self) -> None:
        """Flush and close the run (releasing the embedded server)."""
        self._trainstream.close()
