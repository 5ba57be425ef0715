"""lightning-reg: regularization for PyTorch Lightning, as callbacks.

Add the callbacks to ``Trainer(callbacks=[...])``; your LightningModule stays as it is.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
