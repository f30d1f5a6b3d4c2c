"""Train a recipe: ``composer train.py yamls/remask_3b.yaml [key=value ...]`` or ``python train.py ...``."""

import sys

from composer_remask.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
