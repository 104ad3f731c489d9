#!/usr/bin/env python
"""Train and evaluate the capsule networks of *Capsules with Inverted Dot-Product Attention Routing*
(Tsai et al., ICLR 2020) with Hugging Face Accelerate, from one CPU to many GPUs.

    accelerate launch train_accelerate.py                            # quick DiverseMultiMNIST run, CPU-sized
    accelerate launch train_accelerate.py --preset cifar10_resnet    # a paper recipe (see PRESETS)
    accelerate launch --multi_gpu --num_processes 8 train_accelerate.py --preset multimnist_matrix
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_accelerate.py  # 2 CPU processes

Explicit arguments override a preset. Every option is spelled with dashes or underscores
(``--batch-size`` == ``--batch_size``). The script reads top to bottom: presets, arguments, data,
model, evaluation, checkpoints, outputs, then ``main`` with the training loop.
"""
import argparse
import ast
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

import timm
import timm_capsules  # noqa: F401  (registers the capsule models with timm)
from timm_capsules import hub
from timm_capsules.routing import routing_kernel
from timm_capsules.losses import margin_loss, spread_loss
from timm_capsules.data.cifar import KNOWN_DATASETS
from timm_capsules.presets import PRESETS, QUICK
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

# -------------------------------------------------------------------------------------------- arguments
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(message):
    """Stop before training with one clear line."""
    raise SystemExit(f"train_accelerate.py: error: {' '.join(str(message).split())}")


def parse_key_values(items):
    """['a=1', "b={'x': 2}", 'c=resnet18'] -> {'a': 1, 'b': {'x': 2}, 'c': 'resnet18'} (ast.literal_eval)."""
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            fail(f"model argument {item!r} is not key=value")
        try:
            result[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            result[key] = value  # a bare word such as resnet18
    return result


def parse_args(argv=None):
    parser = Parser(prog="train_accelerate.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(name, **kwargs):  # --some-name and --some_name
        names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
        parser.add_argument(*names, **kwargs)

    add("preset", choices=sorted(PRESETS), help="a paper experiment; explicit arguments override it")
    # model
    add("model", help="any timm model name (capsnet_*), or local-dir:<dir> / hf-hub:<id>")
    add("model-kwargs", dest="model_kwargs_cli", nargs="+", default=[], metavar="KEY=VALUE",
        help="timm.create_model kwargs, values read with ast.literal_eval (e.g. backbone=resnet18)")
    add("model-arg", dest="model_arg_cli", action="append", default=[], metavar="KEY=VALUE",
        help="one create_model kwarg (repeatable)")
    add("pretrained", action="store_true", help="start from the model's pretrained weights")
    add("iterations", type=int, help="routing iterations (iterations= of the model)")
    add("routing", choices=["concurrent", "sequential"], help="routing schedule (sequential: ablation B)")
    add("no-layer-norm", dest="layer_norm", action="store_const", const=False, help="drop LayerNorm (ablation A)")
    add("activations", action="store_const", const=True, help="EM-style capsule activations (ablation C)")
    # data
    add("dataset", help="diverse_multimnist | cifar10 | cifar100 | hf:<Hub id or local folder>")
    add("data-dir", help="local copy of cifar10/cifar100 (save_to_disk or parquet folder, same columns)")
    add("image-column", help="image column (cifar: img)")
    add("label-column", help="label column (cifar10: label, cifar100: fine_label)")
    add("train-split", default="train")
    add("test-split", default="test")
    add("resize", action="store_true", help="resize images to the model's input size")
    add("mnist-source", default="auto", help="MNIST digits: auto | sample | hub | fashion_mnist | IDX folder")
    add("epoch-size", type=int, help="DiverseMultiMNIST images per epoch (generated on the fly)")
    add("test-size", type=int, help="DiverseMultiMNIST fixed test images")
    add("data-seed", type=int, default=0, help="seed of the DiverseMultiMNIST test set")
    add("num-workers", type=int, help="DataLoader workers (default: 4 with CUDA, else 0)")
    # optimisation
    add("opt", help="timm optimizer name (sgd, adam, adamw, ...)")
    add("lr", type=float)
    add("momentum", type=float)
    add("weight-decay", type=float)
    add("batch-size", type=int, help="per process")
    add("eval-batch-size", type=int, help="per process (default: 2 x batch size)")
    add("epochs", type=int)
    add("max-train-steps", type=int, help="optimizer steps in all; overrides --epochs")
    add("sched", help="timm scheduler: multistep | cosine | step | ... | none")
    add("decay-milestones", type=int, nargs="*", help="multistep: epochs at which lr *= decay-rate")
    add("decay-rate", type=float)
    add("warmup-epochs", type=int)
    add("clip-grad", type=float, help="clip the gradient norm to this value")
    add("gradient-accumulation-steps", type=int, default=1)
    # accelerate, logging, outputs
    add("mixed-precision", choices=["no", "fp16", "bf16"], help="default: accelerate config")
    add("cpu", action="store_true", help="train on the CPU even when a GPU is there")
    add("seed", type=int, default=42)
    add("with-tracking", action="store_true", help="log to the trackers of --report_to")
    add("report-to", default="tensorboard", help="tensorboard | wandb | all | ...")
    add("project-name", default="timm_capsules")
    add("output-dir", default="outputs")
    add("log-every", type=int, default=20, help="optimizer steps between logged training losses")
    add("eval-every", type=int, default=1, help="epochs between evaluations (the last always runs)")
    add("checkpointing-steps", help="save a resumable checkpoint every N optimizer steps, or 'epoch'")
    add("checkpoints-total-limit", type=int, default=3, help="keep only the last K checkpoints")
    add("resume-from-checkpoint", metavar="PATH|latest", help="continue a run exactly from a checkpoint")
    add("push-to-hub", metavar="REPO_ID", help="publish the final model to the Hugging Face Hub")
    add("hub-private", action="store_true")
    add("stop-after-steps", type=int, help="debug: stop after N optimizer steps as if killed")
    add("debug-digests", action="store_true", help="debug: each rank writes a digest of its final weights")

    # A preset (or, without one, QUICK) supplies the defaults; explicit arguments win.
    known, _ = parser.parse_known_args(argv)
    preset = dict(PRESETS[known.preset]) if known.preset else dict(QUICK)
    preset_kwargs = preset.pop("model_kwargs", {})
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    # create_model kwargs: the preset's (they belong to its model: naming another model drops them),
    # then --model-kwargs / --model-arg, then the ablation flags
    args.model_kwargs = dict(preset_kwargs if args.model == preset["model"] else {})
    args.model_kwargs.update(parse_key_values(args.model_kwargs_cli + args.model_arg_cli))
    for name in ("iterations", "routing", "layer_norm", "activations"):
        if getattr(args, name) is not None:
            args.model_kwargs[name] = getattr(args, name)
    return args


def check_args(args):
    if args.checkpointing_steps not in (None, "epoch") and not str(args.checkpointing_steps).isdigit():
        fail(f"--checkpointing_steps must be a number or 'epoch', got {args.checkpointing_steps!r}")
    for name in ("batch_size", "epochs", "gradient_accumulation_steps", "log_every", "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be >= 1")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        fail(f"checkpoint {args.resume_from_checkpoint} does not exist")
    name = args.model
    if not (name.startswith(("local-dir:", "hf-hub:")) or timm.is_model(name)):
        fail(f"unknown model {name!r}; capsule models: {', '.join(timm.list_models('capsnet_*'))}")


# ------------------------------------------------------------------------------------------------- data
def describe_dataset(args):
    """(kind, source, image column, label column) for --dataset, or a clear error."""
    if args.dataset in ("diverse_multimnist", "multimnist"):
        return "multimnist", None, None, None
    if args.dataset in KNOWN_DATASETS:
        hub_id, image_column, label_column = KNOWN_DATASETS[args.dataset]
        return "hf", args.data_dir or hub_id, args.image_column or image_column, args.label_column or label_column
    if args.dataset.startswith("hf:"):
        return "hf", args.dataset[3:], args.image_column or "image", args.label_column or "label"
    fail(f"unknown dataset {args.dataset!r}: use diverse_multimnist, cifar10, cifar100 or hf:<id or folder>")


def load_hf_splits(args, source, image_column, label_column):
    from timm_capsules.data.cifar import check_columns, label_info, load_image_dataset
    splits = {}
    for role, split in (("train", args.train_split), ("test", args.test_split)):
        try:
            splits[role] = load_image_dataset(source, split)
        except Exception as error:  # offline Hub, missing folder, unknown split: one line, no traceback
            fail(f"cannot load split {split!r} of {source}: {str(error).splitlines()[0] if str(error) else repr(error)}")
        try:
            check_columns(splits[role], image_column, label_column, name=f"{source} ({split})")
        except ValueError as error:
            fail(str(error))
    return splits, label_info(splits["train"], label_column)


def make_hf_loaders(args, splits, labels, image_column, label_column, data_cfg):
    from timm_capsules.data.cifar import ImageClassificationData, image_size, image_transform
    size = tuple(data_cfg["input_size"][1:])
    found = image_size(splits["train"], image_column)
    if data_cfg["fixed_input_size"] and found != size and not args.resize:
        fail(f"{args.model} takes {size[0]}x{size[1]} images but the dataset's are {found[0]}x{found[1]}; "
             f"pass --resize or --model-arg img_size=...")
    loaders = {}
    transform = image_transform(data_cfg["input_size"], resize=args.resize or found != size)
    for role, dataset in splits.items():
        data = ImageClassificationData(dataset, transform, image_column, label_column, labels, mean=data_cfg["mean"],
                                       std=data_cfg["std"], augment=role == "train", seed=args.seed)
        loaders[role] = torch.utils.data.DataLoader(
            data, batch_size=args.batch_size if role == "train" else args.eval_batch_size,
            shuffle=role == "train", drop_last=False, num_workers=args.num_workers,
            pin_memory=torch.cuda.is_available())  # workers restart each epoch and see set_epoch
    return loaders


def multimnist_test_loader(args, data_cfg):
    from timm_capsules.data import make_split
    split = make_split("test", args.test_size, source=args.mnist_source, seed=args.data_seed)
    images = normalise(torch.from_numpy(split.images).unsqueeze(1).float().div_(255), data_cfg)
    dataset = torch.utils.data.TensorDataset(images, torch.from_numpy(split.targets))
    return torch.utils.data.DataLoader(dataset, batch_size=args.eval_batch_size)


def multimnist_stream(args, accelerator, start):
    """Per-rank on-the-fly training stream, resumed at batch ``start`` (nothing before it is generated).
    Not prepared by accelerate: each rank generates its own images (rank r: images r, r + W, ...)."""
    from timm_capsules.data import DiverseMultiMNISTStream
    stream = DiverseMultiMNISTStream(
        "train", source=args.mnist_source, seed=args.seed, batch_size=args.batch_size, start=start,
        rank=accelerator.process_index, world_size=accelerator.num_processes)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                                       pin_memory=torch.cuda.is_available())


def normalise(images, data_cfg):
    mean = torch.tensor(data_cfg["mean"], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg["std"], device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


# ------------------------------------------------------------------------------------------------ model
def create_model(args, num_classes):
    kwargs = dict(args.model_kwargs)
    if num_classes is not None:
        if kwargs.setdefault("num_classes", num_classes) != num_classes:
            fail(f"num_classes={kwargs['num_classes']} but the dataset has {num_classes} classes")
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, OSError) as error:
        fail(f"cannot create {args.model} with {kwargs}: {error}")
    return model, kwargs


def data_config_of(model):
    """input size (C, H, W), mean, std, and whether the model takes only that size."""
    cfg = timm.data.resolve_data_config({}, model=model)
    if hasattr(model, "img_size") and hasattr(model, "in_chans"):  # the capsule nets' actual size
        cfg["input_size"] = (model.in_chans, *model.img_size)
    channels = cfg["input_size"][0]
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != channels:  # e.g. an ImageNet model with in_chans=1
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    fixed = bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False))
    return dict(input_size=tuple(cfg["input_size"]), mean=mean, std=std, fixed_input_size=fixed)


# ------------------------------------------------------------------------------------------- evaluation
def output_kind(model):
    """What forward returns: 'logits', or for the capsule baselines class-capsule 'lengths' (dynamic
    routing) or 'activations' (EM routing), both in [0, 1]."""
    return getattr(model, "output_type", "logits")  # timm's own models return logits


def loss_fn(outputs, targets, multi_label, returns="logits", margin=0.2, reduction="mean"):
    outputs = outputs.float()
    if returns == "lengths":  # Sabour et al.'s margin loss
        loss = margin_loss(outputs, targets, reduction="none")
    elif returns == "activations":  # Hinton et al.'s spread loss; the margin grows during training
        loss = spread_loss(outputs, targets, margin, reduction="none")
    elif multi_label:  # binary cross-entropy per class
        loss = F.binary_cross_entropy_with_logits(outputs, targets.float(), reduction="none").mean(1)
    else:
        loss = F.cross_entropy(outputs, targets, reduction="none")
    return loss.mean() if reduction == "mean" else loss


def present(outputs, returns):
    """The classes predicted present: logit > 0, or capsule length / activation > 0.5."""
    return outputs > (0.0 if returns == "logits" else 0.5)


def correct(outputs, targets, multi_label, returns="logits"):
    """Per image: exact match of the thresholded prediction (multi-label) or top-1 hit."""
    if multi_label:
        return (present(outputs, returns) == targets.bool()).all(1)
    return outputs.argmax(1) == targets


@torch.no_grad()
def evaluate(model, loader, accelerator, multi_label, num_classes, returns="logits"):
    """Metrics over the whole test set; gather_for_metrics drops the samples duplicated to even out
    the last batch across processes, so every image counts exactly once."""
    model.eval()
    totals = dict(images=0, loss=0.0, correct=0, top5=0)
    tp = fp = fn = torch.zeros(num_classes, dtype=torch.long, device=accelerator.device)
    for images, targets in loader:
        logits = model(images)
        losses = loss_fn(logits, targets, multi_label, returns, margin=0.9, reduction="none")
        logits, targets, losses = accelerator.gather_for_metrics((logits.float(), targets, losses))
        totals["images"] += len(targets)
        totals["loss"] += losses.sum().item()
        totals["correct"] += correct(logits, targets, multi_label, returns).sum().item()
        if multi_label:
            predicted, actual = present(logits, returns), targets.bool()
            tp = tp + (predicted & actual).sum(0)
            fp = fp + (predicted & ~actual).sum(0)
            fn = fn + (~predicted & actual).sum(0)
        else:
            k = min(5, num_classes)
            totals["top5"] += (logits.topk(k, 1).indices == targets[:, None]).any(1).sum().item()
    model.train()
    n = max(totals["images"], 1)
    metrics = dict(num_images=totals["images"], loss=totals["loss"] / n)
    if multi_label:
        f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1)).tolist()
        metrics.update(exact_match=totals["correct"] / n, per_class_f1=f1, macro_f1=sum(f1) / len(f1))
    else:
        metrics.update(top1=totals["correct"] / n, top5=totals["top5"] / n)
    return metrics


# ------------------------------------------------------------------------------------------ checkpoints
class TrainState:
    """Progress that accelerate's save_state does not know about; registered for checkpointing."""

    def __init__(self, device):
        self.completed_steps = 0
        self.running = torch.zeros(3, device=device)  # loss sum, correct, images since the last log line
        self.history = dict(train=[], eval=[])

    def state_dict(self):
        return dict(completed_steps=self.completed_steps, running=self.running.tolist(), history=self.history)

    def load_state_dict(self, state):
        self.completed_steps, self.history = state["completed_steps"], state["history"]
        self.running = torch.tensor(state["running"], device=self.running.device)


def checkpoint_dirs(output_dir):
    """Finished checkpoints, oldest first (a half-written one is still a .tmp dir and never listed)."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator, output_dir, step, total_limit):
    """Writes into a temporary folder, then renames it: a kill mid-save never leaves a broken checkpoint."""
    final = Path(output_dir) / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-total_limit] if total_limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------- outputs
def weights_digest(model):
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_model(model, output_dir, label_names, data_cfg):
    """The timm way: config.json + model.safetensors, loadable with create_model('local-dir:<dir>').
    Written to a temporary folder first, then moved in."""
    tmp = Path(output_dir) / ".tmp_model"
    shutil.rmtree(tmp, ignore_errors=True)
    model_config = dict(label_names=list(label_names)) if label_names else None
    timm.models.save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True,
                            data_config=dict(mean=data_cfg["mean"], std=data_cfg["std"]))
    for file in tmp.iterdir():
        os.replace(file, Path(output_dir) / file.name)
    tmp.rmdir()


def push_to_hub(model, output_dir, repo_id, private, label_names):
    """A paper model goes through timm_capsules.hub (validated upload folder, model card from its
    hub config); any other model through timm's own push_to_hf_hub. Safetensors only, either way."""
    architecture = model.pretrained_cfg["architecture"]
    num_params = sum(p.numel() for p in model.parameters())
    if any(cfg["model"] == architecture and cfg["architecture"]["params"] == num_params
           for cfg in hub.list_hub_configs()):
        hub.push_checkpoint(output_dir, repo_id, private=private)
    else:
        model_config = dict(label_names=list(label_names)) if label_names else None
        timm.models.push_to_hf_hub(model, repo_id, model_config=model_config, private=private,
                                   safe_serialization=True)


def plot_curves(history, path, metric_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    train, test = history["train"], history["eval"]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    ax_loss.plot([r["step"] for r in test], [r["loss"] for r in test], "o-", label="test")
    ax_acc.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train (batches)")
    ax_acc.plot([r["step"] for r in test], [r[metric_name] for r in test], "o-", label="test")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="optimizer step", ylabel=metric_name, title=metric_name, ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tracker_config(args):
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


# ------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    args.num_workers = args.num_workers if args.num_workers is not None else (4 if torch.cuda.is_available() else 0)
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size

    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # accelerate: silently fp32
        fail("--mixed_precision fp16 needs a GPU (on the CPU accelerate trains in float32); use bf16 or no")
    set_seed(args.seed)
    started = time.time()

    # ---- data description and model (everything that can be wrong is checked before training)
    kind, source, image_column, label_column = describe_dataset(args)
    if kind == "multimnist":
        multi_label, num_classes, label_names = True, 10, [str(d) for d in range(10)]
        model, model_kwargs = create_model(args, num_classes)
        data_cfg = data_config_of(model)
        if data_cfg["input_size"] != (1, 36, 36) and data_cfg["fixed_input_size"]:
            fail(f"{args.model} takes {data_cfg['input_size']} images; DiverseMultiMNIST's are (1, 36, 36)")
        with accelerator.main_process_first():  # the MNIST digits may be downloaded once
            test_loader = multimnist_test_loader(args, data_cfg)
        updates_per_epoch = math.ceil(args.epoch_size / (args.batch_size * accelerator.num_processes
                                                         * args.gradient_accumulation_steps))
        batches_per_epoch = updates_per_epoch * args.gradient_accumulation_steps
    else:
        with accelerator.main_process_first():
            splits, labels = load_hf_splits(args, source, image_column, label_column)
        multi_label, num_classes, label_names = labels.multi_label, labels.num_classes, labels.names
        model, model_kwargs = create_model(args, num_classes)
        data_cfg = data_config_of(model)
        loaders = make_hf_loaders(args, splits, labels, image_column, label_column, data_cfg)
        test_loader = loaders["test"]
    metric_name = "exact_match" if multi_label else "top1"
    returns = output_kind(model)  # logits, or capsule lengths / activations (the baselines)
    if accelerator.device.type == "cpu" and getattr(model, "fused_routing", False):
        with accelerator.main_process_first():  # compiled once (about a minute), then cached by torch
            accelerator.print("loading the fused CPU routing kernel (compiled on first use)")
            routing_kernel()

    # ---- optimizer, scheduler (timm factories; the scheduler is stepped by us, once per optimizer step)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    if kind == "multimnist":
        model, optimizer, test_loader = accelerator.prepare(model, optimizer, test_loader)
    else:
        model, optimizer, train_loader, test_loader = accelerator.prepare(
            model, optimizer, loaders["train"], test_loader)
        batches_per_epoch = len(train_loader)
        updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.epochs * updates_per_epoch
    epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    scheduler = None
    if args.sched and args.sched != "none":
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=epochs, decay_milestones=args.decay_milestones or [],
            decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs or 0, step_on_epochs=False,
            updates_per_epoch=updates_per_epoch)
    state = TrainState(accelerator.device)
    accelerator.register_for_checkpointing(state)

    # ---- resume: weights, optimizer, RNG states, samplers and our progress
    resume = args.resume_from_checkpoint
    if resume == "latest":
        found = checkpoint_dirs(args.output_dir)
        resume = str(found[-1]) if found else None
        if resume is None:
            accelerator.print(f"no checkpoint in {args.output_dir}/checkpoints; starting from scratch")
    if resume:
        accelerator.print(f"resuming from {resume}")
        accelerator.load_state(resume)
        accelerator.project_configuration.iteration = state.completed_steps  # load_state does not restore it
    completed_steps = state.completed_steps
    starting_epoch, resume_updates = divmod(completed_steps, updates_per_epoch)
    if scheduler is not None:
        scheduler.step_update(num_updates=completed_steps)

    def run_evaluation(epoch):
        metrics = evaluate(model, test_loader, accelerator, multi_label, num_classes, returns)
        state.history["eval"].append(dict(step=completed_steps, epoch=epoch, **metrics))
        if accelerator.is_main_process:  # through tqdm, so the progress bar stays intact
            tqdm.write(f"epoch {epoch}: step {completed_steps}, test loss {metrics['loss']:.4f}, "
                       f"{metric_name} {metrics[metric_name]:.4f} ({metrics['num_images']} images)")
        if args.with_tracking:
            accelerator.log({f"test/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=completed_steps)

    if args.with_tracking:
        accelerator.init_trackers(args.project_name, tracker_config(args))
    num_params = sum(p.numel() for p in model.parameters())
    accelerator.print(
        f"{args.model} {model_kwargs} ({num_params:,} parameters) on {args.dataset}: {epochs} epochs x "
        f"{updates_per_epoch} steps, batch {args.batch_size} x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation, {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}")

    if kind == "multimnist":  # one endless per-rank stream; skipped batches are never generated
        stream = iter(multimnist_stream(args, accelerator, start=completed_steps * args.gradient_accumulation_steps))
    evaluated_steps = {record["step"] for record in state.history["eval"]}
    if completed_steps and not resume_updates and starting_epoch % args.eval_every == 0 \
            and completed_steps not in evaluated_steps and completed_steps < args.max_train_steps:
        run_evaluation(starting_epoch - 1)  # a step checkpoint at the end of an epoch came before its evaluation
    progress = tqdm(range(args.max_train_steps), initial=completed_steps, disable=not accelerator.is_main_process)
    stopped = False
    epoch = starting_epoch
    for epoch in range(starting_epoch, epochs if completed_steps < args.max_train_steps else starting_epoch):
        model.train()
        if kind == "multimnist":
            skip = resume_updates * args.gradient_accumulation_steps if epoch == starting_epoch else 0
            batches = (next(stream) for _ in range(batches_per_epoch - skip))
        else:
            train_loader.set_epoch(epoch)  # the sampler's shuffle and the augmentation draws
            train_loader.dataset.set_epoch(epoch)
            batches = train_loader
            if epoch == starting_epoch and resume_updates:
                batches = accelerator.skip_first_batches(train_loader, resume_updates * args.gradient_accumulation_steps)
        for images, targets in batches:
            if kind == "multimnist":
                images = normalise(images.to(accelerator.device, non_blocking=True), data_cfg)
                targets = targets.to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                logits = model(images)
                margin = 0.2 + 0.7 * min(1.0, completed_steps / args.max_train_steps)  # spread loss only
                loss = loss_fn(logits, targets, multi_label, returns, margin)
                accelerator.backward(loss)
                if args.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad()
            state.running += torch.stack([loss.detach().float() * len(targets),
                                          correct(logits.detach(), targets, multi_label, returns).sum().float(),
                                          torch.tensor(float(len(targets)), device=accelerator.device)])
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            state.completed_steps = completed_steps
            if scheduler is not None:
                scheduler.step_update(num_updates=completed_steps)
            progress.update(1)
            if completed_steps % args.log_every == 0 or completed_steps == args.max_train_steps:
                loss_sum, hits, count = accelerator.reduce(state.running.clone(), "sum").tolist()
                record = dict(step=completed_steps, epoch=epoch, loss=loss_sum / count, accuracy=hits / count,
                              lr=optimizer.param_groups[0]["lr"])
                state.history["train"].append(record)
                state.running.zero_()
                progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
                if args.with_tracking:
                    accelerator.log({"train/loss": record["loss"], "train/accuracy": record["accuracy"],
                                     "lr": record["lr"]}, step=completed_steps)
            if str(args.checkpointing_steps).isdigit() and completed_steps % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, args.output_dir, completed_steps, args.checkpoints_total_limit)
            if completed_steps == args.stop_after_steps:
                stopped = True
            if completed_steps >= args.max_train_steps or stopped:
                break
        if stopped:
            break
        last = completed_steps >= args.max_train_steps
        if last or (epoch + 1) % args.eval_every == 0:
            run_evaluation(epoch)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args.output_dir, completed_steps, args.checkpoints_total_limit)
        if last:
            break
    progress.close()
    if not stopped and completed_steps not in {record["step"] for record in state.history["eval"]}:
        run_evaluation(epoch)  # e.g. resumed from a checkpoint written just before the final evaluation

    # ---- outputs
    unwrapped = accelerator.unwrap_model(model)
    if args.debug_digests:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / f"digest_rank{accelerator.process_index}.txt").write_text(weights_digest(unwrapped))
    if stopped:
        accelerator.print(f"stopped after {completed_steps} steps (--stop_after_steps)")
        accelerator.end_training()
        return dict(stopped=True, completed_steps=completed_steps, model_object=unwrapped)
    final = state.history["eval"][-1] if state.history["eval"] else {}
    results = dict(
        model=args.model, model_kwargs=model_kwargs, preset=args.preset, dataset=args.dataset,
        task="multi-label" if multi_label else "single-label", metric=metric_name,
        final=final, completed_steps=completed_steps, epochs=epochs,
        images_seen=completed_steps * args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
        num_processes=accelerator.num_processes, num_parameters=num_params,
        wall_time_s=time.time() - started, weights_sha256=weights_digest(unwrapped),
        args=tracker_config(args), history=state.history)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_model(unwrapped, out, label_names, data_cfg)
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        plot_curves(state.history, out / "training_curves.png", metric_name)
        if args.push_to_hub:
            push_to_hub(unwrapped, out, args.push_to_hub, args.hub_private, label_names)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"final test {metric_name}: {final.get(metric_name, float('nan')):.4f} on "
                      f"{final.get('num_images', 0)} images after {completed_steps} steps "
                      f"({results['wall_time_s']:.0f} s); saved to {args.output_dir}")
    return dict(results, model_object=unwrapped)


if __name__ == "__main__":
    main()
