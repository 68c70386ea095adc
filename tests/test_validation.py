"""Validation at the boundary: lorafy's configuration values, nodes whose factors do not fit, also= on adapted kernels.

Every bad value gives a ValueError naming the field (and the pattern key, the parameter path, the shapes), before
anything is traced; a property suite checks that every valid configuration starts at the base model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import EPS32, assert_within, sum_bound
from hypothesis import given, settings
from hypothesis import strategies as st

import lorajax
from lorajax import Layout, LoRA, LoRASpec


def _qv(shape=(8, 6)):
    k = jax.random.split(jax.random.key(0), 2)
    return {"query": {"kernel": jax.random.normal(k[0], shape)}, "value": {"kernel": jax.random.normal(k[1], shape)}}


def _lorafy(**kw):
    kw = {"rank": 2, "where": lorajax.attn_qv, **kw}
    return lorajax.lorafy(_qv(), **kw)


# ---- ranks and alphas ----------------------------------------------------------------------------------------


def test_a_matched_zero_in_rank_pattern_is_an_error_not_the_global_rank():
    with pytest.raises(ValueError, match=r"rank_pattern\['query'\] must be an integer >= 1, got 0"):
        _lorafy(rank_pattern={"query": 0})
    # A key that names no target leaves the global rank; a matched one is used as it is.
    p = _lorafy(rank=2, rank_pattern={"value": 4, "nothing": 3})
    assert (p["query"]["kernel"].rank, p["value"]["kernel"].rank) == (2, 4)


@pytest.mark.parametrize("alpha", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_alpha_must_be_finite_and_positive(alpha):
    with pytest.raises(
        ValueError,
        match=rf"lorafy: invalid LoRA configuration.*\n  - alpha must be a finite number > 0, "
        rf"got {alpha!r}".replace("(", r"\("),
    ):
        _lorafy(alpha=alpha)


def test_alpha_pattern_values_are_checked_naming_the_key():
    with pytest.raises(ValueError, match=r"alpha_pattern\['value'\] must be a finite number > 0, got nan"):
        _lorafy(alpha_pattern={"value": float("nan")})


def test_numpy_integers_and_scalars_are_ranks_and_alphas_bools_are_not():
    p = _lorafy(rank=np.int64(2), alpha=np.float32(4.0), rank_pattern={"value": np.int32(3)})
    q, v = p["query"]["kernel"], p["value"]["kernel"]
    assert (q.rank, v.rank, q.alpha) == (2, 3, 4.0)
    assert type(q.spec.rank) is int and type(q.spec.alpha) is float  # static metadata: plain Python values
    assert _lorafy(alpha=8)["query"]["kernel"].scale == 4.0
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got True \(a bool\)"):
        _lorafy(rank=True)
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 2.0"):
        _lorafy(rank=2.0)
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0, got True \(a bool\)"):
        _lorafy(alpha=True)
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0, got '8'"):
        _lorafy(alpha="8")


def test_every_bad_value_is_listed_in_one_error():
    with pytest.raises(ValueError, match=r"\(5 problems\)") as e:
        _lorafy(rank=0, alpha=float("nan"), rank_pattern={"query": -2, "(": 2}, key="seed")
    lines = ("rank must be", "alpha must be", "rank_pattern['query'] must be", "rank_pattern: key '('", "key must be")
    for line in lines:
        assert line in str(e.value)


def test_patterns_must_be_dicts_of_valid_regexes():
    with pytest.raises(ValueError, match=r"rank_pattern must be a dict \{module name or regex: value\}, got list"):
        _lorafy(rank_pattern=[("query", 2)])
    with pytest.raises(ValueError, match=r"alpha_pattern: key '\[' is not a valid regular expression"):
        _lorafy(alpha_pattern={"[": 2.0})


def test_eva_init_checks_its_ranks_too():
    params = {"fc": {"kernel": jnp.ones((6, 4))}}
    bad = r"eva_init: invalid LoRA configuration.*\n  - rank_pattern\['fc'\] must be an integer >= 1, got 0"
    with pytest.raises(ValueError, match=bad):
        lorajax.eva_init(
            lambda p, x: x @ p["fc"]["kernel"], params, [jnp.ones((4, 6))], rank=2, where=["fc"], rank_pattern={"fc": 0}
        )


# ---- the PRNG key --------------------------------------------------------------------------------------------


def _a(p):
    return np.asarray(p["query"]["kernel"].a)


def test_key_accepts_an_integer_seed_a_typed_key_or_a_raw_key():
    typed = _a(_lorafy(key=jax.random.key(3)))
    for key in (3, np.int64(3), jax.random.PRNGKey(3)):
        np.testing.assert_array_equal(_a(_lorafy(key=key)), typed, err_msg=repr(key))
    np.testing.assert_array_equal(_a(_lorafy(key=0)), _a(_lorafy()))  # None is seed 0
    # Under jit, a traced integer seed and a traced key work too.
    jitted = jax.jit(lambda p, k: lorajax.lorafy(p, rank=2, where=lorajax.attn_qv, key=k))
    np.testing.assert_array_equal(_a(jitted(_qv(), 3)), typed)
    np.testing.assert_array_equal(_a(jitted(_qv(), jax.random.key(3))), typed)


@pytest.mark.parametrize(
    ("key", "said"),
    [
        ("seed", r"got str 'seed'"),
        (1.5, r"got float 1.5"),
        (jnp.ones(3), r"got ArrayImpl of shape \(3,\) and dtype float32"),
        (jax.random.split(jax.random.key(0), 4), r"must be a single PRNG key, got an array of \(4,\) keys"),
        (True, r"got bool True"),
    ],
)
def test_a_bad_key_is_refused_before_jax_sees_it(key, said):
    with pytest.raises(
        ValueError, match=r"lorafy: invalid LoRA configuration.*\n  - key " + r"(must be None.*)?" + said
    ):
        _lorafy(key=key)


# ---- nodes whose factors do not fit their base -----------------------------------------------------------------


def _node(base_shape=(8, 4), a_shape=(8, 2), b_shape=(2, 4), layout="io", **kw):
    spec = LoRASpec(rank=2, alpha=2.0, layout=Layout(layout), **kw)
    return LoRA(jnp.ones(base_shape), jnp.ones(a_shape), jnp.zeros(b_shape), spec)


_B_WRONG = (
    r"layer/q/kernel: factor b has shape \(3, 4\), expected \(2, 4\) \(rank 2, layout 'io', kernel shape \(8, 4\)\)"
)


@pytest.mark.parametrize(
    "run",
    [
        lambda p: lorajax.merge(p),
        lambda p: jax.jit(lorajax.merge)(p),
        lambda p: lorajax.merge(p, donate=True),
        lambda p: lorajax.factored(lambda p, x: x @ p["layer"]["q"]["kernel"])(p, jnp.ones((2, 8))),
        lambda p: jax.jit(lorajax.factored(lambda p, x: x @ p["layer"]["q"]["kernel"]))(p, jnp.ones((2, 8))),
    ],
    ids=["merge", "jit-merge", "donate", "factored", "jit-factored"],
)
def test_a_hand_built_node_that_does_not_fit_is_named_before_tracing(run):
    p = {"layer": {"q": {"kernel": _node(b_shape=(3, 4))}}}
    with pytest.raises(
        ValueError, match=r"the LoRA factors do not fit their base kernels \(1 problem\):\n  - shape: " + _B_WRONG
    ):
        run(p)


def test_every_unfit_node_is_listed_with_what_its_layout_expects():
    p = {
        "layer": {"q": {"kernel": _node(b_shape=(3, 4))}},
        "stacked": {"kernel": _node((2, 8, 4), (8, 2), (2, 2, 4), "sio")},
        "wrong_rank": {"kernel": _node((6, 5, 4), (6, 2), (2, 5, 4), "ioo")},  # the layout has 3 axes: fine
        "axes": {"kernel": _node((8, 4), (8, 2), (2, 4), "ioo")},
    }
    with pytest.raises(ValueError, match=r"merge: the LoRA factors do not fit their base kernels \(3 problems\)") as e:
        lorajax.merge(p)
    msg = str(e.value)
    assert "stacked/kernel: factor a has shape (8, 2), expected (2, 8, 2) (rank 2, layout 'sio'" in msg
    assert "layout: axes/kernel: layout 'ioo' has 3 axes, the kernel shape (8, 4) has 2" in msg
    assert "wrong_rank" not in msg


def test_a_dora_node_needs_a_magnitude_of_its_output_features():
    node = dataclasses.replace(_node(variant="dora"), magnitude=jnp.ones(8))
    with pytest.raises(ValueError, match=r"q: a DoRA entry needs a magnitude of shape \(4,\).*got \(8,\)"):
        lorajax.merge({"q": node})
    # A missing magnitude keeps merge's own error, which says how to put it back.
    with pytest.raises(ValueError, match="has no magnitude"):
        lorajax.merge({"q": _node(variant="dora")})


def test_nodes_that_fit_merge_and_run_as_before():
    p = lorajax.lorafy({"q": {"kernel": jnp.ones((8, 4))}}, rank=2, where=["q"], dora=True)
    assert lorajax.merge(p)["q"]["kernel"].shape == (8, 4)
    # Per-example nodes (lorajax.select) carry leading axes beyond the layout's: tests/test_bank.py runs them.


# ---- also= on kernels that where= already adapts ---------------------------------------------------------------


def _mlp():
    return {"mlp": {"router": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}, "fc1": {"kernel": jnp.ones((8, 8))}}}


def test_also_on_an_adapted_kernel_says_so_and_what_to_do():
    p = _mlp()
    del p["mlp"]["router"]["bias"]
    with pytest.raises(
        ValueError,
        match=r"lorafy: also=\['router'\]: 'router' names mlp/router/kernel, already adapted by lorafy's where= "
        r"\(a LoRA node: its factors a and b train\)\. Drop it from also= to train its adapter only, or leave it out "
        r"of lorafy's where= to train the whole kernel",
    ):
        lorajax.lorafy(p, rank=2, where=lorajax.all_linear, also=["router"])
    with pytest.raises(ValueError, match=r"trainable: where='\.\*/fc1/kernel': '\.\*/fc1/kernel' names mlp/fc1/kernel"):
        lorajax.trainable(lorajax.lorafy(p, rank=2, where=lorajax.mlp), ".*/fc1/kernel")
    # Left out of where=, it trains whole.
    p = lorajax.lorafy(p, rank=2, where=["fc1"], also=["router"])
    assert lorajax.is_trainable(p["mlp"]["router"]["kernel"])


def test_also_matching_nothing_still_says_matched_no_leaf_and_lists_plain_leaves():
    with pytest.raises(
        ValueError,
        match=r"lorafy: also=\['gate'\] matched no leaf\. Paths available include: "
        r"mlp/router/bias\.",
    ):
        lorajax.lorafy(_mlp(), rank=2, where=lorajax.all_linear, also=["gate"])


def test_also_on_a_module_whose_kernel_is_adapted_takes_its_other_leaves():
    p = lorajax.lorafy(_mlp(), rank=2, where=lorajax.all_linear, also=["router"])
    assert lorajax.is_lora(p["mlp"]["router"]["kernel"]) and lorajax.is_trainable(p["mlp"]["router"]["bias"])


# ---- property suite over lorafy's configuration space -----------------------------------------------------------

_SHAPES = [(4, 6), (6, 4)]
_INITS = ["kaiming", "gaussian", "pissa", "olora"]
_names = st.sampled_from(["q", "v"])
_ranks = st.integers(1, 4) | st.integers(1, 4).map(np.int64)
_alphas = st.none() | st.integers(1, 64) | st.floats(0.25, 64.0) | st.floats(0.25, 64.0).map(np.float32)


@st.composite
def _valid(draw):
    return dict(
        shape=draw(st.sampled_from(_SHAPES)),
        rank=draw(_ranks),
        alpha=draw(_alphas),
        rank_pattern=draw(st.none() | st.dictionaries(_names, _ranks, max_size=2)),
        alpha_pattern=draw(st.none() | st.dictionaries(_names, _alphas.filter(lambda a: a is not None), max_size=2)),
        rslora=draw(st.booleans()),
        dora=draw(st.booleans()),
        init=draw(st.sampled_from(_INITS)),
        key=draw(st.none() | st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=15, deadline=None)
@given(_valid())
def test_every_valid_configuration_starts_at_the_base(cfg):
    shape = cfg.pop("shape")
    k = jax.random.split(jax.random.key(7), 2)
    params = {"q": {"kernel": jax.random.normal(k[0], shape)}, "v": {"kernel": jax.random.normal(k[1], shape)}}
    p = lorajax.lorafy(params, where=["q", "v"], **cfg)
    merged = lorajax.merge(p)
    for name in ("q", "v"):
        node, w = p[name]["kernel"], np.asarray(params[name]["kernel"])
        rank = int((cfg["rank_pattern"] or {}).get(name, cfg["rank"]))
        alpha = (cfg["alpha_pattern"] or {}).get(name, cfg["alpha"])
        assert node.rank == rank and node.alpha == pytest.approx(float(rank if alpha is None else alpha))
        assert node.spec.variant == ("dora" if cfg["dora"] else "lora")
        got = np.asarray(merged[name]["kernel"])
        if cfg["init"] in ("kaiming", "gaussian") and not cfg["dora"]:
            np.testing.assert_array_equal(got, w)  # b is zero: bit for bit
            continue
        # A residual base (PiSSA/OLoRA) adds back what it took out, W - s a b + s a b: two roundings of terms
        # up to |W| + s |a| |b| after a length-r product; DoRA's m / n is 1 up to its norms' roundings.
        ab = abs(float(node.scale)) * np.abs(np.asarray(node.a, np.float64)) @ np.abs(np.asarray(node.b, np.float64))
        bound = sum_bound(np.abs(w) + 2 * ab, rank + 3)
        if cfg["dora"]:
            bound = bound + sum_bound(np.abs(w) + ab, 2 * shape[0] + 4)
        assert_within(got, w, bound + EPS32 * np.abs(w), f"{name} {cfg}")


_BAD = {
    "rank": [0, -1, True, 2.5, "2", None],
    "alpha": [0, -2.0, float("nan"), float("inf"), False, "8"],
    "rank_pattern": [{"q": 0}, {"q": -3}, {"v": 1.5}, {"q": None}, {"(": 2}, ["q"]],
    "alpha_pattern": [{"q": 0.0}, {"v": float("nan")}, {"q": -1}, {"q": None}, 3.0],
    "key": ["0", 1.5, jnp.zeros(3), jax.random.split(jax.random.key(0), 2)],
}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(_BAD)).flatmap(lambda f: st.tuples(st.just(f), st.sampled_from(_BAD[f]))))
def test_every_invalid_value_is_a_value_error_naming_its_field(case):
    field, value = case
    kw = {"rank": 2, field: value}
    with pytest.raises(ValueError, match=r"lorafy: invalid LoRA configuration \(1 problem\):\n  - " + field) as e:
        lorajax.lorafy(_qv((4, 4)), where=lorajax.attn_qv, **kw)
    if isinstance(value, dict):
        assert repr(next(iter(value))) in str(e.value)  # the pattern key
