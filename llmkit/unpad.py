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
only); the model's code, weights and state dict are untouched. Where the batch has no padding (or is padded on
the left) these hooks do nothing.

A token classifier's last layer goes further when the batch has labels (`skip_padding(labelled_last_layer=True)`,
NER): its loss reads the positions labelled, not -100, alone (a word's first sub-token; not the continuation
pieces, [CLS], [SEP] or padding), so that layer's query projection, attention output block and feed-forward run at
those positions only (keys and values at every real token: the labelled ones attend to all); the logits elsewhere
are the head's bias. This holds with or without padding on either side; without labels (prediction), or with
nothing labelled, every real position is computed.
"""

from __future__ import annotations

from typing import Any

# Encoders whose layers are BERT's: layer.attention.output(context, residual) then the feed-forward block.
ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}


class _RealTokens:
    """One model's current batch: the flat indices of its real positions (None: no padding) and its shape."""

    index: Any = None
    shape: tuple = ()
    last: tuple = ()  # (padded tensor, index, its gathered tokens): the last three gathered
    labels: Any = None  # the labels the model was called with (a token classifier's, read before the encoder)
    labelled: Any = None  # the flat indices of the labelled positions, where the last layer runs on them alone


def positions_skipped(recipe: Any) -> bool:
    """`model.skip_positions`: the tasks' hooks that compute only where the loss reads (padding skipped here, MLM's
    head at masked positions, a classifier's last layer at its first token). False computes every position, as
    transformers does: on a GPU that waits on the host, gathers with data-dependent shapes can cost more than the
    arithmetic they save (README, On a CUDA GPU). Unset: on, except for a run on a TPU (XLA), whose compiled graphs
    want fixed shapes: every new gathered size there is a new compilation."""
    value = getattr(getattr(recipe, "model", None), "skip_positions", None)
    if value is not None:
        return bool(value)
    return not _on_xla(getattr(recipe, "args", None))


def _on_xla(args: Any) -> bool:
    """Whether this run trains on an XLA device (a TPU): torch_xla importable and not told to use the CPU."""
    if args is not None and getattr(args, "use_cpu", False):
        return False
    from transformers.utils import is_torch_xla_available

    return is_torch_xla_available()


def wanted(recipe: Any) -> bool:
    """Whether a run's model should skip padding: not under `model.skip_positions: false`, with distillation's
    hidden-state loss (it compares hidden states at padded positions too), under torch.compile (a compiled graph
    wants fixed shapes, not gathers) or under nn.DataParallel (several GPUs in one process: its replicas would
    share the hooks' state across threads)."""
    if not positions_skipped(recipe):
        return False
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


# Token classifiers whose loss is cross-entropy over the positions not labelled -100, from each position's own
# last hidden state (dropout, one linear layer): no other position of the last layer feeds the loss.
TOKEN_HEADS = {
    "BertForTokenClassification",
    "RobertaForTokenClassification",
    "XLMRobertaForTokenClassification",
    "CamembertForTokenClassification",
    "ElectraForTokenClassification",
}


def skip_padding(model: Any, labelled_last_layer: bool = False) -> bool:
    """Install the hooks on a BERT-family encoder (not decoders, cross-attention or a chunked feed-forward).
    A layer whose attention output already runs at the first token only (classification's last layer) is left
    to that hook; with `labelled_last_layer` a token classifier's last layer runs at the labelled positions when
    the batch has labels. Returns whether it applies; a second call installs nothing more."""
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
    labelled = labelled_last_layer and type(found[0]).__name__ in TOKEN_HEADS
    if labelled:
        found[0].register_forward_pre_hook(_label_reader(batch), with_kwargs=True)
    encoder_model.register_forward_pre_hook(_reader(batch), with_kwargs=True)

    def real() -> Any:
        return batch.index

    def at_labels() -> Any:  # the last layer's query, attention output and feed-forward, where labels are known
        return batch.index if batch.labelled is None else batch.labelled

    for i, (layer, block) in enumerate(zip(layers, blocks, strict=True)):
        rows = at_labels if labelled and i == len(layers) - 1 else real
        # The gathered layer input is reused within one attention block only: under gradient checkpointing the
        # block runs again in the backward pass, and must gather (and save for its backward) exactly as before.
        layer.attention.register_forward_pre_hook(_forget(batch))
        for j, projection in enumerate(_projections(layer)):  # query, key, value
            projection.register_forward_pre_hook(_gather(batch, projection, rows if j == 0 else real))
            projection.register_forward_hook(_scatter(batch, projection))
        if not getattr(block, "_llmkit_first_token", False):
            block.register_forward_pre_hook(_gather(batch, layer, rows))
            layer.register_forward_hook(_scatter(batch, layer, ends_layer=True))
    encoder_model._llmkit_skips_padding = True
    return True


def _projections(layer: Any) -> list:
    attention = getattr(getattr(layer, "attention", None), "self", None)
    found = [getattr(attention, name, None) for name in ("query", "key", "value")]
    return found if all(p is not None for p in found) else []


def _label_reader(batch: _RealTokens) -> Any:
    def read_labels(module: Any, args: tuple, kwargs: dict) -> None:
        batch.labels = kwargs.get("labels")

    return read_labels


def _reader(batch: _RealTokens) -> Any:
    def read_mask(module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        labels, batch.labels = batch.labels, None
        batch.index, batch.last, batch.labelled = None, (), None
        if mask is None or getattr(mask, "dim", lambda: 0)() != 2:
            return
        batch.shape = tuple(mask.shape)
        if labels is not None and tuple(labels.shape) == batch.shape:
            batch.labelled = _rows(labels.reshape(-1).ne(-100))
        real = mask.reshape(-1).ne(0)
        # Right padding only: with left padding position 0 (a classifier's token) is padding in the short rows.
        if bool(real.all()) or not bool(mask[:, 0].ne(0).all()):
            return
        batch.index = _rows(real)

    return read_mask


def _rows(wanted: Any) -> Any:
    """The flat indices to gather for a [positions] bool of those wanted: their count rounded up by positions not
    wanted riding along (see packed_size); None where none are wanted or the rounding reaches every position."""
    count = int(wanted.sum())
    extra = packed_size(count) - count
    if count == 0 or count + extra >= wanted.numel():  # as many rows as the padded batch: nothing to skip
        return None
    wanted[(~wanted).nonzero().squeeze(1)[:extra]] = True  # positions that ride along (see packed_size)
    return wanted.nonzero().squeeze(1)


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


def _pack(batch: _RealTokens, a: Any, index: Any) -> Any:
    """[rows, width, d] -> [1, tokens, d]. A layer's input feeds four blocks (query, key, value and the residual
    of the attention's output block): gathered once (twice in a labelled last layer: all real tokens for the keys
    and values, the labelled ones for the rest)."""
    for seen, at, packed in batch.last:
        if seen is a and at is index:
            return packed
    packed = a.reshape(-1, a.shape[-1]).index_select(0, index).unsqueeze(0)
    batch.last = ((a, index, packed), *batch.last[:2])  # the layer input stays while its context comes by
    return packed


def _gather(batch: _RealTokens, owner: Any, rows: Any) -> Any:
    def gather(module: Any, args: tuple) -> Any:
        owner._llmkit_packed = index = rows()
        if index is None or not args or any(a.dim() != 3 or a.shape[:2] != batch.shape for a in args):
            owner._llmkit_packed = None
            return None
        return tuple(_pack(batch, a, index) for a in args)

    return gather


def _scatter(batch: _RealTokens, owner: Any, ends_layer: bool = False) -> Any:
    import torch

    def scatter(module: Any, args: tuple, output: Any) -> Any:
        index = getattr(owner, "_llmkit_packed", None)
        if index is None or not isinstance(output, torch.Tensor):
            return None
        owner._llmkit_packed = None
        if ends_layer:  # its gathered tensors are done with
            batch.last = ()
        rows, width = batch.shape
        flat = output.new_zeros(rows * width, output.shape[-1])
        return flat.index_copy(0, index, output[0]).view(rows, width, -1)

    return scatter
