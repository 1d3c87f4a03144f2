"""`hf-dynorm`: convert, inspect, calibrate, evaluate, and the end-to-end demo on the embedded defaults."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .allocator import pin_malloc_thresholds
from .assets import EMBEDDED_MODEL, EMBEDDED_TEXT


def _add_conversion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--norm", choices=("dyisru", "dyt"), default="dyisru")
    parser.add_argument("--sites", nargs="+", help="roles (attn_input, mlp_input, final, ...) or regexes; default all")
    parser.add_argument("--kappa", type=float, help="DyISRU kappa for every site (instead of calibration)")
    parser.add_argument("--alpha", type=float, help="DyT alpha for every site (instead of calibration)")
    parser.add_argument("--per-channel", action="store_true", help="one kappa/alpha per channel")
    parser.add_argument("--anchors", type=int, help="anchored DyISRU: k anchor channels per site (needs calibration)")
    parser.add_argument("--bound", type=float, help="saturate at BOUND x token rms instead of sqrt(C) (pure forms: "
                                                    "0.5 is far better zero-shot; anchors keep sqrt(C); see README)")
    parser.add_argument("--calibration", help=f"calibration text (e.g. {EMBEDDED_TEXT}, a file, a Hub dataset)")
    parser.add_argument("--estimator", default="median", help="median | mean | geomean | fit")
    parser.add_argument("--kappa-from", default="all", choices=("all", "bulk"))
    parser.add_argument("--calibration-windows", type=int, default=64)
    parser.add_argument("--calibration-autocast", choices=("bf16", "fp16"),
                        help="run the calibration pass's matmuls in this dtype (2.2x faster on an AMX CPU)")


def _conversion_kwargs(args, tokenizer) -> dict:
    import torch

    kwargs = {"sites": args.sites, "kappa": args.kappa, "alpha": args.alpha, "per_channel": args.per_channel,
              "bound": args.bound}
    if args.calibration:
        kwargs.update(calibration=args.calibration, estimator=args.estimator, kappa_from=args.kappa_from,
                      max_windows=args.calibration_windows, anchors=args.anchors, tokenizer=tokenizer,
                      autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.calibration_autocast))
    elif args.anchors:
        raise SystemExit("error: --anchors k picks channels from calibration data: add --calibration TEXT.")
    return kwargs


def _tokenizer(name: str, needed_for: str | None):
    """The tokenizer of `name`; where it has none that loads: an error naming --tokenizer if `needed_for` says what
    needs one, else None."""
    from . import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError, ImportError, TypeError) as error:
        if needed_for:
            raise ValueError(f"{needed_for} needs the model's tokenizer, and {name} has none that loads ({error}). "
                             "Pass --tokenizer NAME_OR_PATH: the base model's Hub id or a folder with its tokenizer "
                             "files.") from None
        return None


def cmd_convert(args) -> None:
    from . import convert, load_model
    from .conversion import save_converted
    from .fileio import check_output_folder

    check_output_folder(args.output, args.overwrite)
    tokenizer = _tokenizer(args.tokenizer or args.model, "calibration" if args.calibration else None)
    model = load_model(args.model)
    convert(model, args.norm, **_conversion_kwargs(args, tokenizer))
    save_converted(model, args.output, tokenizer, overwrite=args.overwrite)
    print(f"converted {len(model.config.dynorm['sites'])} norms to {args.norm}; saved to {args.output}"
          + ("" if tokenizer is not None else " (no tokenizer: the model folder had none; add one with --tokenizer)"))


def cmd_info(args) -> None:
    from . import find_norm_sites, load_model
    from .conversion import is_converted

    model = load_model(args.model)
    if is_converted(model):
        record = model.config.dynorm
        print(f"converted by hf_dynorm {record['hf_dynorm_version']}: {record['norm']} at {len(record['sites'])} "
              f"sites of a {record['base_model_type']} model; parameters: {json.dumps(record['parameters'])}")
        rows = [(name, spec["role"], spec["flavour"], spec["channels"], spec["kind"]) for name, spec in
                record["sites"].items()]
    else:
        rows = [(s.name, s.role, s.flavour, s.channels, f"eps={s.eps:g}") for s in find_norm_sites(model)]
        print(f"{type(model).__name__} ({model.config.model_type}): {len(rows)} norm sites")
    width = max(len(row[0]) for row in rows) if rows else 10
    for row in rows:
        print(f"  {row[0]:<{width}}  {row[1]:<11} {row[2]:<10} C={row[3]:<6} {row[4]}")


def cmd_eval(args) -> None:
    from . import load_model
    from .data import token_stream
    from .evaluation import agreement, compare, perplexity
    from .fileio import check_output_folder
    from .reports import write_eval_report

    check_output_folder(args.out, args.overwrite)
    tasks = [task for task in (args.tasks or "").split(",") if task]
    if tasks:
        from .downstream import check_tasks

        check_tasks(tasks)
    tokenizer = _tokenizer(args.tokenizer or args.model, "evaluation on text")
    model = load_model(args.model)
    options = dict(tokenizer=tokenizer, split=args.split, window=args.window, stride=args.stride,
                   batch_size=args.batch_size, max_tokens=args.max_tokens)
    reference = load_model(args.reference) if args.reference else None
    if reference is not None:
        ids = token_stream(args.data, tokenizer, args.split, args.max_tokens)
        results = compare(model, reference, ids, **options)
        results["agreement"] = agreement(model, reference, ids, window=args.window, prompts=args.prompts)
        if getattr(tokenizer, "chat_template", None):  # a chat model: the shipped prompts, answered side by side
            from .evaluation import chat_answers, chat_prompts

            prompts = chat_prompts()
            results["chat"] = [{"prompt": p, "model": m, "reference": r} for p, m, r in zip(
                prompts, chat_answers(model, tokenizer, prompts), chat_answers(reference, tokenizer, prompts))]
    else:
        results = {"model": perplexity(model, args.data, **options).to_dict()}
    if tasks:
        from .downstream import run_tasks

        scores = {"model": run_tasks(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size)}
        if reference is not None:
            scores["reference"] = run_tasks(reference, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size)
        results["tasks"] = {task: {who: found[task] for who, found in scores.items()} for task in tasks}
    results.update(model_id=str(args.model), reference_id=args.reference, data=args.data, split=args.split)
    if Path(args.model).is_dir():
        from .hub import model_fingerprint

        results["model_fingerprint"] = model_fingerprint(args.model)
    plots = []
    if args.fidelity:
        results["fidelity"], plots = _fidelity(args, model, tokenizer)
    write_eval_report(results, args.out)
    if plots:
        from .fidelity import plot_fidelity

        plot_fidelity(plots, args.out)
    print(Path(args.out, "report.md").read_text())


def _fidelity(args, model, tokenizer):
    from . import load_model
    from .calibration import calibrate
    from .data import token_stream
    from .fidelity import outlier_fidelity

    ids = token_stream(args.data, tokenizer, args.split)
    if getattr(model.config, "dynorm", None) is not None:
        if not args.reference:
            raise ValueError("--fidelity on a converted model compares it with its original: add --reference MODEL.")
        results = outlier_fidelity(model, ids, reference=load_model(args.reference), window=args.window)
    else:
        calibration = calibrate(model, args.data, tokenizer=tokenizer, split="train", max_windows=16)
        results = outlier_fidelity(model, ids, calibration=calibration, window=args.window)
    return {k: v for k, v in results.items() if not k.startswith("_")}, results


def cmd_paper_demo(args) -> None:
    from .fileio import check_output_folder
    from .paper_demo import run_paper_demo

    check_output_folder(args.out, args.overwrite)
    run_paper_demo(args.out)
    print(Path(args.out, "report.md").read_text())


def cmd_calibrate(args) -> None:
    from .fileio import check_output_folder
    from .sweep import zero_shot_report

    check_output_folder(args.out, args.overwrite)
    zero_shot_report(args.model, args.data, args.out, windows=args.windows, eval_windows=args.eval_windows,
                     sensitivity=not args.no_sensitivity)
    print(Path(args.out, "report.md").read_text())


def cmd_demo(args) -> None:
    from .demo import run_demo
    from .fileio import check_output_folder

    check_output_folder(args.out, args.overwrite)
    run_demo(args.out, [*args.overrides, *(["--overwrite", "true"] if args.overwrite else [])])


def cmd_card(args) -> None:
    from .hub import write_card

    results = json.loads(Path(args.results).read_text()) if args.results else None
    print(f"wrote {write_card(args.folder, results, license=args.license)}")


def cmd_push(args) -> None:
    from .hub import push_to_hub

    if args.dry_run and not args.out:
        raise ValueError("--dry-run needs --out STAGE: the folder to write instead of uploading.")
    if args.out and not args.dry_run:
        raise ValueError("--out names the stage folder of --dry-run; add --dry-run, or drop --out to upload.")
    if args.dry_run:
        from .fileio import check_output_folder

        check_output_folder(args.out, args.overwrite)
    where = push_to_hub(args.folder, args.repo_id, results=args.results, private=args.private, token=args.token,
                        revision=args.revision, license=args.license, dry_run_dir=args.out if args.dry_run else None,
                        overwrite=args.overwrite)
    print(f"staged in {where} (nothing uploaded)" if args.dry_run else f"pushed: {where}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-dynorm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="write a converted model folder (with tokenizer)")
    convert.add_argument("model", help=f"Hub id, local folder or {EMBEDDED_MODEL}")
    convert.add_argument("output")
    convert.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it holds files")
    convert.add_argument("--tokenizer", help="where the tokenizer is, if not in MODEL (needed with --calibration)")
    _add_conversion_options(convert)
    convert.set_defaults(func=cmd_convert)

    info = commands.add_parser("info", help="norm sites and roles, and the conversion record of a converted model")
    info.add_argument("model")
    info.set_defaults(func=cmd_info)

    evaluate = commands.add_parser("eval", help="strided perplexity, optionally beside a reference model")
    evaluate.add_argument("model", help="a converted (or any) model: Hub id, local folder or smollm2-135m")
    evaluate.add_argument("--reference", help="the original model, evaluated on the very same tokens")
    evaluate.add_argument("--data", default=EMBEDDED_TEXT, help="held-out text: wiki-sample, news-sample, a local "
                                                                "file or a Hub dataset (name or name:config)")
    evaluate.add_argument("--split", default="test", help="the split scored (embedded texts: train, test or all)")
    evaluate.add_argument("--window", type=int, default=512, help="tokens per scored window")
    evaluate.add_argument("--stride", type=int, help="window stride (default: the window, no overlap)")
    evaluate.add_argument("--batch-size", type=int, default=4, help="windows per forward (lm-eval: its batch size)")
    evaluate.add_argument("--max-tokens", type=int, help="score at most this many tokens of the split")
    evaluate.add_argument("--fidelity", action="store_true",
                          help="outlier fidelity per site (converted: against --reference; else DyT/DyISRU what-if)")
    evaluate.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated: lm-eval task names, task "
                                          "YAML files, or wiki-cloze (shipped, offline); needs hf_dynorm[eval]")
    evaluate.add_argument("--limit", type=float, help="lm-eval: at most this many examples per task (or a fraction)")
    evaluate.add_argument("--prompts", type=int, default=8,
                          help="greedy continuations compared with --reference's (agreement)")
    evaluate.add_argument("--out", default="outputs/eval", help="results.json, report.md and plots go here")
    evaluate.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    evaluate.add_argument("--tokenizer", help="where the tokenizer is, if not in MODEL")
    evaluate.set_defaults(func=cmd_eval)

    calibrate = commands.add_parser("calibrate", help="zero-shot report: every norm kind and estimator, swapped")
    calibrate.add_argument("model")
    calibrate.add_argument("--data", default=EMBEDDED_TEXT)
    calibrate.add_argument("--out", default="outputs/calibration")
    calibrate.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    calibrate.add_argument("--windows", type=int, default=64, help="calibration windows of 512 tokens")
    calibrate.add_argument("--eval-windows", type=int, default=4, help="held-out windows of 512 tokens")
    calibrate.add_argument("--no-sensitivity", action="store_true", help="skip the per-site sweep")
    calibrate.set_defaults(func=cmd_calibrate)

    demo_paper = commands.add_parser("paper-demo", help="the paper's numerical demonstration, with a sweep")
    demo_paper.add_argument("--out", default="outputs/paper-demo")
    demo_paper.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    demo_paper.set_defaults(func=cmd_paper_demo)

    card = commands.add_parser("card", help="render the model card into a converted folder's README.md")
    card.add_argument("folder")
    card.add_argument("--results", help="results.json of `hf-dynorm eval` or of distillation for this folder")
    card.add_argument("--license", help="the base model's licence (default: known for embedded models, else other)")
    card.set_defaults(func=cmd_card)

    push = commands.add_parser("push", help="upload a converted folder with its card in one commit")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--results")
    push.add_argument("--private", action="store_true", default=None)
    push.add_argument("--token")
    push.add_argument("--revision")
    push.add_argument("--license")
    push.add_argument("--dry-run", action="store_true", help="write the stage folder to --out, upload nothing")
    push.add_argument("--out")
    push.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    push.set_defaults(func=cmd_push)

    demo = commands.add_parser("demo", help="the main job: calibrate, convert, distil, evaluate the embedded default")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--overwrite", action="store_true", help="replace --out (and its distillation) if it holds files")
    demo.set_defaults(func=cmd_demo)  # further --key value arguments override the distillation recipe

    commands.add_parser("distill", help="distil: --config RECIPE.yaml [--key value ...] (see hf_dynorm.distill)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["distill"]:  # its own HfArgumentParser takes every recipe key (and its main pins malloc)
        from .distill import main as distill_main

        return distill_main(argv[1:])
    pin_malloc_thresholds()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
