"""`ray job submit` entry point for the tokenize job; takes the `geneformer-ray tokenize` arguments.

(Not named tokenize.py: the working dir goes on sys.path and would shadow the stdlib module.)

    ray job submit --working-dir . -- python jobs/tokenize_corpus.py data/*.h5ad --vocab gc104M --out /shared/corpus

Inside a job, Ray connects to the job's cluster, so every task runs on the cluster.
"""

import sys

from geneformer_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
