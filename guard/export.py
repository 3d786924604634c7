"""Export any model spec we accept to a Hugging Face safetensors directory (float32).

Engines that load Hugging Face directories (vLLM) cannot read the embedded GGUF, and a
GGUF-loaded transformers model refuses ``save_pretrained`` ("quantized with gguf"). The
export builds a plain model from the loaded model's config, copies the de-quantised
weights into it, saves it with its tokenizer and generation config, then loads the
directory back and checks that its fingerprint (`guard.model.fingerprint_model`) equals
the source's: a probe trained on the spec verifies the exported directory too.

    fingerprint = export_model("smollm2", Path("/tmp/smollm2-hf"))
    directory = exported_dir("smollm2")    # cached export, reused while it still verifies
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from guard.errors import ModelLoadError
from guard.fingerprint import ModelFingerprint
from guard.model import LoadedModel, load_model, resolve_spec

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "hguard-fingerprint.json"  # written last: its presence = a complete export
EXPORT_DIR_ENV = "GUARD_EXPORT_DIR"


def export_loaded(loaded: LoadedModel, out: Path) -> ModelFingerprint:
    """Save ``loaded`` (float32 safetensors, tokenizer, generation config) into ``out``
    and verify the saved directory's fingerprint; returns it."""
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"export directory {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    source = loaded.model
    config = source.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.detach().to("cpu", torch.float32) for name, tensor in
             source.state_dict().items()}  # fmt: skip
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ModelLoadError(
            f"cannot export {loaded.spec}: missing {sorted(missing)}, unexpected {unexpected}"
        )
    plain.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    if getattr(source, "generation_config", None) is not None:
        source.generation_config.save_pretrained(out)
    exported = load_model(str(out)).fingerprint
    if exported != loaded.fingerprint:
        raise ModelLoadError(
            f"the export of {loaded.spec} does not reproduce its fingerprint: "
            f"{exported} vs {loaded.fingerprint}"
        )
    record = {"spec": loaded.spec, "model_id": loaded.model_id, **exported.model_dump()}
    (out / FINGERPRINT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return exported


def export_model(spec: str, out: Path) -> ModelFingerprint:
    """Load ``spec`` (see `guard.model`) and export it to ``out`` (an empty directory)."""
    return export_loaded(load_model(spec), out)


def exported_fingerprint(directory: Path) -> ModelFingerprint | None:
    """The fingerprint an export recorded, or None for a directory that is not one."""
    path = directory / FINGERPRINT_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return ModelFingerprint(**{key: record[key] for key in ModelFingerprint.model_fields})


def export_root() -> Path:
    """Where `exported_dir` keeps exports: ``$GUARD_EXPORT_DIR`` or ``~/.cache/hguard``."""
    configured = os.environ.get(EXPORT_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "hguard" / "export"


def exported_dir(spec: str) -> Path:
    """A Hugging Face directory for ``spec``: the spec itself when it is one, else its
    export under `export_root` (made once; a partial export is made again)."""
    location, gguf_file, model_id = resolve_spec(spec)
    if gguf_file is None and Path(location).is_dir():
        return Path(location)
    if gguf_file is None:
        raise ModelLoadError(f"model '{spec}' is neither a GGUF nor a local directory")
    gguf = Path(location) / gguf_file
    key = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    target = export_root() / f"{gguf.stem}-{key}"  # one export per GGUF file
    if exported_fingerprint(target) is not None:
        return target
    if target.exists():
        shutil.rmtree(target)
    log.info("exporting %s (%s) to %s", spec, model_id, target)
    export_model(spec, target)
    return target
