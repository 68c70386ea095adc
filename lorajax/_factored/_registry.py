"""The primitive -> rule table of the factored interpreter, as JAX's own interpreters dispatch.

A rule runs an equation one of whose inputs is a :class:`~lorajax._factored._ref.KernelRef`.
It returns the equation's outputs (a list, a ``KernelRef`` where the output is still a view of
the kernel), or ``None`` when it cannot factor this use: the interpreter then forms ``W`` for it
and warns. Supporting a new primitive is one function::

    @register_rule("my_primitive")
    def my_rule(interp, eqn, invals):
        ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: ``rule(interp, eqn, invals)``: ``interp`` is the running :class:`~lorajax._factored._interpreter.Interpreter`
#: (typed ``Any`` here: the registry sits below the interpreter and the rules, and imports neither).
Rule = Callable[[Any, Any, list], "list | None"]

RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule for the primitives ``names``.

    >>> @register_rule("doc_example_p")
    ... def rule(interp, eqn, invals):
    ...     return None
    >>> RULES.pop("doc_example_p") is rule
    True
    """

    def add(rule: Rule) -> Rule:
        for name in names:
            if name in RULES:
                raise ValueError(f"lorajax.factored: a rule for primitive {name!r} is already registered.")
            RULES[name] = rule
        return rule

    return add


def rule_for(name: str) -> Rule | None:
    """The rule registered for primitive ``name``, if any."""
    return RULES.get(name)
