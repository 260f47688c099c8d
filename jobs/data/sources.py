"""The data sources of a pipeline (the config's ``data.<name>``), each with what it holds: the one list the
config, the prepare and evaluate stages and the suites' ``needs`` all read."""

from __future__ import annotations

SOURCES = {
    "forget": "the forget set (question/answer rows)",
    "retain": "the retain set (question/answer rows)",
    "holdout": "held-out question/answer rows never trained on (the non-members of membership inference)",
    "general": "general text (records with 'text')",
    "mc": "a multiple-choice file (question, choices, answer)",
}
SOURCE_NAMES = tuple(SOURCES)
MC_SOURCE = "mc"  # multiple-choice rows, read by the mc suite alone (no question/answer canonical form)
