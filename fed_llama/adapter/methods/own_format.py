"""The folder of an adapter whose method peft does not have (LLaMA-Adapter V2, Excitor).

Same layout as a peft adapter, so the adapter store, manifests, checkpoints and envelopes
treat it alike::

    adapter_config.json        {"fed_llama_method": "<method>", "config": {<its settings>},
                                "base_model_name_or_path": "<backbone>"}
    adapter_model.safetensors  the method's trainable tensors by parameter name

:func:`load_into` is the documented loader: it attaches the method to a frozen backbone with
the saved settings and loads the tensors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fed_llama.common.bounded_json import BadJson, loads
from fed_llama.errors import AdapterError

METHOD_KEY = "fed_llama_method"


@dataclasses.dataclass(frozen=True)
class OwnAdapterConfig:
    """What ``adapter_config.json`` holds for a method of ours (``save_pretrained`` writes it,
    as peft's configs do)."""

    method: str
    config: dict[str, Any]
    base_model_name_or_path: str = ""

    def save_pretrained(self, folder: str) -> None:
        import json

        text = json.dumps({METHOD_KEY: self.method, "config": self.config,
                           "base_model_name_or_path": self.base_model_name_or_path}, indent=2)
        (Path(folder) / "adapter_config.json").write_text(text + "\n")


def read_config(folder: Path) -> OwnAdapterConfig | None:
    """The saved method and settings (None: not one of ours, e.g. a peft adapter)."""
    path = folder / "adapter_config.json"
    try:
        data = loads(path.read_bytes(), max_bytes=1 << 20)
    except (OSError, BadJson) as exc:
        raise AdapterError(f"{path} cannot be read ({exc}): copy the adapter again") from None
    return parse_config(data, path)


def parse_config(data: Any, path: Path) -> OwnAdapterConfig | None:
    """:func:`read_config` of ``data``, the parsed ``adapter_config.json`` at ``path``."""
    if not isinstance(data, dict) or METHOD_KEY not in data:
        return None
    method, config = data.get(METHOD_KEY), data.get("config")
    if not isinstance(method, str) or not isinstance(config, dict):
        raise AdapterError(f"{path}: {METHOD_KEY} must be a text and config a table")
    base = data.get("base_model_name_or_path", "")
    return OwnAdapterConfig(method, config, base if isinstance(base, str) else "")


def saved_settings(folder: Path, saved: OwnAdapterConfig | None = None) -> tuple[Any, Any]:
    """(the method, its settings) an adapter folder of ours was saved with; ``saved``: its
    ``adapter_config.json`` already read (:func:`read_config`)."""
    from fed_llama.adapter.methods import method_of

    saved = saved if saved is not None else read_config(folder)
    if saved is None:
        raise AdapterError(f"{folder} is not a fed-llama method's adapter (no "
                           f"{METHOD_KEY} in adapter_config.json): load peft adapters with peft")
    try:
        spec = method_of(saved.method)
        cfg = spec.config_type(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in saved.config.items()})
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{folder}/adapter_config.json: not settings of a fed-llama "
                           f"method ({exc})") from None
    problems = cfg.problems()
    if problems:
        raise AdapterError(f"{folder}/adapter_config.json: {'; '.join(problems)}")
    return spec, cfg


def trainable_state(model: Any) -> dict[str, Any]:
    """The model's trainable tensors by parameter name (CPU copies): a method's state."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Any, state: dict[str, Any]) -> None:
    """Copy ``state`` into the model's trainable tensors (exactly the same names)."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise AdapterError(f"the adapter's tensors do not fit this model: missing "
                           f"{missing[:2]}, unexpected {extra[:2]}: was it made with other "
                           "settings or another backbone?")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise AdapterError(f"the adapter's {name} has shape "
                                   f"{tuple(state[name].shape)}; this model's is "
                                   f"{tuple(param.shape)}")
            param.copy_(state[name].to(param.dtype))


def save(model: Any, method: str, cfg: Any, out: Path, manifest: dict[str, Any], *,
         base: str = "", force: bool = False) -> Path:
    """Write the method's adapter folder (atomically, with the fed-llama manifest)."""
    from fed_llama.adapter.store import save_adapter_state

    config = OwnAdapterConfig(method, dataclasses.asdict(cfg), base)
    return save_adapter_state(trainable_state(model), config, out, manifest, force=force)


def load_into(model: Any, folder: Path, seed: int = 0,
              settings: tuple[Any, Any] | None = None) -> Any:
    """Attach the saved method to the frozen ``model`` with the saved settings and load its
    tensors: the loader of V2 and Excitor adapter folders. ``settings``: what
    :func:`saved_settings` returned for ``folder``, if the caller has it. Returns the model."""
    from safetensors.torch import load_file

    from fed_llama.adapter.store import read_manifest

    read_manifest(folder)  # the files' hashes
    spec, cfg = settings if settings is not None else saved_settings(folder)
    model = spec.attach(model, cfg, seed)
    load_trainable_state(model, dict(load_file(str(folder / "adapter_model.safetensors"))))
    return model
