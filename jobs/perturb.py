"""`ray job submit` entry point for in-silico perturbation; takes the `geneformer-ray perturb` arguments.

    ray job submit --working-dir . -- python jobs/perturb.py --model /shared/model --corpus /shared/corpus \
        --out /shared/runs/perturb --all-genes --perturbation delete \
        --start-state disease=dcm --goal-state disease=nf --max-cells 2000
    # after an interruption, the same command again: finished cells are not redone
"""

import sys

from geneformer_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["perturb", *sys.argv[1:]]))
