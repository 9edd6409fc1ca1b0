"""Save and load pruned models without unpickling code.

A pruned model is stored in one file written with ``torch.save`` that holds only plain data: a JSON string (the
architecture: the zoo builder and its arguments, if any, and the new size of every Linear/Conv1d/Conv2d/
ConvTranspose1d/ConvTranspose2d/BatchNorm/InstanceNorm layer, with the groups of a convolution, which a pruned
depthwise convolution changes, the ``num_groups`` and ``num_channels`` of every ``GroupNorm``, which lose the
removed groups, the ``unflattened_size`` of every ``nn.Unflatten``, whose channel count a pruned
``linear->conv`` pair changes, and the sizes of every ``nn.Embedding``, whose embedding dim a conditioning term's
pruning changes; a layer of the base's size is left as it is, with its ties to other layers) and a plain
``state_dict`` of tensors. Loading uses ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects,
then rebuilds the architecture (from the zoo, or from an unpruned instance you pass), resizes the layers and loads
the tensors strictly. A Hugging Face model's attention implementation (``config._attn_implementation``: ``"eager"``,
``"sdpa"``, ...), which its ``config.json`` does not keep, is recorded too and set again on loading. The file is
written to a temporary name and moved into place with ``os.replace``, so an interrupted save never leaves a
half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from submod._atomic import atomic_path, check_file_path

from . import _conv, zoo
from ._modes import tie_again, tie_groups, unwrap, weightless_copy
from .pairs import _NORM_MODULES  # normalisation layers whose entries follow a producer's channels

__all__ = ["save_pruned", "load_pruned", "architecture_spec"]

FORMAT = "submod-pruned-v1"


def _layer_shape(m: nn.Module) -> dict | None:
    """The recorded sizes of a layer whose sizes pruning may change (see the module docstring), or ``None``."""
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    if _conv.is_conv(m):
        return {"type": _conv.base_class(m).__name__, "in": m.in_channels, "out": m.out_channels,
                "groups": m.groups, "bias": m.bias is not None}
    if isinstance(m, _NORM_MODULES):
        return {"type": next(t.__name__ for t in _NORM_MODULES if isinstance(m, t)), "num_features": m.num_features}
    if isinstance(m, nn.GroupNorm):
        return {"type": "GroupNorm", "num_groups": m.num_groups, "num_channels": m.num_channels}
    if isinstance(m, nn.Embedding):  # a conditioning term's: its embedding dim follows a pair's channels
        return {"type": "Embedding", "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim}
    if isinstance(m, nn.Unflatten) and all(isinstance(v, int) for v in m.unflattened_size):
        return {"type": "Unflatten", "unflattened_size": [int(v) for v in m.unflattened_size]}
    return None


def architecture_spec(model: nn.Module) -> dict:
    """The JSON-able description of ``model``'s layer sizes (and its zoo builder if it has one)."""
    shapes = {name: shape for name, m in model.named_modules() if (shape := _layer_shape(m)) is not None}
    spec = {"format": FORMAT, "builder": getattr(model, "_submod_spec", None), "shapes": shapes}
    impl = attn_implementation_of(model)
    if impl is not None:
        spec["attn_implementation"] = impl
    return spec


def attn_implementation_of(model: nn.Module) -> str | None:
    """The attention implementation of a Hugging Face ``model`` (``"eager"``, ``"sdpa"``, ...), None for others.

    ``save_pretrained`` does not write it to ``config.json``, so a model rebuilt from that file gets the library's
    default (``"sdpa"`` where available), not the one the user chose with ``attn_implementation=``.
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def restore_attn_implementation(model: nn.Module, saved: object, chosen: str | None, source: object) -> None:
    """Give the Hugging Face ``model`` the attention implementation ``chosen`` by the caller, or else the one
    ``saved`` in ``source`` (a file). ``ValueError`` for a damaged record, a choice for a model that has none, and
    an implementation that cannot be used here (e.g. ``"flash_attention_2"`` without its package)."""
    if saved is not None and not isinstance(saved, str):
        raise ValueError(f"{source} records attn_implementation={saved!r}, not a name: it has been damaged.")
    have = attn_implementation_of(model)
    if chosen is not None and (have is None or not isinstance(chosen, str)):
        raise ValueError(f"attn_implementation={chosen!r}: pass the name of a Hugging Face attention implementation "
                         "('eager', 'sdpa', ...), for a Hugging Face model (None: the saved one).")
    impl = chosen if chosen is not None else saved
    if impl is None or have in (None, impl):
        return
    what = f"attn_implementation={impl!r}" + ("" if chosen is not None else f" (saved in {source})")
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:  # transformers releases before set_attn_implementation fix the attention when building
        raise ValueError(f"{what}: the model is built with {have!r}, and this transformers release cannot switch "
                         f"a built model: pass a model built with attn_implementation={impl!r}, or pass "
                         f"attn_implementation={have!r} to load it with the model's own.")
    try:
        setter(impl)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"{what} cannot be used here ({exc}): install what it needs, or pass another "
                         "attn_implementation= ('sdpa' or 'eager').") from exc


def save_pruned(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model`` (pruned or not) to ``path`` atomically; see the module docstring for the format.

    A model wrapped by ``torch.compile``, ``nn.DataParallel`` or ``DistributedDataParallel`` is saved as the model
    it wraps (the layer names :func:`load_pruned` rebuilds; wrap the loaded model again). A transformer whose
    attention heads were pruned (``torch.nn.TransformerEncoderLayer``, or a Hugging Face model whose blocks have
    fewer heads than its config) or that holds a mixture of experts is refused: this format records no head counts
    and no experts' tensors; use :func:`nn_adapters.transformer.save_pruned`.

    Parameters
    ----------
    model : torch.nn.Module
        The model to save (or a wrapper of it).
    path : path-like
        The file to write.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> import nn_adapters as nna
    >>> net = nna.zoo.mlp(8, [16], 2)
    >>> pruned, _ = nna.prune(net, torch.randn(64, 8), keep=0.5, method="layer")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = nna.save_pruned(pruned, os.path.join(d, "net.pt"))
    ...     back = nna.load_pruned(p)
    >>> back[1].out_features
    8
    """
    from ._transformer_blocks import PrunedMultiheadAttention

    model = unwrap(model)  # a wrapper's prefix (_orig_mod., module.) would not match the model load_pruned builds
    from ._transformer_blocks import find_blocks

    blocks = find_blocks(model)
    heads = [n for n, m in model.named_modules() if isinstance(m, PrunedMultiheadAttention)]
    config_heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if isinstance(config_heads, int) and not isinstance(config_heads, bool):
        # Hugging Face attention keeps its head count in attributes (num_attention_heads, all_head_size) that
        # this format does not record either: the loaded model would keep the config's count
        heads += [b.name for b in blocks if b.num_heads != config_heads]
    for what, names in (("attention modules with pruned heads", heads),
                        ("mixtures of experts (the number and neurons of their experts)", [b.name for b in blocks
                                                                                           if b.moe])):
        if names:
            raise ValueError(f"{type(model).__name__} has {what} ({', '.join(names[:3])}"
                             f"{' ...' if len(names) > 3 else ''}), whose sizes this format does not record, so "
                             "load_pruned could not rebuild them; save it with nn_adapters.transformer.save_pruned("
                             "model, directory) and read it back with nn_adapters.transformer.load_pruned(directory, "
                             "model).")
    path = check_file_path(path)
    spec = architecture_spec(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"spec": json.dumps(spec), "state_dict": state}, tmp)
    return path


def _resize(model: nn.Module, name: str, shape: dict) -> None:
    try:
        m = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"the saved model has a layer {name!r} that the base architecture lacks; pass the "
                         "architecture the model was pruned from as base_model=.") from exc
    kind = shape["type"]
    base = {t.__name__: t for t in (*_conv.LAYER_TYPES, *_NORM_MODULES, nn.GroupNorm, nn.Unflatten,
                                    nn.Embedding)}.get(kind)
    if base is None or not isinstance(m, base):  # the spec names the base class; subclasses are that layer too
        raise ValueError(f"layer {name!r} is a {type(m).__name__} in the base architecture but a {kind} in the file.")
    if _layer_shape(m) == shape:
        return  # not resized by pruning: keep its parameters, which may be tied to another layer's (weight tying)
    if kind == "Unflatten":
        m.unflattened_size = tuple(int(v) for v in shape["unflattened_size"])
        return
    dev = {"device": m.weight.device if getattr(m, "weight", None) is not None else None}
    if kind == "Embedding":
        m.weight = nn.Parameter(torch.empty(int(shape["num_embeddings"]), int(shape["embedding_dim"]), **dev))
        m.num_embeddings, m.embedding_dim = int(shape["num_embeddings"]), int(shape["embedding_dim"])
        return
    if issubclass(base, _conv.LAYER_TYPES):
        # a file written before groups were recorded holds no resized grouped convolution: keep the base's groups
        groups = 1 if kind == "Linear" else shape.get("groups", m.groups)
        m.weight = nn.Parameter(torch.empty(_conv.weight_shape(m, shape["in"], shape["out"], groups), **dev))
        m.bias = nn.Parameter(torch.empty(shape["out"], **dev)) if shape["bias"] else None
        if kind == "Linear":
            m.in_features, m.out_features = shape["in"], shape["out"]
        else:
            m.in_channels, m.out_channels, m.groups = shape["in"], shape["out"], groups
        return
    # a normalisation layer: per-channel affine entries, and running statistics for BatchNorm / InstanceNorm
    n = int(shape["num_channels" if kind == "GroupNorm" else "num_features"])
    if m.weight is not None:
        m.weight = nn.Parameter(torch.empty(n, **dev))
        m.bias = nn.Parameter(torch.empty(n, **dev))
    if kind == "GroupNorm":
        m.num_groups, m.num_channels = int(shape["num_groups"]), n
        return
    if m.running_mean is not None:
        m.running_mean = torch.zeros(n)
        m.running_var = torch.ones(n)
    m.num_features = n


def load_pruned(path: str | os.PathLike, base_model: nn.Module | None = None,
                map_location: str | torch.device = "cpu", *, attn_implementation: str | None = None) -> nn.Module:
    """Load a model written by :func:`save_pruned` (``torch.load(weights_only=True)``: no code is unpickled).

    Parameters
    ----------
    path : path-like
    base_model : nn.Module, optional
        An instance of the unpruned architecture (copied, never modified; the copy's parameters are shapes only until
        the saved tensors take their places, so its weights are not copied). Not needed for zoo models.
    map_location : str or torch.device
    attn_implementation : str, optional
        Hugging Face models: the attention implementation of the loaded model (``"eager"``, ``"sdpa"``, ...).
        Default: the one the saved model had, whatever ``base_model`` was built with.

    Returns
    -------
    nn.Module
        The model with the saved layer sizes and weights, in eval mode.
    """
    try:
        data = torch.load(Path(path), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a model saved by nn_adapters.save_pruned "
                         f"({type(exc).__name__}: {exc}).") from exc
    if not isinstance(data, dict) or "spec" not in data or "state_dict" not in data:
        raise ValueError(f"{path} is not a model saved by nn_adapters.save_pruned (missing spec/state_dict).")
    spec = json.loads(data["spec"])
    if spec.get("format") != FORMAT:
        raise ValueError(f"{path} has format {spec.get('format')!r}; this version reads {FORMAT!r}.")
    if base_model is not None:
        model = weightless_copy(base_model)  # shapes only: the saved tensors take the parameters' places below
    elif spec.get("builder"):
        model = zoo.build(spec["builder"]["name"], **spec["builder"]["kwargs"])
    else:
        raise ValueError(f"{path} holds a custom architecture; pass base_model= (an instance of the unpruned model "
                         "class) so it can be rebuilt without unpickling code.")
    restore_attn_implementation(model, spec.get("attn_implementation"), attn_implementation, path)
    for name, shape in spec["shapes"].items():
        _resize(model, name, shape)
    ties = tie_groups(model)  # parameters shared by several layers (weight tying), which pruning leaves alone
    model.load_state_dict(data["state_dict"], strict=True, assign=True)  # keeps the saved dtypes (e.g. float64)
    tie_again(ties)  # assign=True gives each name its own parameter
    return model.to(map_location).eval()
