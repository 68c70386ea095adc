"""Write the notebooks of this folder from the cell sources below (outputs stripped).

    python notebooks/build_notebooks.py

Edit the cells here, not the .ipynb files, then rerun; tests/test_examples.py executes the notebooks.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

FIND_ROOT = """\
import sys
from pathlib import Path

# The repository root (this notebook may run from notebooks/ or from the root); the demo model lives in examples/.
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "examples" / "textlm.py").exists())
sys.path.insert(0, str(ROOT / "examples"))"""

NB1 = [
    (
        "md",
        """\
# LoRA from scratch

Low-Rank Adaptation (Hu et al., 2021) fine-tunes a pretrained weight matrix $W_0 \\in \\mathbb{R}^{m \\times n}$
by learning a low-rank update instead of a full one:

$$W = W_0 + \\frac{\\alpha}{r} A B, \\qquad A \\in \\mathbb{R}^{m \\times r},\\; B \\in \\mathbb{R}^{r \\times n},\\;
r \\ll \\min(m, n).$$

$W_0$ stays frozen; only $A$ and $B$ train. $B$ starts at zero, so training starts exactly from the pretrained model.
This notebook builds the ideas up with plain JAX and NumPy, with plots:

1. rank and low-rank approximation,
2. how many parameters a rank-$r$ update costs,
3. a LoRA layer written by hand,
4. evidence that real fine-tuning updates are close to low-rank (from a full fine-tune of the demo model),
5. merging costs nothing at inference (compiled FLOPs),
6. swapping adapters on a merged model.

It runs in well under a minute on a laptop CPU.""",
    ),
    (
        "code",
        FIND_ROOT
        + """

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import lorajax
import textlm

rng = np.random.default_rng(0)""",
    ),
    (
        "md",
        """\
## 1. Rank and low-rank approximation

A product $AB$ with inner dimension $r$ has rank at most $r$, however large $m$ and $n$ are. Conversely, the
truncated SVD gives the best rank-$r$ approximation of any matrix (Eckart–Young). Matrices with structure (here a
smooth 2-D function sampled on a grid) are well approximated at a small rank; white noise is not.""",
    ),
    (
        "code",
        """\
A, B = rng.normal(size=(256, 4)), rng.normal(size=(4, 192))
print("rank of a 256x192 product with inner dimension 4:", np.linalg.matrix_rank(A @ B))

u, v = np.meshgrid(np.linspace(-2, 2, 192), np.linspace(-2, 2, 256))
smooth = np.sin(3 * u) * np.cos(2 * v) + np.exp(-(u**2 + v**2)) + 0.3 * u * v
noise = rng.normal(size=smooth.shape)


def rank_r_error(M, ranks):
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    return [np.linalg.norm(M - (U[:, :r] * s[:r]) @ Vt[:r]) / np.linalg.norm(M) for r in ranks]


ranks = np.arange(1, 65)
plt.figure(figsize=(6, 3.5))
plt.plot(ranks, rank_r_error(smooth, ranks), label="smooth function on a grid")
plt.plot(ranks, rank_r_error(noise, ranks), label="Gaussian noise")
plt.xlabel("rank r of the truncated SVD")
plt.ylabel("relative error ||M - M_r|| / ||M||")
plt.legend()
plt.grid(alpha=0.3)
plt.show()""",
    ),
    (
        "md",
        """\
## 2. Parameter counts: $r(m+n)$ instead of $mn$

A rank-$r$ update of an $m \\times n$ matrix has $r(m+n)$ parameters. For a $4096 \\times 4096$ projection (a 7B
model's attention) rank 8 is 0.4% of the full matrix; Adam keeps two more numbers per trainable parameter, so the
optimizer state shrinks by the same factor.""",
    ),
    (
        "code",
        """\
plt.figure(figsize=(6, 3.5))
for m in (256, 1024, 4096):
    rs = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])
    rs = rs[rs <= m]
    plt.loglog(rs, rs * (m + m) / (m * m), marker="o", label=f"{m} x {m}")
plt.axhline(1.0, color="gray", ls=":")
plt.xlabel("rank r")
plt.ylabel("LoRA params / full params")
plt.legend()
plt.grid(alpha=0.3, which="both")
plt.show()
for r in (4, 8, 16):
    print(f"4096x4096, rank {r:2d}: {r * 8192:>9,} trainable vs {4096 * 4096:,} ({100 * r * 8192 / 4096**2:.2f}%)")""",
    ),
    (
        "md",
        """\
## 3. A LoRA layer by hand

The forward pass never needs the merged matrix: $h = xW_0 + \\frac{\\alpha}{r}(xA)B$. We fit a rank-4 update to a
target $W_0 + \\Delta$ whose true $\\Delta$ has rank 4, training only $A$ and $B$ with gradients from `jax.grad`.""",
    ),
    (
        "code",
        """\
m, n, r, alpha = 64, 48, 4, 4.0
k0, k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 5)
W0 = jax.random.normal(k0, (m, n)) / jnp.sqrt(m)
true_delta = jax.random.normal(k1, (m, r)) @ jax.random.normal(k2, (r, n)) / m
x = jax.random.normal(k3, (512, m))
y = x @ (W0 + true_delta)


def lora_forward(factors, x):
    a, b = factors
    return x @ W0 + (alpha / r) * (x @ a) @ b  # W0 is a constant: never differentiated


factors = (jax.random.uniform(k4, (m, r), minval=-1, maxval=1) / jnp.sqrt(m), jnp.zeros((r, n)))
print("at init the LoRA model equals the base model:", bool(jnp.allclose(lora_forward(factors, x), x @ W0)))

tx = optax.adam(1e-2)
state = tx.init(factors)
loss = lambda f: jnp.mean((lora_forward(f, x) - y) ** 2)


@jax.jit
def step(f, state):
    value, grads = jax.value_and_grad(loss)(f)
    updates, state = tx.update(grads, state)
    return optax.apply_updates(f, updates), state, value


history = []
for _ in range(400):
    factors, state, value = step(factors, state)
    history.append(float(value))
plt.figure(figsize=(6, 3))
plt.semilogy(history)
plt.xlabel("step")
plt.ylabel("MSE")
plt.title(f"training {2 * r * (m + n) // 2} LoRA params to fit a rank-{r} change of a {m}x{n} layer")
plt.show()
learned = (alpha / r) * factors[0] @ factors[1]
rel = jnp.linalg.norm(learned - true_delta) / jnp.linalg.norm(true_delta)
print("relative error of the learned update:", float(rel))""",
    ),
    (
        "md",
        """\
## 4. Real fine-tuning updates are close to low-rank

LoRA works because the change a fine-tune makes to a pretrained matrix has most of its energy in a few directions.
We check this on the demo model of `examples/finetune.py`: a byte-level GPT pretrained mostly on the docstrings of
Python's standard library (15% of its windows were code), here fully fine-tuned (every weight free, plain Adam) on
the standard library's *code* for a few dozen steps. Then we look at the singular values of $W_\\text{tuned} - W_0$
for a few matrices, next to a random matrix of the same shape and norm.""",
    ),
    (
        "code",
        """\
base, config = textlm.load_params(textlm.BASE_CHECKPOINT)
model = textlm.TinyGPT(config)
_, code = textlm.load_corpora(max_train=150_000, max_val=20_000)

tx = optax.adam(1e-3)
params, opt_state = base, tx.init(base)


@jax.jit
def full_step(params, opt_state, tokens):
    value, grads = jax.value_and_grad(lambda p: textlm.loss_fn(model, p, tokens))(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value


batches = textlm.train_batches(code.train, 8, config.seq_len, seed=0)
for _ in range(40):
    params, opt_state, value = full_step(params, opt_state, next(batches))
print("training loss on code after 40 full fine-tuning steps:", float(value))

names = {
    "block0 query (128 x 128)": ("block0", "attn", "query"),
    "block2 value (128 x 128)": ("block2", "attn", "value"),
    "block1 fc1 (128 x 512)": ("block1", "fc1"),
}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for label, path in names.items():
    w0, w1 = base["params"], params["params"]
    for key in path:
        w0, w1 = w0[key], w1[key]
    d = np.asarray(w1["kernel"] - w0["kernel"]).reshape(w0["kernel"].shape[0], -1)
    s = np.linalg.svd(d, compute_uv=False)
    axes[0].semilogy(s / s[0], label=label)
    energy = np.cumsum(s**2) / np.sum(s**2)
    axes[1].plot(np.arange(1, len(s) + 1), energy, label=label)
    print(f"{label}: top 8 directions hold {100 * energy[7]:.0f}% of ||W_tuned - W0||^2")
rand = rng.normal(size=(128, 128))
s = np.linalg.svd(rand, compute_uv=False)
energy = np.cumsum(s**2) / np.sum(s**2)
axes[0].semilogy(s / s[0], "k:", label="random 128 x 128")
axes[1].plot(np.arange(1, len(s) + 1), energy, "k:", label="random 128 x 128")
print(f"random 128 x 128 matrix: top 8 directions hold {100 * energy[7]:.0f}%")
axes[0].set(xlabel="singular value index", ylabel="sigma_k / sigma_1", title="spectrum of W_tuned - W0")
axes[1].set(xlabel="rank r", ylabel="fraction of ||dW||^2", title="energy captured by the top r directions")
axes[1].axvline(8, color="gray", ls="--", lw=1)
for ax in axes:
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """\
The update's spectrum decays faster than a random matrix's: the first 8 directions (dashed line) hold 35-50% of
the change's energy (printed above), against about a fifth for a random matrix of the same shape. That concentrated
part is what a rank-8 LoRA can represent. The update is *not* exactly low-rank: its tail is long (a short Adam
fine-tune moves every weight a little), which is one reason why full fine-tuning still ends a little lower than LoRA
in the demo's table.

## 5. Merging costs nothing at inference

During training the factored form $xW_0 + (xA)B$ does a little extra work. Once training is done we fold the update
into the kernel, $W = W_0 + \\frac{\\alpha}{r}AB$, and the model is again a plain model of the original shapes.
We compare the FLOPs XLA reports for the compiled forward pass of one layer: base, unmerged LoRA, merged LoRA.""",
    ),
    (
        "code",
        """\
def flops(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


d_in, d_out, rank, tokens = 1024, 1024, 8, 256
W = jnp.ones((d_in, d_out))
A, B = jnp.ones((d_in, rank)), jnp.zeros((rank, d_out))
xb = jnp.ones((tokens, d_in))
dense = lambda W, x: x @ W
unmerged = lambda W, A, B, x: x @ W + (x @ A) @ B
merged_W = W + A @ B
print(f"base layer        {flops(dense, W, xb):>14,.0f} FLOPs")
print(f"LoRA, unmerged    {flops(unmerged, W, A, B, xb):>14,.0f} FLOPs")
print(f"LoRA, merged      {flops(dense, merged_W, xb):>14,.0f} FLOPs  (same program as the base layer)")

# The same on the demo model with lorajax: merge once, then serve the plain params.
lora = lorajax.lorafy(base, rank=8, where=lorajax.attn_qv, key=jax.random.key(0))
window = jnp.zeros((1, config.seq_len), jnp.int32)
f_plain = lambda p, t: model.apply(p, t)
f_merge_each_call = lambda p, t: model.apply(lorajax.merge(p), t)
print(f"demo model, base params         {flops(f_plain, base, window):>14,.0f} FLOPs")
print(f"demo model, merge on every call {flops(f_merge_each_call, lora, window):>14,.0f} FLOPs")
print(f"demo model, merged once         {flops(f_plain, lorajax.merge(lora), window):>14,.0f} FLOPs")""",
    ),
    (
        "md",
        """\
## 6. Swapping adapters

Several adapters can share one base. On a deployed model that kept only the merged kernel, switching tasks is
$W' = W - s_1 A_1 B_1 + s_2 A_2 B_2$, done per target in float32 (`lorajax.swap`). Here two adapters are built by
hand on the demo model, merged, and swapped; the result matches merging the second adapter into the base directly.""",
    ),
    (
        "code",
        """\
def random_adapter(seed):
    p = lorajax.lorafy(base, rank=8, where=lorajax.attn_qv, key=jax.random.key(seed), init="gaussian")
    # Give B a non-zero value, as if trained, so the adapter changes the model.
    fake_b = lambda x: dataclasses.replace(x, b=0.02 * jax.random.normal(jax.random.key(seed + 1), x.b.shape))
    return jax.tree.map(lambda x: fake_b(x) if lorajax.is_lora(x) else x, p, is_leaf=lorajax.is_lora)


task1, task2 = random_adapter(1), random_adapter(2)
served = lorajax.merge(task1)  # deployed with adapter 1 folded in; W0 not kept
served = lorajax.swap(served, task1, task2)  # now serving adapter 2
direct = lorajax.merge(task2)
err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(direct)))
print(f"max |swap(merge(task1)) - merge(task2)| over all weights: {err:.2e}")
logits_swapped = model.apply(served, window)
logits_direct = model.apply(direct, window)
print("same logits:", bool(jnp.allclose(logits_swapped, logits_direct, atol=1e-4)))""",
    ),
]


NB2 = [
    (
        "md",
        """\
# A tour of lorajax

lorajax adds LoRA to any JAX parameter pytree (Flax linen, NNX, Equinox, plain dicts) without touching the model
code. This notebook walks through the whole API on the demo model of `examples/finetune.py` (a byte-level GPT
pretrained mostly on Python docstrings, adapted here to Python code):

`lorafy` -> `summary` -> train (`masked` optimizer, or `partition`/`combine`) -> `merge` -> `save_adapter` /
`load_adapter` -> `swap`.""",
    ),
    (
        "code",
        FIND_ROOT
        + """

import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import lorajax
import textlm

base, config = textlm.load_params(textlm.BASE_CHECKPOINT)
model = textlm.TinyGPT(config)
_, code = textlm.load_corpora(max_train=150_000, max_val=20_000)
val = textlm.val_windows(code.val, config.seq_len, 32)
evaluate = textlm.make_eval(model)
print(config)
n_params = sum(x.size for x in jax.tree.leaves(base))
print(f"base model: {n_params:,} params; val loss on code {evaluate(base, val):.3f}")""",
    ),
    (
        "md",
        """\
## Choosing targets with lorafy and summary

`where` takes a preset (`attn_qv`, `attn_qkv`, `attn_all`, `mlp`, `all_linear`), a regex over the '/'-joined
parameter path, a list of module names (PEFT's `target_modules` rule) or a callable `(path, leaf) -> bool`.
Layouts of multi-axis kernels (Flax's `DenseGeneral` query kernel is `(d_model, heads, head_dim)`: layout `"ioo"`)
are inferred from names and shapes. The base arrays are not copied.""",
    ),
    (
        "code",
        """\
key = jax.random.key(0)
lora = lorajax.lorafy(base, rank=8, alpha=16, where=lorajax.attn_qv, key=key)
print(lorajax.summary(lora))""",
    ),
    (
        "code",
        """\
for where in [lorajax.attn_all, lorajax.mlp, lorajax.all_linear, r".*block3/fc\\d/kernel", ["query", "out"]]:
    s = lorajax.summary(lorajax.lorafy(base, rank=8, where=where, key=key))
    pct = 100 * s.trainable_fraction
    print(f"{where!s:40.40} {len(s.targets):2d} targets, {s.trainable:7,} trainable ({pct:.2f}%)")

# Per-target ranks, PEFT-style:
s = lorajax.summary(lorajax.lorafy(base, rank=4, where=lorajax.all_linear, rank_pattern={"fc1": 16}, key=key))
print({t.path: t.rank for t in s.targets if "block0" in t.path})""",
    ),
    (
        "md",
        """\
## Training

The loss sees plain kernels: `lorajax.merge` folds `base + scale * a @ b` inside the jitted step, and its
`stop_gradient` on the base means gradients only reach the factors. Two equivalent ways to train:

* `lorajax.masked(tx)`: an optimizer over the whole tree that updates only the factors (state kept only for them);
* `lorajax.partition` / `lorajax.combine`: differentiate with respect to the trainable half only.

We train the same adapter both ways and check they agree.""",
    ),
    (
        "code",
        """\
steps, batch = 40, 8
schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 4, steps, 5e-4)


def train_masked(params):
    tx = lorajax.masked(optax.adam(schedule))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: textlm.loss_fn(model, lorajax.merge(p), tokens))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses, batches = [], textlm.train_batches(code.train, batch, config.seq_len, seed=1)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, next(batches))
        losses.append(float(loss))
    return params, losses, opt_state


def train_partitioned(params):
    trainable, frozen = lorajax.partition(params)
    tx = optax.adam(schedule)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, tokens):
        f = lambda t: textlm.loss_fn(model, lorajax.merge(lorajax.combine(t, frozen)), tokens)
        loss, grads = jax.value_and_grad(f)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses, batches = [], textlm.train_batches(code.train, batch, config.seq_len, seed=1)
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state, next(batches))
        losses.append(float(loss))
    return lorajax.combine(trainable, frozen), losses, opt_state


t0 = time.perf_counter()
tuned, losses_masked, state_masked = train_masked(lora)
tuned_p, losses_part, state_part = train_partitioned(lora)
print(f"trained twice in {time.perf_counter() - t0:.1f} s")
print("optimizer state bytes: masked", textlm.tree_bytes(state_masked), "| partitioned", textlm.tree_bytes(state_part))
print("max |loss difference| between the two ways:", float(np.max(np.abs(np.subtract(losses_masked, losses_part)))))
plt.figure(figsize=(6, 3.5))
plt.plot(losses_masked, label="lorajax.masked(optax.adam)")
plt.plot(losses_part, "--", label="partition / combine")
plt.xlabel("step")
plt.ylabel("training loss on code (nats/byte)")
plt.legend()
plt.grid(alpha=0.3)
plt.show()
print(f"val loss: base {evaluate(base, val):.3f} -> adapted {evaluate(lorajax.merge(tuned), val):.3f}")""",
    ),
    (
        "md",
        """\
## Merge, unlorafy

`merge` returns plain params of the original structure, shapes and dtypes (Flax boxes included), ready for
`model.apply` at no extra cost. `unlorafy` drops the adapters and gives the untouched base back.""",
    ),
    (
        "code",
        """\
merged = lorajax.merge(tuned)
window = jnp.asarray(val[:4, :-1])
same_structure = jax.tree.structure(merged) == jax.tree.structure(base)
print("merged has the base's structure:", same_structure)
same = jnp.allclose(model.apply(merged, window), model.apply(lorajax.merge(tuned), window))
print("merged logits == LoRA logits:", bool(same))
q = lambda p: p["params"]["block0"]["attn"]["query"]["kernel"]
print("unlorafy(lorafy(base)) holds the very base arrays:", q(lorajax.unlorafy(lora)) is q(base))
print("training left the base weights unchanged:", bool(jnp.array_equal(q(lorajax.unlorafy(tuned)), q(base))))
generate = textlm.make_generate(model)
prompt = "def read(self, "
for name, p in [("base", base), ("adapted", merged)]:
    print(f"--- {name} ---\\n{prompt}{generate(p, prompt, 120, jax.random.key(0))}")""",
    ),
    (
        "md",
        """\
## Save, load, swap

An adapter file holds only the factors and their metadata (safetensors, with a fingerprint of the base shapes it
was made for). `load_adapter` attaches it to a base, checking every target's shape first.""",
    ),
    (
        "code",
        """\
tmp = Path(tempfile.mkdtemp())
lorajax.save_adapter(tmp / "code.safetensors", tuned, metadata={"task": "python code"})
textlm.save_params(tmp / "full.safetensors", merged, config)
print(f"adapter file {(tmp / 'code.safetensors').stat().st_size / 1e3:,.0f} kB vs "
      f"full checkpoint {(tmp / 'full.safetensors').stat().st_size / 1e3:,.0f} kB")
print("metadata:", lorajax.read_adapter(tmp / "code.safetensors").metadata)

reloaded = lorajax.load_adapter(tmp / "code.safetensors", base)
print(f"val loss after reload + merge: {evaluate(lorajax.merge(reloaded), val):.4f} "
      f"(before saving: {evaluate(merged, val):.4f})")

# A second adapter for a second task (here: more prose), and swapping between them on a merged model.
prose_adapter = lorajax.lorafy(base, rank=8, alpha=16, where=lorajax.attn_qv, key=jax.random.key(7))
serving = lorajax.swap(merged, tuned, prose_adapter)  # code adapter out, (untrained) prose adapter in
print("after swapping to an untrained adapter, the model is the base again:",
      bool(all(jnp.allclose(a, b, atol=1e-5) for a, b in zip(jax.tree.leaves(serving), jax.tree.leaves(base)))))

try:
    small_base = textlm.init_params(textlm.Config(d_model=64))
    lorajax.load_adapter(tmp / "code.safetensors", small_base)
except ValueError as e:
    print("loading onto the wrong base fails clearly:\\n", str(e)[:300], "...")""",
    ),
]


def build(cells: list[tuple[str, str]], path: Path) -> None:
    nb = new_notebook(cells=[new_markdown_cell(s) if k == "md" else new_code_cell(s) for k, s in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for n, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{n:02d}"  # stable ids: rebuilding gives byte-identical files
    nbformat.validate(nb)
    nbformat.write(nb, path)


if __name__ == "__main__":
    build(NB1, HERE / "01_lora_from_scratch.ipynb")
    build(NB2, HERE / "02_lorajax_tour.ipynb")
    print("wrote", HERE / "01_lora_from_scratch.ipynb", "and", HERE / "02_lorajax_tour.ipynb")
