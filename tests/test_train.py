"""Tests of train_accelerate.py: outputs and reloading, presets, two real processes, exact resume, bad
arguments, CIFAR-style and multi-label Hub-style datasets, and the default command.

Tiny models keep every training step in the milliseconds; most runs call ``main(argv)`` in-process.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
import timm_capsules  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_accelerate.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# a 4-type, 2x2-pose capsule net on DiverseMultiMNIST (built-in MNIST sample): ~2k parameters
TINY_MODEL = ["--model-kwargs", "backbone_args={'out_chs': 8}", "primary_caps=4", "pose_dim=4",
              "capsule_layers=[('conv', 4, 3, 1)]"]
TINY = TINY_MODEL + ["--mnist-source", "sample", "--batch-size", "8", "--epoch-size", "40", "--test-size", "37",
                     "--log-every", "2", "--lr", "0.01"]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_accelerate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(train):
    """Runs main(argv) in-process and resets accelerate's process-wide state afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    def _run(argv):
        try:
            return train.main([str(a) for a in argv])
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    return _run


def load_weights(folder):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*argv, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ outputs and reloading
def test_tiny_run_writes_outputs_and_reloads(run, tmp_path):
    out = tmp_path / "out"
    results = run(TINY + ["--max-train-steps", 6, "--output-dir", out, "--with-tracking",
                          "--checkpointing-steps", 2, "--checkpoints-total-limit", 2])
    for name in ("config.json", "model.safetensors", "metrics.json", "training_curves.png"):
        assert (out / name).is_file(), name
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000004", "step_00000006"]
    assert list((out / "timm_capsules").glob("**/events.out.tfevents.*")), "no tensorboard log"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["completed_steps"] == 6 and metrics["final"]["num_images"] == 37
    assert set(metrics["final"]) >= {"exact_match", "per_class_f1", "macro_f1", "loss"}
    assert metrics["history"]["train"] and metrics["history"]["eval"]

    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    model = results["model_object"].eval()
    assert reloaded.pretrained_cfg["label_names"] == [str(d) for d in range(10)]
    x = torch.rand(5, 1, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    assert sum(p.numel() for p in reloaded.parameters()) == metrics["num_parameters"]


def test_presets_and_overrides(train):
    args = train.parse_args(["--preset", "cifar10_resnet", "--lr", "0.05", "--iterations", "3",
                             "--routing", "sequential", "--no-layer-norm", "--activations"])
    assert (args.model, args.dataset, args.opt, args.lr, args.momentum, args.weight_decay) == \
        ("capsnet_resnet_cifar10", "cifar10", "sgd", 0.05, 0.9, 5e-4)
    assert (args.batch_size, args.epochs, args.decay_milestones, args.decay_rate) == (128, 350, [150, 250], 0.1)
    assert args.model_kwargs == dict(iterations=3, routing="sequential", layer_norm=False, activations=True)
    args = train.parse_args(["--preset", "multimnist_vector", "--model_arg", "backbone_args={'out_chs': 32}"])
    assert (args.model, args.epoch_size, args.test_size) == ("capsnet_vector_multimnist", 60_000, 10_000)
    assert args.model_kwargs == dict(backbone_args={"out_chs": 32})
    for name, preset in train.PRESETS.items():
        assert timm.is_model(preset["model"]), name
    # the quick default's kwargs belong to its model: another model gets none of them
    assert train.parse_args([]).model_kwargs["pose_dim"] == 16
    assert train.parse_args(["--model", "capsnet_simple_cifar10"]).model_kwargs == {}
    assert train.parse_args(["--model-kwargs", "backbone=resnet18", "x=[1, 2]"]).model_kwargs["backbone"] == "resnet18"


# ------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("accumulation, every, stop, steps", [
    (1, 2, 3, 7),  # 40 images per epoch at batch 8: 5 steps, an evaluation at each epoch end
    (2, 2, 3, 4),  # 3 steps of 2 batches per epoch
    (1, 5, 6, 8),  # the checkpoint at the end of epoch 0 comes before that epoch's evaluation
])
def test_resume_continues_exactly(run, tmp_path, accumulation, every, stop, steps):
    common = TINY + ["--max-train-steps", steps, "--checkpointing-steps", every,
                     "--gradient-accumulation-steps", accumulation, "--seed", 3]
    full = run(common + ["--output-dir", tmp_path / "full"])
    interrupted = tmp_path / "interrupted"
    stopped = run(common + ["--output-dir", interrupted, "--stop-after-steps", stop])
    assert stopped["stopped"] and not (interrupted / "model.safetensors").exists()
    assert [p.name for p in (interrupted / "checkpoints").iterdir()] == [f"step_{every:08d}"]
    resumed = run(common + ["--output-dir", interrupted, "--resume-from-checkpoint", "latest"])
    assert_same_weights(load_weights(tmp_path / "full"), load_weights(interrupted))
    assert resumed["completed_steps"] == full["completed_steps"]
    assert [r["step"] for r in resumed["history"]["eval"]] == [r["step"] for r in full["history"]["eval"]]
    assert resumed["final"]["loss"] == pytest.approx(full["final"]["loss"], rel=1e-5)


# --------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--preset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--model-arg", "img_size=8"], "too small"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--model", "capsnet_simple_cifar10"], "DiverseMultiMNIST's are (1, 36, 36)"),
    (["--checkpointing-steps", "often"], "--checkpointing_steps must be a number or 'epoch'"),
    (["--resume-from-checkpoint", "/no/such/dir"], "checkpoint /no/such/dir does not exist"),
    (["--dataset", "cifar10", "--model", "capsnet_simple_cifar10"], "cannot load split 'train' of uoft-cs/cifar10"),
])
def test_bad_arguments_stop_with_one_line(run, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        run(argv + ["--output-dir", tmp_path])
    text = str(stop.value.code) if not isinstance(stop.value.code, int) else capsys.readouterr().err.strip()
    assert message in text and "\n" not in text.strip()
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_bad_arguments_cli(tmp_path):
    dataset = make_image_dataset(tmp_path / "cifar", size=32, mode="RGB", n=(4, 2))
    done = cli("--dataset", f"hf:{dataset}", "--label-column", "fine_label", "--model", "capsnet_simple_cifar10",
               "--output-dir", tmp_path / "out", timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "has no column 'image' or 'fine_label'" in done.stderr and "columns: ['img', 'label']" in done.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ Hub-style data
def make_image_dataset(folder, size, mode, n=(12, 7), multi_label=False):
    """A tiny DatasetDict with CIFAR's columns (img / label), saved with save_to_disk."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    label = datasets.ClassLabel(names=[f"c{i}" for i in range(10)])
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.List(label) if multi_label else label})
    splits = {}
    for split, count in zip(("train", "test"), n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(count)]
        labels = [sorted(set(rng.integers(0, 10, 2).tolist())) if multi_label else int(rng.integers(0, 10))
                  for _ in range(count)]
        splits[split] = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def test_cifar_style_dataset(run, tmp_path):
    data = make_image_dataset(tmp_path / "cifar10", size=32, mode="RGB")
    out = tmp_path / "out"
    results = run(["--model", "capsnet_simple_cifar10", "--dataset", "cifar10", "--data-dir", data,
                   "--model-kwargs", "backbone_args={'out_chs': 8}", "primary_caps=4", "pose_dim=4",
                   "--batch-size", 4, "--epochs", 2, "--opt", "sgd", "--lr", 0.01, "--sched", "multistep",
                   "--decay-milestones", 1, "--output-dir", out])
    final = results["final"]
    assert results["task"] == "single-label" and final["num_images"] == 7
    assert {"top1", "top5"} <= set(final) and results["completed_steps"] == 6  # 3 batches x 2 epochs
    assert [r["lr"] for r in results["history"]["train"]][-1] == pytest.approx(0.001)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert reloaded.pretrained_cfg["label_names"] == [f"c{i}" for i in range(10)]
    assert tuple(reloaded.pretrained_cfg["mean"]) == pytest.approx((0.4914, 0.4822, 0.4465))


def test_multilabel_hub_style_dataset(run, tmp_path):
    data = make_image_dataset(tmp_path / "multi", size=36, mode="L", multi_label=True)
    results = run(TINY_MODEL + ["--dataset", f"hf:{data}", "--image-column", "img", "--batch-size", 4,
                                "--max-train-steps", 2, "--output-dir", tmp_path / "out"])
    assert results["task"] == "multi-label" and results["final"]["num_images"] == 7
    assert "exact_match" in results["final"]


# -------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_identical_weights_and_exact_eval(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(SCRIPT), *TINY, "--max-train-steps", "4", "--debug-digests",
               "--output-dir", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=dict(ENV, ACCELERATE_USE_CPU="1"), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = {p.name: p.read_text() for p in out.glob("digest_rank*.txt")}
    assert len(digests) == 2 and len(set(digests.values())) == 1, digests
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["final"]["num_images"] == 37  # odd: every test image exactly once
    assert metrics["weights_sha256"] == next(iter(digests.values()))


# ---------------------------------------------------------------------------- the default command
@pytest.mark.slow
def test_default_command_prints_accuracy(tmp_path):
    """The README's main command (`accelerate launch train_accelerate.py`), shortened."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", str(SCRIPT), "--max_train_steps", "15", "--test-size", "100",
               "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final test exact_match:" in done.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_resume_cifar_style_exactly(run, tmp_path):
    """Shuffling and augmentation draws survive an interruption (and do not depend on the worker count)."""
    data = make_image_dataset(tmp_path / "cifar10", size=32, mode="RGB", n=(20, 5))
    common = ["--model", "capsnet_simple_cifar10", "--dataset", "cifar10", "--data-dir", data,
              "--model-kwargs", "backbone_args={'out_chs': 8}", "primary_caps=4", "pose_dim=4",
              "--batch-size", 4, "--max-train-steps", 12, "--checkpointing-steps", 3, "--seed", 1, "--log-every", 2]
    full = run(common + ["--output-dir", tmp_path / "full"])
    run(common + ["--output-dir", tmp_path / "int", "--stop-after-steps", 7])
    resumed = run(common + ["--output-dir", tmp_path / "int", "--resume-from-checkpoint", "latest"])
    assert_same_weights(load_weights(tmp_path / "full"), load_weights(tmp_path / "int"))
    assert [r["loss"] for r in resumed["history"]["train"]] == pytest.approx([r["loss"] for r in full["history"]["train"]])


def test_paper_augmentation():
    from timm_capsules.data.cifar import ImageClassificationData, LabelInfo

    images = [torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 6) + k for k in range(50)]
    data = ImageClassificationData([dict(img=im, label=0) for im in images], lambda x: x, "img", "label",
                                   LabelInfo(10, None, False), mean=(0.0, 0.0), std=(1.0, 1.0), augment=True, seed=5)
    first = [data[k][0] for k in range(50)]
    assert all(torch.equal(a, data[k][0]) for k, a in enumerate(first))  # a pure function of (seed, epoch, index)
    data.set_epoch(1)
    assert any(not torch.equal(a, data[k][0]) for k, a in enumerate(first))
    for k, out in enumerate(first):  # every output is a 6x6 window of the zero-padded (maybe flipped) image
        padded = torch.nn.functional.pad(images[k], (4,) * 4)
        windows = [padded[:, t:t + 6, l:l + 6] for t in range(9) for l in range(9)]
        assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)


def test_push_to_hub_routes_paper_models_through_the_hub_module(train, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train.hub, "push_checkpoint", lambda *a, **k: calls.append(("hub", a, k)))
    monkeypatch.setattr(train.timm.models, "push_to_hf_hub", lambda *a, **k: calls.append(("timm", a, k)))
    paper = timm.create_model("capsnet_simple_cifar10")
    train.push_to_hub(paper, tmp_path, "me/paper", False, None)
    shrunk = timm.create_model("capsnet_simple_cifar10", backbone_args={"out_chs": 8})
    train.push_to_hub(shrunk, tmp_path, "me/shrunk", True, ["a"] * 10)
    assert [c[0] for c in calls] == ["hub", "timm"]
    assert calls[0][1][:2] == (tmp_path, "me/paper")
    assert calls[1][2]["safe_serialization"] is True and calls[1][2]["private"] is True


def test_baseline_presets_use_the_papers_optimizers(train):
    presets = train.PRESETS
    for data in ("cifar10", "cifar100"):
        assert presets[f"{data}_dynamic_simple"]["opt"] == "adam" and presets[f"{data}_dynamic_simple"]["lr"] == 1e-3
        assert presets[f"{data}_em_resnet"]["opt"] == "adam" and presets[f"{data}_em_resnet"]["lr"] == 1e-2
        assert presets[f"{data}_cnn"]["opt"] == "sgd" and presets[f"{data}_resnet18"]["lr"] == 0.1
    for name, preset in presets.items():
        assert preset["model"] in timm.list_models(), name


def test_loss_and_threshold_follow_what_the_model_returns(train):
    from timm_capsules.routing_baselines import margin_loss, spread_loss
    assert train.output_kind(timm.create_model("dynamic_capsnet_vector_multimnist", device="meta")) == "lengths"
    assert train.output_kind(timm.create_model("em_capsnet_simple_cifar10", device="meta")) == "activations"
    assert train.output_kind(timm.create_model("cnn_baseline_multimnist", device="meta")) == "logits"
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.7, 0.4]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(train.loss_fn(scores, targets, True, "lengths"), margin_loss(scores, targets))
    torch.testing.assert_close(train.loss_fn(scores, targets, True, "activations", margin=0.5),
                               spread_loss(scores, targets, 0.5))
    assert train.correct(scores, targets, True, "lengths").tolist() == [True, False]  # 0.4 < 0.5: digit missed
    assert train.correct(scores, targets, True, "logits").tolist() == [False, False]  # logits: every class > 0
    assert train.correct(scores - 0.5, targets, True, "logits").tolist() == [True, False]


@pytest.mark.slow
def test_dynamic_routing_baseline_trains_with_its_preset(run, tmp_path):
    out = tmp_path / "dr"
    run(["--preset", "multimnist_dynamic_vector", "--model-kwargs", "backbone_args={'out_chs': 16}",
         "--mnist-source", "sample", "--batch-size", "4", "--epoch-size", "8", "--test-size", "6",
         "--max-train-steps", "2", "--output-dir", out])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["num_images"] == 6 and 0.0 <= metrics["final"]["exact_match"] <= 1.0
    assert metrics["args"]["opt"] == "adam" and metrics["args"]["lr"] == 1e-3
