"""The onnx-morph command line: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import re
import sys

from onnx_morph.data import CALIBRATION_IMAGES, DATA_HELP
from onnx_morph.errors import InvariantError, OnnxMorphError, OptionError
from onnx_morph.rewrite.training import BATCH_SIZE
from onnx_morph.rewrite.surgery.criteria import MIN_KEEP, ROUND_TO, Budget, Criterion, Mask, Threshold


class _HelpFormatter(argparse.HelpFormatter):
    """Help lines end with the option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


class _Commands(argparse._SubParsersAction):
    """Subcommands parse without prefix matching (`--round` is not `--round-to`) and with the
    defaults shown in their help."""

    def add_parser(self, name, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        return super().add_parser(name, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-morph", description="MorphNet structure learning for ONNX models.",
                                     allow_abbrev=False)
    parser.register("action", "parsers", _Commands)
    commands = parser.add_subparsers(dest="command", required=True)
    _analyze_command(commands)
    _prune_command(commands)
    _profile_command(commands)
    _expand_command(commands)
    _regularize_command(commands)
    _train_command(commands)
    _demo_command(commands)
    return parser


def _analyze_command(commands) -> None:
    analyze = commands.add_parser("analyze", help="channel groups and per-op costs of a model")
    analyze.add_argument("model", help="path of an .onnx file")
    _input_shape(analyze)
    analyze.add_argument("--cost", default="flops",
                         help="flops | params | activations | memory | latency:HW (HW: V100, T4, ... or GFLOPS,GBS)")
    _thresholds(analyze.add_mutually_exclusive_group())
    analyze.add_argument("--macs", action="store_true", help="count multiply-accumulates instead of FLOPs (2 per MAC)")
    analyze.add_argument("--json", action="store_true", help="print the JSON report (docs/analyze-json.md)")
    analyze.add_argument("--all-ops", action="store_true", help="list every op, not only the 40 costliest")
    analyze.add_argument("--structure", metavar="FILE",
                         help="write the learned structure and channel masks (input of `prune --mask`)")
    analyze.add_argument("--graph", metavar="FILE.graphml",
                         help="write the channel graph for a graph viewer: ops, tensors, their channel groups")


def _prune_command(commands) -> None:
    prune = _model_to_model(commands, "prune", "remove dead channels and write a smaller model", "pruned")
    # Destinations are the fields of the criteria (Threshold, Mask, Budget), so that their messages
    # (`flops`, round_to) show as these flags.
    criterion = prune.add_mutually_exclusive_group(required=True)
    _thresholds(criterion)
    criterion.add_argument("--mask", metavar="FILE", help="channel masks written by `analyze --structure`")
    criterion.add_argument("--target-flops", dest="flops", type=float,
                           help="remove the weakest channels until FLOPs <= this")
    criterion.add_argument("--target-params", dest="params", type=float,
                           help="remove the weakest channels until params <= this")
    criterion.add_argument("--ratio", type=float, help="keep this fraction of the FLOPs (e.g. 0.5)")
    criterion.add_argument("--target-latency", dest="latency", metavar="R|TIME",
                           help="prune to this latency predicted by --latency-table: a fraction of the measured "
                                "original (0.5) or a time (3.2ms)")
    prune.add_argument("--latency-table", metavar="FILE",
                       help="latency table written by `onnx-morph profile`: predicted and measured latency before and after")
    prune.add_argument("--provider", choices=["cpu", "cuda"], help="refuse a latency table profiled on another provider")
    prune.add_argument("--no-measure", action="store_true", help="with a latency table, skip timing the two models")
    prune.add_argument("--round-to", type=int, default=ROUND_TO, metavar="N", help="keep every width a multiple of N")
    prune.add_argument("--min-keep", type=float, default=MIN_KEEP, metavar="F",
                       help="with a budget, keep at least this fraction of every group's channels")
    prune.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    prune.add_argument("--calibrate", metavar="DATA",
                       help=f"re-measure BatchNorm statistics of the pruned model on training images of DATA: {DATA_HELP}")
    prune.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, metavar="N",
                       help="how many training images --calibrate uses")
    _normalization(prune)


def _profile_command(commands) -> None:
    profile = commands.add_parser("profile", help="time every weighted op in onnxruntime at a grid of widths")
    profile.add_argument("model", help="path of an .onnx file")
    profile.add_argument("-o", "--output", required=True, metavar="FILE", help="latency table (JSON)")
    _input_shape(profile)
    profile.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider")
    profile.add_argument("--threads", type=int, default=2, help="intra-op threads")
    profile.add_argument("--batch", type=int, default=1, help="batch size timed")
    profile.add_argument("--max-points", type=int, default=10, metavar="N",
                         help="widths per axis of each op's grid, besides the full width and its top step (default 10)")


def _expand_command(commands) -> None:
    expand = _model_to_model(commands, "expand", "scale a learned structure to a budget, freshly initialized",
                             "expanded")
    target = expand.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops", type=float, help="largest uniform width multiplier with FLOPs <= this")
    target.add_argument("--target-params", type=float, help="largest uniform width multiplier with params <= this")
    target.add_argument("--like", metavar="MODEL", help="target the FLOPs of MODEL (e.g. the network before shrinking)")
    expand.add_argument("--round-to", type=int, default=ROUND_TO, metavar="N", help="make every width a multiple of N")
    expand.add_argument("--seed", type=int, default=0, help="seed of the fresh weights")


def _regularize_command(commands) -> None:
    regularize = commands.add_parser("regularize", help="write onnxruntime-training artifacts with MorphNet's regularizer")
    regularize.add_argument("model", help="path of an .onnx file (exported with BatchNorm kept for --regularizer gamma)")
    regularize.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the artifacts")
    _input_shape(regularize)
    regularize.add_argument("--cost", default="flops", help="flops | params | activations | latency:HW")
    regularize.add_argument("--regularizer", default="gamma", choices=["gamma", "group-lasso", "gates", "none"],
                            help="gamma (BatchNorm scale L1), group-lasso (weight slices), gates (probabilistic "
                                 "per-channel gates, FiGS), none (plain fine-tuning)")
    regularize.add_argument("--strength", type=float,
                            help="weight of the regularization term (default: 1 / its initial value)")
    regularize.add_argument("--threshold", type=float,
                            help="a channel is alive while its value exceeds this (0.01; gates: probability >= 0.1)")
    regularize.add_argument("--l1-fraction", type=float, default=0.0, help="group-lasso: share of mean |W| vs RMS")
    regularize.add_argument("--gate-temperature", type=float, metavar="T",
                            help="gates: temperature of the sampled logistic-sigmoid mask (default 0.5)")
    regularize.add_argument("--straight-through", action="store_true",
                            help="gates: hard 0/1 mask forward, the soft mask's gradient backward")
    regularize.add_argument("--gate-logit-scale", type=float, metavar="S",
                            help="gates: learning-rate multiplier of the logits (stored as logit / S; default 10)")
    regularize.add_argument("--gates-everywhere", action="store_true",
                            help="gates: gate every prunable group, also those with a BatchNorm")
    regularize.add_argument("--macs", action="store_true", help="FLOPs cost counts multiply-accumulates")
    regularize.add_argument("--loss", default="cross-entropy", choices=["cross-entropy", "mse", "bce"],
                            help="task loss on the model's first output")
    regularize.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer of the artifacts")
    regularize.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="training batch size (fixed in the artifacts)")
    for option, text in (("--input-boundary", "regularize only after nodes matching this regex"),
                         ("--output-boundary", "regularize only up to nodes matching this regex"),
                         ("--force-group", "regularize the outputs of all nodes matching this regex as one group"),
                         ("--blacklist", "do not regularize the sources of nodes matching this regex")):
        regularize.add_argument(option, action="append", default=[], metavar="REGEX", help=text)
    regularize.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def _train_command(commands) -> None:
    train = commands.add_parser("train", help="train regularize's artifacts and export the trained model")
    train.add_argument("artifacts", metavar="DIR", help="folder written by `onnx-morph regularize`")
    train.add_argument("--data", required=True, help=DATA_HELP)
    _normalization(train)
    train.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    train.add_argument("--learning-rate", type=float, help="default: the optimizer's (1e-3)")
    strength = train.add_mutually_exclusive_group()
    strength.add_argument("--strength", type=float, help="override the artifacts' strength")
    _targets(strength)
    train.add_argument("--structure-every", type=int, default=100, metavar="N",
                       help="write learned_structure/alive_STEP.json every N steps")
    train.add_argument("--limit", type=int, metavar="N", help="use only the first N training examples")
    train.add_argument("-o", "--output", metavar="FILE", help="trained model (default: DIR/trained.onnx)")


def _demo_command(commands) -> None:
    demo = commands.add_parser("demo", help="MorphNet end to end on a built-in CNN: shrink, prune, fine-tune")
    demo.add_argument("-o", "--output", default="onnx-morph-demo", metavar="DIR", help="folder for models, logs, plot")
    demo.add_argument("--data", choices=["fashion-mnist", "digits"],
                      help="default: Fashion-MNIST where it is installed or downloads, else digits")
    demo.add_argument("--target-ratio", type=float, default=0.5, metavar="R", help="fraction of the FLOPs to keep")
    demo.add_argument("--quick", action="store_true", help="a small subset and few steps (under a minute)")


def _thresholds(group) -> None:
    """analyze's and prune's dead-channel thresholds (destinations: Threshold's fields)."""
    group.add_argument("--gamma-threshold", dest="gamma", type=float, metavar="T",
                       help="channels whose |BatchNorm scale| is at most T are dead")
    group.add_argument("--weight-threshold", dest="weight", type=float, metavar="T",
                       help="channels whose weight-slice RMS is at most T are dead")


def _input_shape(command: argparse.ArgumentParser) -> None:
    command.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                         help="fix the dims of a dynamic input (a dynamic batch alone is set to 1)")


def _normalization(command: argparse.ArgumentParser) -> None:
    command.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                         help="normalize [0, 1] pixels by this per-channel mean (default: the training set's)")
    command.add_argument("--std", type=_floats, metavar="S[,S,S]",
                         help="normalize [0, 1] pixels by this per-channel std (default: the training set's)")


def _targets(group) -> None:
    group.add_argument("--target-ratio", type=float, metavar="R",
                       help="adapt the strength until the effective cost is this fraction of the full cost")
    group.add_argument("--target-flops", type=float, metavar="X", help="adapt the strength until FLOPs <= X")
    group.add_argument("--target-params", type=float, metavar="X", help="adapt the strength until params <= X")
    group.add_argument("--target-latency", type=float, metavar="SECONDS",
                       help="adapt the strength until the latency cost <= this (artifacts made with --cost latency:HW)")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not '{text}'") from None


def _model_to_model(commands, name: str, text: str, result: str) -> argparse.ArgumentParser:
    """A command that reads one model and writes another."""
    command = commands.add_parser(name, help=text)
    command.add_argument("model", help="path of an .onnx file")
    command.add_argument("-o", "--output", required=True, help=f"path of the {result} model (never the input)")
    _input_shape(command)
    return command


def _analyze(args: argparse.Namespace) -> None:
    from onnx_morph.analysis import analyze
    from onnx_morph.graph import parse_input_shapes
    from onnx_morph.report import render

    result = analyze(
        args.model,
        input_shapes=parse_input_shapes(args.input_shape),
        cost=args.cost,
        gamma_threshold=args.gamma,
        weight_threshold=args.weight,
        macs=args.macs,
    )
    if args.structure:
        from onnx_morph.rewrite.surgery.select import write_mask_document

        write_mask_document(result.graph, result.alive, args.structure,
                            "weight" if args.weight is not None else "gamma")
    if args.graph:
        from onnx_morph.graph.graphml import write_graphml

        write_graphml(result.graph, args.graph)
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(render(result, None if args.all_ops else 40))


def _prune(args: argparse.Namespace) -> None:
    from onnx_morph.graph import parse_input_shapes
    from onnx_morph.report import render_prune
    from onnx_morph.rewrite import prune_file

    criterion = _criterion(args)
    calibration = None
    if args.calibrate:
        from onnx_morph.data import load_dataset

        data = load_dataset(args.calibrate)
        calibration = lambda shape: data.fitted(shape, args.mean, args.std).calibration_batches(  # noqa: E731
            args.calibration_images)
    result = prune_file(args.model, args.output, criterion, input_shapes=parse_input_shapes(args.input_shape),
                        verify=not args.no_verify, calibration=calibration, latency_table=args.latency_table,
                        provider=args.provider, measure=not args.no_measure)
    print(render_prune(result, args.output))


def _criterion(args: argparse.Namespace) -> Criterion:
    """prune's criterion from its flags (argparse lets exactly one kind through)."""
    if args.mask is not None:
        return Mask(args.mask, round_to=args.round_to)
    if args.gamma is not None or args.weight is not None:
        return Threshold(gamma=args.gamma, weight=args.weight, round_to=args.round_to)
    return Budget(flops=args.flops, params=args.params, ratio=args.ratio, latency=args.latency,
                  round_to=args.round_to, min_keep=args.min_keep)


def _profile(args: argparse.Namespace) -> None:
    from onnx_morph.graph import parse_input_shapes
    from onnx_morph.profile import Timing, profile
    from onnx_morph.rewrite.surgery.save import write_text

    table = profile(args.model, input_shapes=parse_input_shapes(args.input_shape), max_points=args.max_points,
                    timing=Timing(provider=args.provider, threads=args.threads, batch=args.batch))
    write_text(json.dumps(table.to_json(), indent=1) + "\n", args.output)
    print(f"wrote {args.output}: {len(table.ops)} ops on {table.name}; model {1e3 * table.model_seconds:.3f} ms "
          f""
          f"= {table.scale:.3f} x ops {1e3 * table.ops_seconds:.3f} ms + overhead {1e3 * table.overhead_seconds:.3f} ms")


def _expand(args: argparse.Namespace) -> None:
    from onnx_morph.graph import parse_input_shapes
    from onnx_morph.report import render_expand
    from onnx_morph.rewrite.surgery.expand import expand_file

    target_flops = args.target_flops
    if args.like:
        from onnx_morph.analysis import analyze

        target_flops = analyze(args.like).total.flops
    result = expand_file(args.model, args.output, input_shapes=parse_input_shapes(args.input_shape),
                         target_flops=target_flops, target_params=args.target_params,
                         round_to=args.round_to, seed=args.seed)
    print(render_expand(result, args.output))


def _regularize(args: argparse.Namespace) -> None:
    from onnx_morph.graph import parse_input_shapes
    from onnx_morph.rewrite.training.artifacts import make_training_artifacts
    from onnx_morph.rewrite.training.regularizer import GATE_LOGIT_SCALE, GATE_TEMPERATURE, RegularizerOptions

    options = None if args.regularizer == "none" else RegularizerOptions(
        kind=args.regularizer, cost=args.cost, threshold=args.threshold, l1_fraction=args.l1_fraction, macs=args.macs,
        input_boundary=tuple(args.input_boundary), output_boundary=tuple(args.output_boundary),
        force_group=tuple(args.force_group), blacklist=tuple(args.blacklist),
        gate_temperature=GATE_TEMPERATURE if args.gate_temperature is None else args.gate_temperature,
        straight_through=args.straight_through, gates_everywhere=args.gates_everywhere,
        gate_logit_scale=GATE_LOGIT_SCALE if args.gate_logit_scale is None else args.gate_logit_scale)
    result = make_training_artifacts(
        args.model, args.output, loss=args.loss, regularizer=options, strength=args.strength,
        optimizer=args.optimizer, batch_size=args.batch_size, input_shapes=parse_input_shapes(args.input_shape), overwrite=args.force)
    print(f"wrote training artifacts to {result.directory}/ (training, eval and optimizer models, checkpoint)")
    if options is not None:
        print(f"regularizer: {options.kind} on {options.cost}, strength {result.strength:.4g}; cost "
              f"{result.total_cost:.6g}, effective {result.initial_cost:.6g}, regularization {result.initial_regularization:.6g}")
    for note in result.notes:
        print(f"note: {note}")
    target = " --target-ratio 0.5" if options is not None else ""
    print(f"train it: onnx-morph train {result.directory} --data DATA --epochs 1{target}  (DATA: {DATA_HELP})")


def _train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from onnx_morph.data import load_dataset
    from onnx_morph.rewrite.training.artifacts import load_artifacts
    from onnx_morph.target import cost_target
    from onnx_morph.train import train

    artifacts = load_artifacts(args.artifacts)
    target = None
    if artifacts.regularizer is not None:
        target = cost_target(artifacts.regularizer.cost, artifacts.total_cost, ratio=args.target_ratio,
                             flops=args.target_flops, params=args.target_params, latency=args.target_latency)
    elif any(v is not None for v in (args.target_ratio, args.target_flops, args.target_params, args.target_latency)):
        raise OptionError(f"the artifacts in {artifacts.directory} have no regularizer, so no cost to bring to a target")
    shape = next(iter(artifacts.input_shapes.values()))
    data = load_dataset(args.data, image_size=tuple(shape[2:]) if len(shape) == 4 else None)
    data = data.fitted(shape, args.mean, args.std)
    if args.limit:
        data = data.subset(train=args.limit)
    output = Path(args.output) if args.output else artifacts.directory / "trained.onnx"
    result = train(artifacts, (data.x_train, data.y_train), epochs=args.epochs, learning_rate=args.learning_rate,
                   strength=args.strength, target=target, structure_every=args.structure_every, export=output,
                   test_data=(data.x_test, data.y_test))
    print(f"{result.steps} steps in {result.seconds:.1f} s on {data.name}; task loss {result.task_loss:.4f}")
    if result.effective_cost is not None:
        cost = artifacts.regularizer.cost
        print(f"effective {cost}: {result.effective_cost:.6g} of {artifacts.total_cost:.6g} "
              f"({100 * result.effective_cost / artifacts.total_cost:.1f}%)"
              + (f"; target {target:.6g} ({100 * target / artifacts.total_cost:.1f}%)" if target else ""))
        if result.moved_to_target > 0:
            print(f"masks.json: the {result.moved_to_target} weakest channels still alive at the end removed to meet "
                  "the target")
        elif result.moved_to_target < 0:
            print(f"masks.json: the {-result.moved_to_target} strongest channels below the threshold kept, within "
                  "the target")
        print("alive channels per group: " + ", ".join(f"{g}: {n}" for g, n in result.alive_per_group.items()))
    print(f"test accuracy {100 * result.test_accuracy:.2f}%; trained model: {result.model_path}")
    if result.effective_cost is None:
        print(f"logs: {artifacts.directory}/train_log.csv, tensorboard/")
        return
    print(f"logs: {artifacts.directory}/train_log.csv, tensorboard/, learned_structure/, masks.json")
    # Channels removed while still alive shift the next BatchNorms: their statistics need measuring again.
    calibrate = f" --calibrate {args.data}" if result.moved_to_target > 0 else ""
    print(f"prune it: onnx-morph prune {result.model_path} --mask {artifacts.directory / 'masks.json'} -o small.onnx"
          f"{calibrate}")


def _demo(args: argparse.Namespace) -> None:
    from onnx_morph.examples import demo

    demo(sys.stdout, args.output, quick=args.quick, data=args.data, target_ratio=args.target_ratio)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        {"analyze": _analyze, "prune": _prune, "profile": _profile, "expand": _expand, "regularize": _regularize, "train": _train,
         "demo": _demo}[args.command](args)
    except OnnxMorphError as exc:
        print(f"onnx-morph: error: {_with_flags(str(exc), command)}", file=sys.stderr)
        return 2
    except InvariantError as exc:
        print(f"onnx-morph: internal error (a bug of onnx-morph, not of your input): {exc}\n"
              "Please report it with the command and, if you can, the model.", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


def _with_flags(message: str, command: argparse.ArgumentParser) -> str:
    """The library names its options as Python does (`round_to`); the CLI user knows them as flags."""
    for action in command._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if flags:
            message = message.replace(f"`{action.dest}`", flags[0])
            if "_" in action.dest:
                message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}(?![\w])", flags[0], message)
    return message


if __name__ == "__main__":
    sys.exit(main())
