"""The PyTorch (+ PEFT) peer of the training-step benchmark: the same GPT, stepped one step at a time so that its
modes join the JAX modes' round-robin."""

from __future__ import annotations

import time

RANK = 8
TARGETS = {"attn_qv": ["query", "value"], "all_linear": ["query", "key", "value", "out", "fc1", "fc2"]}


def set_threads(n: int) -> int:
    """Pin torch's intra-op pool to ``n`` threads; returns what torch reports back."""
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def build_gpt(cfg):
    """The benchmark GPT in torch: same shapes, pre-norm blocks, causal attention, tanh GELU (flax's default)."""
    import torch
    from torch import nn

    d, h, s = cfg["d"], cfg["heads"], cfg["seq"]

    class TBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b = x.shape[0]
            y = self.ln1(x)
            q, k, v = (f(y).view(b, s, h, d // h).transpose(1, 2) for f in (self.query, self.key, self.value))
            att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(att.transpose(1, 2).reshape(b, s, d))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class TGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(cfg["vocab"], d), nn.Embedding(s, d)
            self.blocks = nn.ModuleList([TBlock() for _ in range(cfg["layers"])])
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, cfg["vocab"], bias=False)

        def forward(self, t):
            x = self.wte(t) + self.wpe(torch.arange(t.shape[1]))[None]
            for blk in self.blocks:
                x = blk(x)
            return self.lm_head(self.ln_f(x))

    torch.manual_seed(0)
    return TGPT()


class TorchRunner:
    """One torch training mode (full fine-tune, or PEFT LoRA at ``where``); ``once()`` runs and times one step.

    Same interface as the JAX runner: ``name``, ``times``, ``info`` (no XLA analyses: FLOPs and peak are None).
    """

    framework = "torch"

    def __init__(self, name, cfg, where=None):
        import torch

        self.name, self.times = name, []
        model = build_gpt(cfg)
        if where is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS[where]))
        self.model, self.vocab = model, cfg["vocab"]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=1e-4)
        self.tokens = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]))
        self.compile_s = 0.0
        self.info = {"flops": None, "peak_bytes": None, "opt_state_bytes": 2 * sum(p.numel() * 4 for p in self.params)}

    def once(self):
        from torch.nn.functional import cross_entropy

        t0 = time.perf_counter()
        logits = self.model(self.tokens)
        loss = cross_entropy(logits[:, :-1].reshape(-1, self.vocab), self.tokens[:, 1:].reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.times.append(time.perf_counter() - t0)
