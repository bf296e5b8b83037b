"""Parameters per module of a GPT, as the compact table rank 0 prints when training starts.

Rows: the token embeddings (which are also the output projection: weight tying), the
position embeddings, each block's attention, MLP and layer norms, the final layer norm,
and the total. Consecutive blocks of the same size share one row ("h.0-11 attn, 12 x
2,362,368"), so GPT-2 XL's 48 blocks take three rows, not 144. Each parameter tensor is
counted once, so the rows add up to the total and the total to
`sum(p.numel() for p in model.parameters())`.
"""

from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.(attn|mlp|ln_1|ln_2)\.")
_BLOCK_PARTS = {"attn": "attn", "mlp": "mlp", "ln_1": "ln_1+ln_2", "ln_2": "ln_1+ln_2"}
_NAMED = {
    "transformer.wte.": "wte (tokens)",
    "transformer.wpe.": "wpe (positions)",
    "transformer.ln_f.": "ln_f",
    "lm_head.": "lm_head",
}


def parameter_rows(model: nn.Module) -> list[tuple[str, int]]:
    """(label, parameters) per row of the table, the total last. Shared tensors (the tied
    embedding) count once, under the first module that holds them."""
    top: dict[str, int] = defaultdict(int)
    blocks: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, p in model.named_parameters():  # yields a shared tensor once
        if match := _BLOCK_RE.match(name):
            blocks[int(match.group(1))][_BLOCK_PARTS[match.group(2)]] += p.numel()
            continue
        label = next((v for k, v in _NAMED.items() if name.startswith(k)), None)
        top[label or name.rsplit(".", 1)[0]] += p.numel()

    rows: list[tuple[str, int]] = []
    for label in ("wte (tokens)", "wpe (positions)"):
        if label in top:
            rows.append((label, top.pop(label)))
    rows.extend(_block_rows(blocks))
    if "ln_f" in top:
        rows.append(("ln_f", top.pop("ln_f")))
    rows.extend(sorted(top.items()))
    if _tied(model):
        rows.append(("lm_head (tied to wte)", 0))  # its weight is counted in wte
    rows.append(("total", sum(p.numel() for p in model.parameters())))
    return rows


def format_table(model: nn.Module) -> str:
    """The rows as aligned text: label, parameters, share of the total."""
    rows = parameter_rows(model)
    total = rows[-1][1] or 1
    width = max(len(label) for label, _ in rows)
    digits = max(len(f"{n:,}") for _, n in rows)
    lines = [f"[raygpt] parameters by module ({_short(total)} in all):"]
    for label, n in rows:
        lines.append(f"  {label:<{width}}  {n:>{digits},}  {100 * n / total:5.1f}%")
    return "\n".join(lines)


def _block_rows(blocks: dict[int, dict[str, int]]) -> list[tuple[str, int]]:
    """One row per block part, consecutive blocks of equal sizes merged into one."""
    runs: list[tuple[int, int, dict[str, int]]] = []  # (first, last, sizes)
    for index in sorted(blocks):
        sizes = dict(blocks[index])
        if runs and runs[-1][1] == index - 1 and runs[-1][2] == sizes:
            runs[-1] = (runs[-1][0], index, sizes)
        else:
            runs.append((index, index, sizes))
    rows = []
    for first, last, sizes in runs:
        count = last - first + 1
        where = f"h.{first}" if count == 1 else f"h.{first}-{last}"
        for part in ("attn", "mlp", "ln_1+ln_2"):
            if part in sizes:
                each = f", {count} x {sizes[part]:,}" if count > 1 else ""
                rows.append((f"{where} {part}{each}", count * sizes[part]))
    return rows


def _tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    return head is not None and wte is not None and head.weight is wte.weight


def _short(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)
