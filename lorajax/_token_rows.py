"""trainable_tokens: declare the rows of embedding tables that train (PEFT's ``trainable_token_indices``).

The node itself, :class:`lorajax.TrainableTokens`, and the table it stands for are in ``lorajax/_tokens.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from lorajax import _boxes, _paths, _targets
from lorajax._problems import Problems
from lorajax._tokens import TrainableTokens, check_indices, rows_like
from lorajax._trainable import is_node

__all__ = ["trainable_tokens"]


def _table_leaves(leaves: list, module: str) -> list[int]:
    """Leaf numbers of the 2-D float arrays of the modules named ``module`` (PEFT's rule: a name or its suffix)."""
    names = [module.replace(".", "/")]
    out = []
    for n, (path, leaf) in enumerate(leaves):
        array = _boxes.unbox(leaf)
        if (
            is_node(leaf)
            or not hasattr(array, "shape")
            or len(array.shape) != 2
            or not jnp.issubdtype(array.dtype, jnp.floating)
        ):
            continue
        if _targets.module_matches(_paths.module_path(path), names):
            out.append(n)
    return out


def trainable_tokens(params: Any, tokens: Mapping[str, Sequence[int]], *, caller: str = "trainable_tokens") -> Any:
    """Train the rows ``tokens[module]`` of each named embedding table, and nothing else of it.

    Each table becomes a :class:`TrainableTokens` node whose ``values`` start as the table's rows, so
    ``merge`` gives the base back until they train. ``lorafy(..., trainable_tokens=...)`` does the same in
    one call. PEFT's ``trainable_token_indices``: :func:`lorajax.save_peft` writes these nodes in its format
    and :func:`lorajax.load_peft` reads them.

    Args:
        params: a pytree (lorafied or not).
        tokens: ``{module name: [row indices]}``; a module name matches as in ``lorafy``'s module lists
            (the name or a suffix of the module's path, ``.`` or ``/``) and must name one 2-D table
            (``embedding``, ``weight``), rows on axis 0.

    Returns:
        ``params`` with a :class:`TrainableTokens` node at each named table.

    Raises:
        ValueError: listing every name that matches no table or several, every table that is already a
            lorajax node (a LoRA target, declared trainable), and every bad index list.

    Example:
        >>> import jax.numpy as jnp, lorajax
        >>> p = lorajax.trainable_tokens({"embed": {"embedding": jnp.zeros((8, 4))}}, {"embed": [5, 7]})
        >>> node = p["embed"]["embedding"]
        >>> node.values.shape, node.indices, lorajax.mask(p)["embed"]["embedding"].values
        ((2, 4), (5, 7), True)
    """
    problems = Problems(caller)
    if not isinstance(tokens, Mapping) or not tokens:
        raise ValueError(f"{caller}: trainable_tokens must be a dict {{module name: [row indices]}}, got {tokens!r}.")
    leaves = _paths.tree_paths(params, is_leaf=is_node)
    chosen: dict[int, Any] = {}
    for module, indices in tokens.items():
        hits = _table_leaves(leaves, str(module))
        node_hits = [
            _paths.path_str(p)
            for p, x in leaves
            if is_node(x) and _targets.module_matches(_paths.module_path(p), [str(module).replace(".", "/")])
        ]
        if node_hits and not hits:
            problems.add(f"{module!r} names {', '.join(node_hits)}, already a lorajax node (LoRA or trainable)")
            continue
        if len(hits) != 1:
            shown = ", ".join(_paths.path_str(leaves[n][0]) for n in hits)
            problems.add(f"{module!r} matches {'no 2-D table' if not hits else 'several tables: ' + shown}")
            continue
        (n,) = hits
        path, leaf = leaves[n]
        table = _boxes.unbox(leaf)
        why = check_indices(indices, int(table.shape[0]), _paths.path_str(path))
        if why:
            problems.add(why)
            continue
        idx = tuple(int(i) for i in indices)
        chosen[n] = TrainableTokens(leaf, rows_like(leaf, table[jnp.asarray(idx, jnp.int32)]), idx)
    problems.raise_if_any(
        "cannot make these token rows trainable",
        "Name each embedding table once by its module (e.g. {'embed_tokens': [ids]}); a table that is a LoRA target "
        "cannot also train rows (PEFT's trainable tokens wrap the plain table).",
    )
    return _paths.rebuild(params, leaves, chosen, is_node)
