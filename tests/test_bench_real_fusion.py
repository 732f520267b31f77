"""bench/real_fusion.py's pure parts (the benchmark itself needs the real models and is not a test): the works
split against the shared corpus and by hand, the options that keep runs and caches apart, the arms' recipes."""

from __future__ import annotations

import pytest

from bench.real_fusion import TEST_WORKS, VALIDATION_WORKS, split_works


def test_split_is_by_whole_works_and_disjoint_on_the_shared_corpus(shared):
    names = sorted(p.name for p in (shared / "corpus" / "shakespeare").glob("*.txt"))
    split = split_works(names)
    parts = [set(split[k]) for k in ("train", "validation", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(names)
    assert parts[2] == set(TEST_WORKS) and parts[1] == set(VALIDATION_WORKS)
    assert len(split["train"]) == len(names) - 6 == 36


def test_split_by_hand_and_missing_works_are_named():
    names = ["a.txt", "b.txt", "c.txt", "d.txt"]
    assert split_works(names, test=["c.txt"], validation=["a.txt"]) == {
        "train": ["b.txt", "d.txt"], "validation": ["a.txt"], "test": ["c.txt"]}
    with pytest.raises(FileNotFoundError, match=r"\['x.txt'\]"):
        split_works(names, test=["x.txt"], validation=["a.txt"])


def test_an_out_folder_refuses_a_rerun_with_other_options(tmp_path):
    import argparse

    from bench.real_fusion import SCALE, check_scale
    from stillroom.errors import ConfigError

    args = argparse.Namespace(**{k: 1 for k in SCALE})
    check_scale(args, tmp_path)
    check_scale(args, tmp_path)  # same options: resumes
    args.steps = 2
    with pytest.raises(ConfigError, match=r"'steps': \(1, 2\)"):
        check_scale(args, tmp_path)


def _args(**kw):
    import argparse

    from bench.real_fusion import SCALE

    base = {k: 1 for k in SCALE} | {"smollm2": "/m/smollm2", "gemma3": "/m/gemma3", "arms": None, "token_level": False,
                                     "cache_from": None, "scratch": False, "threads": 1}
    return argparse.Namespace(**(base | kw))


CACHES = {"smollm2": "/c/smollm2", "gemma3": "/c/gemma3", "gemma3-top1": "/c/gemma3-top1"}


def test_default_arms_are_the_fusion_arms_and_objective_arms_run_only_when_named():
    from bench.real_fusion import FUSION_ARMS, arms

    assert list(arms(_args(), CACHES)) == list(FUSION_ARMS)
    assert list(arms(_args(token_level=True), CACHES))[-2:] == ["fused-min_ce-token", "fused-avg_ce-token"]
    picked = arms(_args(arms=["kd-gemma3-mined", "uld-gemma3", "alm-gemma3", "alm-unbiased-gemma3", "alm+kd-gemma3",
                              "fused-alm-avg_ce"]), CACHES)
    assert list(picked) == ["kd-gemma3-mined", "uld-gemma3", "alm-gemma3", "alm-unbiased-gemma3", "alm+kd-gemma3",
                            "fused-alm-avg_ce"]
    mined = picked["kd-gemma3-mined"]
    assert mined["projection"] == "onehot" and mined["teachers"] == [
        {"name": "gemma3", "path": "/m/gemma3", "cache": "/c/gemma3"}]
    assert picked["uld-gemma3"]["teachers"][0] == {"name": "gemma3-uld", "path": "/m/gemma3", "cache": "/c/gemma3",
                                                         "objective": "uld"}
    alm = {"name": "gemma3-alm", "path": "/m/gemma3", "cache": "/c/gemma3-top1", "objective": "alm"}
    assert picked["alm-gemma3"]["teachers"] == [alm]  # ALM reads the top-1 cache
    assert picked["alm-unbiased-gemma3"]["teachers"] == [alm | {"alm_chunks": "unbiased"}]
    assert [t.get("objective", "kd") for t in picked["alm+kd-gemma3"]["teachers"]] == ["kd", "alm"]
    assert picked["alm+kd-gemma3"]["projection"] is None  # KD beside ALM uses --projection
    fused = picked["fused-alm-avg_ce"]
    assert fused["method"] == "avg_ce" and [t["objective"] for t in fused["teachers"]] == ["alm", "alm"]
    both = arms(_args(arms=["fused-min_ce-mined"]), CACHES)["fused-min_ce-mined"]
    assert both["projection"] == "onehot" and both["method"] == "min_ce" and both["level"] == "sequence"
    assert [t["name"] for t in both["teachers"]] == ["smollm2", "gemma3"]
    assert all("objective" not in t for t in both["teachers"])  # both KD, Gemma through the MinED map


def test_served_arm_reads_the_served_cache_and_names_its_server(tmp_path):
    """kd-smollm2-served is kd-smollm2 on the cache written through llama.cpp; the recipe names the URL the cache
    was written through, as a user's does (training reads the cache and never asks the server)."""
    import json

    from bench.real_fusion import arms

    served = tmp_path / "smollm2-served"
    served.mkdir()
    (served / "manifest.json").write_text(json.dumps({"teacher": "http://127.0.0.1:4567 (smollm2)"}))
    arm = arms(_args(arms=["kd-smollm2-served"]), {**CACHES, "smollm2-served": str(served)})["kd-smollm2-served"]
    assert arm["teachers"] == [{"name": "smollm2-served", "path": "/m/smollm2", "cache": str(served),
                                "server": "http://127.0.0.1:4567"}]
    assert arm["method"] == "min_ce" and arm["projection"] is None


def test_recipe_carries_each_arms_teachers_and_projection(tmp_path):
    from bench.real_fusion import arms, recipe

    args = _args(projection="prefix", layers=[0, 1], threads=1, arms=["kd-gemma3-mined", "alm-unbiased-gemma3"])
    data = {"train": "/d/train", "validation": "/d/val"}
    table = arms(args, CACHES)
    r = recipe(args, data, "x", tmp_path / "o", 0, **table["kd-gemma3-mined"])
    assert r["fusion"]["projection"] == "onehot" and r["teachers"][0]["cache"] == "/c/gemma3"
    r = recipe(args, data, "x", tmp_path / "o", 0, **table["alm-unbiased-gemma3"])
    assert r["fusion"]["projection"] == "prefix"
    assert r["teachers"] == [{"name": "gemma3-alm", "path": "/m/gemma3", "cache": "/c/gemma3-top1", "objective": "alm",
                              "alm_chunks": "unbiased"}]
    assert r["loss"]["ce_weight"] == 1


def test_temperature_reaches_the_loss_and_keeps_caches_apart(tmp_path):
    """--temperature τ is the recipe's loss.temperature (the caches are written at it), a cache written at another τ
    is not read, and a run recorded before the option read as τ = 1."""
    import json

    from bench.real_fusion import SCALE, arms, cache_source, check_scale, recipe
    from stillroom.errors import ConfigError

    args = _args(projection="prefix", layers=[0, 1], temperature=2.0)
    r = recipe(args, {"train": "/d/train", "validation": "/d/val"}, "x", tmp_path / "o", 0,
               **arms(args, CACHES)["kd-gemma3"])
    assert r["loss"]["temperature"] == 2.0
    src = tmp_path / "src"
    for name in ("smollm2", "gemma3"):
        _manifest(src / "cache" / name, [(1, 1)])
    old = {k: v for k, v in vars(_args()).items() if k in SCALE and k != "temperature"}  # before the option
    (src / "options.json").write_text(json.dumps(old))
    assert cache_source(_args(cache_from=src, temperature=1.0), tmp_path / "mine") == src
    with pytest.raises(ConfigError, match=r"'temperature': \(1.0, 2.0\)"):
        cache_source(_args(cache_from=src, temperature=2.0), tmp_path / "mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "options.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="temperature"):
        check_scale(_args(temperature=2.0), tmp_path / "run")


def test_support_temperature_reaches_the_loss_and_shares_the_caches(tmp_path):
    """--support-temperature T is the recipe's loss.support_temperature; the caches of another OUT are read whatever
    its T (the teacher's top-k is the same), and a run recorded before the option read as T = 1."""
    import json

    from bench.real_fusion import SCALE, arms, cache_source, check_scale, recipe
    from stillroom.errors import ConfigError

    args = _args(projection="next_bytes", layers=[0, 1], temperature=1.0, support_temperature=1.5)
    r = recipe(args, {"train": "/d/train", "validation": "/d/val"}, "x", tmp_path / "o", 0,
               **arms(args, CACHES)["kd-gemma3"])
    assert r["loss"]["support_temperature"] == 1.5 and r["loss"]["temperature"] == 1.0
    src = tmp_path / "src"
    for name in ("smollm2", "gemma3"):
        _manifest(src / "cache" / name, [(1, 1)])
    old = {k: v for k, v in vars(_args(temperature=1.0)).items() if k in SCALE and k != "support_temperature"}
    (src / "options.json").write_text(json.dumps(old))
    assert cache_source(_args(cache_from=src, temperature=1.0, support_temperature=1.5), tmp_path / "mine") == src
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "options.json").write_text(json.dumps(old))
    check_scale(_args(temperature=1.0, support_temperature=1.0), tmp_path / "run")  # the recorded run: T = 1
    with pytest.raises(ConfigError, match=r"'support_temperature': \(1.0, 1.5\)"):
        check_scale(_args(temperature=1.0, support_temperature=1.5), tmp_path / "run")


def _manifest(folder, shards):
    import json

    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"bytes": b, "tokens": t} for b, t in shards]}))


def test_cache_bytes_per_token_and_per_arm(tmp_path):
    from bench.real_fusion import arm_cache_bytes, cache_bytes_per_token

    _manifest(tmp_path / "k", [(3000, 100), (1000, 60)])  # 4000 B / 160 tokens
    _manifest(tmp_path / "one", [(640, 100)])
    assert cache_bytes_per_token(tmp_path / "k") == 25.0
    spec = {"teachers": [{"cache": str(tmp_path / "k")}, {"cache": str(tmp_path / "one")}]}
    assert arm_cache_bytes(spec) == 25.0 + 6.4
    assert arm_cache_bytes({"teachers": []}) == 0.0


def test_cache_from_reads_another_run_only_with_the_same_options(tmp_path):
    import json

    from bench.real_fusion import SCALE, cache_source
    from stillroom.errors import ConfigError, MissingPathError

    src = tmp_path / "main"
    src.mkdir()
    with pytest.raises(MissingPathError, match="no options.json"):
        cache_source(_args(cache_from=src), tmp_path / "mine")
    (src / "options.json").write_text(json.dumps({k: getattr(_args(), k) for k in SCALE}))
    with pytest.raises(MissingPathError, match="cache/smollm2 is not finished"):
        cache_source(_args(cache_from=src), tmp_path / "mine")
    for name in ("smollm2", "gemma3"):
        _manifest(src / "cache" / name, [(1, 1)])
    assert cache_source(_args(cache_from=src), tmp_path / "mine") == src
    assert cache_source(_args(), tmp_path / "mine") == tmp_path / "mine"
    with pytest.raises(ConfigError, match="caches 1 blocks, this run trains on 2"):
        cache_source(_args(cache_from=src, steps=2), tmp_path / "mine")
    with pytest.raises(ConfigError, match=r"'seq_len': \(1, 2\)"):
        cache_source(_args(cache_from=src, seq_len=2), tmp_path / "mine")
    with pytest.raises(ConfigError, match=r"'top_k': \(1, 16\)"):
        cache_source(_args(cache_from=src, top_k=16), tmp_path / "mine")
    # what the caches do not depend on may differ: λ, learning rate, projection, layers kept, test text; fewer blocks
    (src / "options.json").write_text(json.dumps({k: getattr(_args(steps=4), k) for k in SCALE}))
    assert cache_source(_args(cache_from=src, steps=2, batch_size=2), tmp_path / "mine") == src
    assert cache_source(_args(cache_from=src, ce_weight=0.5, lr=2, projection="onehot", layers=[0, 1],
                              eval_chars=9), tmp_path / "mine") == src


def test_references_are_reused_from_cache_from_only_for_the_same_text_and_models(tmp_path, monkeypatch):
    import json

    import bench.real_fusion as rf
    import stillroom.evaluation
    import stillroom.models.cut
    import stillroom.models.loading
    from bench.real_fusion import SCALE, references

    src = tmp_path / "main"
    src.mkdir()
    (src / "options.json").write_text(json.dumps({k: getattr(_args(), k) for k in SCALE}))
    theirs = {"teacher smollm2": 1.5, "teacher gemma3": 1.4, "cut student, untrained": 7.0}
    (src / "references.json").write_text(json.dumps(theirs))
    monkeypatch.setattr(stillroom.evaluation, "load_model", lambda folder: (folder, None))
    monkeypatch.setattr(stillroom.models.cut, "cut_from", lambda path, layers: "cut")
    monkeypatch.setattr(stillroom.models.loading, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(rf, "bits_per_byte", lambda model, tok, texts, name: 9.0)
    same = tmp_path / "same"
    same.mkdir()
    assert references(_args(cache_from=src, ce_weight=0.5), ["t"], same) == theirs  # λ does not change them
    other = tmp_path / "other"
    other.mkdir()
    assert references(_args(cache_from=src, eval_chars=9), ["t"], other) == dict.fromkeys(theirs, 9.0)


def test_scratch_student_has_the_cut_shape_and_fresh_weights_and_older_runs_read_as_cut(tmp_path):
    """--scratch: a Llama of the cut student's shape built from the tokenizer (no teacher's weights inside); an
    OUT recorded before the option existed reads as a cut run, so its arms are reused by a cut rerun only."""
    import json

    from bench.real_fusion import check_scale, recipe
    from stillroom.errors import ConfigError

    data = {"train": "/d/train", "validation": "/d/val"}
    cut = recipe(_args(scratch=False, layers=[0, 5], student_from="/m/smollm2"), data, "x", tmp_path / "o", 0)["student"]
    assert cut == {"init_from": "/m/smollm2", "layers": [0, 5]}
    fresh = recipe(_args(scratch=True, layers=[0, 5], student_from="/m/smollm2"), data, "x", tmp_path / "o", 0)["student"]
    assert set(fresh) == {"tokenizer", "config"} and fresh["tokenizer"] == "/m/smollm2"  # the recipe's scratch kind
    assert fresh["config"]["num_hidden_layers"] == 2 and fresh["config"]["hidden_size"] == 576
    old = {k: v for k, v in vars(_args(scratch=False)).items() if k != "scratch"}
    (tmp_path / "options.json").write_text(json.dumps(old))
    check_scale(_args(scratch=False), tmp_path)  # the same run
    with pytest.raises(ConfigError, match="scratch"):
        check_scale(_args(scratch=True), tmp_path)
