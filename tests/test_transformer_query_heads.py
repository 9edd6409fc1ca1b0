"""Query heads of Llama-style decoders with grouped-query attention, and of Falcon's new decoder architecture
(``head_unit="query"``): the units are query heads, as many kept in every key/value group, every key and value head
kept (``num_key_value_groups``, or Falcon's ``num_heads / num_kv_heads``, becomes the query heads kept per group).

Oracles: the original model with the removed query heads' ``o_proj`` columns zeroed (what removing them must give
without a refit), forward selection under the per-group quota written out with one lstsq per candidate on the
hooked rows of ``o_proj``, the query rows' and output columns' norms written out for the magnitude baseline, and
pruning with ``head_unit="group"`` where there are no groups."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _torch_helpers import assert_reloads_and_generates, hooked_rows, ragged_token_batches, user_module, zeroed_heads

from nn_adapters.transformer import load_pruned, prune_transformer, save_pruned

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, HEADS, KV, LAYERS, HEAD_DIM = 40, 32, 8, 2, 2, 4
GROUPS = HEADS // KV


def build(name: str = "llama", kv: int = KV, n_layers: int = LAYERS) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=n_layers,
                  num_attention_heads=HEADS, num_key_value_heads=kv, max_position_embeddings=32, head_dim=HEAD_DIM,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = {"llama": lambda: transformers.LlamaConfig(**common),
           "qwen3": lambda: transformers.Qwen3Config(**common),  # q_norm / k_norm over head_dim, shared by the heads
           "phi3": lambda: transformers.Phi3Config(**common),  # query, key and value fused in qkv_proj
           "cohere_qk": lambda: transformers.CohereConfig(**common, use_qk_norm=True),  # a norm weight per head
           "mixtral": lambda: transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
           "gpt_oss": lambda: transformers.GptOssConfig(**{**common, "intermediate_size": 16}, num_local_experts=4,
                                                        num_experts_per_tok=2, sliding_window=4,
                                                        layer_types=["sliding_attention", "full_attention"]),
           "stablelm": lambda: transformers.StableLmConfig(**common),
           # a LayerNorm for each query and each key head, in parallel with the FFN
           "stablelm_qk": lambda: transformers.StableLmConfig(**common, qk_layernorm=True, use_parallel_residual=True),
           "dbrx": lambda: transformers.DbrxConfig(  # query, key and value fused in Wqkv: queries first
               d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS, max_seq_len=32, vocab_size=VOCAB, pad_token_id=0,
               attn_config={"kv_n_heads": kv, "rope_theta": 10000.0, "clip_qkv": 8.0},
               ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}),
           # query_key_value holds, group by group, the group's query heads then its key and its value head
           "falcon": lambda: transformers.FalconConfig(
               vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=n_layers, num_attention_heads=HEADS,
               num_kv_heads=kv, new_decoder_architecture=True, pad_token_id=0, bos_token_id=1, eos_token_id=2),
           }[name]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger weights than the default init, so that the heads differ visibly
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
        for layer in layers(model):  # distinct per-head parameters, so that the kept rows matter
            sa = attention(layer)
            for norm in (getattr(sa, "q_norm", None), getattr(sa, "k_norm", None)):
                if norm is not None and norm.weight.dim() == 2:
                    norm.weight.normal_(1.0, 0.5)
            for per_head in (getattr(sa, "q_layernorm", None), getattr(sa, "k_layernorm", None)):
                for norm in [] if per_head is None else per_head.norms:
                    norm.weight.normal_(1.0, 0.5)
            sinks = getattr(sa, "sinks", None)
            if sinks is not None:
                sinks.normal_(0.0, 1.0)
    return model.eval()


def layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    if hasattr(model, "transformer"):  # DBRX's blocks, Falcon's h
        return getattr(model.transformer, "blocks", None) or model.transformer.h
    return model.model.layers


def attention(layer: torch.nn.Module) -> torch.nn.Module:
    if hasattr(layer, "norm_attn_norm"):
        return layer.norm_attn_norm.attn
    return getattr(layer, "self_attention", None) or layer.self_attn


def out_proj(sa: torch.nn.Module) -> torch.nn.Linear:
    return getattr(sa, "out_proj", None) or getattr(sa, "dense", None) or sa.o_proj


def out_path(model: torch.nn.Module) -> str:
    """The output projection's path in a layer."""
    if hasattr(model, "transformer"):
        return "self_attention.dense" if hasattr(model.transformer, "h") else "norm_attn_norm.attn.out_proj"
    return "self_attn.o_proj"


def groups_of(sa: torch.nn.Module) -> int:
    """Query heads per key/value head of an attention."""
    return sa.num_heads // sa.num_kv_heads if hasattr(sa, "num_kv_heads") else sa.num_key_value_groups


def falcon_rows(sa: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the query rows and of the key and value rows of Falcon's query_key_value, ``(groups, heads, d,
    hidden)``: group by group, its query heads, then its key and its value head."""
    per = sa.num_heads // sa.num_kv_heads
    w = sa.query_key_value.weight.view(sa.num_kv_heads, per + 2, sa.head_dim, -1)
    return w[:, :per], w[:, per:]


def data(n: int = 3) -> list[dict[str, torch.Tensor]]:
    return ragged_token_batches(VOCAB, n)


def key_value_weights(attn: torch.nn.Module) -> torch.Tensor:
    """The key and value rows of an attention (Phi-3, DBRX: the rows of its fused projection after the queries'),
    and the weights of its per-key-head norms (StableLM's qk_layernorm)."""
    if hasattr(attn, "query_key_value"):
        return falcon_rows(attn)[1]
    fused = getattr(attn, "qkv_proj", None) or getattr(attn, "Wqkv", None)
    rows = (fused.weight[out_proj(attn).in_features:] if fused is not None
            else torch.cat([attn.k_proj.weight, attn.v_proj.weight]))
    norms = getattr(attn, "k_layernorm", None)
    return rows if norms is None else torch.cat([rows.reshape(-1), *(n.weight for n in norms.norms)])


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def balanced(kept: list[int], per: int) -> bool:
    return np.bincount(np.asarray(kept) // GROUPS, minlength=KV).tolist() == [per] * KV


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "cohere_qk", "mixtral", "gpt_oss", "stablelm",
                                  "stablelm_qk", "dbrx", "falcon"])
@pytest.mark.parametrize("method", ["asym", "layer", "magnitude", "wanda", "random"])
def test_query_heads_go_evenly_and_act_as_the_zeroed_original(name: str, method: str) -> None:
    """Without refit the pruned model computes the original with the removed query heads' o_proj columns zeroed;
    every group keeps 2 of its 4 query heads, the key and value projections are untouched, and the attention's
    counts follow (num_key_value_groups 2)."""
    model, batches = build(name), data()
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method=method, reweight=False,
                                       head_unit="query")
    units = [u for u in report.units if u.stage == "heads"]
    assert all(u.n_units == HEADS and u.n_kept == HEADS // 2 and balanced(u.kept, GROUPS // 2) for u in units)
    zeroed = zeroed_heads(model, report, HEAD_DIM, out_path(model))
    for b in batches:
        torch.testing.assert_close(logits(pruned, b), logits(zeroed, b), atol=1e-4, rtol=1e-4)
    for old, new in zip(layers(model), layers(pruned), strict=True):
        sa = attention(new)
        assert groups_of(sa) == GROUPS // 2 and out_proj(sa).in_features == HEADS // 2 * HEAD_DIM
        torch.testing.assert_close(key_value_weights(sa), key_value_weights(attention(old)))


def quota_selection(a: np.ndarray, y: np.ndarray, per: int) -> list[int]:
    """Forward selection of query heads (columns of ``a``, HEAD_DIM each) with at most ``per`` from each group, the
    largest explained energy of ``y`` first (one lstsq per candidate; ties to the lower head)."""
    chosen: list[int] = []
    for _ in range(KV * per):
        full = {g for g in range(KV) if sum(h // GROUPS == g for h in chosen) >= per}
        gains = {h: explained(a, y, [*chosen, h]) for h in range(HEADS) if h not in chosen and h // GROUPS not in full}
        chosen.append(max(gains, key=lambda h: (gains[h], -h)))
    return chosen


def explained(a: np.ndarray, y: np.ndarray, heads: list[int]) -> float:
    cols = np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])
    m = np.linalg.lstsq(a[:, cols], y, rcond=None)[0]
    return float((y ** 2).sum() - ((y - a[:, cols] @ m) ** 2).sum())


def test_layer_mode_selection_is_forward_selection_under_the_group_quota() -> None:
    """Layer mode, ridge 0: the first block's query heads are those of forward selection with at most 2 heads from
    each group, on o_proj's hooked input rows (real tokens) with its unpruned output as target (one lstsq per
    candidate); 3 of 4 (keep 0.75) likewise."""
    model, batches = build(), data(4)
    first = model.model.layers[0].self_attn.o_proj
    a = hooked_rows(model, batches, first, lambda b, x: x[b["attention_mask"].bool()])
    y = a @ first.weight.detach().double().numpy().T
    for keep, per in ((0.5, 2), (0.75, 3)):
        _, report = prune_transformer(model, batches, keep=keep, target="heads", method="layer", reweight=False,
                                      ridge=0.0, head_unit="query")
        assert report.units[0].kept == sorted(quota_selection(a, y, per))


def test_the_error_curve_allocation_splits_query_heads_a_head_per_group_at_a_time(monkeypatch, tmp_path) -> None:
    """allocation="error-curve" with query heads: each layer's curve is the error of forward selection with ``q``
    heads from each group (written out with lstsq on o_proj's hooked rows of the original model, ``q = 0..4``); the
    layers keep ``2 q`` heads, ``q`` from each group, with the counts that marginal allocation gives for those
    curves (the same total as uniform); and the model, its layers now with different query heads per group, reloads
    and generates."""
    import nn_adapters.transformer as tr

    model, batches = build(), data(4)
    seen = []
    allocate = tr.allocate_units
    monkeypatch.setattr(tr, "allocate_units", lambda c, total, floors: seen.append(c) or allocate(c, total, floors))
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method="layer", reweight=False,
                                       ridge=0.0, head_unit="query", allocation="error-curve", min_keep=0.25)
    want = []
    for layer in model.model.layers:
        o_proj = layer.self_attn.o_proj
        a = hooked_rows(model, batches, o_proj, lambda b, x: x[b["attention_mask"].bool()])
        y = a @ o_proj.weight.detach().double().numpy().T
        energy = float((y ** 2).sum())
        want.append([energy] + [energy - explained(a, y, quota_selection(a, y, q)) for q in range(1, GROUPS + 1)])
    assert len(seen) == 1
    np.testing.assert_allclose(np.array(seen[0]), np.array(want), rtol=1e-6, atol=1e-9 * max(map(max, want)))
    steps = allocate([np.array(c) for c in want], LAYERS * GROUPS // 2, [1] * LAYERS)
    assert [u.n_kept for u in report.units] == [KV * int(q) for q in steps]
    assert all(balanced(u.kept, int(q)) for u, q in zip(report.units, steps))
    for u, layer in zip(report.units, model.model.layers):
        o_proj = layer.self_attn.o_proj
        a = hooked_rows(model, batches, o_proj, lambda b, x: x[b["attention_mask"].bool()])
        assert sorted(u.kept) == sorted(quota_selection(a, a @ o_proj.weight.detach().double().numpy().T,
                                                        u.n_kept // KV))
    assert [layer.self_attn.num_key_value_groups for layer in pruned.model.layers] == [int(q) for q in steps]
    assert_reloads_and_generates(pruned, tmp_path / "m")


@pytest.mark.parametrize("name", ["llama", "phi3", "dbrx", "falcon"])
def test_magnitude_ranks_the_query_heads_within_each_group(name: str) -> None:
    """The magnitude score of a query head reads its query rows (Phi-3, DBRX: the first rows of the fused
    projection; Falcon: the first rows of each group's) and its output projection's columns (the shared key and
    value heads stay); the 2 best of each group are kept."""
    model, batches = build(name), data(2)

    def fused(sa: torch.nn.Module) -> torch.nn.Linear | None:
        return getattr(sa, "qkv_proj", None) or getattr(sa, "Wqkv", None)

    with torch.no_grad():  # large key and value rows of unequal norms: they must not enter any query head's score
        for layer in layers(model):
            sa = attention(layer)
            if hasattr(sa, "query_key_value"):
                kv = falcon_rows(sa)[1]
                kv.mul_(torch.arange(1, kv[0].numel() // kv.shape[-1] + 1, dtype=kv.dtype).flip(0).view(
                    1, 2, HEAD_DIM, 1) * 10.0)
                continue
            kv = fused(sa).weight[HEADS * HEAD_DIM:] if fused(sa) is not None else sa.k_proj.weight
            kv.mul_(torch.arange(1, kv.shape[0] + 1, dtype=kv.dtype).flip(0).view(-1, 1) * 10.0)
    _, report = prune_transformer(model, batches, keep=0.5, target="heads", method="magnitude", reweight=False,
                                  head_unit="query")
    for layer, u in zip(layers(model), report.units, strict=True):
        sa = attention(layer)
        q = (falcon_rows(sa)[0].reshape(HEADS * HEAD_DIM, -1) if hasattr(sa, "query_key_value")
             else fused(sa).weight[:HEADS * HEAD_DIM] if fused(sa) is not None else sa.q_proj.weight).detach().double()
        o = out_proj(sa).weight.detach().double()
        score = np.array([float(q[h * HEAD_DIM:(h + 1) * HEAD_DIM].pow(2).sum()
                                + o[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].pow(2).sum()) for h in range(HEADS)])
        want = sorted(g * GROUPS + i for g in range(KV) for i in np.argsort(-score[g * GROUPS:(g + 1) * GROUPS])[:2])
        assert u.kept == want


@pytest.mark.parametrize("name", ["llama", "phi3", "gpt_oss", "stablelm_qk", "dbrx", "falcon"])
def test_refit_reload_and_generation(tmp_path, name: str) -> None:
    """asym with refit is closer to the original than without; the pruned model's spec (version 2) records the
    groups' query heads, it reloads from its config with the same logits and generates with its cache; a spec of
    whole groups removed stays version 1."""
    model, batches = build(name), data(4)
    errs = []
    for reweight in (False, True):
        pruned, _ = prune_transformer(model, batches, keep=0.5, target="heads", reweight=reweight, head_unit="query")
        errs.append(sum(float((logits(pruned, b) - logits(model, b)).square().sum()) for b in batches))
    assert errs[1] < errs[0]
    assert_reloads_and_generates(pruned, tmp_path / "q")
    spec = json.loads((tmp_path / "q" / "submod_pruning.json").read_text())
    assert spec["version"] == 2 and [(b["num_heads"], b["num_key_value_heads"], b["num_key_value_groups"])
                                     for b in spec["blocks"]] == [(4, 2, 2)] * LAYERS
    again = load_pruned(tmp_path / "q", build(name))
    assert [groups_of(attention(layer)) for layer in layers(again)] == [2, 2]
    _, report = prune_transformer(model, batches, keep=0.5, target="heads")
    assert report.spec["version"] == 1 and all("num_key_value_groups" not in b for b in report.spec["blocks"])


def test_query_heads_then_whole_groups(tmp_path) -> None:
    """A model whose query heads were pruned can lose whole groups next (head_unit="group": each group has 2 query
    heads left): the result is the original with both removals' o_proj columns zeroed, and it reloads (its
    spec keeps the groups' query heads against the trained 4)."""
    model, batches = build(), data(3)
    once, first = prune_transformer(model, batches, keep=0.5, target="heads", method="wanda", reweight=False,
                                    head_unit="query")
    twice, second = prune_transformer(once, batches, keep=0.5, target="heads", method="wanda", reweight=False)
    kept_groups = [u.kept for u in second.units]
    assert all(len(k) == 1 for k in kept_groups)
    zeroed = zeroed_heads(model, first, HEAD_DIM)
    with torch.no_grad():
        for layer, u1, groups in zip(zeroed.model.layers, first.units, kept_groups, strict=True):
            gone = [h for i, h in enumerate(u1.kept) if i // 2 not in groups]  # the query heads of removed groups
            for h in gone:
                layer.self_attn.o_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0.0
    for b in batches:
        torch.testing.assert_close(logits(twice, b), logits(zeroed, b), atol=1e-4, rtol=1e-4)
    save_pruned(twice, tmp_path / "t")
    again = load_pruned(tmp_path / "t", build())
    assert [(s.num_key_value_groups, s.k_proj.out_features) for s in (la.self_attn for la in again.model.layers)] \
        == [(2, HEAD_DIM)] * LAYERS
    torch.testing.assert_close(logits(again, batches[0]), logits(twice, batches[0]))


def test_without_groups_query_and_group_units_are_the_same() -> None:
    """With as many key/value heads as query heads there are no groups: both units give the same model."""
    model, batches = build(kv=HEADS), data(2)
    a, ra = prune_transformer(model, batches, keep=0.5, target="all", head_unit="query")
    b, rb = prune_transformer(model, batches, keep=0.5, target="all", head_unit="group")
    assert [u.kept for u in ra.units] == [u.kept for u in rb.units]
    torch.testing.assert_close(logits(a, batches[0]), logits(b, batches[0]))


def test_refusals() -> None:
    """An unknown unit and a block whose query heads cannot go alone are refused with the fix (every block with
    key/value groups can lose query heads now: one is made unable to, as a block laid out otherwise would be)."""
    import nn_adapters._transformer_blocks as tb

    model, batches = build(), data(2)
    with pytest.raises(ValueError, match="head_unit must be 'group' .* or 'query'"):
        prune_transformer(model, batches, keep=0.5, target="heads", head_unit="queries")
    falcon = build("falcon", n_layers=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tb._HFFalconBlock, "QUERY_HEADS_OK", False)
        with pytest.raises(ValueError, match="key/value groups of 4 query heads, which cannot be removed alone; "
                                             "pass head_unit='group'"):
            prune_transformer(falcon, batches, keep=0.5, target="heads", head_unit="query")
        prune_transformer(falcon, batches, keep=0.5, target="heads")  # whole groups


def test_cli_head_unit(tmp_path, monkeypatch, capsys) -> None:
    """submod prune --target heads --head-unit query saves a model whose groups keep half of their query heads
    (the reloaded attention's counts); with an MLP --head-unit is refused in one line."""
    from submod.cli import main

    user_module(tmp_path, monkeypatch, "qmods",
        "import torch\n"
        "from test_transformer_query_heads import build, data\n"
        "def llama():\n"
        "    return build(), data(2)\n"
        "def mlp():\n"
        "    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "    return net, [torch.randn(16, 4)]\n")
    assert main(["prune", "qmods:llama", "--target", "heads", "--keep", "0.5", "--head-unit", "query",
                 "--out", "q"]) == 0
    again = load_pruned(tmp_path / "q")
    assert [(la.self_attn.num_key_value_groups, la.self_attn.k_proj.out_features) for la in again.model.layers] == [
        (2, KV * HEAD_DIM)] * LAYERS
    capsys.readouterr()
    assert main(["prune", "qmods:mlp", "--keep", "0.5", "--head-unit", "query", "--out", "m.pt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --head-unit" in err


def test_the_error_curve_allocation_trades_heads_only_between_layers_of_as_many_groups(monkeypatch) -> None:
    """After the first of 3 layers lost a key/value group, its query heads come one at a time and the other two
    layers' a head per group (2) at a time: the first keeps its uniform count, the other two split their uniform
    total by marginal allocation over their quota curves (forward selection under the quota, written out with
    lstsq, on the pruned model's o_proj rows)."""
    import nn_adapters.transformer as tr

    model, batches = build(n_layers=3), data(4)
    fewer, _ = prune_transformer(model, batches, keep={0: 0.5, 1: 1.0, 2: 1.0}, target="heads")
    assert [layer.self_attn.k_proj.out_features // HEAD_DIM for layer in fewer.model.layers] == [1, 2, 2]
    seen = []
    allocate = tr.allocate_units
    monkeypatch.setattr(tr, "allocate_units", lambda c, total, floors: seen.append(c) or allocate(c, total, floors))
    _, report = prune_transformer(fewer, batches, keep=0.5, target="heads", method="layer", reweight=False,
                                  ridge=0.0, head_unit="query", allocation="error-curve", min_keep=0.25)
    assert len(seen) == 2 and [len(c) for c in seen] == [1, 2]  # the first layer alone, then the other two
    want = []
    for layer in fewer.model.layers[1:]:
        o_proj = layer.self_attn.o_proj
        a = hooked_rows(fewer, batches, o_proj, lambda b, x: x[b["attention_mask"].bool()])
        y = a @ o_proj.weight.detach().double().numpy().T
        energy = float((y ** 2).sum())
        want.append([energy] + [energy - explained(a, y, quota_selection(a, y, q)) for q in range(1, GROUPS + 1)])
    np.testing.assert_allclose(np.array(seen[1]), np.array(want), rtol=1e-6, atol=1e-9 * max(map(max, want)))
    steps = allocate([np.array(c) for c in want], GROUPS, [1, 1])
    assert [u.n_kept for u in report.units] == [2] + [KV * int(q) for q in steps]
    assert all(balanced(u.kept, int(q)) for u, q in zip(report.units[1:], steps))


@pytest.mark.parametrize("method", ["asym", "magnitude"])
def test_stablelm_per_head_norms_follow_whole_groups_too(tmp_path, method: str) -> None:
    """StableLM with a LayerNorm for each query and key head (qk_layernorm), whole key/value groups removed: the
    zeroed original without refit, the kept groups' query and key norms kept (in order), and the model reloads."""
    model, batches = build("stablelm_qk"), data()
    pruned, report = prune_transformer(model, batches, keep=0.5, target="heads", method=method, reweight=False)
    zeroed = zeroed_heads(model, report, GROUPS * HEAD_DIM)
    for b in batches:
        torch.testing.assert_close(logits(pruned, b), logits(zeroed, b), atol=1e-4, rtol=1e-4)
    for u, old, new in zip(report.units, layers(model), layers(pruned), strict=True):
        (g,) = u.kept  # one of the 2 groups
        for part, heads in (("q_layernorm", range(g * GROUPS, (g + 1) * GROUPS)), ("k_layernorm", [g])):
            got = [n.weight for n in getattr(new.self_attn, part).norms]
            torch.testing.assert_close(got, [getattr(old.self_attn, part).norms[h].weight for h in heads])
    assert_reloads_and_generates(pruned, tmp_path / "g")
