"""What the LLM planner asks: the system prompt teaching the paper's decomposition by example, the answer's JSON
schema, and the version of both that the plan cache keys on (a hash: any change to them is a new version)."""

from __future__ import annotations

import hashlib
import json

#: the answer's JSON schema (structured output): the plan format without the prompt and without token indices.
PLAN_SCHEMA: dict = {
    "type": "object",
    "additionalProperties": False,
    "required": ["base", "branches"],
    "properties": {
        "base": {"type": "string"},
        "branches": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["prompt", "subject", "attributes"],
                "properties": {
                    "prompt": {"type": "string"},
                    "subject": {"type": "string"},
                    "attributes": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

_EXAMPLES: list[tuple[str, str, dict]] = [
    (
        "a red teddy bear wearing a green tracksuit",
        "subject",
        {
            "base": "a teddy bear wearing a tracksuit",
            "branches": [
                {"prompt": "a red teddy bear wearing a tracksuit", "subject": "teddy bear", "attributes": ["red"]},
                {"prompt": "a teddy bear wearing a green tracksuit", "subject": "tracksuit", "attributes": ["green"]},
            ],
        },
    ),
    (
        "a man wearing a brown hat stands in front of a red sports car",
        "subject",
        {
            "base": "a man wearing a hat stands in front of a sports car",
            "branches": [
                {
                    "prompt": "a man wearing a brown hat stands in front of a sports car",
                    "subject": "hat",
                    "attributes": ["brown"],
                },
                {
                    "prompt": "a man wearing a hat stands in front of a red sports car",
                    "subject": "sports car",
                    "attributes": ["red"],
                },
            ],
        },
    ),
    (
        "photo of a fluffy white cat on a blue velvet sofa, golden hour, highly detailed, 8k",
        "subject",
        {
            "base": "photo of a cat on a sofa, golden hour, highly detailed, 8k",
            "branches": [
                {
                    "prompt": "photo of a fluffy white cat on a sofa, golden hour, highly detailed, 8k",
                    "subject": "cat",
                    "attributes": ["fluffy", "white"],
                },
                {
                    "prompt": "photo of a cat on a blue velvet sofa, golden hour, highly detailed, 8k",
                    "subject": "sofa",
                    "attributes": ["blue", "velvet"],
                },
            ],
        },
    ),
    (
        "a black dog without a red collar next to a wooden bench",
        "subject",
        {
            "base": "a dog without a red collar next to a bench",
            "branches": [
                {
                    "prompt": "a black dog without a red collar next to a bench",
                    "subject": "dog",
                    "attributes": ["black"],
                },
                {
                    "prompt": "a dog without a red collar next to a wooden bench",
                    "subject": "bench",
                    "attributes": ["wooden"],
                },
            ],
        },
    ),
    (
        "The car is red and the bench is blue.",
        "subject",
        {
            "base": "The car and the bench.",
            "branches": [
                {"prompt": "The car is red and the bench.", "subject": "car", "attributes": ["red"]},
                {"prompt": "The car and the bench is blue.", "subject": "bench", "attributes": ["blue"]},
            ],
        },
    ),
    (
        "a girl with a pearl necklace holding a small yellow bag",
        "attribute",
        {
            "base": "a girl with a necklace holding a bag",
            "branches": [
                {
                    "prompt": "a girl with a pearl necklace holding a bag",
                    "subject": "necklace",
                    "attributes": ["pearl"],
                },
                {
                    "prompt": "a girl with a necklace holding a small bag",
                    "subject": "bag",
                    "attributes": ["small"],
                },
                {
                    "prompt": "a girl with a necklace holding a yellow bag",
                    "subject": "bag",
                    "attributes": ["yellow"],
                },
            ],
        },
    ),
    ("a red car", "subject", {"base": "a red car", "branches": []}),
]

_RULES = """\
You split text-to-image prompts for Detail++ (progressive detail injection). Given a prompt p0, write:
- "base": p0 with every modifier removed. A modifier is a word or phrase that describes one subject: colour,
  material, texture, pattern, shape, size, age, style ("red", "velvet", "striped", "small", "lego-style"), and an
  attribute phrase on one subject ("with a necklace", "wearing sunglasses") unless the worn thing has modifiers of
  its own (then that thing is a subject).
- "branches": one branch per subject that has modifiers, in the prompt's order. A branch's "prompt" is the base plus
  that subject's modifiers and nothing else; "subject" is the subject's noun copied from p0 with its compound
  nouns ("teddy bear", "sports car"); "attributes" are the modifiers the branch adds, copied from p0.

Rules:
1. Copy words from p0 exactly. Never add, reorder, translate or rephrase a word; only remove modifiers.
2. Keep everything else in the base and in every branch: verbs, relations ("in front of"), counts, and the words
   that hold the sentence together.
3. Global tags belong to the whole image: quality and detail tags ("masterpiece", "highly detailed", "8k"), light,
   camera and artist tags ("golden hour", "35mm", "by greg rutkowski", "trending on artstation") and a leading medium
   ("photo of", "oil painting of"). They stay in the base and in every branch; they are never subjects or attributes.
4. Negation is never split: "not", "no", "never", "without" and the phrase they govern ("without a red collar")
   stay in every prompt unchanged and give no subject or attribute.
5. With fewer than two subjects, or no modifiers, answer "branches": [] and "base": p0 unchanged.
6. Granularity "subject": one branch per subject with all its modifiers. Granularity "attribute": one branch per
   modifier (a subject with two modifiers gets two branches).
7. Answer with the JSON object only: {"base": "...", "branches": [{"prompt": "...", "subject": "...",
   "attributes": ["..."]}]}. No prose, no code fence.

Examples:
"""


def _user_message(prompt: str, granularity: str) -> str:
    return json.dumps({"prompt": prompt, "granularity": granularity}, ensure_ascii=False)


def system_prompt() -> str:
    """The system prompt: the rules, then each example as the request and the answer expected."""
    lines = [_RULES]
    for prompt, granularity, answer in _EXAMPLES:
        lines.append(f"Request: {_user_message(prompt, granularity)}")
        lines.append(f"Answer: {json.dumps(answer, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


SYSTEM_PROMPT = system_prompt()

#: the version of the question (system prompt and schema); part of every cache key.
PROMPT_VERSION = hashlib.sha256((SYSTEM_PROMPT + json.dumps(PLAN_SCHEMA, sort_keys=True)).encode()).hexdigest()[:12]


def user_message(prompt: str, granularity: str) -> str:
    """The request for one prompt: ``{"prompt": ..., "granularity": ...}``."""
    return _user_message(prompt, granularity)


def repair_message(error: str) -> str:
    """The repair round's request: the validation error, and the instruction to answer again."""
    return (
        f"Your plan breaks a rule: {error}. Answer again with the corrected plan for the same prompt, as the JSON "
        "object only."
    )
