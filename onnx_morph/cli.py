"""The onnx-morph command line: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys

from onnx_morph.errors import OnnxMorphError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-morph", description="MorphNet structure learning for ONNX models.")
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser("analyze", help="channel groups and per-op costs of a model")
    analyze.add_argument("model", help="path of an .onnx file")
    analyze.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                         help="fix the dims of a dynamic input (default: dynamic batch = 1)")
    analyze.add_argument("--cost", default="flops",
                         help="flops | params | activations | memory | latency:HW (HW: V100, T4, ... or GFLOPS,GBS)")
    threshold = analyze.add_mutually_exclusive_group()
    threshold.add_argument("--gamma-threshold", type=float,
                           help="channels whose |BatchNorm scale| is at most this are dead")
    threshold.add_argument("--weight-threshold", type=float,
                           help="channels whose weight-slice RMS is at most this are dead")
    analyze.add_argument("--macs", action="store_true", help="count multiply-accumulates instead of FLOPs (2 per MAC)")
    analyze.add_argument("--json", action="store_true", help="print the JSON report (docs/analyze-json.md)")
    analyze.add_argument("--all-ops", action="store_true", help="list every op, not only the 40 costliest")
    analyze.add_argument("--structure", metavar="FILE",
                         help="write the learned structure and channel masks (input of `prune --mask`)")

    prune = commands.add_parser("prune", help="remove dead channels and write a smaller model")
    prune.add_argument("model", help="path of an .onnx file")
    prune.add_argument("-o", "--output", required=True, help="path of the pruned model (never the input)")
    prune.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...")
    criterion = prune.add_mutually_exclusive_group(required=True)
    criterion.add_argument("--gamma-threshold", type=float, help="remove channels with |BatchNorm scale| <= T")
    criterion.add_argument("--weight-threshold", type=float, help="remove channels with weight-slice RMS <= T")
    criterion.add_argument("--mask", metavar="FILE", help="channel masks written by `analyze --structure`")
    criterion.add_argument("--target-flops", type=float, help="remove the weakest channels until FLOPs <= this")
    criterion.add_argument("--target-params", type=float, help="remove the weakest channels until params <= this")
    criterion.add_argument("--ratio", type=float, help="keep this fraction of the FLOPs (e.g. 0.5)")
    prune.add_argument("--round-to", type=int, default=1, metavar="N", help="keep every width a multiple of N")
    prune.add_argument("--min-keep", type=float, default=0.1, metavar="F",
                       help="with a budget, keep at least this fraction of every group's channels (default 0.1)")
    prune.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")

    commands.add_parser("demo", help="analyze a built-in example model (a small ResNet-style CNN)")
    return parser


def _analyze(args: argparse.Namespace) -> None:
    from onnx_morph.analysis import analyze
    from onnx_morph.graph import parse_input_shapes
    from onnx_morph.report import render

    result = analyze(
        args.model,
        input_shapes=parse_input_shapes(args.input_shape),
        cost=args.cost,
        gamma_threshold=args.gamma_threshold,
        weight_threshold=args.weight_threshold,
        macs=args.macs,
    )
    if args.structure:
        from onnx_morph.rewrite.select import write_mask_document

        write_mask_document(result.graph, result.alive, args.structure,
                            "weight" if args.weight_threshold is not None else "gamma")
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(render(result, None if args.all_ops else 40))


def _prune(args: argparse.Namespace) -> None:
    from onnx_morph.graph import parse_input_shapes
    from onnx_morph.report import render_prune
    from onnx_morph.rewrite import prune_file

    result = prune_file(
        args.model,
        args.output,
        input_shapes=parse_input_shapes(args.input_shape),
        gamma_threshold=args.gamma_threshold,
        weight_threshold=args.weight_threshold,
        masks=args.mask,
        target_flops=args.target_flops,
        target_params=args.target_params,
        ratio=args.ratio,
        round_to=args.round_to,
        min_keep=args.min_keep,
        verify=not args.no_verify,
    )
    print(render_prune(result, args.output))


def _demo(args: argparse.Namespace) -> None:
    from onnx_morph.examples import demo

    demo(sys.stdout)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"analyze": _analyze, "prune": _prune, "demo": _demo}[args.command](args)
    except OnnxMorphError as exc:
        print(f"onnx-morph: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
