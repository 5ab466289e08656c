"""Models: named flavours and the masked-gene objective (``flavours``), model folders in the Hugging Face
layout (``folders``: load, save, vocabulary checks), fine-tuning task heads with freezing and LoRA
(``tasks``), and the CPU attention with sparse dropout (``attention``). Imports ``data`` and below."""
