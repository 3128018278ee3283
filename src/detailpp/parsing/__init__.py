"""Prompt decomposition (paper, section 3.1): a prompt -> a :class:`~detailpp.plan.DecompositionPlan`."""
