"""The public face: ``from stillroom import train`` and every package's exports resolve to the real objects,
lazily (``import stillroom`` loads no torch), and each package lists exactly what it exports."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["stillroom", "stillroom.tokenization", "stillroom.models", "stillroom.inputs", "stillroom.teachers",
            "stillroom.generation", "stillroom.training"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_is_the_object_of_its_module(name):
    pkg = importlib.import_module(name)
    for export in pkg.__all__:
        if export == "__version__":
            continue
        value = getattr(pkg, export)
        home = importlib.import_module(pkg._EXPORTS[export])
        assert value is getattr(home, export), (name, export)
        assert export in dir(pkg)
    with pytest.raises(AttributeError):
        pkg.no_such_name  # noqa: B018


def test_import_stillroom_stays_cheap():
    code = "import sys, stillroom; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_the_documented_entry_points():
    from stillroom import (
        DistillTrainer,
        TokenTable,
        align,
        evaluate,
        generate,
        load_model,
        train,
    )
    from stillroom.evaluation import evaluate as evaluate_fn
    from stillroom.training.run import train as train_fn
    from stillroom.training.trainer import DistillTrainer as trainer_cls

    assert train is train_fn and evaluate is evaluate_fn and DistillTrainer is trainer_cls
    assert callable(align) and callable(generate) and callable(load_model) and hasattr(TokenTable, "from_tokenizer")
