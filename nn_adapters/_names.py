"""The spellings that both pruning paths (MLP/CNN and transformer) accept for ``method`` and ``allocation``.

Each path has its own canonical names, kept for compatibility (the MLP/CNN path says ``"weight_norm"`` and
``"act_norm"``, the transformer path ``"magnitude"`` and ``"wanda"``), and accepts the other path's names, the
paper's class names and any letter case, so that one call works on any model.
"""

from __future__ import annotations

#: ``allocation`` values: ``"error"`` is the MLP/CNN path's earlier spelling of ``"error-curve"``.
ALLOCATIONS = ("uniform", "error-curve")
_ALLOCATION_ALIASES = {"error": "error-curve"}

#: Other names of the methods, mapped to the paper's short names (greedy methods) or to the generic baseline name.
_GENERIC = {"asyminchange": "asym", "seqinchange": "seq", "layerinchange": "layer",
            "weight_norm": "magnitude", "activation_norm": "wanda", "act_norm": "wanda"}


def canonical_method(method: object, canonical: dict[str, str]) -> object:
    """``method`` in the calling path's vocabulary; ``canonical`` maps generic names to that path's names.

    Anything that is not a string, or not a known name, is returned as given, for the caller's own check to
    refuse with the list of valid names.

    >>> canonical_method("Magnitude", {"magnitude": "weight_norm", "wanda": "act_norm"})
    'weight_norm'
    >>> canonical_method("AsymInChange", {})
    'asym'
    >>> canonical_method("bogus", {})
    'bogus'
    """
    if not isinstance(method, str):
        return method
    name = _GENERIC.get(method.lower(), method.lower())
    return canonical.get(name, name)


def canonical_allocation(allocation: object) -> str:
    """``allocation`` as ``"uniform"`` or ``"error-curve"``, or a ``ValueError`` that lists the valid values.

    >>> canonical_allocation("error")
    'error-curve'
    >>> canonical_allocation("equal")
    Traceback (most recent call last):
    ...
    ValueError: allocation must be 'uniform' or 'error-curve' ('error' is accepted for 'error-curve'); got 'equal'.
    """
    name = _ALLOCATION_ALIASES.get(allocation, allocation) if isinstance(allocation, str) else allocation
    if name not in ALLOCATIONS:
        raise ValueError(f"allocation must be 'uniform' or 'error-curve' ('error' is accepted for 'error-curve'); "
                         f"got {allocation!r}.")
    return name
