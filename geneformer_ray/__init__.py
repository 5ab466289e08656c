"""geneformer-ray: Geneformer tokenization, training, tuning and inference on Ray."""

__version__ = "0.1.0"
