"""Identity-enhanced training: photos to cached pairs, the accelerate trainer, native checkpoints.
"""

from .._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "CachedPairs": ".data",
    "center_crop": ".data",
    "preprocess": ".data",
    "IdentityBranch": ".trainer",
    "TrainConfig": ".trainer",
    "Trainer": ".trainer",
    "build_engine": ".trainer",
    "empty_prompt": ".trainer",
    "load_config": ".trainer",
    "main": ".trainer",
    "new_encoder": ".trainer",
})
