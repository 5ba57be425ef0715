"""TensorBoard extras: custom-scalar layouts, hparams in the same run, text cards.

Written on rank 0 only, and only when a ``TensorBoardLogger`` (of ``lightning.pytorch`` or of the
standalone ``pytorch_lightning``) is attached; plain scalars always go through the loggers so CSV
and other loggers receive them too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as pl

from lightning_reg._lightning import is_lightning_class

__all__ = [
    "gap_layout",
    "log_scalars",
    "regularization_settings",
    "tensorboard_writer",
    "write_hparams",
    "write_layout",
    "write_text",
]


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the first ``TensorBoardLogger`` on rank 0, else ``None``.

    Either package's ``TensorBoardLogger`` (or a subclass) counts: the check is by class name.
    """
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if is_lightning_class(logger, "TensorBoardLogger"):
            return cast(Any, logger).experiment
    return None


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Send scalars to every logger (rank 0), for hooks where ``self.log`` is not allowed."""
    if trainer.is_global_zero and metrics:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=trainer.global_step if step is None else step)


def gap_layout(pairs: Mapping[str, str]) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalar layout: for each metric, train_eval and val on one chart, the gap on another.

    Args:
        pairs: ``{short name: validation tag}``, e.g. ``{"loss": "val_loss"}``.

    Example:
        >>> gap_layout({"loss": "val_loss"})["Generalization: loss"]["train_eval vs val"]
        ['Multiline', ['reg/train_eval/loss', 'val_loss']]
    """
    return {
        f"Generalization: {name}": {
            "train_eval vs val": ["Multiline", [f"reg/train_eval/{name}", val_tag]],
            "gap (val - train_eval, > 0: overfitting)": ["Multiline", [f"reg/gap/{name}"]],
        }
        for name, val_tag in pairs.items()
    }


def write_layout(writer: Any, layout: dict[str, dict[str, list[Any]]]) -> None:
    """Write a custom-scalars layout to the run (TensorBoard's "Custom Scalars" tab)."""
    writer.add_custom_scalars(layout)


def write_text(writer: Any, tag: str, markdown: str, step: int) -> None:
    """Write a Markdown text card (TensorBoard's "Text" tab)."""
    writer.add_text(tag, markdown, step)


def write_hparams(
    writer: Any,
    params: Mapping[str, Any],
    metric_tags: Sequence[str],
    *,
    columns: Mapping[str, Any] | None = None,
) -> None:
    """Write hparams into the *same* run (``SummaryWriter.add_hparams`` would create another).

    TensorBoard keeps the first hparams summary of a run, and its HParams tab takes the table's
    columns (hparams and metrics) from one run's summary, whichever run it reads first.

    Args:
        writer: the run's ``SummaryWriter`` (see :func:`tensorboard_writer`).
        params: this run's hparams, ``{name: value}``; values other than ``bool``, ``int``,
            ``float`` and ``str`` are written as their ``str``.
        metric_tags: scalar tags logged in the run (before or after this call), shown as the
            hparams' metrics, e.g. ``["val_loss", "test/acc"]``.
        columns: the hparams the table lists, ``{name: an example value}`` (the value sets the
            column's type); default: the keys of ``params``. Runs of one sweep whose settings
            differ should all pass the union of their settings, so that every setting gets a
            column whichever run TensorBoard reads first.
    """
    from torch.utils.tensorboard.summary import hparams

    clean = _plain_values(params)
    exp, ssi, sei = hparams(clean, dict.fromkeys(metric_tags, 0.0))
    if columns is not None:
        exp, _, _ = hparams({**_plain_values(columns), **clean}, dict.fromkeys(metric_tags, 0.0))
    file_writer = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary)


def _plain_values(params: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in params.items()}


def regularization_settings(trainer: pl.Trainer) -> dict[str, Any]:
    """The regularization settings of this run: our callbacks' options and the optimizers' decay.

    Every callback of this package exposes ``regularization_settings()``; param groups contribute
    their ``weight_decay``, as ``WeightDecayExclusion`` leaves them (also when called before its
    ``on_fit_start`` split).
    """
    from lightning_reg._utils import trainer_callbacks

    settings: dict[str, Any] = {}
    callbacks = trainer_callbacks(trainer)
    for callback in callbacks:
        describe = getattr(callback, "regularization_settings", None)
        if callable(describe):
            settings.update(describe())
    # a WeightDecayExclusion whose on_fit_start has not run yet reports the groups it will make
    previews = [getattr(cb, "param_groups_after_split", None) for cb in callbacks]
    for i, optimizer in enumerate(trainer.optimizers):
        groups = optimizer.param_groups
        for preview in previews:
            if callable(preview):
                groups = preview(trainer.lightning_module, optimizer)
        for j, group in enumerate(groups):
            name = group.get("name", f"pg{j}")
            settings[f"optimizer{i}/{type(optimizer).__name__}/{name}/weight_decay"] = float(
                group.get("weight_decay", 0.0)
            )
    return settings
