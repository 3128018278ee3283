"""The toy world: synthetic scenes (:mod:`.scenes`), their judge (:mod:`.judge`), a small SDXL-architecture model
(:mod:`.model`) and its training (:mod:`.train`); the trained weights are in ``detailpp/data/toy-model``."""
