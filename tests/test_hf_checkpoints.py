"""Real checkpoints end to end: transformers -> tunix's own loaders -> lorajax <-> PEFT, with ``name_map="tunix"``.

Tiny random Qwen3 and Gemma 3 models are saved by transformers (``save_pretrained``, no downloads) and loaded into
tunix's NNX models by tunix's safetensors loaders. PEFT LoRA and DoRA adapters written by the real PEFT load onto
them and give PEFT's logits through ``merge`` and ``factored``; adapters lorajax makes on every linear kernel (Gemma's
fused ``kv_einsum`` included) load in ``PeftModel.from_pretrained`` with lorajax's logits. Tolerance: 1e-5 of the
largest logit. Gemma 3 here has ``d_model`` 32 != heads x head_dim 2 x 8.

Runs under the ``libraries`` and ``torch`` markers, where google-tunix is installed (``pip install --no-deps
google-tunix==0.1.7 einops``: tunix's own requirements pin older transformers/safetensors; its model and loader
modules need only jax, flax, einops and safetensors).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tunix import NEEDS_TUNIX, flax_shard_flag_kept, tunix_module

import lorajax

pytestmark = [*NEEDS_TUNIX, pytest.mark.torch]

TOKENS = np.array([[1, 5, 9, 3, 7, 2, 11, 4]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _flax_config_given_back():
    with flax_shard_flag_kept():
        yield


def _qwen3(path):
    import torch
    import transformers

    cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
        rope_theta=1_000_000.0,  # tunix's Qwen3 applies RoPE with its default theta, 1e6
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(path)
    model_lib, params = tunix_module("tunix.models.qwen3.model"), tunix_module("tunix.models.qwen3.params")
    config = model_lib.ModelConfig(
        num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8, num_kv_heads=2,
        rope_theta=1_000_000, norm_eps=cfg.rms_norm_eps, use_tied_embedding=False,
    )  # fmt: skip
    return transformers.Qwen3ForCausalLM, params.create_model_from_safe_tensors(str(path), config)


def _gemma3(path):
    import torch
    import transformers

    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, query_pre_attn_scalar=8, sliding_window=16,
        layer_types=["sliding_attention"] * 2,  # tunix's pattern: five local layers, then a global one
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # norms away from their init (zeros, i.e. scale 1), so that every weight matters
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    hf.save_pretrained(path)
    model_lib = tunix_module("tunix.models.gemma3.model")
    params = tunix_module("tunix.models.gemma3.params_safetensors")
    config = model_lib.ModelConfig(
        num_layers=2, num_embed=64, embed_dim=32, hidden_dim=48, num_heads=2, head_dim=8, num_kv_heads=1,
        sliding_window_size=16, local_base_frequency=10_000, global_base_frequency=1_000_000,
        param_dtype=jnp.float32,
    )  # fmt: skip
    return transformers.Gemma3ForCausalLM, params.create_model_from_safe_tensors(str(path), config)


MODELS = {"qwen3": _qwen3, "gemma3": _gemma3}


@pytest.fixture(params=sorted(MODELS))
def checkpoint(request, tmp_path_factory):
    """``(name, HF folder, HF model class, graphdef, state, apply)`` for one tiny checkpoint."""
    from flax import nnx

    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf_class, model = MODELS[request.param](path)
    graphdef, state = nnx.split(model)
    n = TOKENS.shape[1]
    positions, mask = jnp.arange(n)[None], jnp.tril(jnp.ones((1, n, n), bool))

    def apply(st, tokens):
        return nnx.merge(graphdef, st)(tokens, positions, None, mask)[0]

    return request.param, path, hf_class, state, apply


def _torch_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_base_checkpoint_matches_transformers(checkpoint):
    name, path, hf_class, state, apply = checkpoint
    _close(apply(state, TOKENS), _torch_logits(hf_class.from_pretrained(path).eval()))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_with_tunix_names(checkpoint, tmp_path, dora):
    import peft
    import torch

    name, path, hf_class, state, apply = checkpoint
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=ALL, init_lora_weights=False, use_dora=dora)
    model = peft.get_peft_model(hf_class.from_pretrained(path), config).eval()
    want = _torch_logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = lorajax.load_peft(tmp_path / "adapter", state, name_map="tunix")
    nodes = [x for x in jax.tree.leaves(loaded, is_leaf=lorajax.is_lora) if lorajax.is_lora(x)]
    assert len(nodes) == (12 if name == "gemma3" else 14)  # Gemma: k and v in one fused kv_einsum per layer
    assert np.abs(want - _torch_logits(hf_class.from_pretrained(path))).max() > 1e-3  # the adapter does something
    _close(apply(lorajax.merge(loaded), TOKENS), want)
    _close(lorajax.factored(apply)(loaded, TOKENS), want)


def test_lorajax_adapter_on_every_linear_kernel_loads_in_peft(checkpoint, tmp_path):
    import peft

    name, path, hf_class, state, apply = checkpoint
    layouts = lorajax.infer_layouts(apply, state, TOKENS)
    lora = lorajax.lorafy(state, rank=2, where=lorajax.all_linear, layout=layouts, key=jax.random.key(2))
    lora = jax.tree.map(  # trained-looking factors: b away from zero
        lambda x: (
            lorajax.LoRA(x.base, x.a, x.b + 0.05 * jax.random.normal(jax.random.key(3), x.b.shape), x.spec)
            if lorajax.is_lora(x)
            else x
        ),
        lora,
        is_leaf=lorajax.is_lora,
    )
    if name == "gemma3":  # the fused kernel, with its fused axis as fan-out: written with one shared A
        assert lora["layers"][0]["attn"]["kv_einsum"]["w"].layout == lorajax.Layout("ooio")
    want = np.asarray(apply(lorajax.merge(lora), TOKENS))
    lorajax.save_peft(tmp_path / "adapter", lora, name_map="tunix")
    model = peft.PeftModel.from_pretrained(hf_class.from_pretrained(path), tmp_path / "adapter").eval()
    _close(_torch_logits(model), want)


def test_tunix_convention_agrees_with_tunix_key_mappings():
    """name_map="tunix" gives every kernel the module tunix's own loader reads it from."""
    from lorajax.peft._conventions import convention_namer

    class Anything:
        vision_config = None

        def __getattr__(self, name):
            return 1

    tunix = convention_namer("tunix", "test")
    paths = [f"layers/3/attn/{p}/w" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    paths += [f"layers/3/mlp/{p}/kernel" for p in ("gate_proj", "up_proj", "down_proj")]
    paths += ["embedder/input_embedding", "lm_head/w"]
    gemma = ["layers/0/attn/attn_vec_einsum/w", "layers/0/mlp/up_proj/kernel", "embedder/input_embedding"]
    for module, kernels in (
        ("qwen3.params", [*paths, "layers/3/mlp/router/kernel"]),
        ("qwen2.params", paths),
        ("llama3.params", paths),
        ("gemma3.params_safetensors", gemma),
        ("gemma.params_safetensors", gemma),
    ):
        mapping = tunix_module(f"tunix.models.{module}")._get_key_and_transform_mapping(Anything())
        theirs = lorajax.name_map_from_key_mapping(mapping)
        for p in kernels:
            assert tunix(p) == theirs(p) is not None, (module, p)


@pytest.mark.examples
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_hf_roundtrip_example_runs(family, tmp_path):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "hf_roundtrip.py"), "--family", family, "--steps", "3"],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    diff = float(proc.stdout.split("max |diff| ")[1].split()[0])
    largest = float(proc.stdout.split("largest logit ")[1].rstrip(")\n").split(")")[0])
    assert diff <= 1e-5 * largest, proc.stdout
