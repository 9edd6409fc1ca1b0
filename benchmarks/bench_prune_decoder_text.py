"""Quality benchmark on causal language models: pruning small GPT-2, Pythia-style (GPT-NeoX, parallel attention
and FFN) and, on request, Gemma-3-style (``--arch gemma3``: RMS norms before and after the sublayers, gated FFN,
grouped-query attention, sliding-window and global layers) and Qwen2-MoE-style (``--arch qwen2moe``: a mixture of 8
experts of 128 neurons, top-2 routing, and a gated shared expert of 256 in every layer), GPT-OSS-style
(``--arch gptoss``), Llama-4-style (``--arch llama4``), Gemma-4-style (``--arch gemma4``: Gemma 3's layout with
per-layer inputs and a layer scalar), NemotronH-style (``--arch nemotron_h``: one mixer a layer,
Mamba-2, attention or a ReLU^2 FFN; the pruner runs the Mamba layers as they are between the blocks it prunes) and
Falcon-H1-style (``--arch falcon_h1``: a Mamba-2 mixer beside the attention in every layer, then a gated FFN)
decoders trained here on text, without fine-tuning; and
encoder-decoders (``--arch mbart``: BART family, pre-LN; ``--arch t5``: Flan-T5-style), whose encoder reads the first
half of each window and whose decoder continues it (the perplexity is the decoder's, on the second half).

No pretrained decoder can be downloaded on this machine, so each architecture is trained once on bytes of English
text (sentences from the docstrings of the Python standard library, the MiniLM benchmark's source; vocabulary: the
256 byte values; 4 layers (encoder-decoders: 4 of each), width 128, 4 heads, FFN 512, windows of 64 bytes) and
cached in ``$SUBMOD_CACHE_DIR`` like the demo's CNN. The sentences are split three ways, disjoint: training,
calibration (the unlabeled windows the pruner sees) and evaluation. For every target (FFN neurons or attention
heads, in every block), fraction kept and seed (the seed draws the calibration windows and the random baseline's
units) the model is pruned with the greedy methods (asym, layer; least-squares refit) and the baselines
(Wanda-style, magnitude and random with the same refit; magnitude without refit, what Torch-Pruning gives before
fine-tuning), and measured on the evaluation windows: perplexity of the next byte (labels: the text itself, never
seen by the pruner) and the KL divergence of the pruned model's next-byte distribution from the unpruned one's
(label-free fidelity). Prints means over seeds and RATIOS of the perplexity increase (pruned / unpruned - 1) against
the baselines measured in the same run. All figures are empirical estimates on this data (no guarantee is involved).

Run:  python benchmarks/bench_prune_decoder_text.py [--arch gpt2 pythia gemma3 gemma4 qwen2moe gptoss llama4
      nemotron_h falcon_h1 mbart t5]
      [--targets ffn heads] [--keep 0.5 0.25] [--seeds 3] [--calib 128] [--steps 1000] [--retrain]
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import time

import numpy as np
import torch
import transformers
from minilm import stdlib_sentences

import nn_adapters as nna
from nn_adapters.digits import cache_dir
from nn_adapters.transformer import load_pruned, save_pruned

WINDOW, WIDTH, LAYERS, HEADS, FFN = 64, 128, 4, 4, 512
METHODS = [("asym", "asym", True), ("layer", "layer", True), ("wanda+refit", "wanda", True),
           ("magnitude+refit", "magnitude", True), ("random+refit", "random", True),
           ("magnitude (no refit)", "magnitude", False)]
BASELINES = ("wanda+refit", "magnitude+refit", "magnitude (no refit)")
SEQ2SEQ = ("mbart", "t5")


def corpus() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training, calibration and evaluation text (disjoint sentences, 80 / 10 / 10 %), one sentence per line, as
    token ids (the byte values)."""
    sents = stdlib_sentences(seed=0)
    n = len(sents)
    cut1, cut2 = int(0.8 * n), int(0.9 * n)

    def ids(part: list[str]) -> torch.Tensor:
        return torch.frombuffer(bytearray(("\n".join(part) + "\n").encode("utf-8")), dtype=torch.uint8).long()

    return ids(sents[:cut1]), ids(sents[cut1:cut2]), ids(sents[cut2:])


def windows(data: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``WINDOW`` tokens at random offsets of ``data``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - WINDOW, (n,), generator=g)
    return torch.stack([data[s:s + WINDOW] for s in starts.tolist()])


def build(arch: str) -> torch.nn.Module:
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=WINDOW, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                      n_inner=FFN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=10,
                                      eos_token_id=10)
        return transformers.GPT2LMHeadModel(cfg)
    if arch == "mbart":
        # BART-family encoder-decoder, pre-LN (mBART: post-LN BART stalls at the byte frequencies when trained from
        # scratch here): LAYERS encoder and LAYERS decoder layers, cross-attention in every decoder layer
        cfg = transformers.MBartConfig(vocab_size=256, max_position_embeddings=WINDOW, d_model=WIDTH,
                                       encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                                       decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
                                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
                                       bos_token_id=10, eos_token_id=10, decoder_start_token_id=10,
                                       forced_eos_token_id=None)
        return transformers.MBartForConditionalGeneration(cfg)
    if arch == "t5":
        # Flan-T5-style encoder-decoder: RMS norms before the sublayers, gated-GELU FFN, relative position biases
        cfg = transformers.T5Config(vocab_size=256, d_model=WIDTH, d_kv=WIDTH // HEADS, d_ff=FFN, num_layers=LAYERS,
                                    num_decoder_layers=LAYERS, num_heads=HEADS, dropout_rate=0.0,
                                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                                    eos_token_id=10, decoder_start_token_id=10)
        return transformers.T5ForConditionalGeneration(cfg)
    if arch == "gemma3":
        # sandwich norms, gated FFN, three sliding-window layers and a global one; grouped-query attention with
        # 8 query heads of width 16 in 4 key/value groups (the units of head pruning)
        cfg = transformers.Gemma3TextConfig(vocab_size=256, max_position_embeddings=WINDOW, hidden_size=WIDTH,
                                            num_hidden_layers=LAYERS, num_attention_heads=2 * HEADS,
                                            num_key_value_heads=HEADS, head_dim=WIDTH // (2 * HEADS),
                                            query_pre_attn_scalar=WIDTH // (2 * HEADS),
                                            intermediate_size=FFN, sliding_window=16,
                                            layer_types=["sliding_attention"] * (LAYERS - 1) + ["full_attention"],
                                            pad_token_id=0, bos_token_id=10, eos_token_id=10)
        return transformers.Gemma3ForCausalLM(cfg)
    if arch == "gemma4":
        # Gemma 4's text decoder: Gemma 3's layout with per-layer inputs (the E models' PLE, width 16), a weightless
        # value norm, each layer's output times layer_scalar; three sliding-window layers and a global one
        cfg = transformers.Gemma4TextConfig(vocab_size=256, max_position_embeddings=WINDOW, hidden_size=WIDTH,
                                            num_hidden_layers=LAYERS, num_attention_heads=2 * HEADS,
                                            num_key_value_heads=HEADS, head_dim=WIDTH // (2 * HEADS),
                                            global_head_dim=WIDTH // (2 * HEADS), intermediate_size=FFN,
                                            sliding_window=16, vocab_size_per_layer_input=256,
                                            hidden_size_per_layer_input=16,
                                            layer_types=["sliding_attention"] * (LAYERS - 1) + ["full_attention"],
                                            pad_token_id=0, bos_token_id=10, eos_token_id=10)
        return transformers.Gemma4ForCausalLM(cfg)
    if arch == "qwen2moe":
        # every layer a mixture: 8 routed experts of FFN // 4 neurons (top 2) and a shared expert of FFN // 2
        # behind its sigmoid gate, as Qwen2-MoE / Qwen1.5-MoE
        cfg = transformers.Qwen2MoeConfig(vocab_size=256, max_position_embeddings=WINDOW, hidden_size=WIDTH,
                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          num_key_value_heads=HEADS // 2, intermediate_size=FFN,
                                          moe_intermediate_size=FFN // 4, shared_expert_intermediate_size=FFN // 2,
                                          num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                                          mlp_only_layers=[], pad_token_id=0, bos_token_id=10, eos_token_id=10)
        return transformers.Qwen2MoeForCausalLM(cfg)
    if arch == "gptoss":
        # GPT-OSS: 8 experts of FFN // 4 neurons (top 2) with biases and the clamped SwiGLU, sink logits per head,
        # sliding-window and full-attention layers alternating
        cfg = transformers.GptOssConfig(vocab_size=256, max_position_embeddings=WINDOW, hidden_size=WIDTH,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=HEADS // 2, head_dim=WIDTH // HEADS,
                                        intermediate_size=FFN // 4, num_local_experts=8, num_experts_per_tok=2,
                                        sliding_window=16, pad_token_id=0, bos_token_id=10, eos_token_id=10)
        return transformers.GptOssForCausalLM(cfg)
    if arch == "llama4":
        # Llama 4: dense and mixture layers alternating; 8 experts of FFN // 4 neurons, top 1, the scores scaling
        # the experts' input, and a shared expert of FFN // 4
        cfg = transformers.Llama4TextConfig(vocab_size=256, max_position_embeddings=WINDOW, hidden_size=WIDTH,
                                            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            num_key_value_heads=HEADS // 2, head_dim=WIDTH // HEADS,
                                            intermediate_size=FFN // 4, intermediate_size_mlp=FFN,
                                            num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                            attention_chunk_size=WINDOW, pad_token_id=0, bos_token_id=10,
                                            eos_token_id=10)
        return transformers.Llama4ForCausalLM(cfg)
    if arch == "nemotron_h":
        # NemotronH: Mamba-2, attention (no position embeddings; 4 heads, each its own keys and values) and ReLU^2
        # FFN layers, one mixer each, x + mixer(norm(x)); two of each (the pruner steps over the second Mamba)
        cfg = transformers.NemotronHConfig(vocab_size=256, max_position_embeddings=WINDOW, hidden_size=WIDTH,
                                           layers_block_type=["mamba", "attention", "mlp"] * (LAYERS // 2),
                                           num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                           head_dim=WIDTH // HEADS, intermediate_size=FFN, mamba_num_heads=8,
                                           mamba_head_dim=WIDTH // 4, n_groups=1, ssm_state_size=32, chunk_size=16,
                                           pad_token_id=0, bos_token_id=10, eos_token_id=10)
        return transformers.NemotronHForCausalLM(cfg)
    if arch == "falcon_h1":
        # Falcon-H1: in every layer a Mamba-2 mixer and the attention (4 heads, each its own keys and values, so
        # that 50% and 75% of the heads removed differ) run in parallel on the normalised input, summed into the
        # residual, then a gated FFN
        cfg = transformers.FalconH1Config(vocab_size=256, max_position_embeddings=WINDOW, hidden_size=WIDTH,
                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          num_key_value_heads=HEADS, head_dim=WIDTH // HEADS,
                                          intermediate_size=FFN, mamba_d_ssm=WIDTH, mamba_n_heads=8,
                                          mamba_d_head=WIDTH // 8, mamba_d_state=32, mamba_chunk_size=16,
                                          pad_token_id=0, bos_token_id=10, eos_token_id=10)
        return transformers.FalconH1ForCausalLM(cfg)
    cfg = transformers.GPTNeoXConfig(vocab_size=256, max_position_embeddings=WINDOW, hidden_size=WIDTH,
                                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                                     use_parallel_residual=True, bos_token_id=10, eos_token_id=10)
    return transformers.GPTNeoXForCausalLM(cfg)


def train(arch: str, text: torch.Tensor, steps: int) -> torch.nn.Module:
    """AdamW on random windows of the training text, batch 32, warm-up then cosine decay (seeded)."""
    torch.manual_seed(0)
    model = build(arch).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    for i in range(steps):
        x = batches_of(windows(text, 32, seed=10_000 + i), seq2seq=arch in SEQ2SEQ)[0]
        ids = x.get("decoder_input_ids", x["input_ids"])
        loss = torch.nn.functional.cross_entropy(model(**x).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (i + 1) % 250 == 0:
            print(f"  {arch} step {i + 1}/{steps}: training loss {loss.item():.3f} nats/byte", flush=True)
    return model.eval()


def trained(arch: str, text: torch.Tensor, steps: int, retrain: bool) -> tuple[torch.nn.Module, float | None]:
    """The trained model from the cache (a :func:`~nn_adapters.transformer.save_pruned` directory) or trained now
    and cached; also the training time (``None`` when cached)."""
    path = cache_dir() / f"bytes-{arch}-w{WIDTH}-l{LAYERS}-s{steps}-v1"
    if path.exists() and not retrain:
        try:
            return load_pruned(path).eval(), None
        except (ValueError, RuntimeError, OSError) as exc:  # stale or unreadable: train again
            print(f"ignoring the cache {path}: {exc}")
    t0 = time.perf_counter()
    model = train(arch, text, steps)
    took = time.perf_counter() - t0
    try:
        if path.exists():  # --retrain: the new model replaces the cached one
            shutil.rmtree(path)
        save_pruned(model, path)
    except OSError as exc:  # read-only home: run without the cache
        print(f"could not cache the model at {path}: {exc}")
    return model, took


def batches_of(x: torch.Tensor, size: int = 32, seq2seq: bool = False) -> list[dict[str, torch.Tensor]]:
    """Model inputs for windows ``x``, ``size`` windows a batch. ``seq2seq``: the encoder reads the first half of
    each window and the decoder continues it (its tokens: the source's last byte, then the second half)."""
    out = []
    for i in range(0, len(x), size):
        w = x[i:i + size]
        if seq2seq:
            src = w[:, :WINDOW // 2]
            out.append({"input_ids": src, "attention_mask": torch.ones_like(src),
                        "decoder_input_ids": w[:, WINDOW // 2 - 1:]})
        else:
            out.append({"input_ids": w, "attention_mask": torch.ones_like(w)})
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
             ref_logp: list[torch.Tensor] | None = None) -> tuple[float, float, list[torch.Tensor]]:
    """Perplexity of the next byte (of the decoder's tokens for an encoder-decoder), mean KL(unpruned || model) per
    position (0 without ``ref_logp``), and the log-probabilities."""
    nll, kl, n, logps = 0.0, 0.0, 0, []
    for i, b in enumerate(batches):
        logp = torch.log_softmax(model(**b).logits[:, :-1].double(), dim=-1)
        target = b.get("decoder_input_ids", b["input_ids"])[:, 1:]
        nll += float(-logp.gather(-1, target.unsqueeze(-1)).sum())
        if ref_logp is not None:
            kl += float((ref_logp[i].exp() * (ref_logp[i] - logp)).sum())
        n += target.numel()
        logps.append(logp)
    return math.exp(nll / n), kl / n, logps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["gpt2", "pythia"],
                    choices=["gpt2", "pythia", "gemma3", "gemma4", "qwen2moe", "gptoss", "llama4", "nemotron_h",
                             "falcon_h1", *SEQ2SEQ])
    ap.add_argument("--targets", nargs="+", default=["ffn", "heads"], choices=["ffn", "heads"])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25],
                    help="fractions of units kept (default: 0.5 0.25)")
    ap.add_argument("--seeds", type=int, default=3, help="calibration draws (default: 3)")
    ap.add_argument("--calib", type=int, default=128, help="calibration windows of 64 bytes (default: 128)")
    ap.add_argument("--eval", type=int, default=512, help="evaluation windows (default: 512)")
    ap.add_argument("--steps", type=int, default=1000, help="training steps of an uncached model (default: 1000)")
    ap.add_argument("--retrain", action="store_true", help="train again instead of using the cached models")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    train_text, calib_text, eval_text = corpus()
    eval_windows = windows(eval_text, args.eval, seed=1)
    print(f"text: {len(train_text)} training, {len(calib_text)} calibration and {len(eval_text)} evaluation bytes; "
          f"{args.calib} calibration and {args.eval} evaluation windows of {WINDOW} bytes")
    for arch in args.arch:
        seq2seq = arch in SEQ2SEQ
        eval_batches = batches_of(eval_windows, seq2seq=seq2seq)
        model, took = trained(arch, train_text, args.steps, args.retrain)
        base_ppl, _, ref = evaluate(model, eval_batches)
        how = "cached" if took is None else f"trained in {took:.0f} s"
        print(f"\n== {arch} ({how}): unpruned perplexity {base_ppl:.3f} per byte")
        for target in args.targets:
            for keep in args.keep:
                res: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in METHODS}
                for seed in range(args.seeds):
                    calib = batches_of(windows(calib_text, args.calib, seed=100 + seed), seq2seq=seq2seq)
                    for label, method, reweight in METHODS:
                        t0 = time.perf_counter()
                        pruned, _ = nna.prune(model, calib, keep=keep, target=target, method=method,
                                              reweight=reweight, seed=seed)
                        took = time.perf_counter() - t0
                        ppl, kl, _ = evaluate(pruned, eval_batches, ref)
                        res[label].append((ppl, kl, took))
                print(f"\n{arch}, {target}, keep {keep:g} ({args.seeds} seeds): perplexity per byte (unpruned "
                      f"{base_ppl:.3f}), KL from the unpruned model in millinats per byte, pruning time")
                print(f"{'method':<22}{'perplexity':>12}{'KL':>9}{'time s':>9}   perplexity increase vs "
                      + ", ".join(BASELINES))
                rise = {label: np.mean([r[0] for r in rows]) / base_ppl - 1 for label, rows in res.items()}
                for label, rows in res.items():
                    a = np.array(rows)
                    ratios = "  ".join(f"x{rise[label] / rise[b]:.3g}" if rise[b] > 0 else "n/a" for b in BASELINES)
                    print(f"{label:<22}{a[:, 0].mean():>12.3f}{1000 * a[:, 1].mean():>9.1f}{a[:, 2].mean():>9.2f}   "
                          f"{ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
