"""One forward's input in compact form: the placeholders of ``input_ids`` replaced by each
item's compact tokens (``compact_chunk``), the virtual slots VTU attends over (``virtual_block``)
and, for multi-row RoPE, their positions (``chunk_rope``, ``compact_rope``). Nothing here knows a
family: the family's items and positions come in as arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..vtu import VirtualLayout, VTUTrack
from .cache import GenerationState
from .family import VLMFamily
from .tokens import ImageTokens

Media = tuple[str, str, list[ImageTokens], bool]  # (kind, its placeholder as written, the items, may span runs)


@dataclass
class Chunk:
    """The compact form of one forward's input_ids (B, L): embeds (B, P, D) and mask (B, P),
    left-padded; slots: per row, the compact row (0..P-1) of each of its virtual slots, in order;
    rows: (B, L) the compact row standing at every input position; accounting per row; extras:
    (B, P, k, D) the items' ``ImageTokens.extras`` at their compact rows (zeros elsewhere) and
    visual: (B, P) bool, the rows that hold them, when some item has extras (else None)."""

    embeds: Tensor
    mask: Tensor
    slots: list[Tensor]
    rows: Tensor
    accounting: list[dict[str, Any]]
    extras: Optional[Tensor] = None
    visual: Optional[Tensor] = None


def runs_of(flags: Tensor) -> list[tuple[int, int]]:
    """[begin, end) of every run of True in a 1-D bool tensor."""
    edges = torch.diff(torch.cat([flags.new_zeros(1), flags, flags.new_zeros(1)]).long())
    return list(zip(edges.eq(1).nonzero().squeeze(1).tolist(), edges.eq(-1).nonzero().squeeze(1).tolist()))


class Placing:
    """An item being laid out over its placeholders (one run, or several with text between):
    ``done`` virtual positions so far; its compact rows, kept in order of their first virtual
    position, join the row's sequence as that position comes up (``row_of``: their row, -1 until
    then)."""

    def __init__(self, index: int, image: ImageTokens):
        self.index, self.image, self.done = index, image, 0
        n = len(image.features)
        positions = torch.arange(len(image.mapping), device=image.mapping.device)
        self.firsts = torch.full((n,), len(image.mapping), device=positions.device).scatter_reduce(
            0, image.mapping, positions, reduce="amin")  # ascending: the rows are in slot order
        self.row_of = torch.full((n,), -1, dtype=torch.long, device=positions.device)


class RowBuilder:
    """One prompt row's compact sequence as it is built: features, the compact row of every
    virtual slot, and (first row, extras) of the items that carry extras."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.feats: list[Tensor] = []
        self.slots: list[Tensor] = []
        self.placed: list[tuple[int, Tensor]] = []
        self.n = 0

    def add_text(self, embeds: Tensor) -> Tensor:
        """Text tokens, one compact row and one slot each; returns their rows."""
        new = self.n + torch.arange(len(embeds), device=self.device)
        self.feats.append(embeds)
        self.slots.append(new)
        self.n += len(embeds)
        return new

    def add_positions(self, item: Placing, take: int) -> Tensor:
        """The item's next ``take`` virtual positions: the compact rows first seen there join the
        sequence, every position becomes a slot; returns the positions' rows."""
        start, stop = item.done, item.done + take
        r0, r1 = (int(x) for x in torch.searchsorted(item.firsts, torch.tensor([start, stop], device=item.firsts.device)))
        if r1 > r0:
            item.row_of[r0:r1] = self.n + torch.arange(r1 - r0, device=item.row_of.device)
            self.feats.append(item.image.features[r0:r1].to(self.device, self.dtype))
            if item.image.extras is not None:
                self.placed.append((self.n, item.image.extras[r0:r1]))
            self.n += r1 - r0
        part = item.row_of[item.image.mapping[start:stop]].to(self.device)
        self.slots.append(part)
        item.done = stop
        return part


def compact_chunk(model: nn.Module, input_ids: Tensor, mask: Tensor, media: dict[int, Media]) -> Chunk:
    """Replace the placeholders of input_ids (B, L) by compact tokens: ``media`` maps a
    placeholder id to (kind, its placeholder as written in prompts, the items' ``ImageTokens``,
    whether an item's placeholders may come in several runs with text between them -- a video's
    frames between timestamps); placeholders of ids not in ``media`` are ordinary tokens.

    Items are assigned to their placeholders as HF does (row by row, left to right); each takes
    as many placeholders as it has virtual positions (the processor's expansion), or a single
    placeholder standing for all of them. Compact rows join the sequence at their first virtual
    position (in the run that holds it). Positions with mask 0 are dropped (padding)."""
    B, L = input_ids.shape
    device = input_ids.device
    text = model.get_input_embeddings()(input_ids)  # (B, L, D); placeholder rows are replaced
    feeds = {token: iter(enumerate(items)) for token, (_, _, items, _) in media.items()}
    rows_feats, rows_slots, rows_extras, accounting = [], [], [], []
    rows = torch.zeros((B, L), dtype=torch.long, device=device)
    for b in range(B):
        valid = mask[b].bool()
        placeholders = {token: (input_ids[b] == token) & valid for token in media}
        is_image = torch.stack(list(placeholders.values())).any(0) if placeholders else torch.zeros_like(valid)
        runs = sorted((begin, end, token) for token, flags in placeholders.items() for begin, end in runs_of(flags))
        row = RowBuilder(text.dtype, device)
        acc = row_accounting()
        unfinished: dict[int, Placing] = {}  # token -> an item whose placeholders continue in a later run
        cursor = 0
        for begin, end, token in runs + [(L, L, None)]:
            between = (valid[cursor:begin] & ~is_image[cursor:begin]).nonzero().squeeze(1) + cursor
            rows[b, between] = row.add_text(text[b, between])
            acc["text_tokens"] += len(between)
            p = begin
            while p < end:
                kind, written, items, spans = media[token]
                item = unfinished.pop(token, None)
                if item is None:
                    i, image = next(feeds[token], (None, None))
                    if image is None:
                        raise ValueError(f"{len(items)} {kind}s given but the prompts hold more {kind} placeholders; "
                                         f"give one {kind} per {written} in the prompts")
                    item = Placing(i, image.to(device))
                    acc["crop_tokens"] += image.crop_tokens
                    if image.tower_tokens is not None:
                        acc.setdefault("tower_tokens", []).append(image.tower_tokens)
                    acc["image_tokens"] += len(image.features)
                    acc["image_positions"] += len(image.mapping)
                V = len(item.image.mapping)
                if item.done == 0 and end - p == 1 and V != 1:  # one placeholder stands for the whole item
                    rows[b, p] = row.add_positions(item, V)[0]
                    p += 1
                    continue
                take = min(V - item.done, end - p)
                if take < V - item.done and not spans:
                    raise ValueError(f"{kind} {item.index} has {V} positions but only {end - p} {kind} placeholders "
                                     "are left where it goes; expand prompts with the model's own processor")
                rows[b, p:p + take] = row.add_positions(item, take)
                p += take
                if item.done < V:
                    unfinished[token] = item
            cursor = end
        for token, item in unfinished.items():
            kind = media[token][0]
            raise ValueError(f"{kind} {item.index} has {len(item.image.mapping)} positions but the prompt holds "
                             f"{item.done} {kind} placeholders for it; expand prompts with the model's own processor")
        acc["encoder_tokens"] = sum(acc["crop_tokens"])
        rows_feats.append(torch.cat(row.feats))
        rows_slots.append(torch.cat(row.slots))
        rows_extras.append(row.placed)
        accounting.append(acc)
    for token, (kind, written, items, _) in media.items():
        left = sum(1 for _ in feeds[token])
        if left:
            raise ValueError(f"{len(items)} {kind}s given but the prompts hold {kind} placeholders for "
                             f"{len(items) - left}; give one {kind} per {written} in the prompts")
    P = max(len(f) for f in rows_feats)
    embeds = text.new_zeros((B, P, text.shape[-1]))
    compact_mask = torch.zeros((B, P), dtype=torch.long, device=device)
    for b, f in enumerate(rows_feats):
        pad = P - len(f)
        embeds[b, pad:], compact_mask[b, pad:] = f, 1
        rows_slots[b] = rows_slots[b] + pad
        rows[b] = torch.where(mask[b].bool(), rows[b] + pad, P - 1)
    extras, visual = placed_extras(rows_extras, [P - len(f) for f in rows_feats], P, text)
    return Chunk(embeds, compact_mask, rows_slots, rows, accounting, extras, visual)


def placed_extras(rows_extras: list[list[tuple[int, Tensor]]], pads: list[int], P: int,
                  like: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Per row, the (first compact row, extras (n, k, D)) of its items, and its left padding ->
    extras (B, P, k, D) at those rows and the rows' mask (B, P); (None, None) when none has any."""
    found = [e for placed in rows_extras for _, e in placed]
    if not found:
        return None, None
    B, (k, D) = len(rows_extras), found[0].shape[1:]
    extras = like.new_zeros((B, P, k, D))
    visual = torch.zeros((B, P), dtype=torch.bool, device=like.device)
    for b, (placed, pad) in enumerate(zip(rows_extras, pads)):
        for first, e in placed:
            extras[b, pad + first:pad + first + len(e)] = e.to(like.device, like.dtype)
            visual[b, pad + first:pad + first + len(e)] = True
    return extras, visual


def plain_chunk(model: nn.Module, input_ids: Tensor) -> Chunk:
    """A chunk of text tokens with no padding (decode steps): compact = input."""
    B, L = input_ids.shape
    arange = torch.arange(L, device=input_ids.device)
    return Chunk(model.get_input_embeddings()(input_ids), torch.ones_like(input_ids), [arange] * B,
                 arange.expand(B, L), [row_accounting(L) for _ in range(B)])


def row_accounting(text_tokens: int = 0) -> dict[str, Any]:
    """One prompt row's accounting before its images are counted in."""
    return {"encoder_tokens": 0, "crop_tokens": [], "image_tokens": 0, "image_positions": 0, "text_tokens": text_tokens}


def virtual_block(chunk: Chunk, track: VTUTrack, first_row: int,
                  slot_rope: Optional[list[Tensor]] = None) -> VirtualLayout:
    """The chunk's virtual slots as a layout block: global compact rows (first_row + row),
    slot order continuing each row's sequence, left padding with invalid slots; slot_rope: per
    row, the (3, slots) M-RoPE positions of its slots (Qwen2-VL), else RoPE follows slot order."""
    B, device = len(chunk.slots), chunk.mask.device
    S = max(len(s) for s in chunk.slots)
    start = track.layout.next_positions() if track.layout.src.shape[1] else torch.zeros(B, dtype=torch.long,
                                                                                           device=device)
    src = torch.full((B, S), first_row, dtype=torch.long, device=device)
    pos = torch.zeros_like(src)
    valid = torch.zeros_like(src, dtype=torch.bool)
    rope = None if slot_rope is None else torch.zeros((3, B, S), dtype=torch.long, device=device)
    for b, slots in enumerate(chunk.slots):
        n = len(slots)
        src[b, S - n:] = first_row + slots
        pos[b, S - n:] = start[b] + torch.arange(n, device=device)
        valid[b, S - n:] = True
        if rope is not None:
            rope[:, b, S - n:] = slot_rope[b]
    return VirtualLayout(src, pos, valid, rope)


def chunk_rope(family: VLMFamily, model: nn.Module, gen: GenerationState, chunk: Chunk, input_ids: Tensor,
               mask: Tensor, arguments: dict[str, Any], plain: bool) -> Optional[list[Tensor]]:
    """Multi-row RoPE (M-RoPE): per row, the (3, slots) positions of the chunk's virtual slots
    (its valid input positions, numbered by the family as the unpatched model numbers them,
    continuing where the row left off); advances ``gen.next_rope`` to one past each row's
    largest position. None for a family whose RoPE follows the slot order."""
    B, L = input_ids.shape
    start = gen.next_rope if gen.next_rope is not None else torch.zeros(B, dtype=torch.long, device=input_ids.device)
    if plain and gen.next_rope is not None:  # decode steps: no padding, no images; no per-row indexing (no host syncs)
        gen.next_rope = start + L
        return list((start[:, None] + torch.arange(L, device=input_ids.device))[None].expand(3, B, L).unbind(1))
    rope = family.positions(model, input_ids, mask, start, arguments)
    if rope is None:
        return None
    per_row = [rope[:, b, mask[b].bool()] for b in range(B)]
    for b, (r, slots) in enumerate(zip(per_row, chunk.slots)):
        if r.shape[1] != len(slots):
            raise ValueError(f"row {b}: {len(slots)} virtual slots but {r.shape[1]} input tokens; this model needs "
                             "every image's full run of placeholders (use the model's own processor)")
    gen.next_rope = torch.stack([r.amax() + 1 if r.numel() else s for r, s in zip(per_row, start)])
    return per_row


def compact_rope(chunk: Chunk, slot_rope: list[Tensor]) -> Tensor:
    """(3, B, P) M-RoPE position of every compact row of the chunk without VTU ("compact" and
    "full" modes): the position of its first virtual slot (with no merging, its own position:
    vanilla). Padding rows get 0."""
    B, P = chunk.mask.shape
    out = torch.zeros((3, B, P), dtype=torch.long, device=chunk.mask.device)
    for b, (slots, rope) in enumerate(zip(chunk.slots, slot_rope)):
        n = len(slots)
        first = torch.full((P,), n, dtype=torch.long, device=slots.device)
        first = first.scatter_reduce(0, slots, torch.arange(n, device=slots.device), reduce="amin")
        used = first < n
        out[:, b, used] = rope[:, first[used]].to(out.device)
    return out
