"""nanoGPT baseline: character-level Shakespeare, nanoGPT's documented CPU recipe.

This is the *baseline recipe* that jaxsys's JAX trainer is compared against: a
self-contained, single-file PyTorch reimplementation of nanoGPT's GPT model and
train loop, run with the exact settings of the CPU example for shakespeare_char
in nanoGPT's README:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False \
        --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 \
        --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 \
        --lr_decay_iters=2000 --dropout=0.0

i.e. block_size=64, batch_size=12, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
bias=False, max_iters=2000, lr 1e-3 -> min_lr 1e-4 (100 linear warmup iters, then
cosine decay over lr_decay_iters=2000), AdamW betas (0.9, 0.99), weight_decay=0.1 on
>=2-D params only, grad_clip=1.0, eval every 250 iters with eval_iters=20,
float32, no torch.compile, device cpu.

It needs PyTorch, which is NOT a jaxsys dependency. Run it from its own venv:

    python3 -m venv torchenv && torchenv/bin/pip install torch numpy
    torchenv/bin/python experiments/nanogpt_baseline.py \
        [--data path/to/tinyshakespeare.txt] [--seed 0]

The loop follows nanoGPT's train.py: evaluation happens at iter_num % 250 == 0
(0, 250, ..., 2000) before that iter's step, and training stops after the step
of iter 2000. At the end it also evaluates val loss on 200 batches (less noisy),
and prints wall time of the loop with and without the evaluations.
"""
import argparse
import gzip
import math
import time
from pathlib import Path

try:
    import torch
    import torch.nn as nn
    from torch.nn import functional as F
except ImportError:  # PyTorch is not a jaxsys dependency
    raise SystemExit("experiments/nanogpt_baseline.py needs PyTorch, which jaxsys does not install: "
                     "pip install torch==2.13.0 (the version of docs/benchmarks.md), or see this "
                     "file's docstring for a separate venv.") from None


# ----------------------------------------------------------------------------- model
class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's doesn't support bias=False simply)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg["n_embd"] % cfg["n_head"] == 0
        self.c_attn = nn.Linear(cfg["n_embd"], 3 * cfg["n_embd"], bias=cfg["bias"])
        self.c_proj = nn.Linear(cfg["n_embd"], cfg["n_embd"], bias=cfg["bias"])
        self.resid_dropout = nn.Dropout(cfg["dropout"])
        self.n_head, self.n_embd, self.dropout = cfg["n_head"], cfg["n_embd"], cfg["dropout"]

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None,
            dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg["n_embd"], 4 * cfg["n_embd"], bias=cfg["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg["n_embd"], cfg["n_embd"], bias=cfg["bias"])
        self.dropout = nn.Dropout(cfg["dropout"])

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = LayerNorm(cfg["n_embd"], bias=cfg["bias"])
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg["n_embd"], bias=cfg["bias"])
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg["vocab_size"], cfg["n_embd"]),
            wpe=nn.Embedding(cfg["block_size"], cfg["n_embd"]),
            drop=nn.Dropout(cfg["dropout"]),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg["n_layer"])]),
            ln_f=LayerNorm(cfg["n_embd"], bias=cfg["bias"]),
        ))
        self.lm_head = nn.Linear(cfg["n_embd"], cfg["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # scaled init of residual projections
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layer"]))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):  # as nanoGPT reports it: position embeddings excluded
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, targets):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


# ----------------------------------------------------------------------------- training
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "jaxsys" / "data" / "assets" / "tinyshakespeare.txt.gz"),
                    help="the text (.txt, or .txt.gz as shipped in jaxsys/data/assets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--final_eval_iters", type=int, default=200)
    args = ap.parse_args()

    # the README CPU recipe (config/train_shakespeare_char.py + command-line overrides)
    block_size, batch_size = 64, 12
    max_iters, lr_decay_iters, warmup_iters = 2000, 2000, 100
    learning_rate, min_lr = 1e-3, 1e-4
    beta1, beta2, weight_decay, grad_clip = 0.9, 0.99, 0.1, 1.0
    eval_interval, eval_iters, log_interval = 250, 20, 100
    device = "cpu"

    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}, "
          f"seed={args.seed}, device={device}, dtype=float32, compile=False")

    opener = gzip.open if args.data.endswith(".gz") else open
    with opener(args.data, "rt", encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}
    print(f"data: {args.data}: {len(text):,} chars, vocab_size={len(chars)}, "
          f"train {n:,} tokens, val {len(data) - n:,} tokens")

    def get_batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - block_size, (batch_size,))
        x = torch.stack([d[i:i + block_size] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + block_size] for i in ix])
        return x, y

    cfg = dict(vocab_size=len(chars), block_size=block_size, n_layer=4, n_head=4,
               n_embd=128, dropout=0.0, bias=False)
    model = GPT(cfg).to(device)
    print(f"model: {cfg}; number of parameters: {model.num_params() / 1e6:.2f}M")

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    nodecay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": nodecay, "weight_decay": 0.0}],
        lr=learning_rate, betas=(beta1, beta2))
    print(f"decayed tensors: {len(decay)} ({sum(p.numel() for p in decay):,} params), "
          f"non-decayed: {len(nodecay)} ({sum(p.numel() for p in nodecay):,} params)")

    def get_lr(it):
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    @torch.no_grad()
    def estimate_loss(n_batches, which=("train", "val")):
        out = {}
        model.eval()
        for split in which:
            losses = torch.zeros(n_batches)
            for k in range(n_batches):
                X, Y = get_batch(split)
                _, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    eval_time, last_eval = 0.0, None
    X, Y = get_batch("train")
    t_start = time.perf_counter()
    t_log = t_start
    iter_num = 0
    while True:
        lr = get_lr(iter_num)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if iter_num % eval_interval == 0:
            te = time.perf_counter()
            last_eval = estimate_loss(eval_iters)
            eval_time += time.perf_counter() - te
            t_log += time.perf_counter() - te  # keep eval out of the ms/iter figure
            print(f"step {iter_num}: train loss {last_eval['train']:.4f}, "
                  f"val loss {last_eval['val']:.4f}", flush=True)
        _, loss = model(X, Y)
        X, Y = get_batch("train")  # prefetch next batch, as nanoGPT does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if iter_num % log_interval == 0:
            now = time.perf_counter()
            span = max(1, log_interval if iter_num > 0 else 1)
            print(f"iter {iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, "
                  f"{(now - t_log) * 1000 / span:.2f} ms/iter (train only)", flush=True)
            t_log = now
        iter_num += 1
        if iter_num > max_iters:
            break
    total = time.perf_counter() - t_start

    te = time.perf_counter()
    final = estimate_loss(args.final_eval_iters, which=("val",))
    final_eval_secs = time.perf_counter() - te

    print("=" * 70)
    print(f"final val loss (eval_iters={eval_iters}, at iter {max_iters}): {last_eval['val']:.4f}"
          f"  (train {last_eval['train']:.4f})")
    print(f"final val loss ({args.final_eval_iters} batches, after last step): "
          f"{final['val']:.4f}  [{final_eval_secs:.1f} s, not in timings]")
    print(f"total wall time, training loop incl. evals: {total:.1f} s "
          f"({max_iters + 1} steps, {max_iters // eval_interval + 1} evals)")
    print(f"time excluding evals: {total - eval_time:.1f} s "
          f"({(total - eval_time) * 1000 / (max_iters + 1):.2f} ms/iter); evals took {eval_time:.1f} s")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, seed {args.seed}")


if __name__ == "__main__":
    main()
