"""Hugging Face PEFT adapters in and out of a Flax model, without PyTorch.

    python examples/peft_interop.py [PEFT_ADAPTER_DIR] [--check-with-peft]

1. Load a LoRA adapter written by ``PeftModel.save_pretrained`` (default: the tiny one in
   tests/fixtures/peft/linear, made by PEFT for a 2-layer PyTorch MLP) into the Flax twin of
   that model, and check the output against the one PEFT computed.
2. Fine-tune the factors a few steps in JAX and export them with ``save_peft``.
3. With ``--check-with-peft`` (needs torch + peft): load the export into the PyTorch model with
   ``PeftModel.from_pretrained`` and compare outputs.
"""

import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file

import lorajax

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "peft" / "linear"


class MLP(nn.Module):  # the Flax twin of the PyTorch model: Linear(6, 8) -> tanh -> Linear(8, 4)
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc2")(jnp.tanh(nn.Dense(8, name="fc1")(x)))


def torch_to_flax(state):
    """PyTorch Linear weights (out, in) -> Flax Dense kernels (in, out)."""
    params = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        params.setdefault(module, {})["kernel" if leaf == "weight" else "bias"] = value.T if leaf == "weight" else value
    return {"params": params}


def main(adapter_dir: Path, check_with_peft: bool) -> None:
    model = MLP()
    base = torch_to_flax(load_file(str(FIXTURE / "base.safetensors")))  # in real life: the converted HF checkpoint
    io = load_file(str(FIXTURE / "io.safetensors"))  # an input and PEFT's output on it

    # 1. PEFT -> lorajax: modules are found by name (params/fc1/kernel <-> fc1; pass name_map= otherwise).
    params = lorajax.load_peft(adapter_dir, base)
    print(lorajax.summary(params))
    y = model.apply(lorajax.merge(params), io["x"])
    if adapter_dir == FIXTURE:
        err = np.abs(np.asarray(y) - io["y"]).max()
        print(f"max |lorajax - PEFT| = {err:.2e}")
        assert err < 1e-5, "lorajax and PEFT disagree"

    # 2. Train the factors a little on a toy target, then export for PyTorch users.
    x = jax.random.normal(jax.random.key(0), (64, 6))
    target = jnp.sin(x[:, :4])
    loss = lambda p: jnp.mean((lorajax.factored(model.apply)(p, x) - target) ** 2)
    tx = lorajax.masked(optax.adam(1e-2))
    opt_state = tx.init(params)
    step = jax.jit(lambda p, s: (lambda g: tx.update(g, s, p))(jax.grad(loss)(p)))
    for _ in range(50):
        updates, opt_state = step(params, opt_state)
        params = optax.apply_updates(params, updates)
    out = Path(tempfile.mkdtemp()) / "my-adapter"
    config = lorajax.save_peft(out, params, base_model_name_or_path="my-org/tiny-mlp")
    print(f"saved {sorted(p.name for p in out.iterdir())}: r={config['r']}, targets={config['target_modules']}")
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(lorajax.load_peft(out, base)), jax.tree.leaves(params), strict=True)
    ), "round trip is bit-exact"

    # 3. Optional: the export in PyTorch.
    if check_with_peft:
        import torch
        from peft import PeftModel

        torch_model = torch.nn.Sequential()
        torch_model.add_module("fc1", torch.nn.Linear(6, 8))
        torch_model.add_module("act", torch.nn.Tanh())
        torch_model.add_module("fc2", torch.nn.Linear(8, 4))
        torch_model.load_state_dict(
            {k: torch.from_numpy(v) for k, v in load_file(str(FIXTURE / "base.safetensors")).items()}
        )
        peft_model = PeftModel.from_pretrained(torch_model, str(out)).eval()
        with torch.no_grad():
            y_torch = peft_model(torch.from_numpy(np.array(x))).numpy()
        y_jax = np.asarray(model.apply(lorajax.merge(params), x))
        err = np.abs(y_torch - y_jax).max()
        print(f"max |PEFT(save_peft output) - lorajax| = {err:.2e}")
        assert err < 1e-5, "PEFT's forward on the export disagrees with lorajax"


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(args[0]) if args else FIXTURE, "--check-with-peft" in sys.argv)
