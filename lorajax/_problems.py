"""One way to report many problems at once: every mismatch in one error, named by path."""

from __future__ import annotations


class Problems:
    """Collects the problems of one call and raises them together.

    Errors that list every problem at once let a user fix a whole model in one
    run instead of one kernel per run.

    >>> p = Problems("attach")
    >>> p.add("shape: q/kernel: expected (4, 4)")
    >>> try:
    ...     p.raise_if_any("the adapter does not fit", "Attach it to its own base.")
    ... except ValueError as e:
    ...     print(e)
    attach: the adapter does not fit (1 problem):
      - shape: q/kernel: expected (4, 4)
    Attach it to its own base.
    """

    def __init__(self, caller: str) -> None:
        self.caller = caller
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def extend(self, messages: list[str]) -> None:
        self.items.extend(messages)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, what: str, hint: str = "", error: type[Exception] = ValueError) -> None:
        """Raise ``error`` listing every problem, prefixed by the caller's name, if there are any."""
        if not self.items:
            return
        n = len(self.items)
        lines = "\n".join(f"  - {p}" for p in self.items)
        tail = f"\n{hint}" if hint else ""
        raise error(f"{self.caller}: {what} ({n} problem{'s' * (n > 1)}):\n{lines}{tail}")
