"""finetune: load a checkpoint of model A into model B = A + new modules, and prove what trains."""

__version__ = "0.1.0"
