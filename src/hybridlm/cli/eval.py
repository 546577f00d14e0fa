"""`hybridlm eval loss|ruler|harness|plugin`: held-out loss, the RULER-style suite, lm-evaluation-harness.

    hybridlm eval loss CKPT [CKPT ...] --data DIR --seq-len 4096       loss, bits per byte, loss by position
    hybridlm eval ruler CKPT [CKPT ...] --lengths 4096,8192 --tasks all RULER-style scores, table and plot
    hybridlm eval harness --model_args pretrained=DIR --tasks ...      lm-eval's CLI with model `hybridlm`
    hybridlm eval plugin install|remove                                lets plain `lm_eval --model hybridlm` work

CKPT is a Hugging Face checkpoint directory or a training run directory. Several checkpoints are
compared in one table and one plot. Every input is checked (paths, weights, task names, lengths
against the model's limit and the free memory) before any model work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate checkpoints: held-out loss, RULER-style long context, lm-evaluation-harness",
        description="Evaluate Hugging Face checkpoints or training run directories.",
    )
    commands = parser.add_subparsers(dest="eval_command", metavar="KIND")
    parser.set_defaults(func=lambda args: _usage(parser))

    loss = commands.add_parser(
        "loss",
        help="loss and bits per byte on held-out token data, and loss by position (a plot)",
        description="Mean cross-entropy, bits per byte and per-position loss of each checkpoint on windows of "
        "--seq-len tokens of a prepared dataset's split. Writes loss.json, loss_by_position.csv and "
        "loss_by_position.png to --out.",
    )
    _add_model_arguments(loss)
    loss.add_argument("--data", default="embedded", help="a prepared dataset directory, or 'embedded' (default)")
    loss.add_argument("--seq-len", type=int, default=None,
                      help="window length in tokens (default: the longest training length among the runs, else 2048)")
    loss.add_argument("--split", default="val", choices=["val", "train"], help="which split (default val)")
    loss.add_argument("--max-instances", type=int, default=64,
                      help="windows to evaluate, spread over the split (default 64; 0 = all)")
    loss.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    loss.add_argument("--document-masking", action="store_true",
                      help="restart the context at document boundaries inside a window (as training does)")
    loss.set_defaults(func=run_loss)

    ruler = commands.add_parser(
        "ruler",
        help="the RULER-style long-context suite (needles, variable tracking, word extraction)",
        description="Generate the RULER-style tasks at each length (in the model's tokens), answer them greedily "
        "with the inference engine and score them by RULER's string match. Writes results.json, table.md, "
        "ruler.png and the samples with predictions to --out. Tasks: niah_single, niah_multikey, niah_multivalue, "
        "niah_multiquery, vt, cwe, fwe.",
    )
    _add_model_arguments(ruler)
    ruler.add_argument("--lengths", required=True, help="comma-separated lengths in tokens, e.g. 4096,8192 or 4k,8k")
    ruler.add_argument("--tasks", default="all", help="comma-separated task names, or 'all' (default)")
    ruler.add_argument("--samples", type=int, default=20, help="samples per task and length (default 20)")
    ruler.add_argument("--seed", type=int, default=0, help="fixes every sample (default 0)")
    ruler.add_argument("--template", default="text", choices=["text", "code"],
                       help="RULER's English prompts (default) or the same tasks written as Python source")
    ruler.add_argument("--haystack", default="noise", choices=["noise", "corpus"],
                       help="filler: RULER's repeated noise sentences (default) or lines of --haystack-data")
    ruler.add_argument("--haystack-data", default="embedded",
                       help="prepared dataset whose held-out text is the corpus haystack (default: embedded)")
    ruler.add_argument("--values", default="number", choices=["number", "uuid"],
                       help="needle values: 7-digit numbers (default) or UUIDs")
    ruler.add_argument("--batch-size", type=int, default=4, help="prompts generated together (default 4)")
    ruler.set_defaults(func=run_ruler_command)

    harness = commands.add_parser(
        "harness",
        help="lm-evaluation-harness with the `hybridlm` model registered",
        description="Runs lm-eval's command line (all its arguments pass through) after registering the "
        "`hybridlm` model; --model hybridlm is added when no --model is given. Example: hybridlm eval harness "
        "--model_args pretrained=DIR,batch_size=8 --tasks lambada_openai --include_path MY_TASKS/",
        add_help=False,
        prefix_chars="+",  # every argument, --options included, belongs to lm-eval (--help shows lm-eval's)
    )
    harness.add_argument("harness_args", nargs=argparse.REMAINDER, help="arguments for lm-eval")
    harness.set_defaults(func=run_harness)

    plugin = commands.add_parser(
        "plugin",
        help="install (or remove) a start-up hook so that plain `lm_eval --model hybridlm ...` works",
        description="lm-eval 0.4 has no model plugin discovery. `install` writes hybridlm-lm-eval.pth into this "
        "environment's site-packages: at Python start-up it registers the `hybridlm` model lazily in lm-eval's "
        "registry (nothing heavy is imported until the model is used). `remove` deletes it.",
    )
    plugin.add_argument("action", choices=["install", "remove"])
    plugin.add_argument("--site-dir", type=Path, default=None,
                        help="the site-packages directory (default: this environment's)")
    plugin.set_defaults(func=run_plugin)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="Hugging Face checkpoint or training run dirs")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: evals/KIND-TIMESTAMP)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations (default float32)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: newest)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="raise the models' length limit (max_seq_len), to measure beyond it")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _fail(error: BaseException) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def parse_lengths(text: str) -> list[int]:
    """'4096,8k,16K' -> [4096, 8192, 16384] (a k suffix means x1024), sorted and deduplicated."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) * scale < 2:
            raise ValueError(f"--lengths: {part!r} is not a length; expected integers like 4096 or 4k, comma-separated")
        lengths.append(int(digits) * scale)
    if not lengths:
        raise ValueError("--lengths is empty; give lengths like 4096,8192")
    return sorted(set(lengths))


def _load_models(args):
    from hybridlm.evaluate.checkpoint import load_for_evaluation

    loaded = []
    for path in args.checkpoints:
        model = load_for_evaluation(path, device=args.device, dtype=args.dtype, step=args.step,
                                    max_seq_len=args.max_seq_len)
        names = {item.name for item in loaded}
        if model.name in names:
            model.name = f"{model.name}-{len(loaded)}"
        loaded.append(model)
    return loaded


def _out_dir(args, kind: str) -> Path:
    out = args.out or Path("evals") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    return out


# loss ------------------------------------------------------------------------------------------------
def run_loss(args: argparse.Namespace) -> int:
    import numpy as np

    from hybridlm.evaluate.limits import check_length, check_memory, loss_memory
    from hybridlm.evaluate.loss import check_tokenizer_matches, evaluate_loss, open_dataset, plot_loss_by_position

    try:
        if args.batch_size < 1 or args.max_instances < 0:
            raise ValueError("--batch-size must be >= 1 and --max-instances >= 0")
        dataset = open_dataset(args.data)
        models = _load_models(args)
        trained = [m.train_seq_len for m in models if m.train_seq_len]
        seq_len = args.seq_len or (max(trained) if trained else 2048)
        for loaded in models:
            check_length(loaded.model.config, seq_len, what="--seq-len")
            check_tokenizer_matches(dataset, loaded.model.config.vocab_size, loaded.tokenizer)
            weights = loaded.model.lm_head.weight
            check_memory(loss_memory(loaded.model.config, args.batch_size, seq_len, weights.dtype), weights.device,
                         what=f"a forward pass of {args.batch_size} x {seq_len} tokens",
                         hint="lower --batch-size or --seq-len")
            dataset.split(args.split).check_instances(seq_len)
        out = _out_dir(args, "loss")
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)

    results = {}
    for loaded in models:
        started = time.perf_counter()
        results[loaded.name] = evaluate_loss(loaded.model, dataset, seq_len=seq_len, batch_size=args.batch_size,
                                             max_instances=args.max_instances or None, split=args.split,
                                             document_masking=args.document_masking)
        result = results[loaded.name]
        print(f"{loaded.name}: loss {result.loss:.4f}, bits per byte {result.bits_per_byte:.4f} "
              f"({result.instances} x {seq_len} tokens, {time.perf_counter() - started:.1f} s)")
    summary = {
        "data": str(dataset.path),
        "seq_len": seq_len,
        "models": {name: {**r.to_dict(), "path": str(m.path), "train_seq_len": m.train_seq_len}
                   for (name, r), m in zip(results.items(), models)},
    }
    (out / "loss.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = np.column_stack([np.arange(1, seq_len + 1)] + [r.position_loss for r in results.values()])
    np.savetxt(out / "loss_by_position.csv", table, delimiter=",", fmt=["%d"] + ["%.5f"] * len(results),
               header="context_length," + ",".join(results), comments="")
    plot_loss_by_position(results, out / "loss_by_position.png",
                          train_lengths={m.name: m.train_seq_len for m in models})
    print(f"wrote {out}/loss.json, loss_by_position.csv, loss_by_position.png")
    return 0


# ruler -----------------------------------------------------------------------------------------------
def run_ruler_command(args: argparse.Namespace) -> int:
    from hybridlm.evaluate.ruler import (
        check_ruler_limits,
        comparison_table,
        corpus_lines,
        prepare_samples,
        resolve_tasks,
        ruler_table,
        run_ruler,
        write_ruler_outputs,
    )

    try:
        tasks = resolve_tasks(args.tasks)
        lengths = parse_lengths(args.lengths)
        if args.samples < 1 or args.batch_size < 1:
            raise ValueError("--samples and --batch-size must be >= 1")
        models = _load_models(args)
        for loaded in models:
            check_ruler_limits(loaded.model, lengths, batch_size=args.batch_size)
        corpus = _haystack_corpus(args.haystack_data, max(lengths)) if args.haystack == "corpus" else None
        samples_by_tokenizer = {}
        for loaded in models:
            key = loaded.tokenizer.sha256
            if key not in samples_by_tokenizer:
                samples_by_tokenizer[key] = prepare_samples(
                    tasks, lengths, tokenizer=loaded.tokenizer, samples=args.samples, seed=args.seed,
                    template=args.template, haystack=args.haystack, corpus=corpus and corpus_lines(corpus),
                    value_kind=args.values)
        out = _out_dir(args, "ruler")
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)

    runs = []
    for loaded in models:
        started = time.perf_counter()

        def report(task, length, score, name=loaded.name):
            print(f"{name}: {task} @ {length}: {score:.1f}", flush=True)

        run = run_ruler(loaded.model, loaded.tokenizer, samples_by_tokenizer[loaded.tokenizer.sha256],
                        batch_size=args.batch_size, name=loaded.name, progress=report)
        print(f"{loaded.name}: {time.perf_counter() - started:.1f} s")
        runs.append(run)
    settings = {key: getattr(args, key) for key in ("tasks", "samples", "seed", "template", "haystack", "values")}
    settings.update(lengths=lengths, checkpoints=[str(m.path) for m in models])
    write_ruler_outputs(runs, out, settings=settings, train_lengths={m.name: m.train_seq_len for m in models})
    print()
    if len(runs) > 1:
        print("average score (%):")
        print(comparison_table(runs))
        print()
    for run in runs:
        print(f"{run.name}, score (%):")
        print(ruler_table(run))
        print()
        if run.answer_loss:
            print(f"{run.name}, answer loss (nats, lower is better):")
            print(ruler_table(run, "answer_loss"))
            print()
    print(f"wrote {out}/results.json, table.md, ruler.png, answer_loss.png, samples-*.jsonl")
    return 0


def _haystack_corpus(data: str, longest: int) -> str:
    """Held-out text of a prepared dataset, enough for a haystack of `longest` tokens (twice over)."""
    from hybridlm.evaluate.loss import open_dataset

    dataset = open_dataset(data)
    split = dataset.split("val")
    count = min(split.n_tokens, 2 * longest + 1024)
    return dataset.tokenizer.decode(split.read(0, count).tolist(), skip_special_tokens=True)


# harness ---------------------------------------------------------------------------------------------
def run_harness(args: argparse.Namespace) -> int:
    try:
        from hybridlm.evaluate.harness import main
    except ImportError as error:
        return _fail(ImportError(f"lm-evaluation-harness is not installed ({error}); pip install lm-eval"))
    return main(args.harness_args)


def run_plugin(args: argparse.Namespace) -> int:
    from hybridlm.evaluate import lm_eval_plugin

    try:
        if args.action == "install":
            path = lm_eval_plugin.install_pth(args.site_dir)
            print(f"wrote {path}; `lm_eval --model hybridlm --model_args pretrained=DIR --tasks ...` now works "
                  f"in this environment (`hybridlm eval plugin remove` undoes it)")
        else:
            path = lm_eval_plugin.remove_pth(args.site_dir)
            print(f"removed {path}" if path else "nothing to remove: the plugin file was not installed there")
    except OSError as error:
        return _fail(error)
    return 0
