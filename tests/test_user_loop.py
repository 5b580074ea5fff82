"""The MorphNet loop on a user's own model and data: exports with a fixed batch, data adapted to the
model's input (channels, size, normalization), image folders, the Fashion-MNIST download route,
training to a cost target, and the CLI's handling of all of it. Every test names its data."""

from __future__ import annotations

import functools
import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from cli_checks import assert_user_error
from onnx_morph.data import Dataset, download_fashion_mnist, load_dataset
from onnx_morph.errors import ModelLoadError, OptionError
from tools.zoo import export_onnx, import_torchvision

SCRIPT = Path(sys.executable).parent / "onnx-morph"


def cli(*args, env=None):
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=900, env=env)


def _image_folder(root: Path, classes: int = 2, per_class: int = 12, size=(20, 24), mode="RGB") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (*size, 3)).astype(np.uint8) + np.uint8(120 * label)
            Image.fromarray(pixels).convert(mode).save(folder / f"{i}.png")
    return root


# --- data adapted to the model -------------------------------------------------------------------

def test_digits_become_rgb_224_and_back_to_gray():
    digits = load_dataset("digits").subset(train=10, test=4)
    rgb = digits.fitted((1, 3, 32, 32))
    assert rgb.x_train.shape == (10, 3, 32, 32) and rgb.x_test.shape == (4, 3, 32, 32)
    assert np.array_equal(rgb.x_train[:, 0], rgb.x_train[:, 2])
    gray = rgb.fitted((1, 1, 32, 32))
    np.testing.assert_allclose(gray.x_train[:, 0], rgb.x_train[:, 0], atol=1e-5)  # luma weights sum to 1
    assert digits.fitted((1, 64)).x_train.shape == (10, 64)


def test_mean_and_std_normalize_pixels_per_channel():
    digits = load_dataset("digits").subset(train=50, test=5)
    x = digits.fitted((1, 3, 8, 8), mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 2.0]).x_train
    pixels = digits.x_train * digits.pixel_std + digits.pixel_mean  # digits in [0, 1]
    np.testing.assert_allclose(x[:, 0], (pixels[:, 0] - 0.5) / 0.5, atol=1e-5)
    np.testing.assert_allclose(x[:, 2], pixels[:, 0] / 2.0, atol=1e-5)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


@pytest.mark.parametrize("shape, data_shape, message", [
    ((1, 5, 8, 8), (1, 8, 8), "has 1 channels per image and the model's input takes 5"),
    ((1, 10), (1, 8, 8), "cannot be adapted to the model's input of shape [1, 10]"),
])
def test_shapes_that_cannot_be_adapted_name_both(shape, data_shape, message):
    x = np.zeros((4, *data_shape), np.float32)
    data = Dataset("toy", x, np.zeros(4, np.int64), x, np.zeros(4, np.int64))
    with pytest.raises(OptionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        data.fitted(shape)


def test_image_folder_reads_classes_and_splits(tmp_path):
    root = _image_folder(tmp_path / "pets", classes=3, per_class=10)
    data = load_dataset(root, image_size=(16, 16))
    assert data.x_train.shape == (24, 3, 16, 16) and data.x_test.shape == (6, 3, 16, 16)
    assert sorted(set(data.y_train) | set(data.y_test)) == [0, 1, 2]
    assert abs(float(data.x_train.mean())) < 1e-4  # standardized on the training split
    (tmp_path / "pets" / "class_0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OptionError, match="broken.png: not a readable image"):
        load_dataset(root)


def test_npz_uint8_images_are_pixels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(20) % 2, x_test=x[:4], y_test=np.arange(4) % 2)
    data = load_dataset(tmp_path / "d.npz")
    np.testing.assert_allclose(data.x_train * data.pixel_std + data.pixel_mean, x[:, None] / 255.0, atol=1e-5)


# --- Fashion-MNIST: installed, downloaded with checksums, or a message naming both routes ----------

def _idx_gz(path: Path, array: np.ndarray) -> bytes:
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return path.read_bytes()


@pytest.fixture
def mirror(tmp_path):
    """A local file server holding a tiny dataset in Fashion-MNIST's four IDX files."""
    served = tmp_path / "served"
    served.mkdir()
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28)),
             "train-labels-idx1-ubyte.gz": np.arange(30) % 10,
             "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (10, 28, 28)),
             "t10k-labels-idx1-ubyte.gz": np.arange(10)}
    sums = {name: hashlib.md5(_idx_gz(served / name, a)).hexdigest() for name, a in files.items()}
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", sums
    server.shutdown()


def test_download_checks_sums_and_caches(mirror, tmp_path, monkeypatch):
    url, sums = mirror
    monkeypatch.setenv("ONNX_MORPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONNX_MORPH_FASHION_MNIST", str(tmp_path / "not-installed"))
    bad = dict(sums, **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(OptionError, match="does not have the published MD5 checksum"):
        download_fashion_mnist(url, bad)
    assert not (tmp_path / "cache" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").exists()
    folder = download_fashion_mnist(url, sums)
    assert sorted(p.name for p in folder.iterdir()) == sorted(sums)  # no partial files left
    data = load_dataset("fashion-mnist")  # from the cache, no network
    assert data.x_train.shape == (30, 1, 28, 28) and data.y_test.tolist() == list(range(10))


def test_missing_fashion_mnist_names_both_routes(tmp_path):
    env = {"ONNX_MORPH_FASHION_MNIST": str(tmp_path / "none"), "ONNX_MORPH_CACHE": str(tmp_path / "cache"),
           "ONNX_MORPH_FASHION_MNIST_URL": "http://127.0.0.1:9/", "PATH": "/usr/bin:/bin"}
    proc = cli("prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--calibrate",
               "fashion-mnist", env=env)
    # The model is missing too: the data is loaded first, and its error is the one reported.
    assert_user_error(proc, "apt install dataset-fashion-mnist", "download", "127.0.0.1:9")


# --- exports with a fixed batch train from the CLI ------------------------------------------------

@pytest.fixture(scope="module")
def torchvision():
    return import_torchvision()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_static_batch_torchvision_trains_on_digits_from_the_cli(name, torchvision, tmp_path):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    path = export_onnx(model, (1, 3, 32, 32), tmp_path / f"{name}.onnx")  # README's recipe: batch fixed at 1
    proc = cli("regularize", path, "-o", tmp_path / "run", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "fixes the batch at 1" in proc.stdout
    proc = cli("train", tmp_path / "run", "--data", "digits", "--limit", "384", "--learning-rate", "0.01")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("24 steps") and "gray repeated to 3 channels" in proc.stdout
    folder = _image_folder(tmp_path / "images", classes=3, per_class=30)
    proc = cli("train", tmp_path / "run", "--data", folder, "--epochs", "3", "--mean", "0.5", "--std", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("12 steps")  # 72 training images, batches of 16, 3 epochs
    assert "resized" not in proc.stdout.splitlines()[0]  # read at the model's 32x32
    trained = onnx.load(str(tmp_path / "run" / "trained.onnx"))
    assert trained.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    from onnx_morph.rewrite.surgery.verify import onnxruntime

    session = onnxruntime().InferenceSession(trained.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = session.run(None, {"input": x})[0]
    alone = session.run(None, {"input": x[1:2]})[0]
    assert out.shape == (3, 10)
    np.testing.assert_allclose(out[1:2], alone, rtol=1e-4, atol=1e-4)


def test_image_folder_trains_a_static_batch_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    path = export_onnx(model, (1, 3, 16, 16), tmp_path / "m.onnx")
    root = _image_folder(tmp_path / "images", per_class=40, mode="L")  # gray images, an RGB model
    assert cli("regularize", path, "-o", tmp_path / "run", "--batch-size", "8").returncode == 0
    proc = cli("train", tmp_path / "run", "--data", root, "--epochs", "2", "--mean", "0.5", "--std", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("16 steps") and "images, gray repeated to 3 channels" in proc.stdout
    x = np.zeros((8, 5, 16, 16), np.uint8)
    np.savez(tmp_path / "five.npz", x_train=x, y_train=np.zeros(8), x_test=x, y_test=np.zeros(8))
    assert_user_error(cli("train", tmp_path / "run", "--data", tmp_path / "five.npz"),
                      "has 5 channels per image and the model's input takes 3")
    lonely = _image_folder(tmp_path / "lonely", classes=1)
    assert_user_error(cli("train", tmp_path / "run", "--data", lonely), "one subfolder per class (at least 2)")
    assert_user_error(cli("train", tmp_path / "run", "--data", root, "--mean", "0.5,0.5"), "mean takes 1 or 3 values")


def test_reshape_that_froze_the_batch_is_rewritten(tmp_path):
    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).view(1, -1))

    path = tmp_path / "viewed.onnx"
    torch.onnx.export(Viewed().eval(), torch.randn(1, 1, 8, 8), str(path), dynamo=False, do_constant_folding=True,
                      input_names=["input"], output_names=["output"])
    from onnx_morph.graph import build_channel_graph, load_model
    from onnx_morph.rewrite.training.batch import flexible_batch

    flexible = flexible_batch(build_channel_graph(load_model(path)))
    assert "Reshape" in flexible.note and "input 'input'" in flexible.note
    assert cli("regularize", path, "-o", tmp_path / "run", "--batch-size", "4", "--regularizer", "group-lasso").returncode == 0


def test_batch_that_cannot_change_is_refused(tmp_path):
    """Concatenating a constant row along the batch axis makes the batch part of the function."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    row = numpy_helper.from_array(np.ones((1, 4), np.float32), "row")
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "row"], ["joined"], axis=0),
         helper.make_node("MatMul", ["joined", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w, row])
    path = tmp_path / "joined.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    from onnx_morph.graph import build_channel_graph, load_model
    from onnx_morph.rewrite.training.batch import flexible_batch

    with pytest.raises(ModelLoadError, match="cannot change it safely .* export with a dynamic batch"):
        flexible_batch(build_channel_graph(load_model(path)))


def test_partly_dynamic_export_trains(tmp_path):
    """A dynamic input batch with a static output batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    path = tmp_path / "partly.onnx"
    torch.onnx.export(model.eval(), torch.randn(1, 1, 8, 8), str(path), dynamo=False, do_constant_folding=False,
                      input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
    assert cli("regularize", path, "-o", tmp_path / "run", "--batch-size", "32").returncode == 0
    proc = cli("train", tmp_path / "run", "--data", "digits", "--limit", "256")
    assert proc.returncode == 0, proc.stderr


# --- training to a target ---------------------------------------------------------------------------

def test_controller_backs_off_faster_than_it_grows():
    from onnx_morph.target import StrengthController

    up, down = StrengthController(1.0, 100.0), StrengthController(1.0, 100.0)
    assert up.update(200.0) == pytest.approx(np.exp(0.05))
    assert down.update(50.0) == pytest.approx(np.exp(-0.25))
    for _ in range(1000):
        up.update(1e9)
    assert up.strength == pytest.approx(1e3)


def test_structure_at_target_trims_and_restores():
    from onnx_morph.target import structure_at

    cost = lambda alive: float(alive.sum())  # noqa: E731
    vector = np.array([0.9, 0.1, 0.5, 0.0, 0.3, 0.2])
    groups = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    prunable = np.ones(6, bool)
    all_alive = np.ones(6, bool)
    trimmed = structure_at(3, all_alive, vector, prunable, groups, cost)
    assert trimmed.tolist() == [True, False, True, False, True, False]
    few = np.array([True, False, False, False, False, False])
    restored = structure_at(4, few, vector, prunable, groups, cost)
    assert restored.tolist() == [True, False, True, False, True, True]


def test_train_to_a_flop_target_on_digits(tmp_path):
    """The strength adapts until the structure holds at the target; the final masks meet it within 5%."""
    from onnx_morph.examples import export, small_resnet
    from onnx_morph.rewrite.training.artifacts import make_training_artifacts
    from onnx_morph.target import cost_target
    from onnx_morph.train import train

    torch.manual_seed(0)
    path = export(small_resnet(8), (1, 1, 16, 16), tmp_path / "seed.onnx")
    data = load_dataset("digits").fitted((1, 1, 16, 16))
    art = make_training_artifacts(path, tmp_path / "run", batch_size=64)
    target = cost_target("flops", art.total_cost, ratio=0.6)
    batches = [(data.x_train[i:i + 64], torch.from_numpy(data.y_train[i:i + 64]))  # numpy and torch mixed
               for i in range(0, 1408, 64)]
    result = train(art, batches, epochs=6, learning_rate=0.02, target=target, progress=None)
    assert 0.95 * target <= result.effective_cost <= target
    strengths = [r["strength"] for r in result.history]
    assert max(strengths) > strengths[0]  # it had to push
    from onnx_morph.rewrite import Mask, prune

    pruned = prune(path, Mask(tmp_path / "run" / "masks.json"))
    assert pruned.after.flops <= target


def test_train_takes_a_dataloader(tmp_path):
    from onnx_morph.examples import export, small_resnet
    from onnx_morph.rewrite.training.artifacts import make_training_artifacts
    from onnx_morph.train import train

    torch.manual_seed(0)
    data = load_dataset("digits").fitted((1, 1, 8, 8))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.from_numpy(data.x_train[:100]), torch.from_numpy(data.y_train[:100])), batch_size=32)
    art = make_training_artifacts(export(small_resnet(4), (1, 1, 8, 8), tmp_path / "s.onnx"), tmp_path / "run",
                                  batch_size=32)
    result = train(art, loader, epochs=2, progress=None)
    assert result.steps == 6  # 3 full batches per epoch; the last partial batch of 4 is skipped
    with pytest.raises(OptionError, match="one-pass iterator"):
        train(art, iter(loader), epochs=2, progress=None)


# --- CLI hygiene ----------------------------------------------------------------------------------

def test_prefixes_are_not_options_and_errors_show_the_subcommand(tmp_path):
    proc = cli("prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--round", "8")
    assert proc.returncode == 2
    assert "usage: onnx-morph prune" in proc.stderr and "unrecognized arguments: --round 8" in proc.stderr


@pytest.mark.parametrize("command", ["analyze", "prune", "profile", "expand", "regularize", "train", "demo"])
def test_every_option_has_help(command):
    from onnx_morph.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, (command, action.option_strings or action.dest)


def test_library_errors_name_options_and_the_cli_names_flags(tmp_path):
    from onnx_morph.examples import export, small_resnet
    from onnx_morph.rewrite.surgery.expand import expand

    path = export(small_resnet(4), (1, 1, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(OptionError, match="^round_to must be at least 1, not 0$"):
        expand(path, target_flops=1e6, round_to=0)
    assert_user_error(cli("expand", path, "-o", tmp_path / "w.onnx", "--target-flops", "1e6", "--round-to", "0"),
                      "--round-to must be at least 1, not 0")


def test_an_internal_error_is_reported_as_a_bug(monkeypatch, capsys):
    import onnx_morph.analysis
    from onnx_morph.cli import main
    from onnx_morph.errors import InvariantError

    def broken(*args, **kwargs):
        raise InvariantError("channel classes disagree")

    monkeypatch.setattr(onnx_morph.analysis, "analyze", broken)
    assert main(["analyze", "whatever.onnx"]) == 1
    err = capsys.readouterr().err
    assert "internal error (a bug of onnx-morph, not of your input): channel classes disagree" in err
    assert "Please report it" in err
