"""``accelerate launch -m infinite_id.training --config train.toml``: the trainer on several GPUs or nodes."""

import sys

from .trainer import main

sys.exit(main())
