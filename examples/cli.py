"""LightningCLI for the digits MLP: model, data, trainer and every callback from a YAML config.

Run from the repository root::

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --config examples/cli_config.yaml --print_config  # resolved config

The regularization callbacks are listed under ``trainer.callbacks`` with ``class_path:
lightning_reg.EarlyStopping`` etc. and their ``init_args`` (see ``examples/cli_config.yaml``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python examples/cli.py` puts examples/ on sys.path already; this also covers imports from
# elsewhere (e.g. runpy or an importlib spec in the tests).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import MLP, DigitsData
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        MLP,
        DigitsData,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
