"""The run's results leaving it: metrics.json and the training curves, the final model the timm way
(config.json + model.safetensors, loadable with
``create_model('local-dir:<dir>')``), a push to the Hugging Face Hub, and a digest of the weights."""

import hashlib
import os
import shutil
from pathlib import Path

import timm
from timm_capsules import hub

from .config import fail
from .metrics import cnn_reference_record, plot_curves
from .output_dir import write_failure, write_json
from .run_safety import refuse_non_finite

__all__ = ['save_results', 'save_model', 'push_to_hub', 'weights_digest', 'write_digest']


def weights_digest(model):
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_digest(output_dir, model, rank):
    """--debug-digests: each process writes the digest of its weights (processes that trained together agree)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / f'digest_rank{rank}.txt').write_text(weights_digest(model))


def save_model(model, output_dir, label_names, data_cfg):
    """The timm way: config.json + model.safetensors, loadable with create_model('local-dir:<dir>').
    Written to a temporary folder first, then moved in. Non-finite weights are never written."""
    refuse_non_finite(model)
    tmp = Path(output_dir) / '.tmp_model'
    shutil.rmtree(tmp, ignore_errors=True)
    model_config = dict(label_names=list(label_names)) if label_names else None
    try:
        timm.models.save_for_hf(
            model,
            str(tmp),
            model_config=model_config,
            safe_serialization=True,
            data_config=dict(mean=data_cfg['mean'], std=data_cfg['std']),
        )
    except Exception as error:  # the previous model, if any, is left as it was
        shutil.rmtree(tmp, ignore_errors=True)
        fail(write_failure(tmp, error) + '; the model was not saved')
    for file in tmp.iterdir():
        os.replace(file, Path(output_dir) / file.name)
    tmp.rmdir()


def push_to_hub(model, model_kwargs, output_dir, repo_id, private, label_names):
    """A paper model as registered (an architecture with a hub config, built without create_model arguments
    besides num_classes) goes through timm_capsules.hub (validated upload folder, model card from its hub
    config); any other model through timm's own push_to_hf_hub. Safetensors only, either way."""
    architecture = model.pretrained_cfg['architecture']
    as_registered = set(model_kwargs) <= {'num_classes'}
    if as_registered and any(cfg['model'] == architecture for cfg in hub.list_hub_configs()):
        hub.push_checkpoint(output_dir, repo_id, private=private)
    else:
        model_config = dict(label_names=list(label_names)) if label_names else None
        timm.models.push_to_hf_hub(model, repo_id, model_config=model_config, private=private, safe_serialization=True)


def save_results(config, model, model_kwargs, data, data_cfg, results, num_processes):
    """On the main process: the model, metrics.json and the curves into --output-dir; the push when asked."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, data.label_names, data_cfg)
    write_json(out / 'metrics.json', results)
    metric_name = results['metric']
    reference = cnn_reference_record(config, data.source, num_processes)
    plot_curves(
        results['history'],
        out / 'training_curves.png',
        metric_name,
        f'{config.model} on {config.dataset} ({data.source})',
        data.chance,
        reference and ('CNN of similar size, same recipe', reference['final'][metric_name]),
    )
    if config.push_to_hub:
        push_to_hub(model, model_kwargs, out, config.push_to_hub, config.hub_private, data.label_names)
