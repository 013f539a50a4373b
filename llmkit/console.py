"""What the command line prints and how it ends: logging set-up, one-line errors with exit codes, result tables."""

from __future__ import annotations

import gc
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

import typer

from llmkit.errors import Interrupted, LlmkitError, Terminated, first_line


def basic_logging() -> None:
    """llmkit's own log lines on stderr ("[llmkit] ..."), at the --quiet/--verbose level; stdlib only, so cheap."""
    import logging

    # Under torchrun/accelerate only rank 0 reports progress; the other ranks speak up for problems only.
    rank = int(os.environ.get("RANK", "0"))
    verbosity = os.environ.get("LLMKIT_VERBOSITY", "normal")
    level = logging.WARNING if verbosity == "quiet" or rank > 0 else logging.INFO
    # Other libraries' info messages (rouge_score says "Using default tokenizer." at every evaluation) only under -v.
    root = level if verbosity == "verbose" else logging.WARNING
    logging.basicConfig(level=root, format="[llmkit] %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("llmkit").setLevel(level)
    if verbosity != "verbose":
        # torchao (the export extra), imported by transformers whenever installed, warns at import about
        # kernels for other GPUs and about its pytree registrations: noise in every command.
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)


def setup_logging() -> None:
    """basic_logging, then the ML libraries' verbosity and progress bars (imports them: call it inside commands)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    verbosity = os.environ.get("LLMKIT_VERBOSITY", "normal")
    basic_logging()
    import datasets
    import transformers

    transformers.logging.set_verbosity_info() if verbosity == "verbose" else transformers.logging.set_verbosity_warning()
    if verbosity == "quiet" or not sys.stderr.isatty():
        # No live bars in logs and pipes (their carriage returns pile up); the run prints lines instead.
        datasets.disable_progress_bars()
        transformers.logging.disable_progress_bar()
    else:
        from llmkit.progress import transient_bar

        transformers.logging.set_tqdm_hook(transient_bar)
    end_of_startup()


def end_of_startup() -> None:
    """Let the garbage collector back in (see main), with everything the imports built frozen out of its scans."""
    if not gc.isenabled():  # only under main(): a fresh process, so what is tracked now is the libraries'
        gc.freeze()
        gc.enable()


def guarded(debug: bool, fn: Callable[[], Any]) -> Any:
    """Run `fn`, turning errors into exit codes: 2 for recipe/data errors, 130 interrupted, 1 otherwise."""
    try:
        result = fn()
    except LlmkitError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except Interrupted as e:
        words = [w for w in sys.argv[1:] if w not in ("--overwrite", "--resume")]
        typer.echo(f"interrupted: {e}. Resume with: llmkit {shlex.join(words)} --resume", err=True)
        raise typer.Exit(130) from None
    except (KeyboardInterrupt, Terminated) as e:
        return _interrupted(e)
    except (typer.Exit, typer.Abort):
        raise
    except BrokenPipeError as e:
        if not _stdout_reader_gone():
            return _fail(e, debug)
        # `llmkit recipes | head`: the reader left; nothing to say, and no one to say it to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        stop = _stop_request(e)
        if stop is not None:  # a library turned the interrupt into its own error (transformers' lazy imports do)
            return _interrupted(stop)
        return _fail(e, debug)
    if sigterm_unreported():  # its Terminated was raised where Python only prints "Exception ignored"
        return _interrupted(Terminated())
    return result


def _stop_request(e: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Terminated that caused `e`, if one did."""
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        if isinstance(cur, (KeyboardInterrupt, Terminated)):
            return cur
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return None


def _interrupted(e: BaseException) -> Any:
    _UNHANDLED_SIGTERM.clear()
    typer.echo(f"interrupted{' (SIGTERM)' if isinstance(e, Terminated) else ''}", err=True)
    raise typer.Exit(130) from None


def usage_error_exit(e: Exception) -> None:
    """A usage error of the command parser (a missing option, a bad value): one line on stderr, exit 2.

    Click prints usage and a box of four lines; the parser's own message is enough, with where to look.
    Returns (for the caller to re-raise) when `e` is not a usage error.
    """
    if getattr(e, "exit_code", None) != 2 or not hasattr(e, "format_message"):
        return
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "llmkit"
    message = (e.format_message() or "").strip().splitlines() or ["usage error"]
    typer.echo(f"error: {message[0]} (see `{where} --help`)", err=True)
    sys.exit(2)


_UNHANDLED_SIGTERM: list[int] = []  # SIGTERMs whose Terminated no handler has reported yet


def sigterm_unreported() -> bool:
    """A SIGTERM arrived whose Terminated no handler reported (Python swallowed it in a callback)."""
    return bool(_UNHANDLED_SIGTERM)


def stop_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`, torchrun stopping the other ranks) ends any command as Ctrl-C does: exit 130.

    Training installs its own handler (save a checkpoint, then stop) and puts this one back afterwards.
    """
    import signal
    import threading

    def terminate(signum: int, frame: Any) -> None:
        # Noted as well as raised: raised inside a weakref callback or __del__ (an import's module-lock callback),
        # the exception is only printed, and `guarded` ends the command as interrupted all the same.
        _UNHANDLED_SIGTERM.append(signum)
        raise Terminated

    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, terminate)


def _fail(e: Exception, debug: bool) -> Any:
    if debug:
        raise e
    first = first_line(e, default="")
    typer.echo(f"error: {type(e).__name__}: {first} (run again with --debug for the traceback)", err=True)
    raise typer.Exit(1) from None


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reading end was closed (not some other broken pipe, e.g. a socket)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def print_estimate(est: dict) -> None:
    typer.echo("\nEstimate:")
    for key, value in est.items():
        if isinstance(value, dict):  # a section (distill: the teacher, its size and cost)
            typer.echo(f"  {key}:")
            for sub, v in value.items():
                typer.echo(f"    {sub:<20} {_number(v)}")
        else:
            typer.echo(f"  {key:<22} {_number(value)}")


def _number(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return value


def print_metrics(metrics: dict) -> None:
    """The metrics as a table, without the timing and bookkeeping entries (the JSON files keep them)."""
    skip = ("_runtime", "_per_second", "_preparation_time", "epoch", "split", "samples")
    for key, value in metrics.items():
        if not key.endswith(skip):
            typer.echo(f"  {key:<28} {value:.4f}" if isinstance(value, float) else f"  {key:<28} {value}")


def print_report(s: dict) -> None:
    """The end-of-run table (the same facts as summary.json) and the next command to try."""
    out = s["output_dir"]
    tokens = f", {s['train_tokens_per_second']:,.0f} tokens/s" if s.get("train_tokens_per_second") else ""
    rows = [
        ("task", s["task"]),
        ("model", s["model"]),
        ("parameters", f"{s['parameters']:,} ({s['trainable_parameters']:,} trained)"),
        ("steps", f"{s['steps']} ({s['epochs']:.2f} epochs, global batch {s['global_batch_size']})"),
        ("wall time", f"{s['wall_time_s']:.0f} s"),
        ("throughput", f"{s['train_samples_per_second'] or 0:.1f} samples/s{tokens}"),
        ("saved to", f"{out} (model, recipe.yaml, summary.json, plots/, README.md)"),
    ]
    typer.echo(f"\nDone in {s['wall_time_s']:.0f}s.")
    for key, value in rows:
        typer.echo(f"  {key:<28} {value}")
    print_metrics(s["final_metrics"])
    from llmkit.report import distill_lines
    from llmkit.tasks import get_task

    for line in distill_lines(s, get_task(s["task"]).main_metric):
        typer.echo(f"  {line[2:]}")
    nxt = f"llmkit evaluate {out} --split test"
    if get_task(s["task"]).predict is not None:
        nxt += f"   |   llmkit predict {out} -i inputs.jsonl -o preds.jsonl"
    if s["trainable_parameters"] < s["parameters"]:
        nxt += f"   |   llmkit export {out} {out}-merged --merge"
    typer.echo(f"Next: {nxt}")


def leave_process_group() -> None:
    """Under torchrun/accelerate: tear the process group down before exit.

    Left to interpreter shutdown, gloo's threads are sometimes destroyed while still running and the
    process aborts ("terminate called without an active exception", seen in about 1 of 8 CPU runs)
    after the run has finished, turning a good run into a failed launch.
    """
    dist = sys.modules.get("torch.distributed")  # never imported here: an import cut short by a signal stays cut
    if dist is None or not hasattr(dist, "is_initialized"):
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
