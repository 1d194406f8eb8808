"""Length buckets: one padded batch split into a few sub-batches of similar token length.

A training step encodes rows of very different lengths in one call (image-only queries of ~22
tokens beside product rows of up to ~60), and right padding makes every row as long as the
longest: about half the decoder's tokens are padding. Encoding rows in a few calls grouped by
length computes the same embeddings (with right padding a causal decoder's real tokens never
see the pads) on far fewer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PIXEL_KEYS = ("pixel_values", "image_grid_thw")
POSITION_KEY = "position_ids"

CALL_COST_TOKENS = 256
"""What one more backbone call costs, in padded tokens (its fixed overhead on a CPU step)."""


def plan_buckets(
    lengths: Sequence[int], max_buckets: int, call_cost: int = CALL_COST_TOKENS
) -> list[list[int]]:
    """Rows grouped into at most ``max_buckets`` groups of similar length, minimising the padded
    token count plus ``call_cost`` tokens per group (what one more forward call costs). Groups
    are listed shortest first; each lists its rows in their original order."""
    if max_buckets < 1:
        raise ValueError("max_buckets must be >= 1")
    rows = list(range(len(lengths)))
    if max_buckets == 1 or len(rows) < 2:
        return [rows] if rows else []
    distinct = sorted(set(lengths))
    count = [0] * len(distinct)
    where = {length: i for i, length in enumerate(distinct)}
    for length in lengths:
        count[where[length]] += 1
    prefix = [0]
    for c in count:
        prefix.append(prefix[-1] + c)
    n = len(distinct)

    def cost(first: int, last: int) -> int:  # one group spanning distinct lengths first..last
        return (prefix[last + 1] - prefix[first]) * distinct[last] + call_cost

    # exact[g][j]: cheapest cover of distinct lengths 0..j by exactly g + 1 groups
    exact = [[cost(0, j) for j in range(n)]]
    cut: list[list[int]] = [[-1] * n]
    for _ in range(1, min(max_buckets, n)):
        previous, row, row_cut = exact[-1], [], []
        for j in range(n):
            options = [(previous[i] + cost(i + 1, j), i) for i in range(j)]
            choice, split = min(options) if options else (float("inf"), -1)
            row.append(choice)
            row_cut.append(split)
        exact.append(row)
        cut.append(row_cut)
    level = min(range(len(exact)), key=lambda g: exact[g][n - 1])
    bounds, j = [], n - 1
    while level >= 0:
        split = cut[level][j]
        bounds.append((split + 1, j))
        j, level = split, level - 1
    groups = []
    for first, last in reversed(bounds):
        low, high = distinct[first], distinct[last]
        groups.append([r for r in rows if low <= lengths[r] <= high])
    return groups


def images_per_row(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor, image_token_id: int, merge: int
) -> list[int]:
    """How many images each row holds, from its image placeholder tokens (a Qwen2-VL image of
    grid t x h x w stands for t*h*w / merge^2 tokens; images follow row order)."""
    tokens_per_image = (image_grid_thw.prod(-1) // (merge * merge)).tolist()
    per_row = (input_ids == image_token_id).sum(-1).tolist()
    counts, image = [], 0
    for tokens in per_row:
        start = image
        while tokens > 0:
            if image >= len(tokens_per_image):
                raise ValueError("more image tokens than images in the batch")
            tokens -= tokens_per_image[image]
            image += 1
        if tokens != 0:
            raise ValueError("a row's image tokens do not add up to whole images")
        counts.append(image - start)
    if image != len(tokens_per_image):
        raise ValueError("images left over after the rows' image tokens")
    return counts


def take_rows(
    inputs: dict[str, torch.Tensor], rows: list[int], image_counts: list[int] | None
) -> dict[str, torch.Tensor]:
    """The sub-batch of ``rows`` (in that order), trimmed to its longest row; the rows' images
    (``pixel_values`` patches and ``image_grid_thw``) go with them."""
    mask = inputs["attention_mask"]
    batch, width = mask.shape
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    length = int(mask.index_select(0, index).sum(-1).max()) if rows else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in inputs.items():
        if key in PIXEL_KEYS:
            continue
        if key == POSITION_KEY:  # multimodal RoPE positions [3, B, L]
            out[key] = value.index_select(1, index)[:, :, :length]
            continue
        if value.dim() >= 2 and value.shape[0] == batch and value.shape[1] == width:
            out[key] = value.index_select(0, index)[:, :length]
        elif value.dim() >= 1 and value.shape[0] == batch:
            out[key] = value.index_select(0, index)
        else:
            raise ValueError(f"cannot split input {key!r} of shape {tuple(value.shape)} by rows")
    grid = inputs.get("image_grid_thw")
    if grid is not None and image_counts is not None:
        images = images_of_rows(image_counts, rows)
        if images:
            out["image_grid_thw"] = grid[images]
            if "pixel_values" in inputs:
                patches = grid.prod(-1)
                first_patch = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).tolist()
                patch_index = torch.cat(
                    [torch.arange(first_patch[i], first_patch[i + 1]) for i in images]
                ).to(inputs["pixel_values"].device)
                out["pixel_values"] = inputs["pixel_values"].index_select(0, patch_index)
    return out


def images_of_rows(image_counts: list[int], rows: list[int]) -> list[int]:
    """Indices of the images that belong to ``rows`` (in that order), given each row's image
    count (images follow row order)."""
    first_image = [0]
    for count in image_counts:
        first_image.append(first_image[-1] + count)
    return [i for r in rows for i in range(first_image[r], first_image[r + 1])]


def splittable(inputs: dict[str, torch.Tensor]) -> bool:
    """True when every input is a per-row tensor or a Qwen2-VL image tensor."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return False
    if ("pixel_values" in inputs) != ("image_grid_thw" in inputs):
        return False
    batch = mask.shape[0]
    return all(
        key in PIXEL_KEYS
        or (value.dim() >= 1 and value.shape[0] == batch)
        or (key == POSITION_KEY and value.dim() == 3 and value.shape[1] == batch)
        for key, value in inputs.items()
    )


def mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    merge: int,
) -> torch.Tensor:
    """Qwen2-VL's multimodal RoPE positions [3, B, L] (temporal, height, width) of a batch of
    image and text rows, as ``get_rope_index`` computes them row by row in Python (~90 us a
    row, ~11 ms of a CPU training step), in a few tensor operations: a text token's three
    positions are the count of tokens before it, an image's tokens sit on its (t, h, w) grid
    from there, and an image advances the count by max(h, w); padding gets 0."""
    mask = attention_mask.bool()
    is_image = (input_ids == image_token_id) & mask
    advance = (mask & ~is_image).long()
    image_flat = is_image.flatten().nonzero().squeeze(1)
    within = None  # each image token's (t, h, w) place on its image's grid
    if len(image_flat):
        if image_grid_thw is None:
            raise ValueError("image tokens without image_grid_thw")
        grid = image_grid_thw.to(input_ids.device).long()
        frames, height, width = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge
        tokens = frames * height * width
        if int(tokens.sum()) != len(image_flat):
            raise ValueError("the image tokens do not add up to the images' grids")
        first = torch.cumsum(tokens, 0) - tokens
        image = torch.repeat_interleave(torch.arange(len(tokens), device=grid.device), tokens)
        index = torch.arange(len(image_flat), device=grid.device) - first[image]
        area, rows, row_width = (height * width)[image], height[image], width[image]
        within = torch.stack([index // area, (index // row_width) % rows, index % row_width])
        last_token = image_flat[first + tokens - 1]
        advance.view(-1).index_add_(0, last_token, torch.maximum(height, width))
    start = (advance.cumsum(-1) - advance).unsqueeze(0).repeat(3, 1, 1)
    if within is not None:
        start.view(3, -1)[:, image_flat] += within
    return start * mask
