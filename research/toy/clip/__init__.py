"""A tiny CLIP pair pretrained contrastively on toy scenes, and the swapped-attribute probe of its text encoder.

:mod:`.models` builds the pair and exports its text tower as the toy pipeline's ``text_encoder`` /
``text_encoder_2``; :mod:`.pretrain` trains it (``python -m research.toy.clip.pretrain``); :mod:`.probe` measures
how far the frozen text encoder tells a caption from its attribute-swapped twin
(``python -m research.toy.clip.probe``).
"""
