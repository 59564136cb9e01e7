"""Which student module learns from which teacher module: building and checking the map."""
from __future__ import annotations

import difflib
from typing import Dict, List, Sequence, Tuple, Union

from torch import nn

from cex_kernels.distill.hooks import split_call

LayerMap = List[Tuple[str, str]]
LayerMapSpec = Union[Dict[str, str], Dict[str, Sequence[str]], Sequence[Tuple[str, str]]]


class LayerMapError(ValueError):
    """A layer map names a module that does not exist, or is empty or malformed."""


def evenly_spaced_layer_map(student_layers: Sequence[str], teacher_layers: Sequence[str]) -> LayerMap:
    """Student layer i (1-based) ↦ teacher layer round(i * T / S): evenly spaced by depth, the
    last student layer on the last teacher layer. Needs S <= T."""
    s, t = len(student_layers), len(teacher_layers)
    if s == 0 or t == 0:
        raise LayerMapError(f"evenly spaced layer map: need non-empty layer lists, got "
                            f"{s} student and {t} teacher layers")
    if s > t:
        raise LayerMapError(f"evenly spaced layer map: {s} student layers but only {t} teacher "
                            "layers; give the pairs explicitly")
    return [(student_layers[i], teacher_layers[round((i + 1) * t / s) - 1]) for i in range(s)]


def _check_names(model: nn.Module, names: Sequence[str], which: str) -> None:
    known = [n for n, _ in model.named_modules() if n]
    known_set = set(known)
    for spec in names:
        try:
            name, _ = split_call(spec)
        except ValueError as exc:
            raise LayerMapError(f"layer_map: {exc}") from None
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = f"; close matches: {close}" if close else f"; {which} modules: {known[:20]}"
            raise LayerMapError(f"layer_map: {which} has no module named {name!r}{hint}")


def resolve_layer_map(student: nn.Module, teacher: nn.Module, spec: LayerMapSpec) -> LayerMap:
    """Normalise ``spec`` to ``[(student_name, teacher_name), ...]`` and check every name.

    ``spec`` is a dict ``{student_name: teacher_name}``, a list of pairs, or
    ``{"student": [names...], "teacher": [names...]}`` to space evenly
    (:func:`evenly_spaced_layer_map`).
    Names are dotted, as in ``named_modules()``, with an optional call index ``@k`` for a
    module called several times per forward (see :mod:`hooks`); an unknown one raises :class:`LayerMapError`
    listing the close matches.
    """
    if isinstance(spec, dict) and set(spec) == {"student", "teacher"} and all(
            isinstance(v, (list, tuple)) for v in spec.values()):
        pairs = evenly_spaced_layer_map(list(spec["student"]), list(spec["teacher"]))
    elif isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        pairs = [tuple(p) for p in spec]
    if not pairs:
        raise LayerMapError("layer_map is empty: curriculum extraction needs at least one "
                            "(student, teacher) pair")
    for p in pairs:
        if len(p) != 2 or not all(isinstance(x, str) for x in p):
            raise LayerMapError(f"layer_map: each pair must be (student_name, teacher_name), got {p!r}")
    _check_names(student, [s for s, _ in pairs], "student")
    _check_names(teacher, [t for _, t in pairs], "teacher")
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise LayerMapError(f"layer_map: a student module appears twice: {students}")
    return pairs
