"""examples/serve.py: a real HTTP server on loopback, mixed-adapter decode over a KV cache, 4xx for bad requests."""

import importlib.util
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.examples


@pytest.fixture(scope="module")
def served():
    spec = importlib.util.spec_from_file_location("serve_example", ROOT / "examples" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = serve  # dataclasses look their module up there
    spec.loader.exec_module(serve)
    # 3 demo adapters in 4 slots; small limits keep the test fast. Prompts of up to 126 bytes and 5 new tokens
    # let a sequence outgrow the model's 128-byte window, where the cache must give way to recomputation.
    server, _ = serve.build(["--demo-adapters", "3", "--slots", "4", "--rank", "8", "--max-batch", "4",
                             "--max-prompt", "126", "--max-tokens", "5"])  # fmt: skip
    httpd = server.serve(0)
    port = httpd.server_address[1]
    yield serve, server, port
    server.close(httpd)


def post(port, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# 126 bytes of real text (textlm.py's docstring): a prompt whose tokens at positions 126, 127 decode from the cache
# and whose tokens at 128, 129 need the sliding window (positions past the model's 128).
LONG = (ROOT / "examples" / "textlm.py").read_text()[:126]


def test_concurrent_mixed_requests_equal_each_adapters_merged_greedy_output(served):
    serve, server, port = served
    demo = serve.demo_adapters(server.base, 3, 8)
    # 6 requests on 4 cache rows, with different lengths: some join the batch while others are mid-way.
    asks = [("demo0", "def read(self", 5), ("demo1", "class Reader:", 3), (None, "import os\n", 5),
            ("demo2", "return x", 2), ("demo1", LONG, 5), ("demo0", "for i in", 4)]  # fmt: skip
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = list(
            pool.map(lambda a: post(port, "/generate", {"adapter": a[0], "prompt": a[1], "max_tokens": a[2]}), asks)
        )
    for (name, prompt, n), (status, reply) in zip(asks, replies):
        assert status == 200, reply
        # The reference: the adapter merged into the base, no cache, the whole window recomputed per token.
        params = server.base if name is None else lorajax.merge(demo[name])
        want = serve.greedy(server.apply, params, list(prompt.encode()), n, server.seq_len)
        assert reply["tokens"] == want, (name, reply)
    assert server.steps < sum(n for *_, n in asks)  # the requests shared decode steps


def test_prefill_and_cached_decode_equal_no_cache_logits(served):
    """Mixed adapters through the server's cached forward against each merged model recomputing its window.

    Row lengths differ (positions up to the window's last, 127) and one row runs the base. The cached keys and
    values must carry each row's adapter, or the adapters' rows drift. Tolerance: 1e-4 on logits of magnitude
    ~10 (float32; seen: 1.2e-5, from the factored vs merged and one-token vs whole-window matmul orders).
    """
    serve, server, _ = served
    textlm = serve.textlm
    demo = serve.demo_adapters(server.base, 3, 8)
    L = server.seq_len
    names, lens = ["demo0", None, "demo2", "demo1"], np.array([120, 60, 5, 1])
    seqs = np.stack([textlm.encode(LONG * 2)[40 * k : 40 * k + L] for k in range(4)])  # 4 different texts
    merged = [server.base if n is None else lorajax.merge(demo[n]) for n in names]
    full = jax.jit(server.model.apply)

    def no_cache(p, params=merged):  # row k's logits at position p[k], its window recomputed by params[k]
        wins = [np.where(np.arange(L) <= p[k], seqs[k], 0)[None] for k in range(4)]
        return np.stack([np.asarray(full(params[k], wins[k]))[0, p[k]] for k in range(4)])

    ids = server.slots.ids(names)
    prompts = np.where(np.arange(L)[None] < lens[:, None], seqs, 0).astype(np.int32)
    logits, cache = server.forward(server.slots.bank, ids, prompts, jnp.zeros(4, jnp.int32),
                                   textlm.init_cache(server.model.config, 4))  # fmt: skip
    errors = [np.abs(np.asarray(logits)[np.arange(4), lens - 1] - no_cache(lens - 1)).max()]
    for step in range(8):  # row 0 reaches position 127, the last the cache holds
        p = lens + step
        logits, cache = server.forward(server.slots.bank, ids, seqs[np.arange(4), p][:, None], jnp.asarray(p), cache)
        errors.append(np.abs(np.asarray(logits)[:, 0] - no_cache(p)).max())
    assert max(errors) < 1e-4, errors
    # The tolerance tells adapters apart: the base's logits are far from the adapters' at the last step.
    assert (
        np.abs(np.asarray(logits)[[0, 2, 3], 0] - no_cache(p, [server.base] * 4)[[0, 2, 3]]).max(axis=-1).min() > 1e-2
    )


def test_bad_requests_get_4xx_and_do_not_disturb_others(served):
    serve, server, port = served
    assert post(port, "/generate", b"{not json")[0] == 400
    status, reply = post(port, "/generate", {"adapter": "nope", "prompt": "x", "max_tokens": 2})
    assert status == 404 and "unknown adapter names ['nope']" in reply["error"]
    status, reply = post(port, "/generate", {"adapter": None, "prompt": "x" * 127, "max_tokens": 2})
    assert status == 413 and "at most 126" in reply["error"]
    assert post(port, "/generate", {"adapter": None, "prompt": "x", "max_tokens": 99})[0] == 400
    assert post(port, "/generate", {"adapter": None, "prompt": "", "max_tokens": 2})[0] == 400
    assert post(port, "/nowhere", {})[0] == 404
    assert post(port, "/generate", {"adapter": "demo1", "prompt": "ok", "max_tokens": 2})[0] == 200


def test_post_adapters_loads_a_file_into_a_free_slot(served):
    serve, server, port = served
    extra = serve.demo_adapters(server.base, 4, 8)["demo3"]
    path = os.path.join(tempfile.mkdtemp(), "extra.safetensors")
    lorajax.save_adapter(path, extra)
    status, reply = post(port, "/adapters", {"name": "extra", "path": path})
    assert status == 200 and reply["slots"] == ["demo0", "demo1", "demo2", "extra"]
    assert post(port, "/adapters", {"name": "more", "path": path})[0] == 409  # every slot is taken
    assert post(port, "/adapters", {"name": "x", "path": "/no/such/file"})[0] == 400
    status, reply = post(port, "/generate", {"adapter": "extra", "prompt": "for i in", "max_tokens": 4})
    assert status == 200
    assert reply["tokens"] == serve.greedy(server.apply, lorajax.merge(extra), list(b"for i in"), 4, server.seq_len)


def test_decode_step_compiles_once_across_joins_leaves_and_slot_changes(served):
    serve, server, port = served
    demo = serve.demo_adapters(server.base, 5, 8)
    fresh = demo["demo4"]
    with server.lock:  # a slot change while serving: demo2 out, a new adapter in its place
        server.slots = server.slots.evict("demo2").put("fresh", fresh)
    try:
        asks = [("fresh", "while True:", 5), ("demo0", "x = [", 1), ("demo1", "try:", 3), (None, "def f(", 2),
                ("fresh", LONG, 4), ("demo0", "yield ", 5), ("demo1", "raise ", 2)]  # fmt: skip
        with ThreadPoolExecutor(len(asks)) as pool:
            replies = list(
                pool.map(lambda a: post(port, "/generate", {"adapter": a[0], "prompt": a[1], "max_tokens": a[2]}), asks)
            )
        for (name, prompt, n), (status, reply) in zip(asks, replies):
            assert status == 200, reply
            params = server.base if name is None else lorajax.merge(demo[name] if name != "fresh" else fresh)
            assert reply["tokens"] == serve.greedy(server.apply, params, list(prompt.encode()), n, server.seq_len)
    finally:
        with server.lock:
            server.slots = server.slots.evict("fresh").put("demo2", demo["demo2"])
    # The decode step's arguments had one shape throughout: rows joined, left and were reused (7 requests on 4
    # rows here, and whatever the module's other tests sent to this server), ids changed, a slot was replaced.
    assert server.traces["decode"] == 1, server.traces
    assert server.traces["prefill"] <= 3, server.traces  # power-of-two prefill batches: 1, 2 or 4 rows
