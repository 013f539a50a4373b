"""Encoder layers that skip padding: a BERT-family encoder's per-token blocks run on the batch's real tokens only.

A fine-tuning batch is padded to its longest row: a random batch of 32 WNUT-17 tweets (MiniLM tokens) holds 1.85
positions per real token. Attention's scores need the padded [rows, width] layout, but every matmul around them
works token by token: the query, key and value projections, the attention output block (dense, dropout, residual,
LayerNorm) and the feed-forward block, all 12 of a layer's hidden x hidden matmuls. Forward pre-hooks on those
blocks gather the real tokens of their inputs into one [1, tokens, hidden] row (a layer's input once, for its
four users; the count rounded up to one of a few sizes with padding positions, `packed_size`); forward hooks
scatter the projections' and the layer's outputs back to [rows, width, ...], zeros at the padding left out.
Padded positions never reach a real one (the attention mask hides them as keys; their labels are ignored; batches
padded on the left are left alone, as a classifier reads position 0), so the outputs at real positions, the loss
and the gradients are unchanged for the same dropout masks (tested; dropout now draws them over the gathered rows
only); the model's code, weights and state dict are untouched. Where the batch has no padding the hooks do
nothing.
"""

from __future__ import annotations

from typing import Any

# Encoders whose layers are BERT's: layer.attention.output(context, residual) then the feed-forward block.
ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}


class _RealTokens:
    """One model's current batch: the flat indices of its real positions (None: no padding) and its shape."""

    index: Any = None
    shape: tuple = ()
    last: tuple = ()  # (padded tensor, its gathered tokens) pairs: the last two gathered


def wanted(recipe: Any) -> bool:
    """Whether a run's model should skip padding: not with distillation's hidden-state loss (it compares hidden
    states at padded positions too), under torch.compile (a compiled graph wants fixed shapes, not gathers) or
    under nn.DataParallel (several GPUs in one process: its replicas would share the hooks' state across threads)."""
    if recipe.distill is not None and recipe.distill.hidden_loss:
        return False
    args = getattr(recipe, "args", None)
    return not (args is not None and (getattr(args, "torch_compile", False) or getattr(args, "n_gpu", 1) > 1))


def encoder_layers(model: Any) -> tuple[Any, Any, Any] | None:
    """(the model under any PEFT wrapper, its encoder model, the encoder's layers), or None where the layers are
    not an encoder's whose feed-forward runs per token over the whole sequence (decoders, cross-attention, a
    chunked feed-forward, no `encoder.layer`). Classification's first-token hook reads the same layers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None
    if getattr(config, "chunk_size_feed_forward", 0):
        return None
    layers = getattr(getattr(base.base_model, "encoder", None), "layer", None)
    return (base, base.base_model, layers) if layers else None


def skip_padding(model: Any) -> bool:
    """Install the hooks on a BERT-family encoder (not decoders, cross-attention or a chunked feed-forward).
    A layer whose attention output already runs at the first token only (classification's last layer) is left
    to that hook. Returns whether it applies; a second call installs nothing more."""
    found = encoder_layers(model)
    if found is None or getattr(found[0].config, "model_type", None) not in ENCODERS:
        return False
    _, encoder_model, layers = found
    blocks = [getattr(getattr(layer, "attention", None), "output", None) for layer in layers]
    if any(b is None for b in blocks):
        return False
    if getattr(encoder_model, "_llmkit_skips_padding", False):
        return True
    batch = _RealTokens()
    encoder_model.register_forward_pre_hook(_reader(batch), with_kwargs=True)
    for layer, block in zip(layers, blocks, strict=True):
        # The gathered layer input is reused within one attention block only: under gradient checkpointing the
        # block runs again in the backward pass, and must gather (and save for its backward) exactly as before.
        layer.attention.register_forward_pre_hook(_forget(batch))
        for projection in _projections(layer):
            projection.register_forward_pre_hook(_gather(batch, projection))
            projection.register_forward_hook(_scatter(batch, projection))
        if not getattr(block, "_llmkit_first_token", False):
            block.register_forward_pre_hook(_gather(batch, layer))
            layer.register_forward_hook(_scatter(batch, layer, ends_layer=True))
    encoder_model._llmkit_skips_padding = True
    return True


def _projections(layer: Any) -> list:
    attention = getattr(getattr(layer, "attention", None), "self", None)
    found = [getattr(attention, name, None) for name in ("query", "key", "value")]
    return found if all(p is not None for p in found) else []


def _reader(batch: _RealTokens) -> Any:
    def read_mask(module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        batch.index, batch.last = None, ()
        if mask is None or getattr(mask, "dim", lambda: 0)() != 2:
            return
        real = mask.reshape(-1).ne(0)
        # Right padding only: with left padding position 0 (a classifier's token) is padding in the short rows.
        if bool(real.all()) or not bool(mask[:, 0].ne(0).all()):
            return
        count = int(real.sum())
        extra = packed_size(count) - count
        if count + extra >= real.numel():  # as many rows as the padded batch: nothing to skip
            return
        real[(~real).nonzero().squeeze(1)[:extra]] = True  # padding positions that ride along (see packed_size)
        batch.index, batch.shape = real.nonzero().squeeze(1), tuple(mask.shape)

    return read_mask


def packed_size(tokens: int) -> int:
    """How many rows the gathered tokens take: the count rounded up to 16 sizes per doubling (multiples of 8 at
    least, so 470 -> 480, 1,000 -> 1,024), filled with padding positions, whose outputs no real position reads.

    Exactly the real tokens would give every batch matmuls of a shape never seen before: oneDNN JIT-compiles a
    kernel for each new shape (a 500 x 384 x 1536 product ran 15-30% slower per row when its row count was new),
    and glibc's heap fragments over ever new block sizes. The rounding adds fewer than max(8, tokens / 16) rows."""
    granule = max(8, 1 << max(0, tokens.bit_length() - 5))
    return -(-tokens // granule) * granule


def _forget(batch: _RealTokens) -> Any:
    def forget(module: Any, args: tuple) -> None:
        batch.last = ()

    return forget


def _pack(batch: _RealTokens, a: Any) -> Any:
    """[rows, width, d] -> [1, tokens, d]. A layer's input feeds four blocks (query, key, value and the residual
    of the attention's output block): gathered once."""
    for seen, packed in batch.last:
        if seen is a:
            return packed
    packed = a.reshape(-1, a.shape[-1]).index_select(0, batch.index).unsqueeze(0)
    batch.last = ((a, packed), *batch.last[:1])  # the layer input stays while its attention's context comes by
    return packed


def _gather(batch: _RealTokens, owner: Any) -> Any:
    def gather(module: Any, args: tuple) -> Any:
        owner._llmkit_packed = False
        if batch.index is None or not args or any(a.dim() != 3 or a.shape[:2] != batch.shape for a in args):
            return None
        owner._llmkit_packed = True
        return tuple(_pack(batch, a) for a in args)

    return gather


def _scatter(batch: _RealTokens, owner: Any, ends_layer: bool = False) -> Any:
    import torch

    def scatter(module: Any, args: tuple, output: Any) -> Any:
        if not getattr(owner, "_llmkit_packed", False) or not isinstance(output, torch.Tensor):
            return None
        owner._llmkit_packed = False
        if ends_layer:  # its gathered tensors are done with
            batch.last = ()
        rows, width = batch.shape
        flat = output.new_zeros(rows * width, output.shape[-1])
        return flat.index_copy(0, batch.index, output[0]).view(rows, width, -1)

    return scatter
