"""The factored path: run any JAX function on LoRA params without forming ``W`` or ``dW``.

Modules: ``_api`` (the :func:`factored` wrapper), ``_cache`` (its bounded trace cache),
``_interpreter`` (the jaxpr evaluator), ``_registry`` (primitive -> rule), ``_ref`` (the
symbolic kernel and its algebra), ``_products`` (the factored products the rules share), ``_views``,
``_consumers`` and ``_control`` (the rules), and ``_fusion`` (the sibling-fusion pre-pass). A new primitive
is supported by one function registered with :func:`register_rule`.

The package is private (``lorajax._factored``) so that ``lorajax.factored`` names one thing, the
function: a public subpackage of that name would shadow it for documentation tools.
"""

from lorajax._factored._api import FallbackWarning, factored
from lorajax._factored._registry import register_rule

__all__ = ["FallbackWarning", "factored", "register_rule"]
