"""Train a small transformer on long-context retrieval, with SparseK and with window-only attention.

The task (generated here): a sequence of random filler tokens holds, farther back than
layers x window tokens from its end (beyond what any stack of sliding windows can see), the
triple ``MARK key value``; the sequence ends with ``QUERY key`` and the model must output the
value (one of ``--values`` classes, so chance is 1/values). With ``--pairs N`` the sequence holds
N triples with distinct keys and the query asks for one of them. Training sequences carry up to
``--queries`` such queries (more signal per sequence); the accuracy is the last query's.

Both runs use the same model (random init, same seed) built from ``torch.nn`` and
:class:`blackwell_sparsek.SparseKAttention`, whose scorer ``u = x @ w_score + slope * j`` learns
through the SPARSEK operator which far tokens to keep:

- ``sparsek``: window ``--window`` plus ``--k`` selected earlier tokens per query;
- ``window``: the same window and k = 0 (sliding-window attention), which cannot see the pair.

Prints the accuracy curves, and writes ``retrieval_curves.json`` (and ``retrieval_curves.png``
when matplotlib is installed) to ``--out``.

    python examples/retrieval_train.py --device cuda --out results/retrieval    # GPU, minutes
    python examples/retrieval_train.py --short --out /tmp/retrieval             # CPU, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import blackwell_sparsek as bsk


# ---- the task ------------------------------------------------------------------------------------


class Vocab:
    """Token ids: fillers, keys, values, then MARK and QUERY."""

    def __init__(self, fillers: int, keys: int, values: int):
        self.fillers, self.keys, self.values = fillers, keys, values
        self.key0 = fillers
        self.value0 = fillers + keys
        self.mark = fillers + keys + values
        self.query = self.mark + 1
        self.size = self.query + 1

    def types(self) -> torch.Tensor:
        """The type of every token id: 0 filler, 1 key, 2 value, 3 MARK, 4 QUERY."""
        t = torch.zeros(self.size, dtype=torch.long)
        t[self.key0:self.value0] = 1
        t[self.value0:self.mark] = 2
        t[self.mark] = 3
        t[self.query] = 4
        return t


def make_batch(vocab: Vocab, batch: int, seq_len: int, reach: int, pairs: int, queries: int,
               gen: torch.Generator, device):
    """One batch of the task.

    Returns tokens [batch, seq_len] (int64), the query positions [batch, queries] (where the
    answer is read: each query's key token; the last one is seq_len - 1), the answers [batch,
    queries] in [0, values) and a mask [batch, queries] of the queries that exist.

    ``reach`` is how far back sliding-window attention can carry information to a position
    (layers x window): every value lies more than ``reach`` before every query, so no stack of
    windows can see it and only a selection can reach it. Extra queries (``queries`` - 1, as many
    as fit) sit at random positions after the pairs; they multiply the training signal, and the
    evaluation reads the last query only."""
    room = seq_len - reach - 3             # triples start in [0, room)
    seg = room // pairs
    if seg < 3:
        raise ValueError(f"seq_len {seq_len} leaves no room for {pairs} pair(s) beyond the "
                         f"reach {reach} of the windows")
    tok = torch.randint(0, vocab.fillers, (batch, seq_len), generator=gen)
    keys = torch.stack([torch.randperm(vocab.keys, generator=gen)[:pairs] for _ in range(batch)])
    vals = torch.randint(0, vocab.values, (batch, pairs), generator=gen)
    rows = torch.arange(batch)
    last_value = torch.zeros(batch, dtype=torch.long)
    for n in range(pairs):
        p = n * seg + torch.randint(0, seg - 2, (batch,), generator=gen)
        tok[rows, p] = vocab.mark
        tok[rows, p + 1] = vocab.key0 + keys[:, n]
        tok[rows, p + 2] = vocab.value0 + vals[:, n]
        last_value = torch.maximum(last_value, p + 2)
    pos = torch.full((batch, queries), seq_len - 1, dtype=torch.long)
    mask = torch.zeros(batch, queries, dtype=torch.bool)
    mask[:, -1] = True
    for b in range(batch if queries > 1 else 0):
        # Key tokens of the extra queries: after every value by more than reach, two apart (the
        # QUERY token precedes each), before the last query's QUERY token at seq_len - 2.
        first = int(last_value[b]) + reach + 2
        slots = torch.arange(first, max(first, seq_len - 3), 2)
        n = min(queries - 1, slots.numel())
        if n > 0:
            pick = slots[torch.randperm(slots.numel(), generator=gen)[:n]].sort().values
            pos[b, :n] = pick
            mask[b, :n] = True
    asked = torch.randint(0, pairs, (batch, queries), generator=gen)
    tok[rows[:, None], pos - 1] = vocab.query
    tok[rows[:, None], pos] = vocab.key0 + keys[rows[:, None], asked]
    answer = vals[rows[:, None], asked]
    return tok.to(device), pos.to(device), answer.to(device), mask.to(device)


# ---- the model -----------------------------------------------------------------------------------


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x [B, S, H, D] (float32)."""
    S, D = x.shape[1], x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * inv   # [S, D/2]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, d_model, heads, heads_kv, k_budget, window, attn_dtype):
        super().__init__()
        self.h, self.hkv, self.dh = heads, heads_kv, d_model // heads
        self.attn_dtype = attn_dtype
        self.norm1 = nn.RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, (heads + 2 * heads_kv) * self.dh, bias=False)
        self.attn = bsk.SparseKAttention(d_model, heads_kv, k_budget=k_budget, window=window)
        self.proj = nn.Linear(heads * self.dh, d_model, bias=False)
        self.norm2 = nn.RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        B, S, _ = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).split([self.h * self.dh, self.hkv * self.dh, self.hkv * self.dh],
                                    dim=-1)
        q = rope(q.view(B, S, self.h, self.dh)).to(self.attn_dtype)
        k = rope(k.view(B, S, self.hkv, self.dh)).to(self.attn_dtype)
        v = v.view(B, S, self.hkv, self.dh).to(self.attn_dtype)
        a = self.attn(q, k, v, h)            # the scorer reads the normalized layer input
        x = x + self.proj(a.float().reshape(B, S, -1))
        return x + self.mlp(self.norm2(x))


class Retriever(nn.Module):
    def __init__(self, vocab: Vocab, d_model, layers, heads, heads_kv, k_budget, window,
                 attn_dtype):
        super().__init__()
        # Token embedding plus a token-type embedding (as BERT's segment embeddings): what every
        # value token shares, so a scorer that learns to keep one value keeps them all.
        self.embed = nn.Embedding(vocab.size, d_model)
        self.type_embed = nn.Embedding(5, d_model)
        self.register_buffer("types", vocab.types(), persistent=False)
        self.blocks = nn.ModuleList(Block(d_model, heads, heads_kv, k_budget, window, attn_dtype)
                                    for _ in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab.values)

    def forward(self, tokens, positions):
        """Value logits [B, Q, values] read at positions [B, Q]."""
        x = self.embed(tokens) + self.type_embed(self.types[tokens])
        for b in self.blocks:
            x = b(x)
        x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(self.norm(x))


# ---- training ------------------------------------------------------------------------------------


def train_len(args, step: int) -> int:
    """The training sequence length at ``step``: a curriculum from a short length, where k is a
    quarter of the candidates (the scorer sees the pair selected often enough to learn what to
    select), up to --seq-len over the first --curriculum of the steps. Evaluation always uses
    --seq-len."""
    start = min(args.seq_len, args.layers * args.window + 4 * args.k + 16 * args.pairs)
    ramp = args.curriculum * args.steps
    if ramp <= 0 or step >= ramp:
        return args.seq_len
    n = start + (args.seq_len - start) * step / ramp
    return min(args.seq_len, int(math.ceil(n / 16)) * 16)


def train(args, vocab: Vocab, k_budget: int, device, attn_dtype, label: str) -> dict:
    torch.manual_seed(args.seed)  # the same initial weights for both runs
    model = Retriever(vocab, args.d_model, args.layers, args.heads, args.heads_kv, k_budget,
                      args.window, attn_dtype).to(device)
    w_score, slope, rest = [], [], []
    for name, p in model.named_parameters():
        (w_score if name.endswith("w_score") else slope if name.endswith("slope") else rest).append(p)
    # The recency slope multiplies positions up to seq_len: Adam would move slope * j by
    # lr * seq_len per step, so its rate is divided by seq_len (the scores then move alike).
    scorer_lr = args.lr * args.scorer_lr
    opt = torch.optim.AdamW([{"params": rest, "weight_decay": 0.01},
                             {"params": w_score, "weight_decay": 0.0, "lr": scorer_lr},
                             {"params": slope, "weight_decay": 0.0,
                              "lr": scorer_lr / args.seq_len}], lr=args.lr)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm)
        * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed + 1)           # training data: same for both
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    reach = args.layers * args.window
    evals = [make_batch(vocab, args.batch, args.seq_len, reach, args.pairs, 1, eval_gen, device)
             for _ in range(max(1, args.eval_size // args.batch))]
    curve = {"step": [], "accuracy": [], "loss": [], "seconds": []}
    start = time.perf_counter()

    def evaluate(step, loss):
        model.eval()
        with torch.no_grad():   # the last query of each sequence
            hits = sum((model(t, p).argmax(-1) == y).sum().item() for t, p, y, _ in evals)
        model.train()
        acc = hits / (len(evals) * args.batch)
        curve["step"].append(step)
        curve["accuracy"].append(acc)
        curve["loss"].append(loss)
        curve["seconds"].append(round(time.perf_counter() - start, 2))
        print(f"[{label}] step {step:5d}  loss {loss:7.4f}  accuracy {acc:6.3f}  "
              f"({curve['seconds'][-1]:.0f} s)", flush=True)
        return acc

    evaluate(0, float("nan"))  # before training: no loss yet (printed as nan)
    running = None
    for step in range(1, args.steps + 1):
        tokens, pos, answer, mask = make_batch(vocab, args.batch, train_len(args, step), reach,
                                               args.pairs, args.queries, gen, device)
        logits = model(tokens, pos)
        loss = F.cross_entropy(logits[mask], answer[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step, running)
    return curve


def plot(path: str, runs: dict, chance: float, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in runs.items():
        ax.plot(c["step"], c["accuracy"], marker=".", label=name)
    ax.axhline(chance, color="gray", linestyle="--", label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("retrieval accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# (the GPU configuration, the --short CPU one)
DEFAULTS = dict(seq_len=(2048, 96), window=(64, 8), k=(32, 8), d_model=(256, 64),
                layers=(2, 2), heads=(4, 2), heads_kv=(2, 1), batch=(32, 32), steps=(1000, 200),
                eval_every=(50, 25), eval_size=(512, 128), lr=(1e-3, 3e-3), values=(16, 8),
                keys=(16, 8), fillers=(64, 16))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--short", action="store_true",
                   help="a small CPU configuration that runs in well under a minute (CI)")
    p.add_argument("--out", default="results/retrieval", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=1, help="key-value pairs per sequence")
    p.add_argument("--queries", type=int, default=8,
                   help="queries per training sequence (the last at the end; evaluation reads "
                        "only that one)")
    p.add_argument("--scorer-lr", type=float, default=3.0,
                   help="learning-rate multiplier of the scorers' w_score and slope")
    p.add_argument("--curriculum", type=float, default=0.3,
                   help="fraction of the steps over which the training length grows to "
                        "--seq-len (0: none)")
    p.add_argument("--runs", default="sparsek,window",
                   help="which runs, comma-separated: sparsek, window")
    for name in DEFAULTS:
        kind = float if name == "lr" else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"default {DEFAULTS[name][0]} ({DEFAULTS[name][1]} with --short)")
    args = p.parse_args(argv)
    for name, (full, short) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, short if args.short else full)
    if args.device is None:
        args.device = "cpu" if args.short or not torch.cuda.is_available() else "cuda"
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.d_model % args.heads or args.heads % args.heads_kv:
        raise SystemExit("d_model must be a multiple of heads, heads of heads_kv")
    if device.type == "cuda" and args.d_model // args.heads not in (64, 128):
        raise SystemExit("on CUDA the head dim (d_model / heads) must be 64 or 128")
    # The CUDA kernels take fp16/bf16; the CPU reference runs float32 here.
    attn_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 layers
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    vocab = Vocab(args.fillers, args.keys, args.values)
    print(f"retrieval: seq_len {args.seq_len}, window {args.window}, k {args.k}, pairs "
          f"{args.pairs}, {args.values} values (chance {1 / args.values:.3f}), d_model "
          f"{args.d_model}, {args.layers} layers, {args.heads}/{args.heads_kv} heads, batch "
          f"{args.batch}, {args.steps} steps on {device}", flush=True)
    runs = {}
    for which, label, kb in (("sparsek", f"sparsek (k={args.k}, w={args.window})", args.k),
                             ("window", f"window only (k=0, w={args.window})", 0)):
        if which in args.runs.split(","):
            runs[label] = train(args, vocab, kb, device, attn_dtype, label)
    os.makedirs(args.out, exist_ok=True)
    result = {"config": {k: v for k, v in vars(args).items()}, "chance": 1 / args.values,
              "runs": runs,
              "final_accuracy": {name: c["accuracy"][-1] for name, c in runs.items()}}
    json_path = os.path.join(args.out, "retrieval_curves.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {json_path}")
    title = (f"retrieval at distance > {args.layers * args.window} (layers x window), "
             f"S={args.seq_len}, "
             f"{args.values} values ({device.type})")
    png = os.path.join(args.out, "retrieval_curves.png")
    if plot(png, runs, 1 / args.values, title):
        print(f"wrote {png}")
    else:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    for name, acc in result["final_accuracy"].items():
        print(f"final accuracy  {name:28s} {acc:.3f}")
    return result


if __name__ == "__main__":
    main()
