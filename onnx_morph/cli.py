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
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(render(result, None if args.all_ops else 40))


def _demo(args: argparse.Namespace) -> None:
    from onnx_morph.examples import demo

    demo(sys.stdout)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"analyze": _analyze, "demo": _demo}[args.command](args)
    except OnnxMorphError as exc:
        print(f"onnx-morph: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
