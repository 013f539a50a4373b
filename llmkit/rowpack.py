"""Token-classification training batches packed into fewer rows: the same sentences, less padded attention.

NER trains on random batches (length-grouped ones cost it accuracy: README, NER accuracy), so a batch of 32 tweets
is padded to its longest: 1.85 positions per real token on WNUT-17. `unpad.py` takes the padding out of every
per-token matmul, but attention's scores, softmax and dropout stay [rows, heads, width, width]. Here, in training,
a forward pre-hook on the token classifier puts the batch's sentences side by side in as few rows of the same width
as fit (first-fit, longest first: 32 random WNUT-17 rows fit in ~21), each sentence's position ids starting at 0
again, and a pre-hook on its encoder hands the attention a block-diagonal mask in place of the padding mask: a
token attends to its own sentence's tokens only, as before. Input ids, labels and token types move with their
tokens, so the loss reads the same labels from the same per-sentence computation: the same loss and gradients
(tested), in the same optimizer step (dropout draws its masks over the new layout, so runs differ as reseeded ones
do). The logits of a packed step come out in the packed layout, which training never reads (evaluation and
prediction run in eval mode, unpacked).

Only where that holds and pays: a BERT or ELECTRA token classifier (absolute positions from 0: RoBERTa's start
after its padding index), eager or SDPA attention (whose masks can be block-diagonal), in training with labels,
right padding, on a CPU, when packing saves rows; not with a teacher (distillation compares the student's logits
position by position) or where `unpad.py`'s hooks are off (`model.skip_positions: false`).
"""

from __future__ import annotations

from typing import Any

PACKABLE = {"BertForTokenClassification", "ElectraForTokenClassification"}


class _Packed:
    """The batch now in the model, if it was packed: its encoder takes the block-diagonal mask."""

    positions: Any = None  # the position ids the packer made for the batch now in the model; None: not packed


def pack_rows(model: Any) -> bool:
    """Install the two hooks on a token classifier; returns whether it applies (see the module's docstring)."""
    from llmkit.unpad import encoder_layers

    found = encoder_layers(model)
    if found is None or type(found[0]).__name__ not in PACKABLE:
        return False
    base, encoder_model, _ = found
    config = base.config
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    state = _Packed()
    base.register_forward_pre_hook(_packer(state), with_kwargs=True, prepend=True)  # before unpad.py reads labels
    encoder_model.register_forward_pre_hook(_masker(state, config), with_kwargs=True)
    return True


def plan(lengths: list[int], width: int) -> list[list[int]]:
    """Rows of sentences: first-fit, longest first, each row at most `width` tokens (the batch's longest)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[j].append(i)
            room[j] -= lengths[i]
    return rows


def _packer(state: _Packed) -> Any:
    def pack(module: Any, args: tuple, kwargs: dict) -> Any:
        state.positions = None
        ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
        if args or not module.training or ids is None or labels is None or mask is None or mask.dim() != 2:
            return None
        if ids.device.type != "cpu" or kwargs.get("position_ids") is not None or labels.shape != ids.shape:
            return None
        import torch

        counts, width = mask.ne(0).sum(1), ids.shape[1]
        if not bool((mask.bool() == (torch.arange(width) < counts[:, None])).all()):
            return None  # left padding, or holes: not this layout
        lengths = counts.tolist()
        rows = plan(lengths, width)
        if len(rows) == len(lengths):
            return None
        source, positions = _layout(rows, lengths, width)
        real = source >= 0
        flat = source.clamp(min=0).reshape(-1)

        def moved(t: Any, fill: int) -> Any:
            return t.reshape(-1)[flat].reshape(source.shape).masked_fill(~real, fill)

        pad = int(ids[mask == 0][0])
        kwargs.update(input_ids=moved(ids, pad), attention_mask=real.to(mask.dtype), labels=moved(labels, -100))
        kwargs["position_ids"] = state.positions = positions
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = moved(kwargs["token_type_ids"], 0)
        return args, kwargs

    return pack


def _layout(rows: list[list[int]], lengths: list[int], width: int) -> tuple[Any, Any]:
    """For each packed position, its flat index in the padded batch (-1: padding), and its position id: each
    sentence's from 0, and the padding after the last one a segment of its own (also from 0)."""
    import torch

    source = torch.full((len(rows), width), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            source[r, start : start + n] = torch.arange(i * width, i * width + n)
            positions[r, start : start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)
    return source, positions


def _masker(state: _Packed, config: Any) -> Any:
    def block_diagonal(module: Any, args: tuple, kwargs: dict) -> Any:
        positions, state.positions = state.positions, None
        if positions is None or kwargs.get("position_ids") is not positions:
            return None
        import torch

        segment = (positions == 0).cumsum(1)
        same = (segment[:, :, None] == segment[:, None, :])[:, None]  # [rows, 1, width, width]
        if config._attn_implementation == "sdpa":
            kwargs["attention_mask"] = same
        else:  # eager adds it to the scores, as transformers' own padding mask
            dtype = module.get_input_embeddings().weight.dtype  # the embeddings' output, as transformers takes it:
            if getattr(module, "embeddings_project", None) is not None and torch.is_autocast_enabled("cpu"):
                dtype = torch.get_autocast_dtype("cpu")  # ELECTRA's projection to the hidden size ran under autocast
            kwargs["attention_mask"] = torch.zeros(same.shape, dtype=dtype).masked_fill_(~same, torch.finfo(dtype).min)
        return args, kwargs

    return block_diagonal
