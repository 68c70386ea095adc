"""examples/serve.py: a real HTTP server on loopback, mixed-adapter decode steps, 4xx for bad requests."""

import importlib.util
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    # 3 demo adapters in 4 slots; small limits keep the test fast.
    server, _ = serve.build(["--demo-adapters", "3", "--slots", "4", "--rank", "8", "--max-batch", "4",
                             "--max-prompt", "40", "--max-tokens", "5"])  # fmt: skip
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


def test_concurrent_mixed_requests_equal_each_adapters_merged_greedy_output(served):
    serve, server, port = served
    demo = serve.demo_adapters(server.base, 3, 8)
    asks = [("demo0", "def read(self"), ("demo1", "class Reader:"), (None, "import os\n"), ("demo2", "return x")]
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = list(
            pool.map(lambda a: post(port, "/generate", {"adapter": a[0], "prompt": a[1], "max_tokens": 5}), asks)
        )
    for (name, prompt), (status, reply) in zip(asks, replies):
        assert status == 200, reply
        params = server.base if name is None else lorajax.merge(demo[name])
        want = serve.greedy(server.apply, params, list(prompt.encode()), 5, server.seq_len)
        assert reply["tokens"] == want, (name, reply)
    assert server.steps < 4 * 5  # the requests shared decode steps


def test_bad_requests_get_4xx_and_do_not_disturb_others(served):
    serve, server, port = served
    assert post(port, "/generate", b"{not json")[0] == 400
    status, reply = post(port, "/generate", {"adapter": "nope", "prompt": "x", "max_tokens": 2})
    assert status == 404 and "unknown adapter names ['nope']" in reply["error"]
    status, reply = post(port, "/generate", {"adapter": None, "prompt": "x" * 41, "max_tokens": 2})
    assert status == 413 and "at most 40" in reply["error"]
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
