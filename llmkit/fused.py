"""Fused CPU kernels for causal LMs: the vocabulary head fused with its cross-entropy, and one-pass tanh GELU.

A causal LM's training loss goes through the full-vocabulary logits of every position: 4,096 positions x 8,000
tokens for a batch of 32 blocks of 128 is 131 MB in fp32, and transformers' loss reads and writes it about ten
times (the head's bf16 output, its fp32 copy, log-softmax forward and backward, the one-hot gradient, the cast
back), which on a 2-core CPU costs more than the head's three matmuls. `linear_cross_entropy` computes the head
and the loss a chunk of rows at a time, so a chunk's fp32 logits stay in cache, and computes the gradient in the
forward (softmax minus one-hot, scaled as the loss is), written once into one [rows, vocabulary] tensor in the
matmul dtype (bf16 under autocast: half the fp32 logits, none of their copies); the backward only hands it on.
Same loss and gradients (tested). `fuse_head_and_loss` installs it on a causal LM with forward hooks, without
changing its code or weights: the model is called without its labels, its head sees an empty slice of
positions, and the loss is put into its output as the model would have computed it (mean over the predicted
tokens, or the sum over the Trainer's `num_items_in_batch`). GPUs keep the model's own loss (liger-kernel's fused
one where installed).

GPT-2 (and GPT-J, CodeGen, T5 v1.1, ...) compute their tanh-approximated GELU as eight elementwise operations;
`gelu_tanh` swaps those activation modules for torch's one-kernel `gelu(approximate="tanh")`, the same function
that transformers itself names `gelu_pytorch_tanh`, rounded once instead of at each step (under bf16 the outputs
differ in the last bits). The saved config keeps its activation: a reloaded model (predict, export) runs it.
"""

from __future__ import annotations

from typing import Any

from llmkit.sharding import accelerate_shards

IGNORE = -100
# Model types whose causal LM's logits are its output embedding (a plain Linear) applied to the final hidden
# states, with nothing after it (no soft-capping or logit scaling): the fused loss equals theirs.
PLAIN_HEADS = {
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma", "opt",
    "starcoder2", "smollm3",
}  # fmt: skip
# Rows of logits per chunk: about 4 MiB of fp32 (131 rows of an 8,000-token vocabulary stay in cache), and at least
# 128, as each chunk reads the whole head weight (50,257 tokens, 4,096 rows: 1.86 s at 128 rows, 2.16 s at 20,
# transformers' loss 3.17 s, on this project's 2-core CPU)
CHUNK_BYTES, MIN_ROWS = 4 << 20, 128


def _linear_cross_entropy() -> Any:
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """sum over rows with a target of cross_entropy(hidden @ weight.T + bias) / divisor; gradients in the forward."""

        @staticmethod
        def forward(
            ctx: Any, hidden: Any, weight: Any, bias: Any, targets: Any, divisor: float, dtype: Any, grad: bool
        ) -> Any:
            kept = (targets != IGNORE).nonzero().squeeze(1)
            h, t, w = hidden.index_select(0, kept).to(dtype), targets.index_select(0, kept), weight.to(dtype)
            # needs_input_grad says which inputs require grad, also under no_grad (evaluation): `grad` says if any is wanted
            needs = [grad and n for n in ctx.needs_input_grad[:3]]
            g = torch.empty(len(t), w.shape[0], dtype=dtype) if any(needs) else None  # d loss / d logits
            scale = 1.0 / divisor if divisor else float("nan")  # no targets: nan, as a mean over none
            total = torch.zeros((), dtype=torch.float32)
            rows = max(MIN_ROWS, CHUNK_BYTES // (4 * w.shape[0]))
            for start in range(0, len(t), rows):
                z = torch.mm(h[start : start + rows], w.t()).float()
                if bias is not None:
                    z += bias.float()
                lse = torch.logsumexp(z, 1)
                target = t[start : start + rows, None]
                total += (lse - z.gather(1, target).squeeze(1)).sum()
                if g is not None:  # softmax - one-hot, scaled as the loss is
                    z.sub_(lse[:, None]).exp_().scatter_add_(1, target, torch.full(target.shape, -1.0))
                    g[start : start + rows] = z.mul_(scale)
            grad_h = grad_w = grad_b = None
            if needs[0]:
                grad_h = hidden.new_zeros(hidden.shape).index_copy_(0, kept, torch.mm(g, w).to(hidden.dtype))
            if needs[1]:
                grad_w = torch.mm(g.t(), h).to(weight.dtype)
            if bias is not None and needs[2]:
                grad_b = g.float().sum(0).to(bias.dtype)
            ctx.grads = grad_h, grad_w, grad_b
            return total * scale

        @staticmethod
        def backward(ctx: Any, upstream: Any) -> Any:
            grads, ctx.grads = ctx.grads, None
            if not torch.equal(upstream, torch.ones_like(upstream)):  # a loss scaled after us (not the Trainer's)
                grads = tuple(None if g is None else g.mul_(upstream) for g in grads)
            return (*grads, None, None, None, None)

    return LinearCrossEntropy


_FUNCTION: Any = None


def matmul_dtype(tensor: Any) -> Any:
    """The dtype a matmul on `tensor` runs in here: autocast's where it is on, else the tensor's."""
    import torch

    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def linear_cross_entropy(
    hidden: Any, weight: Any, bias: Any, targets: Any, num_items_in_batch: Any = None, dtype: Any = None
) -> Any:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets` (-100: ignored), without materialising the
    logits: the mean over the targets, or their sum / `num_items_in_batch` (the Trainer's count over an
    accumulated batch) where given, as transformers' loss. Matmuls in `dtype` (default: `matmul_dtype(hidden)`)."""
    import torch

    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _linear_cross_entropy()
    device = hidden.device.type
    dtype = dtype or matmul_dtype(hidden)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    divisor = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum()
    with torch.autocast(device, enabled=False):
        return _FUNCTION.apply(hidden, weight, bias, targets, float(divisor), dtype, torch.is_grad_enabled())


def wanted(recipe: Any, model: Any) -> bool:
    """Whether a causal LM's training should fuse its head and loss: a plain head (PLAIN_HEADS) with transformers'
    own causal-LM loss; not with distillation (it reads the student's logits), torch.compile, FSDP or DeepSpeed
    (they own the parameters a fused gradient would have to reach), whether the recipe or `accelerate launch`'s
    config asks for them."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    if recipe.distill is not None or getattr(model.config, "model_type", None) not in PLAIN_HEADS:
        return False
    if getattr(model, "loss_function", None) is not LOSS_MAPPING["ForCausalLM"]:
        return False
    args = getattr(recipe, "args", None)
    sharded = args is not None and (args.torch_compile or args.fsdp or args.deepspeed or args.n_gpu > 1)
    return not (sharded or accelerate_shards())


def fuse_head_and_loss(model: Any, logits_in_eval: bool = False) -> bool:
    """Compute a causal LM's loss with `linear_cross_entropy` when it is called with labels on the CPU (three
    forward hooks; the model's code and weights are untouched). Its `logits` are then empty; with
    `logits_in_eval` (metrics read the predictions) evaluation keeps the model's own loss and logits. Without
    labels (generation, predict), with other inputs (positional, `shift_labels`, `logits_to_keep`, tuples) or on
    other devices the model runs as before. Returns whether it was installed."""
    import torch

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return False
    kept: dict[str, Any] = {}

    def take_labels(module: Any, args: tuple, kwargs: dict) -> Any:
        kept.clear()
        labels, ids = kwargs.get("labels"), kwargs.get("input_ids")
        if (
            labels is None
            or args
            or ids is None
            or ids.device.type != "cpu"
            or (logits_in_eval and not module.training)
        ):
            return None
        keep = kwargs.get("logits_to_keep")
        if kwargs.get("shift_labels") is not None or not (keep is None or (isinstance(keep, int) and keep == 0)):
            return None
        if kwargs.get("return_dict") is False:  # a tuple has no loss field to set
            return None
        if module.get_output_embeddings() is not head:  # replaced since (LoRA on the head): its own output counts
            return None
        kept["labels"], kept["items"] = labels, kwargs.get("num_items_in_batch")
        return args, {**kwargs, "labels": None}

    def take_hidden(module: Any, args: tuple) -> Any:
        labels = kept.get("labels")
        if labels is None or args[0].shape[:-1] != labels.shape:
            return None
        # the head's matmul dtype is read here, inside the model's forward: Accelerate's mixed precision wraps
        # `forward` in autocast, and the loss hook runs after it
        kept["hidden"], kept["dtype"] = args[0], matmul_dtype(args[0])
        return (args[0][..., :0, :], *args[1:])  # no logits: the loss hook computes what the loss needs

    def put_loss(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        labels, hidden, items, dtype = (kept.pop(k, None) for k in ("labels", "hidden", "items", "dtype"))
        if labels is None or output is None:  # not ours, or the forward raised (the hook is always called)
            return None
        if hidden is None:  # the head saw another shape: transformers' loss on the logits it made
            loss = module.loss_function(output.logits, labels, module.config.vocab_size, num_items_in_batch=items)
        else:
            targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
            loss = linear_cross_entropy(hidden, head.weight, head.bias, targets, items, dtype)
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})

    model.register_forward_pre_hook(take_labels, with_kwargs=True)
    head.register_forward_pre_hook(take_hidden)
    model.register_forward_hook(put_loss, with_kwargs=True, always_call=True)
    return True


def gelu_tanh(model: Any) -> int:
    """Swap the model's tanh-approximated GELU modules written as elementwise steps for torch's fused one.
    Returns how many were swapped (the state dict and config are unchanged)."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped
