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

import sys
import types
from typing import Any

# Encoders whose layers are BERT's: layer.attention.output(context, residual) then the feed-forward block.
ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}


class _RealTokens:
    """One model's current batch, kept until its next forward (gradient checkpointing runs layers again in the
    backward pass, which must pack as the forward did)."""

    packed: bool = False  # the encoder runs packed for this batch
    index: Any = None  # the flat [rows x width] positions packed (real tokens, rounded); None: all, a free view
    shape: tuple = ()  # (rows, width)
    tokens: int = 0  # positions packed
    subset: Any = None  # the last layer's positions after attention, in packed coordinates; None: all
    out: Any = None  # where the last layer's rows go in the padded output; None: as packed
    labels: Any = None  # the labels the model was called with (a token classifier's, read before the encoder)


def positions_skipped(recipe: Any) -> bool:
    """`model.skip_positions` (default true): the tasks' hooks that compute only where the loss reads (padding
    skipped here, MLM's head at masked positions, a classifier's last layer at its first token). False computes
    every position, as transformers does: on a GPU that waits on the host, gathers with data-dependent shapes can
    cost more than the arithmetic they save (README, On a CUDA GPU)."""
    return getattr(getattr(recipe, "model", None), "skip_positions", True)


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
    """Run a BERT-family encoder packed (not decoders, cross-attention or a chunked feed-forward). A last layer
    whose attention output runs at the first token only (classification's hook) gets each row's first real token
    when packed; with `labelled_last_layer` a token classifier's last layer runs at the labelled positions when
    the batch has labels. Returns whether it applies; a second call installs nothing more."""
    found = encoder_layers(model)
    if found is None or getattr(found[0].config, "model_type", None) not in ENCODERS:
        return False
    top, encoder_model, layers = found
    attentions = [getattr(getattr(layer, "attention", None), "self", None) for layer in layers]
    eager = getattr(sys.modules.get(type(attentions[0]).__module__), "eager_attention_forward", None)
    block = getattr(getattr(layers[-1], "attention", None), "output", None)
    if eager is None or block is None or not all(_packable(a) for a in attentions):
        return False
    if getattr(encoder_model, "_llmkit_skips_padding", False):
        return True
    batch = _RealTokens()
    tokens_head = type(top).__name__ in TOKEN_HEADS
    if labelled_last_layer and tokens_head:
        top.register_forward_pre_hook(_label_reader(batch), with_kwargs=True)
    encoder_model.register_forward_pre_hook(_reader(batch, block, tokens_head), with_kwargs=True)
    encoder_model.encoder.register_forward_pre_hook(_pack_input(batch), with_kwargs=True)
    encoder_model.encoder.register_forward_hook(_unpack_output(batch))
    for attention in attentions:
        attention._llmkit_batch, attention._llmkit_eager = batch, eager
        attention.forward = types.MethodType(_packed_self_attention, attention)
    block.register_forward_pre_hook(_last_layer_rows(batch), prepend=True)  # before a first-token hook
    encoder_model._llmkit_skips_padding = True
    return True


def _packable(attention: Any) -> bool:
    """A self-attention module as BERT's: query/key/value projections, heads, scaling, attention dropout."""
    names = ("query", "key", "value", "num_attention_heads", "attention_head_size", "scaling", "dropout", "config")
    return attention is not None and all(hasattr(attention, name) for name in names)


def _label_reader(batch: _RealTokens) -> Any:
    def read_labels(module: Any, args: tuple, kwargs: dict) -> None:
        batch.labels = kwargs.get("labels")

    return read_labels


def _reader(batch: _RealTokens, block: Any, tokens_head: bool) -> Any:
    import torch

    def read_mask(module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        labels, batch.labels = batch.labels, None
        batch.packed, batch.index, batch.subset, batch.out = False, None, None, None
        config = module.config
        recorded = ("output_hidden_states", "output_attentions")  # recorded per layer: they would come out packed
        if any(kwargs.get(name, getattr(config, name, False)) for name in recorded):
            return
        if mask is None or getattr(mask, "dim", lambda: 0)() != 2:
            return
        rows, width = batch.shape = tuple(mask.shape)
        real = mask.reshape(-1).ne(0)
        # A sequence head reads position 0, padding in the short rows of a left-padded batch: left alone.
        if not tokens_head and not bool(mask[:, 0].ne(0).all()):
            return
        batch.index = None if bool(real.all()) else _rows(real)
        first_token = getattr(block, "_llmkit_first_token", False)
        labelled = labels is not None and tuple(labels.shape) == batch.shape
        if batch.index is None and not labelled:
            return  # no padding to skip (a first-token hook works on the padded layout)
        batch.packed, batch.tokens = True, rows * width if batch.index is None else batch.index.numel()
        if first_token:
            starts = torch.arange(rows, device=mask.device) * width
            batch.subset = starts if batch.index is None else torch.searchsorted(batch.index, starts)
        elif labelled:
            wanted = labels.reshape(-1).ne(-100)
            batch.subset = _rows(wanted if batch.index is None else wanted[batch.index])
            if batch.subset is not None:
                batch.out = batch.subset if batch.index is None else batch.index[batch.subset]

    return read_mask


def _rows(wanted: Any) -> Any:
    """The indices to gather for a [positions] bool of those wanted: their count rounded up by positions not
    wanted riding along (see packed_size); None where none are wanted or the rounding reaches every position."""
    count = int(wanted.sum())
    extra = packed_size(count) - count
    if count == 0 or count + extra >= wanted.numel():  # as many rows as the padded batch: nothing to skip
        return None
    wanted[(~wanted).nonzero().squeeze(1)[:extra]] = True  # positions that ride along (see packed_size)
    return wanted.nonzero().squeeze(1)


def packed_size(tokens: int) -> int:
    """How many rows the packed tokens take: the count rounded up to 16 sizes per doubling (multiples of 8 at
    least, so 470 -> 480, 1,000 -> 1,024), filled with padding positions, whose outputs no real position reads.

    Exactly the real tokens would give every batch matmuls of a shape never seen before: oneDNN JIT-compiles a
    kernel for each new shape (a 500 x 384 x 1536 product ran 15-30% slower per row when its row count was new),
    and glibc's heap fragments over ever new block sizes. The rounding adds fewer than max(8, tokens / 16) rows."""
    granule = max(8, 1 << max(0, tokens.bit_length() - 5))
    return -(-tokens // granule) * granule


def _pack(batch: _RealTokens, a: Any) -> Any:
    """[rows, width, ...] (or [rows x width, ...]) -> [1, tokens, d]."""
    flat = a.reshape(batch.shape[0] * batch.shape[1], -1)
    return (flat if batch.index is None else flat.index_select(0, batch.index)).unsqueeze(0)


def _unpack(batch: _RealTokens, a: Any) -> Any:
    """[1, tokens, d] -> [rows x width, d], zeros at the positions not packed."""
    rows, width = batch.shape
    if batch.index is None:
        return a.squeeze(0)
    return a.new_zeros(rows * width, a.shape[-1]).index_copy(0, batch.index, a.squeeze(0))


def _pack_input(batch: _RealTokens) -> Any:
    def pack(module: Any, args: tuple, kwargs: dict) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not batch.packed or hidden is None or hidden.dim() != 3 or tuple(hidden.shape[:2]) != batch.shape:
            batch.packed = False
            return None
        if args:
            return (_pack(batch, hidden), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _pack(batch, hidden)}

    return pack


def _unpack_output(batch: _RealTokens) -> Any:
    def unpack(module: Any, args: tuple, output: Any) -> Any:
        hidden = getattr(output, "last_hidden_state", None)
        if not batch.packed or hidden is None or hidden.shape[0] != 1:  # a first-token layer's [rows, 1, d]
            return None
        rows, width = batch.shape
        where = batch.index if batch.out is None else batch.out
        if where is None:
            full = hidden.squeeze(0)
        else:
            full = hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, where, hidden.squeeze(0))
        output.last_hidden_state = full.view(rows, width, -1)
        return output

    return unpack


def _last_layer_rows(batch: _RealTokens) -> Any:
    """The last layer's attention output block (context, residual) at its subset: the rows' first tokens as
    [rows, 1, d] (what a first-token hook passes on), or the labelled positions as [1, labelled, d]."""

    def last_layer_rows(module: Any, args: tuple) -> Any:
        if not batch.packed or batch.subset is None or len(args) != 2:
            return None
        if any(a.dim() != 3 or tuple(a.shape[:2]) != (1, batch.tokens) for a in args):
            return None
        if batch.out is None:  # first tokens
            return tuple(a.squeeze(0).index_select(0, batch.subset).unsqueeze(1) for a in args)
        return tuple(a.index_select(1, batch.subset) for a in args)

    return last_layer_rows


def _packed_self_attention(self: Any, hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any):
    """BERT's self-attention on packed tokens: the projections at the packed tokens, their results scattered to
    [rows, heads, width, head size] for the model's own attention function (eager or SDPA, with the padded
    mask), its output gathered back. Anything else (a cache, padded input) goes to the model's own forward."""
    batch = self._llmkit_batch
    cached = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
    if not batch.packed or args or cached or tuple(hidden_states.shape[:2]) != (1, batch.tokens):
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
    rows, width = batch.shape
    heads, size = self.num_attention_heads, self.attention_head_size
    q, k, v = (
        _unpack(batch, projection(hidden_states)).view(rows, width, heads, size).transpose(1, 2)
        for projection in (self.query, self.key, self.value)
    )
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._llmkit_eager)
    dropout = self.dropout.p if self.training else 0.0
    out, weights = attend(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
    return _pack(batch, out), weights
