"""Hyperparameter optimisation over fine-tuning (``geneformer-ray tune``): the study's settings
(``config``), the Ray Tune + Optuna study and its trials (``study``), and what a study leaves behind
(``outputs``). Imports ``train`` and below."""
