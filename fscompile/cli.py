"""Command line: ``fscompile TEACHER [options]`` compiles; ``targets`` lists targets."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .config import TASKS, DistillConfig
from .errors import EXIT_CODES, DeadlineExceeded, FscompileError

DEFAULT_COMMAND = "compile"


class DefaultGroup(click.Group):
    """A group whose unknown first word is the TEACHER of the default ``compile`` command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def _quiet_libraries(verbose: bool = False) -> None:
    """Library chatter (weight-loading bars, Hub retries, ORT's warnings) would bury our own
    progress: off unless ``verbose``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer warns through the root logger
    for name in ("transformers", "huggingface_hub", "datasets", "httpx", "urllib3", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import onnxruntime
        import transformers

        onnxruntime.set_default_logger_severity(3)  # the C++ runtime's own warnings, on stderr
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def _library_output(verbose: bool) -> Iterator[None]:
    """Where ``print`` inside libraries goes during a compile (ORT's calibrators print their
    progress): stdout carries only our result, so to stderr with ``verbose``, else nowhere."""
    if verbose:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


HUB_HOST = ("huggingface.co", 443)


def _offline_if_unreachable(timeout: float = 3.0) -> None:
    """Without ``HF_HUB_OFFLINE``, an absent network costs every Hub lookup its retries (about 20 s
    each, measured). One connection attempt decides instead: unreachable means offline for this
    run, said once; local, packaged and cached models still load."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE"):
        return
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        if "huggingface_hub" in sys.modules:  # read once at import: already imported by the library setup
            sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
        click.echo(f"note: {HUB_HOST[0]} is unreachable; working offline (local, packaged and cached models only)",
                   err=True)


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """End the compile after ``seconds``: the alarm raises in the main thread wherever it is, so the
    staging directory is removed on the way out as for Ctrl-C (a profiling child is killed too)."""
    if not seconds:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise DeadlineExceeded(f"the compile ran past --timeout {seconds:g} s and was stopped; nothing was written")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


EXIT_HELP = "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items())


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=f"Exit codes:\n\n{EXIT_HELP}")
@click.version_option(package_name="fscompile")
def main() -> None:
    """Few-shot distillation compiler: teacher -> small student -> artifact for a target.

    \b
    fscompile minilm --target ort-int8 --shots 10
    fscompile ./my-teacher --data reviews.jsonl --target ort-int8 --out build/edge
    fscompile targets
    """


def _fail(e: BaseException, debug: bool) -> None:
    if debug:
        raise e
    if isinstance(e, (FscompileError, DeadlineExceeded)):
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    if isinstance(e, OSError):  # disk full, permissions, vanished files: the system's words, one line
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
        click.echo(f"error: {what}{f' ({e.filename})' if e.filename else ''}; nothing was written", err=True)
        sys.exit(5)
    click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
    sys.exit(1)


@main.command(DEFAULT_COMMAND)
@click.argument("teacher")
@click.option("--data", help="Hub dataset (glue/sst2, imdb), a .tsv/.csv/.jsonl file or a directory of "
              "train/dev files. Default: the embedded review-sentiment set.")
@click.option("--target", default="ort-int8", show_default=True, help="Deployment target (see `fscompile targets`).")
@click.option("--shots", default=10, show_default=True, type=int,
              help="Labelled examples per class (text generation: passages).")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory [default: ./fscompile-out/<run-name>].")
@click.option("--force", is_flag=True, help="Replace --out even if it holds a different run.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for shots, augmentation and training.")
@click.option("--student-layers", help="Teacher layers to keep: a count (3) or indices (0,2,4). Default: every other one.")
@click.option("--task", default="auto", show_default=True,
              type=click.Choice(list(TASKS)),
              help="What the teacher does; auto: torchvision names are image classification, local models "
              "with a span head question answering, causal LMs (gpt2) text generation, else text classification.")
@click.option("--student", help="Image tasks: the student's torchvision architecture [default: mobilenet_v3_small]; "
              "text generation: a pretrained LM with the teacher's tokenizer (distilgpt2) instead of kept layers.")
@click.option("--weights", type=click.Path(), help="Image tasks: a local state dict for the teacher architecture "
              "(loaded with weights_only=True).")
@click.option("--image-size", type=int, help="Image tasks: input side in pixels [default: the teacher's, else the data's].")
@click.option("--steps", type=int, help="Distillation steps. [default: 1000; for text inputs averaging over 48 "
              "tokens, fewer in proportion, at least 300]")
@click.option("--lr", type=float, help="Learning rate (AdamW) [default: 5e-5 text, 2e-4 text with --unlabeled, 1e-3 image students].")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Distillation batch size.")
@click.option("--dropout/--no-dropout", default=False, show_default=True,
              help="Text classification: keep the student's dropout while distilling (off: the teacher's soft "
              "targets on many inputs regularise enough, and steps run ~10% faster).")
@click.option("--temperature", default=None, type=float,
              help="Distillation temperature.  [default: 2.0; 1.0 for text generation]")
@click.option("--augment", default=100, show_default=True, type=int, help="Augmented variants per shot in the transfer set.")
@click.option("--augment-ops", "ops", default=DistillConfig.ops, show_default=True,
              help="Augmentations of the transfer set, comma-separated, cycled over the variants (repeat one to "
              "weight it): mask, drop, swap, mix, crop, vocab (vocabulary words), near (embedding neighbours).")
@click.option("--unlabeled", type=click.Path(), help="Unlabelled text for the transfer set, labelled by the teacher: a .txt file (one per "
              "line) or anything --data accepts (a table, a directory, a Hub dataset); in-domain is best, but any "
              "text in the language helps. Evaluation rows are dropped. QA: questions on contexts (answers ignored).")
@click.option("--generator", default="smollm2", show_default=True,
              help="Text classification: a causal LM that writes new in-domain inputs from the shots for the teacher "
              "to label (smollm2: SmolLM2-135M-Instruct, packaged; any local or Hub causal LM or .gguf file; none: off).")
@click.option("--generate", type=int, help="How many texts the generator writes [default: derived from the shots' "
              "length, fewer for long texts, 100-3,000; cached]; 0 turns generation off.")
@click.option("--prune", default=None, type=float,
              help="Pruning rate, in the pattern the target accelerates.  [default: 0.2; 0 for text generation]")
@click.option("--prune-heads/--no-prune-heads", default=False, show_default=True,
              help="CPU targets: prune whole attention heads as well as FFN channels (measured: little speed "
              "for accuracy at MiniLM's size).")
@click.option("--embedding-rank", default=0, show_default=True, type=int,
              help="Factorise the word embeddings to this rank (0 = keep them full).")
@click.option("--embedding-bits", default=8, show_default=True, type=int,
              help="Bits of the word-embedding table in CPU INT8 artifacts: 8, or 4 (block-wise, ~30% smaller "
              "artifact, slightly slower: the embedding LayerNorm is no longer fused).")
@click.option("--bits", default=8, show_default=True, type=int, help="Quantization bits.")
@click.option("--calibration", default="auto", show_default=True,
              type=click.Choice(["auto", "minmax", "entropy", "percentile"]), help="Static INT8 calibration method.")
@click.option("--seq-len", default=128, show_default=True, type=int, help="Sequence length for profiling.")
@click.option("--profile-seconds", default=3.0, show_default=True, type=float,
              help="Time budget per model and batch size when profiling latency.")
@click.option("--max-length", default=128, show_default=True, type=int, help="Truncation length for training and evaluation.")
@click.option("--max-eval", type=int, help="Evaluate on at most this many rows (seeded subset).")
@click.option("--text-column", help="Text column (auto-detected).")
@click.option("--text-pair-column", help="Second text column for sentence pairs (auto-detected).")
@click.option("--label-column", help="Label column (auto-detected).")
@click.option("--export-only", is_flag=True, help="Build the target's portable files even where it cannot run "
              "(e.g. TensorRT's QDQ ONNX without a GPU); evaluated with ONNX Runtime on the CPU.")
@click.option("--fallback", is_flag=True, help="If the artifact is not faster than the fp32 student or loses more "
              "than --tolerance accuracy, ship the better variant instead.")
@click.option("--tolerance", default=0.01, show_default=True, type=float,
              help="Accuracy the artifact may lose against the fp32 student before verification fails.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the Hub (off by default).")
@click.option("--max-latency-ms", type=float, help="Budget: batch-1 p50 latency at --seq-len on this machine. Any "
              "budget makes fscompile search student depth, pruning and table bits for the fastest artifact within "
              "it (within 5% of the fastest: the most accurate; text classification).")
@click.option("--max-size-mb", type=float, help="Budget: the artifact's size on disk.")
@click.option("--max-peak-mb", type=float, help="Budget: peak resident memory of a process serving the artifact.")
@click.option("--min-retention", type=float, help="Budget: accuracy kept relative to the teacher (0-1), estimated "
              "without labels from the teacher's probabilities on the evaluation inputs.")
@click.option("--max-trials", default=3, show_default=True, type=int, help="Budget search: distillations at most.")
@click.option("--timeout", type=float, help="Stop the whole compile after this many seconds (exit code 5, nothing "
              "written).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--verbose", is_flag=True, help="Let the libraries' own output through (on stderr).")
@click.option("--debug", is_flag=True, help="Show tracebacks (and the libraries' output, as --verbose).")
def compile_cmd(teacher: str, out: Path | None, force: bool, as_json: bool, quiet: bool, verbose: bool, debug: bool,
                **opts: Any) -> None:
    """Compile TEACHER (a Hub id, an alias such as minilm / bert-base / distilbert, or a local
    model directory) into a deployable student for --target."""
    verbose = verbose or debug
    _quiet_libraries(verbose)
    from .ui import ProgressUI, print_summary

    try:
        from .config import CompileConfig

        dist_keys = ("steps", "lr", "batch_size", "dropout", "temperature", "augment", "ops", "unlabeled", "generator",
                     "generate", "max_length")
        from .budget import Budget

        max_trials, timeout = opts.pop("max_trials"), opts.pop("timeout")
        if timeout is not None and not timeout > 0:
            raise click.UsageError(f"--timeout must be > 0 seconds, got {timeout}")
        try:
            budget = Budget.pop_from(opts)
            dist = DistillConfig(**{k: opts.pop(k) for k in dist_keys})
            cfg = CompileConfig(teacher=teacher, distill=dist, **opts)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        out = out or Path("fscompile-out") / cfg.run_name()
        _offline_if_unreachable()
        with ProgressUI(enabled=not quiet and not as_json) as ui, _library_output(verbose), _deadline(timeout):
            from .search import compile_or_search

            manifest = compile_or_search(cfg, out, budget, force=force, progress=ui.update, max_trials=max_trials)
    except click.UsageError:
        raise
    except BaseException as e:  # mapped to one line and an exit code; --debug shows the traceback
        if isinstance(e, SystemExit):
            raise
        _fail(e, debug)
        return
    if as_json:
        click.echo(json.dumps(manifest, indent=2, default=str))
    elif not quiet:
        print_summary(manifest)


@main.command("generate")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", default=30, show_default=True, type=click.IntRange(1, 4096))
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def generate_cmd(model_dir: Path, prompt: str, max_new_tokens: int, debug: bool) -> None:
    """Greedy text generation from a compiled text-generation artifact (OUT/model), token by
    token with its key/value cache: what an edge pipeline would run."""
    _quiet_libraries()
    try:
        from .errors import InputError

        if not (model_dir / "model.onnx").is_file() and (model_dir / "model" / "model.onnx").is_file():
            model_dir = model_dir / "model"  # the run directory was given
        if not (model_dir / "model.onnx").is_file():
            raise InputError(f"{model_dir}: no model.onnx (give a text-generation run's output directory)")
        from .tasks.lm import generate

        click.echo(prompt + generate(str(model_dir), prompt, max_new_tokens))
    except BaseException as e:  # one line and an exit code
        if isinstance(e, SystemExit):
            raise
        _fail(e, debug)


@main.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def targets_cmd(as_json: bool) -> None:
    """List every target, whether it can build and run here, and why not."""
    from .backends import broken_plugins, describe, registered

    rows = [describe(n, c) for n, c in sorted(registered().items())]
    broken = broken_plugins()
    if as_json:
        click.echo(json.dumps({"targets": rows, "failed_to_load": broken}, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="fscompile targets")
    for col in ("target", "available", "device", "precisions", "sparsity", "calibration", "module", "why not"):
        table.add_column(col)
    for r in rows:
        table.add_row(*map(escape, (r["name"], "yes" if r["available"] else "no", r["device"],
                                    ",".join(r["precisions"]), ",".join(r["sparsity"]) or "-",
                                    ",".join(r["calibration"]) or "-", r["module"], r["reason"] or "")))
    console = Console()
    console.width = max(console.width, 160)  # pipes and CI logs default to 80 columns
    console.print(table)
    for name, why in broken.items():
        console.print(f"[red]failed to load[/red] {escape(name)}: {escape(why)}")


def _csv(kind):
    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return convert


@main.command("bench")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A YAML or TOML sweep file (same keys as the flags).")
@click.option("--teacher", help="Teacher (as for compile). [default: minilm]")
@click.option("--data", help="Data spec (as for compile). [default: embedded]")
@click.option("--targets", callback=_csv(str), help="Targets, comma-separated. [default: ort-int8]")
@click.option("--shots", callback=_csv(int), help="Shots per class, comma-separated. [default: 5,10,20]")
@click.option("--seeds", type=int, help="Shot draws per shot count (seeds 0..N-1). [default: 5]")
@click.option("--steps", type=int, help="Distillation steps per draw. [default: as for a compile]")
@click.option("--prune", type=float, help="Pruning rate applied per target with a short recovery. [default: 0.2]")
@click.option("--max-eval", type=int, help="Evaluate on at most this many rows.")
@click.option("--profile-seconds", type=float, help="Profiling budget per model and batch size. [default: 3]")
@click.option("--student", help="Image tasks: the student's torchvision architecture; text generation: a pretrained LM.")
@click.option("--weights", help="Image tasks: a local state dict for the teacher architecture.")
@click.option("--image-size", type=int, help="Image tasks: input side in pixels.")
@click.option("--generator", help="Text classification: the LM that writes in-domain inputs (as for compile). "
              "[default: smollm2]")
@click.option("--no-peers", is_flag=True, help="Skip the peer pipelines.")
@click.option("--jobs", default=1, show_default=True, type=int, help="Shot draws run in parallel processes.")
@click.option("--ray", "use_ray", is_flag=True, help="Run each shot draw as a Ray task (RAY_ADDRESS for a cluster).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True,
              help="Results directory (resumes what is already there).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench_cmd(config_file: str | None, no_peers: bool, jobs: int, use_ray: bool, out: Path, debug: bool,
              **flags: Any) -> None:
    """Run a sweep of shots x seeds x targets beside the peers; write results.jsonl (resumable),
    table.md, table.csv and pareto.png."""
    _quiet_libraries(debug)
    from .bench import Sweep, run_sweep

    try:
        flags = {k: v for k, v in flags.items() if v is not None}
        if no_peers:
            flags["peers"] = False
        sweep = Sweep.from_file(config_file, **flags) if config_file else Sweep(**flags)
        if jobs < 1:
            raise click.UsageError("--jobs must be >= 1")
        with _library_output(debug):
            run_sweep(sweep, out, jobs=jobs, use_ray=use_ray, echo=lambda m: click.echo(m, err=True))
    except click.UsageError:
        raise
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        _fail(e, debug)
        return
    click.echo((out / "table.md").read_text())


@main.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Where to write the tables [default: the first DIR].")
def report_cmd(dirs: tuple[Path, ...], out: Path | None) -> None:
    """Rebuild table.md, table.csv and pareto.png from the results.jsonl of one or more DIRs."""
    from .bench import load_results, write_tables

    try:
        rows = load_results(list(dirs))
        target = out or dirs[0]
        target.mkdir(parents=True, exist_ok=True)
        click.echo(write_tables(rows, target))
    except FscompileError as e:
        _fail(e, False)


if __name__ == "__main__":  # pragma: no cover
    main()
