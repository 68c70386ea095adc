"""lorajax.serve through the official openai client: equality with merged models, paging, bad clients, faults."""

import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

import lorajax  # noqa: E402
from lorajax import serve  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# 126 bytes of real text: 5 new tokens take the sequence past the model's 128-byte window (the cache gives way).
LONG = (ROOT / "examples" / "textlm.py").read_text()[:126]


class Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        if record.exc_info:
            self.records.append(self.format(record))


@pytest.fixture(scope="module")
def served():
    spec = importlib.util.spec_from_file_location("serve_example", ROOT / "examples" / "serve.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    # 100 registered adapters over 8 slots, 4 cache rows: requests wait for rows and for slots.
    base, config = example.textlm.load_params(example.textlm.BASE_CHECKPOINT)
    example.tiny = example.textlm.TinyGPT(config)
    example.demo = example.demo_adapters(base, 101, 8)  # 100 to serve and one more to load
    hundred = {f"demo{k}": example.demo[f"demo{k}"] for k in range(100)}
    engine, app, _ = example.build(["--slots", "8", "--rank", "8", "--max-batch", "4", "--max-model-len", "140"],
                                   hundred)  # fmt: skip
    engine.warmup()  # every step shape: later requests, paging and loads must not trace again
    with serve.Background(app, header_timeout=2.0) as port:
        errors = Errors()  # every exception uvicorn logs (a traceback in its log)
        logging.getLogger("uvicorn.error").addHandler(errors)
        example.errors = errors
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        yield example, engine, port, client


def reference(example, engine, name, prompt, n):
    """Greedy decoding of ``name`` merged into the base, no cache (``None``: the base)."""
    params = engine.base if name == "base" else lorajax.merge(example.demo[name])
    return example.greedy(example.tiny, params, prompt, n)


def raw(port, data, timeout=30):
    """Send raw bytes, return (status, parsed JSON body): the first response, read to its Content-Length."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := s.recv(65536)):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length and (chunk := s.recv(65536)):
            body += chunk
    return int(head.split()[1]), json.loads(body)


def post(port, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_base_and_every_adapter(served):
    _, _, _, client = served
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", *[f"demo{k}" for k in range(100)]]


def test_greedy_completions_equal_each_merged_model_with_paging(served):
    """12 adapters (more than the 8 slots) and the base, streamed and not, concurrently on 4 cache rows."""
    example, engine, _, client = served
    asks = [
        (f"demo{k}", p, n, k % 2 == 1)
        for k, (p, n) in enumerate([("def read(self", 5), ("class Reader:", 3), (LONG, 5), ("return x", 2)] * 3)
    ]
    asks = [
        *asks[:10],
        ("demo97", "for i in", 4, False),
        ("demo98", "import os\n", 3, True),
        ("base", "x = [", 4, True),
    ]

    def run(ask):
        name, prompt, n, stream = ask
        if stream:
            chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0,
                                                    stream=True))  # fmt: skip
            assert chunks[-1].choices[0].finish_reason == "length"
            return "".join(c.choices[0].text for c in chunks)
        reply = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
        assert reply.usage.prompt_tokens == len(prompt.encode()) and reply.usage.completion_tokens == n
        return reply.choices[0].text

    page_ins = engine.pager.page_ins
    with ThreadPoolExecutor(len(asks)) as pool:
        texts = list(pool.map(run, asks))
    for (name, prompt, n, _), text in zip(asks, texts):
        assert text == reference(example, engine, name, prompt, n), name
    assert engine.pager.page_ins - page_ins >= 4  # adapters beyond the first 8 were paged in
    # Decode and prefill steps of 1, 2 and 4 rows (prefills of 32 and 128 tokens each), traced by the
    # warm-up: joins, leaves and page-ins traced nothing.
    assert engine.traces == {"decode": 3, "prefill": 6}, engine.traces


def test_stop_seed_and_usage(served):
    example, engine, _, client = served
    full = reference(example, engine, "demo3", "def read(", 12)
    stop = full[4:6]
    reply = client.completions.create(model="demo3", prompt="def read(", max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].text == full[: full.find(stop)]
    streamed = client.completions.create(model="demo3", prompt="def read(", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == full[: full.find(stop)]
    sample = lambda seed: client.completions.create(model="demo1", prompt="if ", max_tokens=8, temperature=1.5,
                                                    seed=seed).choices[0].text  # fmt: skip
    assert sample(7) == sample(7) and len({sample(7), sample(8), sample(9)}) > 1


BAD = [  # (body or raw request, status, words in the message)
    (b"{not json", 400, "not valid JSON"),
    (b'{"model": "base", "prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b'{"model": "base", "prompt": "\\ud800", "max_tokens": 2}', 400, "lone surrogate"),
    (b"[" * 200_000, 400, "nests too deeply"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "x", "max_tokens": 2}, 400, "'model' must be a non-empty string; it is missing"),
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "base", "max_tokens": 2}, 400, "'prompt'"),
    ({"model": "base", "prompt": 5}, 400, "'prompt' must be a non-empty string"),
    ({"model": "base", "prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be an integer"),
    ({"model": "base", "prompt": "x", "max_tokens": "3"}, 400, "'max_tokens' must be an integer"),
    ({"model": "base", "prompt": "x", "max_tokens": 140}, 400, "maximum context length is 140"),
    ({"model": "base", "prompt": "x" * 141}, 400, "context is 140"),
    ({"model": "base", "prompt": "x", "temperature": "hot"}, 400, "'temperature'"),
    ({"model": "base", "prompt": "x", "stop": [1]}, 400, "'stop'"),
    ({"model": "base", "prompt": "x", "stream": "yes"}, 400, "'stream'"),
]


@pytest.mark.parametrize("body, status, words", BAD, ids=range(len(BAD)))
def test_malformed_requests_get_openai_errors(served, body, status, words):
    _, _, port, client = served
    got, reply = post(port, "/v1/completions", body)
    assert got == status and words in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}


def test_malformed_http_and_lengths_get_json_errors(served):
    _, _, port, client = served
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    assert raw(port, head + b"Content-Length: abc\r\n\r\n{}")[0] == 400
    for length in (99999999999, 2 << 20):  # a body over the 1 MiB limit: refused before it is read
        status, reply = raw(port, head + b"Content-Length: %d\r\n\r\n{" % length + b" " * 1000)
        assert status == 413 and "at most" in reply["error"]["message"]
    assert raw(port, head + b"X: " + b"y" * 40000 + b"\r\n\r\n")[0] == 400  # an oversized header block
    assert post(port, "/nowhere", {})[0] == 404
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert client.completions.create(model="demo1", prompt="ok", max_tokens=2, temperature=0).choices[0].text


def test_load_and_unload_while_other_requests_run(served):
    example, engine, port, client = served
    path = os.path.join(tempfile.mkdtemp(), "extra.safetensors")
    extra = example.demo["demo100"]
    lorajax.save_adapter(path, extra)
    corrupt = os.path.join(os.path.dirname(path), "corrupt.safetensors")
    Path(corrupt).write_bytes(Path(path).read_bytes()[:-50])
    with ThreadPoolExecutor(2) as pool:  # a long request runs through the loads and unloads
        running = pool.submit(lambda: client.completions.create(model="demo5", prompt=LONG, max_tokens=12,
                                                                temperature=0).choices[0].text)  # fmt: skip
        assert post(port, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": path})[0] == 200
        status, reply = post(port, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "/no/such/file"})
        assert status == 400 and "does not exist" in reply["error"]["message"]
        status, reply = post(port, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": corrupt})
        assert status == 400 and "corrupt.safetensors" in reply["error"]["message"]
        assert post(port, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": path})[0] == 400
        assert "extra" in [m.id for m in client.models.list().data]
        text = client.completions.create(model="extra", prompt="for i in", max_tokens=4, temperature=0).choices[0].text
        assert text == example.greedy(example.tiny, lorajax.merge(extra), "for i in", 4)
        folder = os.path.join(os.path.dirname(path), "peft")  # the same adapter as a PEFT folder
        lorajax.save_peft(folder, extra)
        assert post(port, "/v1/load_lora_adapter", {"lora_name": "extra-peft", "lora_path": folder})[0] == 200
        assert client.completions.create(model="extra-peft", prompt="for i in", max_tokens=4,
                                         temperature=0).choices[0].text == text  # fmt: skip
        assert post(port, "/v1/unload_lora_adapter", {"lora_name": "extra-peft"})[0] == 200
        assert post(port, "/v1/unload_lora_adapter", {"lora_name": "extra"})[0] == 200
        assert post(port, "/v1/unload_lora_adapter", {"lora_name": "extra"})[0] == 404
        assert running.result() == reference(example, engine, "demo5", LONG, 12)
    assert "extra" not in [m.id for m in client.models.list().data] and "extra" not in engine.pager.slots.names
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="x", max_tokens=2)


def test_a_disconnect_cancels_the_request_and_frees_its_row(served):
    _, engine, port, _ = served
    body = json.dumps({"model": "demo2", "prompt": "def f(", "max_tokens": 130, "temperature": 0, "stream": True})
    for stream in (True, False):
        s = socket.create_connection(("127.0.0.1", port))
        req = body if stream else body.replace('"stream": true', '"stream": false')
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(req)}\r\n\r\n{req}".encode())
        deadline = time.time() + 60
        while not engine.active and time.time() < deadline:
            time.sleep(0.01)
        assert engine.active
        s.close()
        deadline = time.time() + 10
        while (engine.active or engine.pending) and time.time() < deadline:
            time.sleep(0.02)
        assert not engine.active and len(engine.free_rows) == engine.max_batch, stream


def test_stalled_connections_do_not_starve_other_clients(served):
    _, _, port, client = served
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]  # they send nothing
    try:
        t0 = time.perf_counter()
        client.completions.create(model="demo0", prompt="ok", max_tokens=2, temperature=0)
        assert time.perf_counter() - t0 < 5
        time.sleep(3)  # the header timeout (2 s here) drops them
        for s in stalled[:20]:
            s.settimeout(5)
            assert s.recv(10) == b""
    finally:
        for s in stalled:
            s.close()


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), *args], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip


def test_a_client_leaving_mid_body_is_no_error_and_nothing_logged_a_traceback(served):
    example, _, port, client = served
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
    time.sleep(0.5)
    s.close()
    assert client.completions.create(model="demo1", prompt="ok", max_tokens=2, temperature=0).choices[0].text
    time.sleep(0.5)
    assert not example.errors.records, example.errors.records[0]


def test_health_shows_the_engines_counters(served):
    _, engine, port, client = served
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as reply:
        before = json.loads(reply.read())["engine"]
    client.completions.create(model="demo4", prompt="abc", max_tokens=3, temperature=0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as reply:
        after = json.loads(reply.read())["engine"]
    assert after["mode"] == "bank" and after["steps"] >= before["steps"] + 3
    assert after["prefill_rows_used"] >= before["prefill_rows_used"] + 1  # its prompt, in a 32-token bucket
    assert after["prefill_tokens"] - before["prefill_tokens"] >= 32
    assert after["decode_rows_used"] - before["decode_rows_used"] >= 2
    assert 0 < after["call_s"] <= after["step_s"]


def test_nothing_traced_again(served):
    assert served[1].traces == {"decode": 3, "prefill": 6}, served[1].traces


def test_cli_port_in_use_and_missing_adapter_end_in_one_line(served):
    _, _, port, _ = served
    out = run_cli("--port", str(port))
    assert (
        out.returncode == 1
        and out.stderr.strip() == f"serve.py: port {port} on 127.0.0.1 is already in use; pick another with --port"
    )
    out = run_cli("--adapter", "mine=/no/such.safetensors")
    assert out.returncode == 1 and out.stderr.strip() == "serve.py: --adapter 'mine=/no/such.safetensors': no such file"


def test_an_engine_without_adapters_serves_the_base_with_the_banks_steps(served):
    """``--demo-adapters 0`` (the benchmark's base-only server): greedy decoding equals the base's, no warm-up."""
    example, engine, _, _ = served
    base_only, app, _ = example.build(["--demo-adapters", "0", "--max-batch", "2", "--max-model-len", "140"])
    assert base_only.mode == "base" and base_only.names() == []
    with pytest.raises(ValueError, match="base model only"):
        base_only.check("x", example.demo["demo0"])
    with serve.Background(app) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["base"]
        text = client.completions.create(model="base", prompt="x = [", max_tokens=4, temperature=0).choices[0].text
    assert text == reference(example, engine, "base", "x = [", 4)
