"""Serve the demo model with many LoRA adapters through an OpenAI-compatible API (lorajax.serve).

Run (needs ``pip install -e ".[serve]"``; loopback only by default):

    python examples/serve.py --port 8000
    curl -s localhost:8000/v1/models
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "demo3", "prompt": "def read(", "max_tokens": 32, "temperature": 0}'
    curl -s localhost:8000/v1/load_lora_adapter -H 'Content-Type: application/json' \\
         -d '{"lora_name": "mine", "lora_path": "/tmp/mine.safetensors"}'

The base is the demo's byte-level GPT (``assets/base_prose.safetensors``, see ``textlm.py``; ``model`` name
``base``). Adapters come from ``--adapter NAME=PATH`` (files written by ``lorajax.save_adapter``, or PEFT folders)
or, without any, ``--demo-adapters N`` random stand-ins. ``--slots`` of them sit in device slots
(``lorajax.adapter_slots``); the rest wait on the host and are paged in, least recently used out.
``--mode loop`` serves one adapter's requests per step with merged weights (the benchmark's baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import textlm  # examples/textlm.py

import lorajax
from lorajax import serve


def demo_adapters(base: Any, count: int, rank: int = 16) -> dict[str, Any]:
    """``count`` stand-in adapters on all linear layers (ranks ``rank`` / ``rank // 2``), with random B."""
    out = {}
    for k in range(count):
        r = rank if k % 2 == 0 else rank // 2
        lp = lorajax.lorafy(base, rank=r, where=lorajax.all_linear, key=jax.random.key(100 + k), alpha=2.0 * r)
        rng = np.random.default_rng(k)
        out[f"demo{k}"] = jax.tree.map(
            lambda x: (
                dataclasses.replace(x, b=jnp.asarray(0.05 * rng.normal(size=x.b.shape), x.b.dtype))
                if lorajax.is_lora(x)
                else x
            ),
            lp,
            is_leaf=lorajax.is_lora,
        )
    return out


def cached_lm(config: Any) -> serve.CachedLM:
    """The demo model for the engine: ``textlm.CachedGPT`` with byte tokens."""
    return serve.CachedLM(
        apply=textlm.CachedGPT(config).apply,
        init_cache=functools.partial(textlm.init_cache, config),
        seq_len=config.seq_len,
        encode=lambda text: textlm.encode(text).tolist(),
        decode=textlm.decode,
    )


@functools.lru_cache
def _jitted(model: Any) -> Any:
    return jax.jit(model.apply)


def greedy(model: Any, params: Any, prompt: str, n: int) -> str:
    """Reference: greedy decoding with ``textlm.make_generate``'s sliding window and no cache (tests)."""
    apply = _jitted(model)
    toks = textlm.encode(prompt).tolist()
    for _ in range(n):
        w, last = serve.window(toks, model.config.seq_len)
        toks.append(int(jnp.argmax(apply(params, w[None])[0, last])))
    return textlm.decode(toks[len(textlm.encode(prompt)) :])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter file or folder")
    ap.add_argument("--demo-adapters", type=int, default=8, help="random stand-in adapters when no --adapter")
    ap.add_argument("--slots", type=int, default=8, help="adapters on the device at once (more are paged)")
    ap.add_argument("--rank", type=int, default=16, help="slot rank (larger adapters are refused)")
    ap.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache rows)")
    ap.add_argument("--max-model-len", type=int, default=256, help="prompt + completion tokens, at most")
    ap.add_argument("--prefill-chunk", type=int, default=16, help="at most this many prompts per prefill call")
    ap.add_argument("--form", default="auto", choices=["auto", "gather", "onehot", "ragged"])
    ap.add_argument("--mode", default="bank", choices=["bank", "loop"])
    ap.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle connection is kept")
    ap.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send its request")
    ap.add_argument("--max-connections", type=int, default=1024, help="more get 503")
    ap.add_argument("--no-warmup", action="store_true", help="compile on the first requests instead of at start")
    return ap


def read_adapters(specs: list[str], base: Any) -> dict[str, Any]:
    """``NAME=PATH`` specs to adapters; SystemExit with one line naming the first bad one."""
    out = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path or not Path(path).exists():
            raise SystemExit(f"serve.py: --adapter {spec!r}: " + ("no such file" if path else "give NAME=PATH"))
        try:
            ad = lorajax.read_adapter(path) if Path(path).is_file() else lorajax.adapter(lorajax.load_peft(path, base))
        except (OSError, ValueError) as e:
            raise SystemExit(f"serve.py: --adapter {spec!r}: {str(e).splitlines()[0]}") from None
        out[name] = ad
    return out


def build(argv: list[str] | None = None, adapters: dict[str, Any] | None = None) -> tuple[serve.Engine, Any, Any]:
    """The engine and app for ``argv`` (no socket); ``adapters`` (tests) replaces ``--adapter``/``--demo-adapters``."""
    args = parser().parse_args(argv)
    base, config = textlm.load_params(textlm.BASE_CHECKPOINT)
    if adapters is None and args.adapter:
        adapters = read_adapters(args.adapter, base)
    elif adapters is None:
        adapters = demo_adapters(base, args.demo_adapters, args.rank)
    engine = serve.Engine(
        cached_lm(config), base, adapters,
        slots=args.slots, rank=args.rank, max_batch=args.max_batch, max_model_len=args.max_model_len,
        prefill_chunk=args.prefill_chunk, form=args.form, mode=args.mode,
    )  # fmt: skip
    return engine, serve.create_app(engine), args


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    base, _ = textlm.load_params(textlm.BASE_CHECKPOINT)
    read_adapters(args.adapter, base)  # a bad --adapter ends here, before any compile
    try:
        sock = serve.bind(args.host, args.port)
    except OSError as e:
        raise SystemExit(f"serve.py: {e.strerror or e}") from None
    engine, app, _ = build(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = engine.names()
    print(f"serving base + {len(names)} adapters ({', '.join(names[:8])}{' ...' if len(names) > 8 else ''}) "
          f"on http://{args.host}:{sock.getsockname()[1]}/v1 ({engine.mode} mode, {args.slots} slots); "
          "Ctrl-C stops", flush=True)  # fmt: skip
    if not args.no_warmup:  # the socket listens already: requests arriving meanwhile wait in its backlog
        print(f"compiled the prefill and decode steps in {engine.warmup():.1f} s; ready", flush=True)
    serve.serve(app, sock, keep_alive=args.keep_alive, header_timeout=args.header_timeout,
                max_connections=args.max_connections)  # fmt: skip


if __name__ == "__main__":
    main()
