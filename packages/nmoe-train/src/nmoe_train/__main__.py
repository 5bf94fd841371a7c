"""``python -m nmoe_train VERB ...``: the entry torchrun launches (e.g. ``train super``)."""

import sys

from nmoe_train.cli import main

sys.exit(main())
