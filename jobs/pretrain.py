"""`ray job submit` entry point for pretraining; takes the `geneformer-ray pretrain` arguments.

    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_gf6L_10M.yaml \
        --set data.corpus=/shared/corpora/genecorpus30M --set train.storage_path=/shared/runs
"""

import sys

from geneformer_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
