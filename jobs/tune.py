"""`ray job submit` entry point for hyperparameter search; takes the `geneformer-ray tune` arguments.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_cell_type.yaml \
        --set study.storage_path=/shared/runs/tune --set tracking.uri=http://head:5000
    # after an interruption, the same command with --resume
"""

import sys

from geneformer_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
