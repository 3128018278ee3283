"""The toy model's training, by concern (:mod:`research.toy.train` runs it)."""
