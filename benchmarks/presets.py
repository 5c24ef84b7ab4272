"""Sweep presets shared by ``chainprod bench`` and this suite."""

from chainprod.bench import PRESETS, problems

DEFAULT = PRESETS["default"]
QUICK = PRESETS["quick"]


def preset_problems(name="quick"):
    """(structure, depth, width, batch, dtype) tuples of a CLI preset, small enough to benchmark."""
    sweep = PRESETS[name]
    return [p for p in problems(sweep) if p[1] * p[2] ** (2 if p[0] == "dense" else 1) <= 2 ** 22]
