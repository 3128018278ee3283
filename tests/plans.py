"""Plans the tests share (import: ``from tests.plans import TEDDY_PLAN``), written out so that no test depends on the
parser's output."""

from __future__ import annotations

from detailpp.plan import Branch, DecompositionPlan

#: The paper's two-subject example: a subject and the garment it wears, one attribute each.
TEDDY_PLAN = DecompositionPlan(
    prompt="a red teddy bear wearing a green tracksuit",
    base="a teddy bear wearing a tracksuit",
    branches=(
        Branch("a red teddy bear wearing a tracksuit", "teddy bear", ("red",)),
        Branch("a teddy bear wearing a green tracksuit", "tracksuit", ("green",)),
    ),
)
