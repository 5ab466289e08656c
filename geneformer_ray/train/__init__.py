"""Training on Ray Train: settings (``config``), the per-worker loops and drivers of pretraining
(``pretrain``) and fine-tuning (``finetune``, ``prepare``, ``task_batches``), batches and masking (``collate``), labels,
splits, loss and evaluation, the logistic-regression baseline, checkpoint state, LR schedules and the
pieces every loop shares (``common``). Imports ``models``, ``data`` and below."""
