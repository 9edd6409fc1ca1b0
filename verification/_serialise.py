"""``to_dict()`` for the result classes of :mod:`verification`: JSON-ready builtins.

Arrays become lists, numpy scalars Python numbers, tuples lists, paths strings, nested results dicts. A
non-finite float becomes the string ``"nan"``, ``"inf"`` or ``"-inf"`` (``float(s)`` reads it back), so that
``json.dumps(result.to_dict(), allow_nan=False)`` works: strict JSON has no NaN or infinity, and an infinite
ratio (``x / 0``) or an undefined fit is a value these results can hold.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np


def to_builtin(x: Any, where: str = "result") -> Any:
    """``x`` as JSON-serialisable builtins (see the module docstring); ``where`` names ``x`` in an error."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(x, np.ndarray):
        return [to_builtin(v, where) for v in x.tolist()] if x.ndim else to_builtin(x.item(), where)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, ResultDict):
        return x.to_dict()
    if isinstance(x, dict):
        return {str(key): to_builtin(v, f"{where}[{key!r}]") for key, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_builtin(v, f"{where}[{i}]") for i, v in enumerate(x)]
    raise TypeError(f"{where} holds a {type(x).__name__}, which to_dict cannot convert to JSON builtins.")


class ResultDict:
    """Gives a dataclass a :meth:`to_dict`: every field, then the properties named in ``_derived``."""

    _derived: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-serialisable builtins: every attribute, with arrays as lists and a non-finite float
        as the string ``"nan"``, ``"inf"`` or ``"-inf"``, so ``json.dumps(d, allow_nan=False)`` works.

        Nested results (rows, bound curves, ratio estimates) are dicts of the same form; the derived properties
        listed in the class's docstring are included under their names.
        """
        name = type(self).__name__
        out = {f.name: to_builtin(getattr(self, f.name), f"{name}.{f.name}")
               for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for prop in self._derived:
            out[prop] = to_builtin(getattr(self, prop), f"{name}.{prop}")
        return out
