"""bench.weaker_teacher: which layers a candidate loses, the rule that picks one, and the saved teacher being the
original model without exactly those layers."""

from __future__ import annotations

import json

from bench import weaker_teacher as wt
from bench.real_fusion import VALIDATION_WORKS


def test_the_dropped_layers_are_the_middle_ones():
    assert wt.dropped(30, 1) == [14]
    assert wt.dropped(30, 2) == [14, 15]
    assert wt.dropped(30, 3) == [13, 14, 15]
    assert wt.kept(5, 2) == [0, 3, 4]


def test_the_rule_picks_the_smallest_candidate_far_enough_behind_gemma():
    scores = {"gemma3": 1.50, "smollm2": 1.55, "minus 1": 1.58, "minus 2": 1.61, "minus 3": 1.70}
    assert wt.choose(scores, 0.10) == 2  # 1.61 ≥ 1.60; minus 1 is not
    assert wt.choose(scores, 0.15) == 3
    assert wt.choose(scores, 0.30) is None


def test_validation_text_is_the_middle_of_each_validation_work(shared):
    from stillroom.inputs.text import load_texts

    corpus = shared / "corpus" / "shakespeare"
    for w, got in zip(VALIDATION_WORKS, wt.validation_text(corpus, 400), strict=True):
        text = "".join(t for _, t in load_texts(corpus / w))
        assert len(got) == 400 and text.index(got) == len(text) // 2


def test_the_saved_teacher_is_the_model_without_its_middle_layers(tiny_models, shared, tmp_path):
    import torch

    from stillroom.evaluation import load_model

    teacher = tiny_models["gpt2-bpe-teacher"]
    out = tmp_path / "weak"
    args = ["--gap", "-100", "--chars", "300", "--smollm2", str(teacher), "--gemma3", str(tiny_models["llama-spm"]),
            "--corpus", str(shared / "corpus" / "shakespeare"), "--threads", "1", "--out", str(out)]
    wt.main(args)  # any candidate is "far enough behind" at gap −100: one layer removed
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe) == {"gemma3", "smollm2", "minus 1"}
    full, _ = load_model(str(teacher))
    weak, _ = load_model(str(out / "smollm2-minus-1"))
    n = full.config.n_layer
    assert weak.config.n_layer == n - 1
    want = full.state_dict()
    for key, value in weak.state_dict().items():  # block j of the weak model is block kept[j] of the full one
        parts = key.split(".")
        if parts[:2] == ["transformer", "h"]:
            parts[2] = str(wt.kept(n, 1)[int(parts[2])])
        assert torch.equal(value, want[".".join(parts)]), key
    mtime = (out / "probe.json").stat().st_mtime_ns  # a rerun scores nothing again
    wt.main(args)
    assert (out / "probe.json").stat().st_mtime_ns == mtime
