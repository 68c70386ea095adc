"""An OpenAI-compatible multi-adapter server (``pip install "lorajax[serve]"``: Starlette on uvicorn).

One concept per module: the request text stream (``_text``), adapter paging over slots (``_pager``), the engine
with its KV cache and continuous batching (``_engine``), the OpenAI wire format (``_protocol``), the HTTP app
(``_app``) and running it on uvicorn (``_run``). ``examples/serve.py`` serves the demo model with it.
"""

from lorajax.serve._app import create_app, load_adapter_file
from lorajax.serve._engine import CachedLM, Engine, Request, pick, prefill_lengths, window
from lorajax.serve._pager import SlotPager
from lorajax.serve._protocol import ApiError, Completion, completion, parse_json
from lorajax.serve._run import Background, GuardedH11, bind, config, serve
from lorajax.serve._text import TextStream

__all__ = [
    "ApiError",
    "Background",
    "CachedLM",
    "Completion",
    "Engine",
    "GuardedH11",
    "Request",
    "SlotPager",
    "TextStream",
    "bind",
    "completion",
    "config",
    "create_app",
    "load_adapter_file",
    "parse_json",
    "pick",
    "prefill_lengths",
    "serve",
    "window",
]
