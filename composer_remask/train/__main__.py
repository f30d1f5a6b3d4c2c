"""``python -m composer_remask.train RECIPE.yaml [key=value ...]``; with the launcher:
``composer -n 8 -m composer_remask.train RECIPE.yaml`` (no repository checkout needed)."""

import sys

from composer_remask.train import main

sys.exit(main())
