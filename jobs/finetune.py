"""`ray job submit` entry point for fine-tuning; takes the `geneformer-ray finetune` arguments.

    ray job submit --working-dir . -- python jobs/finetune.py --task cell --config jobs/configs/finetune_cell_type.yaml \
        --set train.storage_path=/shared/runs --set tracking.uri=http://head:5000
"""

import sys

from geneformer_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
