"""Fixed, seeded subsets of a dataset, split across ranks, for our callbacks' evaluation passes.

Shared by :class:`~lightning_reg.GeneralizationGapMonitor` (a training subset) and
:class:`~lightning_reg.MembershipInferenceAudit` (a training and a validation subset):

- the indices are ``randperm(len(dataset), generator=generator)[:n]`` from a generator the caller
  seeds, so the global RNG that training uses is never drawn from;
- under DDP each rank takes every ``world_size``-th index of that order (no duplicates, nothing
  padded), so values reduced across ranks equal a single-process evaluation;
- every rank runs the *same number of batches*: going through a DDP wrapper's ``forward`` can run a
  collective per batch (buffer broadcast), so a rank with one batch more would wait forever. Batches
  are balanced instead (a rank's share is cut into that many nearly equal batches, none larger
  than ``batch_size``); batch-size-weighted means do not depend on how samples are batched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

__all__ = ["draw_indices", "is_map_style", "subset_loader"]


def is_map_style(dataset: Any) -> bool:
    """Whether a fixed subset can be drawn from ``dataset`` (it has a length and is indexable)."""
    return (
        dataset is not None
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__len__")
        and hasattr(dataset, "__getitem__")
    )


def draw_indices(dataset: Sized, n: int, generator: torch.Generator) -> Tensor:
    """The first ``n`` indices of a random permutation of ``dataset`` drawn with ``generator``.

    Example:
        >>> draw_indices(range(10), 3, torch.Generator().manual_seed(0)).tolist()
        [4, 1, 7]
    """
    return torch.randperm(len(dataset), generator=generator)[:n]


class _BalancedBatches(Sampler[list[int]]):
    """``length`` positions cut into ``num_batches`` consecutive, nearly equal batches."""

    def __init__(self, length: int, num_batches: int) -> None:
        self.length, self.num_batches = length, num_batches

    def __iter__(self) -> Iterator[list[int]]:
        base, extra = divmod(self.length, self.num_batches)
        start = 0
        for i in range(self.num_batches):
            stop = start + base + (i < extra)
            yield list(range(start, stop))
            start = stop

    def __len__(self) -> int:
        return self.num_batches


def batches_per_rank(n: int, world_size: int, batch_size: int) -> int:
    """How many batches every rank runs for ``n`` samples split over ``world_size`` ranks.

    Example:
        >>> batches_per_rank(65, 2, 32)  # shares of 33 and 32 samples: 2 batches on both ranks
        2
    """
    largest, smallest = math.ceil(n / world_size), n // world_size
    # batch size 1 with uneven shares would leave the smaller share a batch short
    size = 2 if batch_size == 1 and largest != smallest else batch_size
    return math.ceil(largest / size)


def subset_loader(
    dataset: Dataset,
    indices: Tensor,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    like: Any = None,
    seed: int = 0,
) -> DataLoader:
    """A loader over this rank's share of ``dataset[indices]``, in order, balanced across ranks.

    Args:
        dataset: a map-style dataset.
        indices: the whole subset (the same on every rank).
        rank: this process's global rank.
        world_size: number of processes.
        batch_size: the largest batch size.
        like: a DataLoader whose ``collate_fn`` is reused (e.g. the train dataloader).
        seed: seeds the loader's own generator: iterating it must not draw from the global RNG.

    Raises:
        RuntimeError: when the subset has fewer samples than there are ranks.

    Example:
        >>> data = list(range(100))
        >>> loader = subset_loader(data, torch.arange(10), rank=1, world_size=2, batch_size=4)
        >>> [batch.tolist() for batch in loader]
        [[1, 3, 5], [7, 9]]
    """
    n = len(indices)
    if n < world_size:
        raise RuntimeError(
            f"The subset ({n} samples) is smaller than the {world_size} ranks: raise `subset_size` "
            "or use a larger dataset."
        )
    share = indices[rank::world_size].tolist()
    return DataLoader(
        Subset(dataset, share),
        batch_sampler=_BalancedBatches(len(share), batches_per_rank(n, world_size, batch_size)),
        collate_fn=getattr(like, "collate_fn", None),
        generator=torch.Generator().manual_seed(seed),
    )


def train_subset_loader(
    owner: str,
    trainer: Any,
    dataset: Any,
    subset_size: int,
    seed: int,
    batch_size: int | None,
) -> DataLoader:
    """This rank's loader over a fixed, seeded subset of the training set.

    ``dataset`` (the training data with validation transforms) defaults to the train dataloader's;
    the train loader's ``collate_fn`` and batch size are reused.

    Raises:
        RuntimeError: naming ``owner`` and the fix, when there is no map-style dataset.
    """
    train_loader = trainer.train_dataloader
    if dataset is None:
        dataset = getattr(train_loader, "dataset", None)
    if not is_map_style(dataset):
        what = type(dataset).__name__ if dataset is not None else "no single dataset"
        raise RuntimeError(
            f"{owner} needs a map-style training dataset (with `__len__` and `__getitem__`) to "
            f"draw a fixed subset from, but the train dataloader has {what}. Pass `dataset=`: "
            "the training data with validation transforms."
        )
    generator = torch.Generator().manual_seed(seed)  # the global RNG stays untouched
    return subset_loader(
        dataset,
        draw_indices(dataset, min(subset_size, len(dataset)), generator),
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        batch_size=batch_size or getattr(train_loader, "batch_size", None) or 64,
        like=train_loader,
        seed=seed,
    )
