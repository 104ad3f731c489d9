"""Tests of train_accelerate.py: the metrics on hand-made confusions, outputs and reloading (final
metrics recomputed independently from the saved model), presets, two real processes, exact resume,
bad arguments, CIFAR-style and multi-label Hub-style datasets (save_to_disk, parquet, imagefolder,
splits, --resize), what data reaches the model, mixed precision, and the default command.

Tiny models keep every training step in the milliseconds; most runs call ``main(argv)`` in-process.
"""
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


# ---------------------------------------------------- metrics written out here, independently of the script
def expected_losses(scores, hot, returns, multi_label):
    """Per-image losses from their definitions (not through timm_capsules.losses); hot: multi-hot targets."""
    if returns == "lengths":  # Sabour et al.: T_k max(0, 0.9 - s_k)^2 + 0.5 (1 - T_k) max(0, s_k - 0.1)^2, summed
        return (hot * (0.9 - scores).clamp(min=0) ** 2 + 0.5 * (1 - hot) * (scores - 0.1).clamp(min=0) ** 2).sum(1)
    if returns == "activations":  # spread loss at the evaluation margin 0.9: sum over (target t, non-target i)
        return torch.stack([sum((0.9 - (s[t] - s[i])).clamp(min=0) ** 2 for t in range(len(s)) if h[t]
                                for i in range(len(s)) if not h[i]) for s, h in zip(scores, hot)])
    if multi_label:  # binary cross-entropy per class, averaged over the classes
        return -(hot * F.logsigmoid(scores) + (1 - hot) * F.logsigmoid(-scores)).mean(1)
    return -(scores.log_softmax(1) * hot).sum(1)  # cross-entropy


def independent_metrics(model, images, targets, multi_label, returns="logits"):
    """The test metrics of `model` on these images in one plain forward, without train_accelerate."""
    with torch.no_grad():
        scores = model.eval()(images).float()
    hot = targets.float() if multi_label else F.one_hot(targets, scores.shape[1]).float()
    metrics = dict(num_images=len(targets), loss=expected_losses(scores, hot, returns, multi_label).mean().item())
    if not multi_label:
        ranked = scores.topk(min(5, scores.shape[1]), 1).indices
        return dict(metrics, top1=(ranked[:, 0] == targets).float().mean().item(),
                    top5=(ranked == targets[:, None]).any(1).float().mean().item())
    predicted, actual = scores > (0.0 if returns == "logits" else 0.5), targets.bool()
    counts = zip((predicted & actual).sum(0).tolist(), (predicted & ~actual).sum(0).tolist(),
                 (~predicted & actual).sum(0).tolist())
    f1 = [2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0 for tp, fp, fn in counts]
    return dict(metrics, exact_match=(predicted == actual).all(1).float().mean().item(), per_class_f1=f1,
                macro_f1=sum(f1) / len(f1))


def assert_metrics(reported, expected):
    """Every metric the script reports, and only those, equals the independent value."""
    assert set(reported) - {"step", "epoch"} == set(expected)
    for key, value in expected.items():
        assert reported[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def mean_std(model):
    """The (one-channel) normalisation a model was saved with."""
    return model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]


def multimnist_test_images(size, mean, std, seed=0):
    from timm_capsules.data import make_split
    split = make_split("test", size, source="sample", seed=seed)
    return (torch.from_numpy(split.images).unsqueeze(1).float() / 255 - mean) / std, torch.from_numpy(split.targets)


def spy_on_model(train, monkeypatch):
    """Wraps train.create_model so that every forward of the model is recorded: whether it trained, the
    images it received, and, from inside the first convolution (forward hooks of the top module run outside
    the autocast that accelerate wraps around forward), whether autocast was on and the dtype computed in."""
    calls = []
    create = train.create_model

    def create_model(args, num_classes):
        model, kwargs = create(args, num_classes)
        model.register_forward_pre_hook(
            lambda module, inputs: calls.append(dict(training=module.training, images=inputs[0].detach().clone())))
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, inputs, output: calls[-1].update(
            autocast=torch.is_autocast_enabled("cpu"), dtype=output.dtype))
        return model, kwargs
    monkeypatch.setattr(train, "create_model", create_model)
    return calls


def evaluated_images(calls):
    """The images of the last evaluation, in the order the model saw them."""
    last = max(k for k, call in enumerate(calls) if call["training"]) if any(c["training"] for c in calls) else -1
    return torch.cat([call["images"] for call in calls[last + 1:]])


# ------------------------------------------------------------------------- evaluation, on known confusions
class Table(torch.nn.Module):
    """A model whose outputs we choose: input i (an image index) -> row i of a fixed table."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, index):
        return self.table[index]


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def evaluate_table(train, accelerator, table, targets, multi_label, returns, batch_size):
    data = torch.utils.data.TensorDataset(torch.arange(len(targets)), targets)
    loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=batch_size))
    return train.evaluate(Table(table), loader, accelerator, multi_label, table.shape[1], returns)


def ranked_scores(targets, ranks, levels):
    """Scores in [0, 1] (valid logits, lengths and activations alike) in which image i's true class has the
    ranks[i]-th highest score (0: the highest)."""
    rows = []
    for target, rank in zip(targets, ranks):
        order = [c for c in range(len(levels)) if c != target]
        order.insert(rank, target)  # order[p]: the class with the p-th highest score
        rows.append(torch.empty(len(levels)).index_copy_(0, torch.tensor(order), torch.tensor(levels)))
    return torch.stack(rows)


@pytest.mark.parametrize("returns", ["logits", "lengths", "activations"])
def test_evaluate_single_label_top1_top5_and_loss(train, accelerator, returns):
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    # 6 classes: top-1 hits images 0 and 4 (rank 0), top-5 all but images 3 and 6 (rank 5, the last)
    scores = ranked_scores(targets.tolist(), [0, 1, 4, 5, 0, 2, 5], [0.95, 0.8, 0.6, 0.4, 0.2, 0.05])
    metrics = evaluate_table(train, accelerator, scores, targets, False, returns, batch_size=3)  # 3 + 3 + 1
    losses = expected_losses(scores, F.one_hot(targets, 6).float(), returns, False)
    assert metrics == pytest.approx(dict(num_images=7, top1=2 / 7, top5=5 / 7, loss=losses.mean().item()), rel=1e-6)


@pytest.mark.parametrize("returns", ["logits", "lengths", "activations"])
def test_evaluate_multi_label_f1_and_exact_match(train, accelerator, returns):
    actual = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0]]).bool()
    predicted = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]]).bool()
    # per class (tp, fp, fn): 0: (3, 0, 1), 1: (2, 0, 0), 2: (1, 1, 1), 3: (0, 0, 0); F1 = 2tp / (2tp + fp + fn),
    # and 0 for class 3, which is neither present nor predicted anywhere
    f1 = [2 * 3 / (2 * 3 + 0 + 1), 2 * 2 / (2 * 2 + 0 + 0), 2 * 1 / (2 * 1 + 1 + 1), 0.0]
    # 0.9 / 0.7: predicted rightly / wrongly; 0.1 / 0.3: absent rightly / wrongly (thresholds 0.5, logits 0)
    scores = torch.where(predicted, torch.where(actual, 0.9, 0.7), torch.where(actual, 0.3, 0.1))
    scores = scores - 0.5 if returns == "logits" else scores
    metrics = evaluate_table(train, accelerator, scores, actual.float(), True, returns, batch_size=2)  # 2 + 2 + 1
    losses = expected_losses(scores, actual.float(), returns, True)
    assert metrics.pop("per_class_f1") == pytest.approx(f1, rel=1e-6)
    assert metrics == pytest.approx(dict(num_images=5, exact_match=2 / 5, macro_f1=sum(f1) / 4,  # images 0 and 4
                                         loss=losses.mean().item()), rel=1e-6)


# ------------------------------------------------------------------------------ outputs and reloading
def test_tiny_run_writes_outputs_and_reloads(run, tmp_path, capsys):
    out = tmp_path / "out"
    results = run(TINY + ["--max-train-steps", 6, "--output-dir", out, "--with-tracking",
                          "--checkpointing-steps", 2, "--checkpoints-total-limit", 2])
    for name in ("config.json", "model.safetensors", "metrics.json", "training_curves.png"):
        assert (out / name).is_file(), name
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000004", "step_00000006"]
    assert list((out / "timm_capsules").glob("**/events.out.tfevents.*")), "no tensorboard log"
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    assert metrics["completed_steps"] == 6 and final == metrics["history"]["eval"][-1]
    assert [(r["step"], r["epoch"]) for r in metrics["history"]["eval"]] == [(5, 0), (6, 1)]  # 5 steps an epoch
    assert [r["step"] for r in metrics["history"]["train"]] == [2, 4, 6]  # --log-every 2

    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    model = results["model_object"].eval()
    assert reloaded.pretrained_cfg["label_names"] == [str(d) for d in range(10)]
    x = torch.rand(5, 1, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    assert sum(p.numel() for p in reloaded.parameters()) == metrics["num_parameters"]
    # the final metrics, recomputed from the saved model on the same 37 test images
    images, targets = multimnist_test_images(37, *mean_std(reloaded))
    assert_metrics(final, independent_metrics(reloaded, images, targets, multi_label=True))
    # and the printed lines carry those numbers
    captured = capsys.readouterr()
    printed = captured.out
    for r in metrics["history"]["eval"]:
        assert (f"epoch {r['epoch']}: step {r['step']}, test loss {r['loss']:.4f}, "
                f"exact_match {r['exact_match']:.4f} (37 images)") in printed
    assert f"\nfinal test exact_match: {final['exact_match']:.4f} on 37 images after 6 steps\n" in printed
    # not on a terminal: no progress bar, one line per --log-every steps
    for r in metrics["history"]["train"]:
        assert f"\nstep {r['step']}/6: train loss {r['loss']:.4f}, accuracy {r['accuracy']:.3f} (batches)" in printed
    assert "it/s" not in printed + captured.err
    # the accuracy to beat: always answering the test set's most frequent label set, counted here
    _, targets = multimnist_test_images(37, 0.0, 1.0)
    sets = [tuple(row.nonzero().flatten().tolist()) for row in targets]
    chance = max(sets.count(s) for s in sets) / 37
    assert metrics["chance_level"] == pytest.approx(chance) and chance > 1 / 37
    assert f"\nchance level: {chance:.4f} (always the most frequent label set)\n" in printed
    assert "a CNN of similar size" not in printed  # the reference's recipe is the quick run's, not this one
    assert f"s of training; saved to {out}\n" in printed
    from PIL import Image
    with Image.open(out / "training_curves.png") as png:
        assert png.text["Title"] == "capsnet_matrix_multimnist on diverse_multimnist (sample)"


def test_training_curves_name_the_run_and_draw_chance_and_reference(train, tmp_path):
    history = {"train": [dict(step=s, loss=1 / s, accuracy=0.1 * s) for s in (1, 2, 3)],
               "eval": [dict(step=3, loss=0.4, top1=0.5)]}
    fig = train.plot_curves(history, tmp_path / "curves.png", "top1", "resnet18_cifar10 on cifar10 (hub)", 0.125,
                            ("CNN of similar size, same recipe", 0.625))
    assert fig._suptitle.get_text() == "resnet18_cifar10 on cifar10 (hub)"
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[1].get_lines()}
    assert lines["chance level 0.125"] == [0.125, 0.125]
    assert lines["CNN of similar size, same recipe 0.625"] == [0.625, 0.625]
    assert lines["test"] == [0.5] and (tmp_path / "curves.png").is_file()
    fig = train.plot_curves(history, tmp_path / "curves.png", "top1", "a run", 0.125)
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["train (batches)", "test", "chance level 0.125"]


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


def test_help_gives_every_option_a_line_and_its_default(train, capsys):
    with pytest.raises(SystemExit) as done:
        train.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    parser = train.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help and a.help.strip() for a in options), [a.dest for a in options if not a.help]
    # the defaults shown are the real ones: the quick run's (QUICK) and the parser's own, never "None"
    for shown in ("learning rate (default: 0.002)", "(default: adam)", "(default: cosine)", "(default: 8192)",
                  "(default: capsnet_matrix_multimnist)", "(default: 42)", "weight decay (default: 0.0)",
                  "(default: 4 with CUDA, else 0)", "(default: 2 x batch size)"):
        assert shown in " ".join(text.split()), shown
    assert "default: None" not in text and "default: []" not in text
    for group in ("model:", "data:", "optimisation:", "checkpointing:", "output:"):
        assert f"\n{group}\n" in text, group
    presets = text[text.index("presets (--preset NAME"):]
    for name, preset in train.PRESETS.items():  # listed once, with the model they train
        assert text.count(f" {name} ") == 1 and f"{name} " in presets, name
        assert f" {preset['model']} on {preset['dataset']}" in presets


def test_readme_presets_table_lists_every_preset(train):
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Presets"):].split("\n\n")[1]
    rows = [line.split("|")[1] for line in table.splitlines()[2:]]
    named = {name.strip(" `") for row in rows for name in row.split(" / ")}
    assert named == set(train.PRESETS)


def test_print_config_shows_a_presets_resolved_values(run, capsys, tmp_path):
    config = run(["--preset", "cifar10_em_simple", "--lr", "0.5", "--iterations", "3", "--print-config",
                  "--output-dir", tmp_path])
    printed = json.loads(capsys.readouterr().out)
    assert printed == config
    assert (printed["model"], printed["dataset"], printed["opt"], printed["lr"], printed["batch_size"]) == \
        ("em_capsnet_simple_cifar10", "cifar10", "adam", 0.5, 128)
    assert printed["decay_milestones"] == [150, 250] and printed["eval_batch_size"] == 256
    assert printed["model_kwargs"] == {"iterations": 3}
    assert not any(tmp_path.iterdir())  # nothing trained
    quick = run(["--print-config"])
    assert quick["model_kwargs"]["pose_dim"] == 16 and quick["epoch_size"] == 8192


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
    (["--model", "capsnet_simpel_cifar10"], "closest registered names: capsnet_simple_cifar10, "),  # ours
    (["--model", "resnet18_cifar"], "resnet18_cifar10"),  # ours, among timm's ResNets
    (["--model", "resnt50"], "resnet50"),  # timm's own
    (["--preset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--model-arg", "img_size=8"], "too small"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--model", "capsnet_simple_cifar10"], "DiverseMultiMNIST's are (1, 36, 36)"),
    (["--checkpointing-steps", "often"], "--checkpointing_steps: must be a number of steps (>= 1) or 'epoch'"),
    (["--resume-from-checkpoint", "/no/such/dir"], "checkpoint /no/such/dir does not exist"),
    (["--dataset", "cifar10", "--model", "capsnet_simple_cifar10"], "cannot load split 'train' of uoft-cs/cifar10"),
    # accelerate would print "mixed precision fp16" and train in float32: no autocast, no scaler on the CPU
    (TINY + ["--max-train-steps", "1", "--cpu", "--mixed-precision", "fp16"], "--mixed_precision fp16 needs a GPU"),
    # numbers are checked when parsed, naming the option (they used to divide by zero or crash deep inside)
    (["--epoch-size", "0"], "argument --epoch-size/--epoch_size: must be >= 1, got 0"),
    (["--max-train-steps", "-3"], "argument --max-train-steps/--max_train_steps: must be >= 1, got -3"),
    (["--test-size", "-5"], "argument --test-size/--test_size: must be >= 1, got -5"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["--clip-grad", "nan"], "argument --clip-grad/--clip_grad: must be a finite number, got nan"),
    (["--weight-decay", "inf"], "argument --weight-decay/--weight_decay: must be a finite number, got inf"),
    (["--batch-size", "2.5"], "argument --batch-size/--batch_size: '2.5' is not an integer"),
    (["--num-workers", "-1"], "argument --num-workers/--num_workers: must be >= 0, got -1"),
    (["--decay-milestones", "3", "-1"], "argument --decay-milestones/--decay_milestones: must be >= 0, got -1"),
    # a value that is not a Python literal is refused, except for the name arguments
    (["--model-arg", "primary_caps=eight"], "model argument 'primary_caps=eight': 'eight' is not a Python literal"),
    (["--model-arg", "global_pool=avg", "--model-arg", "pose_dim=[4"], "'[4' is not a Python literal"),
    (TINY + ["--opt", "sgdd"], "--opt sgdd: Optimizer sgdd not found in registry"),
    (TINY + ["--sched", "cosin"], "--sched cosin: Unknown scheduler 'cosin'"),
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
def image_examples(size, mode, n=(12, 7), multi_label=False, split_names=("train", "test"), plain=False):
    """{split: (PIL images, labels)}, the same on every call; plain: each image one random colour (which
    resizing leaves exact)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    examples = {}
    for split, count in zip(split_names, n):
        arrays = [np.broadcast_to(rng.integers(0, 256, shape[2:], dtype=np.uint8), shape).copy() if plain
                  else rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
        labels = [sorted(set(rng.integers(0, 10, 2).tolist())) if multi_label else int(rng.integers(0, 10))
                  for _ in range(count)]
        examples[split] = [Image.fromarray(a, mode) for a in arrays], labels
    return examples


def make_image_dataset(folder, size, mode, n=(12, 7), multi_label=False, form="save_to_disk", **options):
    """A tiny dataset with CIFAR's columns (img / label) and classes c0..c9, as --data-dir takes it: a
    save_to_disk DatasetDict, parquet files <split>.parquet, or an imagefolder <split>/<class>/<k>.png
    (whose columns are image / label, and whose classes are the folder names that occur)."""
    import datasets

    label = datasets.ClassLabel(names=[f"c{i}" for i in range(10)])
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.List(label) if multi_label else label})
    splits = {}
    for split, (images, labels) in image_examples(size, mode, n, multi_label, **options).items():
        splits[split] = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        for k, (image, y) in enumerate(zip(images, labels)) if form == "imagefolder" else ():
            (folder / split / f"c{y}").mkdir(parents=True, exist_ok=True)
            image.save(folder / split / f"c{y}" / f"{k:03d}.png")
        if form == "parquet":
            folder.mkdir(parents=True, exist_ok=True)
            splits[split].to_parquet(str(folder / f"{split}.parquet"))
    if form == "save_to_disk":
        datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def as_tensors(images, labels, mean, std, multi_label=False, num_classes=10):
    """PIL images -> normalised float (N, C, H, W) written out here; labels -> class indices or multi-hot."""
    arrays = [np.asarray(image, dtype=np.float32).reshape(image.size[1], image.size[0], -1) / 255 for image in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    if multi_label:
        return x, torch.stack([torch.zeros(num_classes).index_fill_(0, torch.tensor(y), 1.0) for y in labels])
    return x, torch.tensor(labels)


CIFAR_TINY = ["--model", "capsnet_simple_cifar10", "--dataset", "cifar10",
              "--model-kwargs", "backbone_args={'out_chs': 8}", "primary_caps=4", "pose_dim=4"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.201)  # capsnet_simple_cifar10's


def test_cifar_style_dataset(run, tmp_path):
    data = make_image_dataset(tmp_path / "cifar10", size=32, mode="RGB")
    out = tmp_path / "out"
    results = run(CIFAR_TINY + ["--data-dir", data, "--batch-size", 4, "--epochs", 2, "--opt", "sgd", "--lr", 0.01,
                                "--sched", "multistep", "--decay-milestones", 1, "--log-every", 1, "--output-dir", out])
    assert results["task"] == "single-label" and results["completed_steps"] == 6  # 3 batches x 2 epochs
    # each record holds the lr after its step's scheduler update, i.e. the next step's. Milestone 1 = update 3,
    # but timm's multistep compares it with t + 1, so the decay already applies to step 3, epoch 0's last
    assert [r["lr"] for r in results["history"]["train"]] == pytest.approx([0.01] + [0.001] * 5)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert reloaded.pretrained_cfg["label_names"] == [f"c{i}" for i in range(10)]
    assert tuple(reloaded.pretrained_cfg["mean"]) == pytest.approx(CIFAR_MEAN)
    # top-1, top-5 and loss recomputed from the saved model on the 7 test images
    images, targets = as_tensors(*image_examples(32, "RGB")["test"], CIFAR_MEAN, CIFAR_STD)
    assert_metrics(results["final"], independent_metrics(reloaded, images, targets, multi_label=False))
    assert json.loads((out / "metrics.json").read_text())["final"] == results["final"]
    labels = targets.tolist()  # chance: always the most frequent test class
    assert results["chance_level"] == pytest.approx(max(labels.count(y) for y in labels) / 7)


def test_multilabel_hub_style_dataset(run, tmp_path):
    data = make_image_dataset(tmp_path / "multi", size=36, mode="L", multi_label=True)
    results = run(TINY_MODEL + ["--dataset", f"hf:{data}", "--image-column", "img", "--batch-size", 4,
                                "--max-train-steps", 2, "--output-dir", tmp_path / "out"])
    assert results["task"] == "multi-label" and results["metric"] == "exact_match"
    images, targets = as_tensors(*image_examples(36, "L", multi_label=True)["test"], (0.0,), (1.0,), multi_label=True)
    assert_metrics(results["final"], independent_metrics(results["model_object"], images, targets, multi_label=True))


@pytest.mark.parametrize("form", ["save_to_disk", "parquet", "imagefolder"])
def test_data_dir_forms(run, train, tmp_path, monkeypatch, form):
    """The three --data-dir forms of the README; an imagefolder names its image column `image`."""
    data = make_image_dataset(tmp_path / form, size=32, mode="RGB", form=form)
    calls = spy_on_model(train, monkeypatch)
    out = tmp_path / "out"
    results = run(CIFAR_TINY + ["--data-dir", data, "--batch-size", 4, "--max-train-steps", 2, "--output-dir", out]
                  + (["--image-column", "image"] if form == "imagefolder" else []))
    examples = image_examples(32, "RGB")
    names = [f"c{i}" for i in range(10)]
    if form == "imagefolder":  # the classes are the folders that occur, in sorted order
        names = sorted({f"c{y}" for _, labels in examples.values() for y in labels})
    assert timm.create_model(f"local-dir:{out}", pretrained=True).pretrained_cfg["label_names"] == names
    images, labels = examples["test"]
    expected, targets = as_tensors(images, [names.index(f"c{y}") for y in labels], CIFAR_MEAN, CIFAR_STD)
    seen = evaluated_images(calls)  # before the model runs again below, in front of the spy
    assert seen.shape == (7, 3, 32, 32)
    assert_metrics(results["final"], independent_metrics(results["model_object"], expected, targets, False))
    if form == "imagefolder":  # an imagefolder lists its files in its own order: compare image sums
        seen, expected = seen.sum((1, 2, 3)).sort().values, expected.sum((1, 2, 3)).sort().values
    torch.testing.assert_close(seen, expected)


def test_resize_brings_images_to_the_models_size(run, train, tmp_path, monkeypatch):
    data = make_image_dataset(tmp_path / "small", size=28, mode="RGB", plain=True)
    common = CIFAR_TINY + ["--data-dir", data, "--batch-size", 4, "--max-train-steps", 1]
    with pytest.raises(SystemExit, match="takes 32x32 images but the dataset's are 28x28; pass --resize"):
        run(common + ["--output-dir", tmp_path / "refused"])
    calls = spy_on_model(train, monkeypatch)
    run(common + ["--resize", "--output-dir", tmp_path / "out"])
    assert all(call["images"].shape[1:] == (3, 32, 32) for call in calls)
    # one colour per image: resized to 32x32 it is the same colour, normalised with CIFAR-10's mean and std
    images, labels = image_examples(28, "RGB", plain=True)["test"]
    expected, _ = as_tensors([image.resize((32, 32)) for image in images], labels, CIFAR_MEAN, CIFAR_STD)
    torch.testing.assert_close(evaluated_images(calls), expected)


@pytest.mark.parametrize("form, names, n, train_split, test_split, test_images", [
    ("save_to_disk", ("training", "validation", "test"), (8, 5, 3), "training", "validation", slice(None)),
    ("parquet", ("train", "test"), (12, 7), "train[:8]", "train[8:]", slice(8, None)),  # datasets' slicing
])
def test_split_options(run, train, tmp_path, monkeypatch, form, names, n, train_split, test_split, test_images):
    data = make_image_dataset(tmp_path / "data", size=32, mode="RGB", n=n, form=form, split_names=names)
    calls = spy_on_model(train, monkeypatch)
    results = run(CIFAR_TINY + ["--data-dir", data, "--train-split", train_split, "--test-split", test_split,
                                "--batch-size", 4, "--epochs", 1, "--output-dir", tmp_path / "out"])
    assert results["completed_steps"] == 2  # 8 training images at batch 4
    assert sum(call["training"] for call in calls) == 2
    images, labels = image_examples(32, "RGB", n, split_names=names)[test_split.partition("[")[0]]
    expected = as_tensors(images[test_images], labels[test_images], CIFAR_MEAN, CIFAR_STD)
    torch.testing.assert_close(evaluated_images(calls), expected[0])
    assert_metrics(results["final"], independent_metrics(results["model_object"], *expected, multi_label=False))


def test_missing_split_names_the_ones_there(run, tmp_path):
    data = make_image_dataset(tmp_path / "data", size=32, mode="RGB", n=(4, 2))
    with pytest.raises(SystemExit, match=r"cannot load split 'validation' of .*data: .* has splits \['test', "
                                         r"'train'\], not 'validation'$"):
        run(CIFAR_TINY + ["--data-dir", data, "--test-split", "validation", "--output-dir", tmp_path / "out"])
    assert not (tmp_path / "out" / "metrics.json").exists()


# ------------------------------------------------------------------- what reaches the model, and how
@pytest.mark.parametrize("workers", [0, 2])
def test_multimnist_data_reaches_the_model_normalised(run, train, tmp_path, monkeypatch, workers):
    """Training batches are the DiverseMultiMNIST stream of --seed and the test images make_split(--test-size,
    --data-seed), both normalised with the model's mean and std, whatever the DataLoader worker count."""
    from timm_capsules.data import DiverseMultiMNISTStream
    calls = spy_on_model(train, monkeypatch)
    mean, std = 0.1307, 0.3081  # not the capsule nets' (0, 1), which would leave a missing normalisation unseen
    run(TINY + ["--model-arg", f"pretrained_cfg_overlay={{'mean': ({mean},), 'std': ({std},)}}", "--seed", 3,
                "--data-seed", 5, "--num-workers", workers, "--max-train-steps", 3, "--output-dir", tmp_path])
    stream = iter(DiverseMultiMNISTStream("train", source="sample", seed=3, batch_size=8))
    trained = [call["images"] for call in calls if call["training"]]
    assert len(trained) == 3
    for images in trained:
        torch.testing.assert_close(images, (next(stream)[0] - mean) / std)
    torch.testing.assert_close(evaluated_images(calls), multimnist_test_images(37, mean, std, seed=5)[0])


@pytest.mark.parametrize("precision, dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_mixed_precision_on_the_cpu(run, train, tmp_path, monkeypatch, capsys, precision, dtype):
    """--mixed_precision bf16 runs every forward (training and evaluation) under CPU autocast; fp16 is refused
    on the CPU (see test_bad_arguments_stop_with_one_line)."""
    calls = spy_on_model(train, monkeypatch)
    results = run(TINY + ["--cpu", "--mixed_precision", precision, "--max-train-steps", 2, "--output-dir", tmp_path])
    assert [call["training"] for call in calls] == [True, True] + [False] * 3  # 2 steps, 37 test images by 16
    assert all(call["autocast"] == (precision == "bf16") and call["dtype"] == dtype for call in calls)
    assert results["args"]["mixed_precision"] == precision and f"mixed precision {precision}" in capsys.readouterr().out
    assert all(math.isfinite(r["loss"]) for r in results["history"]["train"] + results["history"]["eval"])
    final = results["final"]
    assert final["num_images"] == 37 and final["exact_match"] * 37 == pytest.approx(round(final["exact_match"] * 37))
    assert final["macro_f1"] == pytest.approx(sum(final["per_class_f1"]) / 10)


# -------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_identical_weights_and_exact_eval(tmp_path):
    """Launched as the README says (its launcher arguments), which leaves accelerate nothing to guess and warn about."""
    from test_readme import readme_cpu_launch
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", *readme_cpu_launch(), "--main_process_port",
               str(free_port()), str(SCRIPT), *TINY, "--max-train-steps", "4", "--debug-digests",
               "--output-dir", str(out)]
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}  # as in a user's shell
    done = subprocess.run(command, cwd=ROOT, env=dict(env, ACCELERATE_USE_CPU="1"), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "were not passed" not in done.stderr, done.stderr[:2000]
    digests = {p.name: p.read_text() for p in out.glob("digest_rank*.txt")}
    assert len(digests) == 2 and len(set(digests.values())) == 1, digests
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["final"]["num_images"] == 37  # odd: every test image exactly once
    assert metrics["weights_sha256"] == next(iter(digests.values()))
    # the gathered metrics are those of the saved model on the 37 images in one process
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    images, targets = multimnist_test_images(37, *mean_std(reloaded))
    assert_metrics(metrics["final"], independent_metrics(reloaded, images, targets, multi_label=True))


# ---------------------------------------------------------------------------- the default command
@pytest.mark.slow
def test_default_command_prints_accuracy(tmp_path):
    """The README's main command (`python train_accelerate.py`: one process needs no launcher), shortened."""
    command = [sys.executable, str(SCRIPT), "--max_train_steps", "15", "--test-size", "100",
               "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert f"final test exact_match: {final['exact_match']:.4f} on 100 images after 15 steps" in done.stdout
    assert "mixed precision no" in done.stdout
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    images, targets = multimnist_test_images(100, *mean_std(reloaded))
    assert_metrics(final, independent_metrics(reloaded, images, targets, multi_label=True))


@pytest.mark.slow
def test_resume_cifar_style_exactly(run, tmp_path):
    """Shuffling and augmentation draws survive an interruption and do not depend on the worker count: the
    uninterrupted run loads in the main process, the interrupted one with 2 workers, the resumed one with 1."""
    data = make_image_dataset(tmp_path / "cifar10", size=32, mode="RGB", n=(20, 5))
    common = CIFAR_TINY + ["--data-dir", data, "--batch-size", 4, "--max-train-steps", 12, "--checkpointing-steps", 3,
                           "--seed", 1, "--log-every", 2]  # 5 steps an epoch: the workers restart twice
    full = run(common + ["--output-dir", tmp_path / "full", "--num-workers", 0])
    run(common + ["--output-dir", tmp_path / "int", "--stop-after-steps", 7, "--num-workers", 2])
    resumed = run(common + ["--output-dir", tmp_path / "int", "--resume-from-checkpoint", "latest", "--num-workers", 1])
    assert (full["args"]["num_workers"], resumed["args"]["num_workers"]) == (0, 1)
    assert_same_weights(load_weights(tmp_path / "full"), load_weights(tmp_path / "int"))
    assert [r["loss"] for r in resumed["history"]["train"]] == pytest.approx([r["loss"] for r in full["history"]["train"]])
    assert resumed["final"] == pytest.approx(full["final"], rel=1e-5)


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


def test_push_to_hub_chooses_by_architecture_name(train, tmp_path, monkeypatch):
    """A paper architecture built as registered goes through timm_capsules.hub (its card describes exactly that
    model); the same architecture with other create_model arguments, or a model without a hub config, goes
    through timm's push_to_hf_hub."""
    calls = []
    monkeypatch.setattr(train.hub, "push_checkpoint", lambda *a, **k: calls.append(("hub", a, k)))
    monkeypatch.setattr(train.timm.models, "push_to_hf_hub", lambda *a, **k: calls.append(("timm", a, k)))
    paper = timm.create_model("capsnet_simple_cifar10", num_classes=10)
    train.push_to_hub(paper, {"num_classes": 10}, tmp_path, "me/paper", False, None)
    shrunk = timm.create_model("capsnet_simple_cifar10", backbone_args={"out_chs": 8})
    train.push_to_hub(shrunk, {"backbone_args": {"out_chs": 8}}, tmp_path, "me/shrunk", True, ["a"] * 10)
    baseline = timm.create_model("cnn_baseline_multimnist", device="meta")
    train.push_to_hub(baseline, {}, tmp_path, "me/cnn", False, None)
    assert [c[0] for c in calls] == ["hub", "timm", "timm"]
    assert calls[0][1][:2] == (tmp_path, "me/paper")
    assert calls[1][2]["safe_serialization"] is True and calls[1][2]["private"] is True
    assert calls[1][2]["model_config"] == dict(label_names=["a"] * 10)


def test_baseline_presets_use_the_papers_optimizers(train):
    presets = train.PRESETS
    for data in ("cifar10", "cifar100"):
        assert presets[f"{data}_dynamic_simple"]["opt"] == "adam" and presets[f"{data}_dynamic_simple"]["lr"] == 1e-3
        assert presets[f"{data}_em_resnet"]["opt"] == "adam" and presets[f"{data}_em_resnet"]["lr"] == 1e-2
        assert presets[f"{data}_cnn"]["opt"] == "sgd" and presets[f"{data}_resnet18"]["lr"] == 0.1
    for name, preset in presets.items():
        assert preset["model"] in timm.list_models(), name


def test_threshold_follows_what_the_model_returns(train):
    assert timm.create_model("dynamic_capsnet_vector_multimnist", device="meta").output_type == "lengths"
    assert timm.create_model("em_capsnet_simple_cifar10", device="meta").output_type == "activations"
    assert timm.create_model("cnn_baseline_multimnist", device="meta").output_type == "logits"
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.7, 0.4]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert train.correct(scores, targets, True, "lengths").tolist() == [True, False]  # 0.4 < 0.5: digit missed
    assert train.correct(scores, targets, True, "logits").tolist() == [False, False]  # logits: every class > 0
    assert train.correct(scores - 0.5, targets, True, "logits").tolist() == [True, False]
    assert train.correct(scores, torch.tensor([0, 2]), False).tolist() == [True, False]  # top-1: 0.7 beats 0.4


@pytest.mark.slow
def test_dynamic_routing_baseline_trains_with_its_preset(run, train, tmp_path):
    out = tmp_path / "dr"
    run(["--preset", "multimnist_dynamic_vector", "--model-kwargs", "backbone_args={'out_chs': 16}",
         "--mnist-source", "sample", "--batch-size", "4", "--epoch-size", "8", "--test-size", "6",
         "--max-train-steps", "2", "--output-dir", out])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["opt"] == "adam" and metrics["args"]["lr"] == 1e-3
    # capsule lengths: margin loss, and a class is present when its length is over 0.5
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert reloaded.output_type == "lengths"
    images, targets = multimnist_test_images(6, *mean_std(reloaded))
    assert_metrics(metrics["final"], independent_metrics(reloaded, images, targets, True, returns="lengths"))


# ------------------------------------------------------------------- checkpoints are data, never code
class Payload:
    """Unpickled as code, it creates the file `marker` (pickle calls open(marker, 'w'))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(folder, name, marker):
    """Replaces (or adds) `name` in a checkpoint by a pickle payload and, like a crafted checkpoint would, updates
    the file list of training_state.json so that sizes and checksums match."""
    import hashlib
    torch.save({"state": Payload(marker), "param_groups": []}, folder / name)
    state_file = folder / "training_state.json"
    saved = json.loads(state_file.read_text())
    data = (folder / name).read_bytes()
    saved["files"][name] = dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    state_file.write_text(json.dumps(saved))


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4 (one subprocess, shared by the tests below)."""
    out = tmp_path_factory.mktemp("checkpointed")
    done = cli(*TINY, "--max-train-steps", 4, "--checkpointing-steps", 2, "--seed", 3, "--output-dir", out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def copy_run(checkpointed, tmp_path):
    import shutil
    shutil.copytree(checkpointed / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def test_checkpoint_holds_our_state_as_json(checkpointed):
    folder = checkpointed / "checkpoints" / "step_00000004"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "training_state.json"]
    saved = json.loads((folder / "training_state.json").read_text())
    assert saved["completed_steps"] == 4 and [r["step"] for r in saved["history"]["train"]] == [2, 4]
    assert sorted(saved["files"]) == names[:-1]
    import hashlib
    for name, entry in saved["files"].items():
        data = (folder / name).read_bytes()
        assert entry == dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()), name


@pytest.mark.parametrize("name, refusal", [
    # read by accelerate's load_state with weights_only=True (the RNG states' failure it would swallow silently)
    ("optimizer.bin", r"not plain tensor data, refused \(a checkpoint is data, never code\)"),
    ("random_states_0.pkl", r"not plain tensor data, refused \(a checkpoint is data, never code\)"),
    # accelerate would unpickle it with weights_only=False (where register_for_checkpointing put our state)
    ("custom_checkpoint_0.pkl", r"refused, accelerate would load it as code, not data"),
    ("sampler.bin", None),  # never read for our loaders: the run resumes
])
def test_planted_pickle_never_runs_on_resume(run, checkpointed, tmp_path, name, refusal):
    out = copy_run(checkpointed, tmp_path)
    folder = out / "checkpoints" / "step_00000004"
    marker = tmp_path / "payload_ran"
    plant(folder, name, marker)
    argv = TINY + ["--max-train-steps", 5, "--seed", 3, "--output-dir", out, "--resume-from-checkpoint", folder]
    if refusal:  # refused before anything is loaded, naming the file
        with pytest.raises(SystemExit, match=rf"cannot resume: {re.escape(str(folder / name))}: {refusal}"):
            run(argv)
    else:
        assert run(argv)["completed_steps"] == 5
    assert not marker.exists()
    # the payload is real: its pickle calls open (io.open) on the marker (read statically, never unpickled)
    assert {"io.open", "REDUCE", str(marker)} <= pickled_calls(folder / name)


def pickled_calls(path):
    """The globals a torch.save file's pickle would call, its string arguments, and "REDUCE" if it calls
    anything, read with pickletools: the file is inspected as data, never unpickled."""
    import pickletools
    import zipfile
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if isinstance(arg, str):
            strings.append(arg)
        if opcode.name == "REDUCE":
            found.add("REDUCE")
        elif opcode.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        elif opcode.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return found | set(strings)


# ----------------------------------------------------------------------------- a diverging run stops
def test_diverging_run_stops_and_saves_nothing_non_finite(run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run(TINY + ["--opt", "sgd", "--lr", "1e6", "--max-train-steps", 8, "--log-every", 1, "--checkpointing-steps", 1,
                    "--checkpoints-total-limit", 0, "--output-dir", out])
    message = str(stop.value.code)
    step = int(re.search(r"became nan/inf at step (\d+) ", message).group(1))
    assert message.startswith("train_accelerate.py: error: the run diverged") and "\n" not in message
    assert "Try a lower --lr, --clip-grad 1.0, or --mixed-precision no (float32)" in message
    assert 1 < step <= 8
    # every step before it was finite (its checkpoint holds the logged losses), none from it on was saved
    names = [p.name for p in sorted((out / "checkpoints").iterdir())]
    assert names == [f"step_{k:08d}" for k in range(1, step)]
    assert message.endswith(f"the last checkpoint is {out / 'checkpoints' / names[-1]}")
    saved = json.loads((out / "checkpoints" / names[-1] / "training_state.json").read_text())
    assert [r["step"] for r in saved["history"]["train"]] == list(range(1, step))
    assert all(math.isfinite(r["loss"]) for r in saved["history"]["train"])
    assert all(torch.isfinite(t).all() for t in load_weights(out / "checkpoints" / names[-1]).values())
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


def test_save_model_refuses_non_finite_weights(train, tmp_path):
    model = timm.create_model("cnn_baseline_multimnist")
    with torch.no_grad():
        model.get_classifier().weight[0, 0] = float("nan")
    name = next(k for k, v in model.state_dict().items() if v.isnan().any())
    with pytest.raises(SystemExit, match=rf"the final model has non-finite values \(nan/inf\) in {re.escape(name)}; "
                                         r"not saved$"):
        train.save_model(model, tmp_path, None, dict(mean=(0.0,), std=(1.0,)))
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- damaged checkpoints
def damage(file, how):
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[:len(data) // 2])
        return f"{len(data) // 2} bytes, {len(data)} when it was written \\(truncated or damaged\\)"
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit, same size
    return "its contents changed since it was written \\(damaged\\)"


@pytest.mark.parametrize("name, how", [("model.safetensors", "truncated"), ("optimizer.bin", "flipped"),
                                       ("random_states_0.pkl", "truncated")])
def test_latest_skips_a_damaged_checkpoint(run, checkpointed, tmp_path, capsys, name, how):
    out = copy_run(checkpointed, tmp_path)
    newest = out / "checkpoints" / "step_00000004"
    problem = damage(newest / name, how)
    resumed = run(TINY + ["--max-train-steps", 4, "--checkpointing-steps", 2, "--seed", 3, "--output-dir", out,
                          "--resume-from-checkpoint", "latest"])
    printed = capsys.readouterr()
    assert re.search(rf"warning: checkpoint step_00000004 is damaged or unusable: {re.escape(str(newest / name))}: "
                     rf"{problem}; trying the one before it", printed.err)
    assert f"resuming from {out / 'checkpoints' / 'step_00000002'}" in printed.out
    # resumed exactly from step 2: the weights of the uninterrupted run
    assert resumed["completed_steps"] == 4
    assert_same_weights(load_weights(checkpointed), load_weights(out))


@pytest.mark.parametrize("name, how", [("model.safetensors", "flipped"), ("optimizer.bin", "truncated")])
def test_explicit_damaged_checkpoint_stops_naming_the_file(run, checkpointed, tmp_path, name, how):
    out = copy_run(checkpointed, tmp_path)
    folder = out / "checkpoints" / "step_00000004"
    problem = damage(folder / name, how)
    with pytest.raises(SystemExit, match=rf"^train_accelerate.py: error: cannot resume: "
                                         rf"{re.escape(str(folder / name))}: {problem}$"):
        run(TINY + ["--max-train-steps", 5, "--output-dir", out, "--resume-from-checkpoint", folder])
    assert not (out / "model.safetensors").exists()


def test_checkpoint_of_another_model_or_incomplete_is_refused(run, checkpointed, tmp_path):
    out = copy_run(checkpointed, tmp_path)
    folder = out / "checkpoints" / "step_00000004"
    with pytest.raises(SystemExit, match=rf"cannot resume: {re.escape(str(folder / 'model.safetensors'))}: holds "
                                         r"another model \(first difference: 'capsule_layers.0.weight'; other --model"):
        run(TINY + ["--model-arg", "capsule_layers=[('conv', 6, 3, 1)]", "--output-dir", out,
                    "--resume-from-checkpoint", folder])
    (folder / "training_state.json").unlink()
    with pytest.raises(SystemExit, match=rf"cannot resume: {re.escape(str(folder / 'training_state.json'))}: "
                                         r"missing \(not a complete checkpoint of this script\)$"):
        run(TINY + ["--output-dir", out, "--resume-from-checkpoint", folder])
    # with latest, none usable: one line naming each
    damage(out / "checkpoints" / "step_00000002" / "optimizer.bin", "truncated")
    with pytest.raises(SystemExit, match=r"no usable checkpoint in .*checkpoints: .*step_00000004/training_state.json: "
                                         r"missing .*; .*step_00000002/optimizer.bin: \d+ bytes"):
        run(TINY + ["--output-dir", out, "--resume-from-checkpoint", "latest"])


# ----------------------------------------------------------------------------------------- reporting
@pytest.mark.parametrize("mnist_dir", [False, True])
def test_the_mnist_source_actually_used_is_reported(run, tmp_path, capsys, monkeypatch, mnist_dir):
    """--mnist-source auto resolves (offline here) to the built-in sample, or to $MNIST_DIR: metrics.json and the
    log say which, not 'auto'."""
    from timm_capsules.data import load_sample, write_idx
    expected = "sample"
    if mnist_dir:
        folder = tmp_path / "mnist"
        folder.mkdir()
        for split, prefix in (("train", "train"), ("test", "t10k")):
            digits = load_sample(split)
            write_idx(folder / f"{prefix}-images-idx3-ubyte", digits.images)
            write_idx(folder / f"{prefix}-labels-idx1-ubyte", digits.labels.astype(np.uint8))
        monkeypatch.setenv("MNIST_DIR", str(folder))
        expected = f"idx:{folder}"
    else:
        monkeypatch.delenv("MNIST_DIR", raising=False)
    out = tmp_path / "out"
    results = run(TINY + ["--mnist-source", "auto", "--max-train-steps", 1, "--output-dir", out])
    metrics = json.loads((out / "metrics.json").read_text())
    assert results["data_source"] == metrics["data_source"] == expected
    assert metrics["args"]["mnist_source"] == "auto"  # what was asked, beside what it resolved to
    assert f"on diverse_multimnist ({expected}):" in capsys.readouterr().out


def test_kernel_build_is_timed_apart_from_training(run, train, tmp_path, capsys, monkeypatch):
    """The one-off kernel build (here a stand-in that takes 1 s) is loaded up front and reported on its own."""
    calls = []
    monkeypatch.setattr(train, "routing_kernel", lambda: (calls.append(1), time.sleep(1.0)))
    results = run(TINY + ["--cpu", "--max-train-steps", 1, "--output-dir", tmp_path])
    assert len(calls) == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["kernel_load_s"] == results["kernel_load_s"] >= 1.0
    assert metrics["wall_time_s"] >= metrics["training_time_s"] + metrics["kernel_load_s"]
    assert (f"\n{metrics['training_time_s']:.0f} s of training, routing kernel built/loaded in "
            f"{metrics['kernel_load_s']:.0f} s; saved to {tmp_path}\n") in capsys.readouterr().out



@pytest.mark.parametrize("model, kernel", [("em_capsnet_simple_cifar10", "em_routing_kernel"),
                                           ("capsnet_simple_cifar10", "routing_kernel")])
def test_each_family_loads_its_own_kernel_up_front(train, monkeypatch, model, kernel):
    from accelerate import Accelerator
    calls = {name: [] for name in ("routing_kernel", "em_routing_kernel")}
    for name in calls:
        monkeypatch.setattr(train, name, lambda name=name: calls[name].append(1))
    train.load_routing_kernel(timm.create_model(model, img_size=28, in_chans=1), Accelerator(cpu=True))
    assert {name: len(c) for name, c in calls.items()} == {n: int(n == kernel) for n in calls}
    monkeypatch.setenv("TIMM_CAPSULES_FUSED_ROUTING", "0")  # plain tensor ops: nothing to build
    assert train.load_routing_kernel(timm.create_model(model, img_size=28, in_chans=1), Accelerator(cpu=True)) == 0.0
    assert sum(map(len, calls.values())) == 1

# ------------------------------------------------------------------------------------------ stopping
def processes_writing_to(folder):
    """Pids of the live processes whose command line names `folder`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(folder).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def stop_while_training(command, out, signum, **env):
    """Starts `command`, sends `signum` once its second checkpoint exists (the loop runs), and waits."""
    import signal
    process = subprocess.Popen(command, cwd=ROOT, env=dict(ENV, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 240  # a guard against a hang, not a measurement
    while not (out / "checkpoints" / "step_00000002").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    try:
        stdout, stderr = process.communicate(timeout=120)  # the pipes close when every process holding them is gone
    except subprocess.TimeoutExpired:  # it did not stop: leave nothing running behind the failure
        for pid in processes_writing_to(out):
            os.kill(pid, signal.SIGKILL)
        raise
    return process.returncode, stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize("signame, processes", [("SIGTERM", 0), ("SIGINT", 0), ("SIGTERM", 1), ("SIGTERM", 2)])
def test_a_signal_stops_training_with_a_checkpoint(run, tmp_path, signame, processes):
    """kill -TERM / Ctrl-C of the script, or kill -TERM of `accelerate launch` (with one process, launchers before
    accelerate 1.16 do not pass the signal on: the child asks Linux for SIGTERM when the launcher dies; 1.16's
    terminates its child itself; with two, torch's elastic agent passes it on and the ranks agree on the step), ends
    the current step, writes a checkpoint and exits non-zero; no process is left, and the run resumes from that
    checkpoint."""
    import signal
    out = tmp_path / "out"
    argv = [*TINY, "--epoch-size", 10**6, "--max-train-steps", 10**6, "--checkpointing-steps", 1,
            "--checkpoints-total-limit", 0, "--output-dir", out]
    command = [sys.executable, str(SCRIPT), *map(str, argv)]
    if processes:
        command[1:1] = ["-m", "accelerate.commands.launch", "--num_processes", str(processes), "--mixed_precision", "no",
                        "--dynamo_backend", "no"]
    if processes == 2:
        command[3:3] = ["--multi_gpu", "--num_machines", "1", "--main_process_port", str(free_port())]
    code, _, stderr = stop_while_training(command, out, getattr(signal, signame), ACCELERATE_USE_CPU="1")
    assert not processes_writing_to(out), "a training process outlived the stop"
    match = re.search(rf"stopped by {signame} after (\d+) steps; checkpoint (\S+); continue with "
                      r"--resume-from-checkpoint latest", stderr)
    assert match, stderr[-3000:]
    steps = int(match.group(1))
    # a non-zero status that says the run was stopped by the signal: the script's own 128 + signal; under
    # `accelerate launch`, the launcher's, which changed with accelerate 1.16: before it, killed by the signal
    # (one process) or failed (two); since, 128 + the signal itself for both
    stopped = 128 + getattr(signal, signame)
    assert code in {0: {stopped}, 1: {-signal.SIGTERM, stopped}, 2: {1, stopped}}[processes], code
    assert stderr.count("stopping after this step, with a checkpoint") == max(processes, 1)
    newest = sorted((out / "checkpoints").iterdir())[-1]
    assert match.group(2) == str(newest) and newest.name == f"step_{steps:08d}"
    assert json.loads((newest / "training_state.json").read_text())["completed_steps"] == steps
    assert not (out / "model.safetensors").exists()
    resumed = run(argv[:argv.index("--max-train-steps")] + ["--max-train-steps", steps + 1, "--output-dir", out,
                                                            "--resume-from-checkpoint", "latest"])
    assert resumed["completed_steps"] == steps + 1 and (out / "model.safetensors").exists()


def resolved_quick_args(train, argv=()):
    """parse_args as main resolves them: --max-train-steps from the epochs (DiverseMultiMNIST: epoch size / batch)."""
    args = train.parse_args(list(argv))
    args.max_train_steps = args.max_train_steps or args.epochs * math.ceil(args.epoch_size / args.batch_size)
    return args


def test_cnn_reference_only_for_the_exact_recipe_it_was_measured_with(train):
    """The record is a CNN trained once with the quick run's recipe on the built-in sample: any other recipe,
    data, model or process count (a 60-step run among them) gets no reference."""
    record = json.loads(train.CNN_REFERENCE.read_text())["metrics"]
    for argv in ([], ["--max-train-steps", record["args"]["max_train_steps"]], ["--output-dir", "elsewhere"]):
        line = train.cnn_reference(resolved_quick_args(train, map(str, argv)), "exact_match", "sample")
        assert f"{record['num_parameters']:,} parameters" in line, argv
        assert f"exact_match {record['final']['exact_match']:.4f}" in line
    for argv in (["--max-train-steps", 60], ["--epochs", 2], ["--lr", 0.01], ["--batch-size", 64], ["--seed", 1],
                 ["--opt", "sgd"], ["--sched", "none"], ["--epoch-size", 4096], ["--test-size", 100],
                 ["--data-seed", 1], ["--mnist-source", "hub"], ["--iterations", 3], ["--clip-grad", 1],
                 ["--model-arg", "pose_dim=4"], ["--model", "cnn_baseline_multimnist"],
                 ["--preset", "multimnist_matrix"]):
        assert train.cnn_reference(resolved_quick_args(train, map(str, argv)), "exact_match", "sample") == "", argv
    quick = resolved_quick_args(train)
    assert train.cnn_reference(quick, "exact_match", "hub:ylecun/mnist") == ""
    assert train.cnn_reference(quick, "exact_match", "sample", num_processes=2) == ""


# ------------------------------------------------------------------- --augment and --extra-test-split
def crops(image, padding=4):
    """Every pad-and-crop window of a (C, H, W) image (the training augmentation's shifts)."""
    padded = F.pad(image, (padding,) * 4)
    H, W = image.shape[-2:]
    return [padded[:, r:r + H, c:c + W] for r in range(2 * padding + 1) for c in range(2 * padding + 1)]


@pytest.mark.parametrize("augment", ["none", "crop", "crop-flip"])
def test_augment_option(run, train, tmp_path, monkeypatch, augment):
    """none: the training batch is the plain images; crop: shifted windows, never mirrored; crop-flip (the
    paper's CIFAR recipe, the default): some images are mirrored."""
    data = make_image_dataset(tmp_path / "data", size=32, mode="RGB")
    calls = spy_on_model(train, monkeypatch)
    run(CIFAR_TINY + ["--data-dir", data, "--batch-size", 12, "--max-train-steps", 1, "--augment", augment,
                      "--output-dir", tmp_path / "out"])
    seen = calls[0]["images"]  # the one training batch: all 12 training images, shuffled
    assert calls[0]["training"] and seen.shape == (12, 3, 32, 32)
    plain, _ = as_tensors(*image_examples(32, "RGB")["train"], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    seen = seen * std + mean  # back to [0, 1]; zero padding is 0 there

    def matches(image, candidates):
        return any(torch.allclose(image, c, atol=1e-5) for c in candidates)
    shifted = [any(matches(s, crops(p)) for p in plain) for s in seen]
    mirrored = [any(matches(s, crops(p.flip(-1))) for p in plain) and not shifted[k] for k, s in enumerate(seen)]
    if augment == "none":
        assert all(matches(s, list(plain)) for s in seen)
    elif augment == "crop":
        assert all(shifted) and not all(matches(s, list(plain)) for s in seen)
    else:
        assert all(a or b for a, b in zip(shifted, mirrored)) and any(mirrored)


def test_extra_test_split_is_evaluated_on_the_final_model(run, tmp_path):
    data = make_image_dataset(tmp_path / "data", size=32, mode="RGB", form="parquet")
    out = tmp_path / "out"
    results = run(CIFAR_TINY + ["--data-dir", data, "--batch-size", 4, "--max-train-steps", 2,
                                "--extra-test-split", "train", "--extra-test-split", "test[:3]", "--output-dir", out])
    examples = image_examples(32, "RGB")
    for split, (images, labels) in (("train", examples["train"]), ("test[:3]", [x[:3] for x in examples["test"]])):
        expected = independent_metrics(results["model_object"], *as_tensors(images, labels, CIFAR_MEAN, CIFAR_STD), False)
        assert_metrics(results["extra_tests"][split], expected)
    assert json.loads((out / "metrics.json").read_text())["extra_tests"] == results["extra_tests"]
    with pytest.raises(SystemExit, match="--extra-test-split needs an image dataset"):
        run(TINY + ["--extra-test-split", "train", "--output-dir", tmp_path / "refused"])
