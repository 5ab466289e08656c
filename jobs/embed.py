"""`ray job submit` entry point for cell / gene embeddings; takes the `geneformer-ray embed` arguments.

    ray job submit --working-dir . -- python jobs/embed.py --model /shared/runs/quickstart/model \
        --corpus /shared/corpus --out /shared/runs/embed --color cell_type --h5ad --tracking-uri http://head:5000
"""

import sys

from geneformer_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
