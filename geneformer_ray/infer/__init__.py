"""Inference on Ray Data actor pools: settings (``config``), the shared encoder and cell reading
(``encoder``), predictions (``predict``), embeddings (``embed``), in-silico perturbation (``perturb``) with
its statistics (``perturb_stats``), and the plots (``plots``). Imports ``train``, ``models``, ``data`` and below."""
