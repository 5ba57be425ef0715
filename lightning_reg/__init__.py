"""lightning-reg: regularization for PyTorch Lightning, as callbacks.

Add the callbacks to ``Trainer(callbacks=[...])``; your LightningModule stays as it is.
"""

from lightning_reg.early_stopping import EarlyStopping

__version__ = "0.1.0"

__all__ = ["EarlyStopping", "__version__"]
