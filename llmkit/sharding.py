"""Saving a distributed run: FSDP on CPU processes too, a whole model at the end of a sharded run, and a copy
on every node with trainer.save_on_each_node.

Accelerate turns FSDP on only for accelerator devices (CUDA, XPU, NPU, ...): on CPU processes (gloo) it
drops the FSDP plugin and quietly trains with DDP, although PyTorch's FSDP2 (`fully_shard`) runs on CPU
with gloo. `ShardsOnCpu` is a Trainer mixin that keeps the plugin there (FSDP2 only), so `trainer.fsdp`
and `accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2` shard for real on a CPU
machine and the test suite runs the FSDP code paths (sharded checkpoints, resume, the gathered final
model) that GPU users depend on.
"""

from __future__ import annotations

import os
from typing import Any

from llmkit.errors import RecipeError


def requested_plugin(args: Any) -> Any:
    """The FSDP plugin the run asks for: from trainer.fsdp / fsdp_config, or from `accelerate launch`'s
    FSDP config (its FSDP_* environment); None when the run does not shard."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if args.fsdp_plugin_args is not None:
        return FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if _accelerate_uses("FSDP"):
        return FullyShardedDataParallelPlugin()
    return None


def accelerate_shards() -> bool:
    """Whether `accelerate launch` was given an FSDP or DeepSpeed config (its ACCELERATE_USE_* environment), which
    the Trainer's arguments do not show."""
    return _accelerate_uses("FSDP") or _accelerate_uses("DEEPSPEED")


def _accelerate_uses(kind: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


class ShardsOnCpu:
    """Trainer mixin: FSDP2 on CPU processes instead of Accelerate's silent fallback to DDP."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            return
        plugin = requested_plugin(self.args)
        if plugin is None:
            return
        if plugin.fsdp_version != 2:
            raise RecipeError(
                "FSDP on CPU processes needs FSDP2: set trainer.fsdp_config.version: 2 "
                "(or fsdp_version: 2 in the accelerate config); FSDP1 is GPU-only and deprecated"
            )
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        # Both shared states: AcceleratorState re-reads PartialState's whenever it is constructed again.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True


def gather_full_model(trainer: Any) -> None:
    """Before the final save of a sharded run: have the Trainer gather one full state dict, so the run folder
    holds a model.safetensors that `from_pretrained` (and evaluate, predict, export) load in one process.
    Checkpoints keep the recipe's state_dict_type (SHARDED_STATE_DICT: one shard per rank, fast to write)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = trainer.accelerator.state.fsdp_plugin
        if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            plugin.set_state_dict_type("FULL_STATE_DICT")


class SavesOnEachNode:
    """Trainer mixin: with trainer.save_on_each_node, each node's main process writes the model again.

    transformers 5's `save_pretrained` writes only on global rank 0 once a process group exists
    (`should_save_on_this_rank`), whatever `is_main_process` says: the other nodes' checkpoints had an
    optimizer but no weights or config, and resuming there failed ("Can't find a valid checkpoint").
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not (self.args.save_on_each_node and self.args.should_save and not self.is_world_process_zero()):
            return super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.should_save_on_this_rank = lambda is_main_process: is_main_process  # this node's own copy
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.should_save_on_this_rank
