"""Verbs over two tokenizers: ``vocab-map`` and ``align``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stillroom.cli.app import _choice, app, console
from stillroom.errors import ConfigError, DataError, MissingPathError


# --- vocab-map --------------------------------------------------------------------------------------------
def _vocab_tokenizer(name: str, option: str):
    """A tokenizer folder, or a name under ../shared/tokenizers, loaded offline (checked: not empty)."""
    import os

    from stillroom.models.loading import load_tokenizer
    from stillroom.testing import shared_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(name)
    if not path.is_dir():
        shared = shared_dir()
        if shared is not None and (shared / "tokenizers" / name).is_dir():
            path = shared / "tokenizers" / name
        else:
            raise MissingPathError(f"{option} {name!r} is neither a tokenizer folder nor a name in "
                                   "../shared/tokenizers; pass a folder holding tokenizer.json")
    return load_tokenizer(path, option, model=False)


def _same_pair_map(src_table, tgt_table):
    """``ours`` test for vocab-map --out: a stillroom vocabulary map for this very pair of tokenizers."""
    def ours(path: Path) -> bool:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
        except Exception:  # not a safetensors file at all
            return False
        return meta.get("format") == "stillroom.vocab_map" and meta.get("src_hash") == src_table.hash and \
            meta.get("tgt_hash") == tgt_table.hash
    return ours


@app.command("vocab-map")
def vocab_map(
    source: str = typer.Option(..., help="Source tokenizer: a folder with tokenizer.json, or a name in ../shared/tokenizers."),
    target: str = typer.Option(..., help="Target tokenizer (same forms)."),
    out: Path = typer.Option(..., help="Output file (.safetensors), keyed by both tokenizers' hashes."),
    json_out: bool = typer.Option(False, "--json", help="Print the coverage summary as JSON instead of a table."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it is not a map for this pair."),
) -> None:
    """Map every source token to the target token with the same bytes, else the minimum byte edit distance."""
    import json
    import time

    from rich.table import Table

    from stillroom.files import check_output_file
    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.vocab import VocabMap

    src_table = TokenTable.from_tokenizer(_vocab_tokenizer(source, "--source"))
    tgt_table = TokenTable.from_tokenizer(_vocab_tokenizer(target, "--target"))
    check_output_file(out, "--out", overwrite=overwrite, ours=_same_pair_map(src_table, tgt_table))
    start = time.perf_counter()
    vmap = VocabMap.build(src_table, tgt_table, progress=not json_out)
    seconds = time.perf_counter() - start
    vmap.save(out)
    stats = dict(vmap.stats(), seconds=round(seconds, 2), out=str(out))
    if json_out:
        print(json.dumps(stats))
        return
    table = Table(title=f"vocabulary map {source} -> {target}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("source / target vocabulary", f"{stats['source_vocab']:,} / {stats['target_vocab']:,}")
    table.add_row("ordinary source tokens", f"{stats['ordinary']:,}")
    table.add_row("exact byte match", f"{stats['exact']:,} ({stats['exact_pct']:.1f}%)")
    table.add_row("distance 1 / 2 / 3+", f"{stats['distance_1']:,} / {stats['distance_2']:,} / {stats['distance_3_plus']:,}")
    table.add_row("mean distance (all / inexact)", f"{stats['mean_distance']:.3f} / {stats['mean_distance_inexact']:.3f}")
    table.add_row("max distance", str(stats["max_distance"]))
    table.add_row("special tokens mapped", f"{stats['special_mapped']} of {stats['special']}")
    table.add_row("unmapped (valid=False)", f"{stats['unmapped']:,}")
    table.add_row("build time", f"{seconds:.1f} s")
    console.print(table)
    console.print(f"saved {out}")


# --- align ------------------------------------------------------------------------------------------------
@app.command("align")
def align_cmd(
    source: str = typer.Option(..., help="Source tokenizer: a folder with tokenizer.json, or a name in ../shared/tokenizers."),
    target: str = typer.Option(..., help="Target tokenizer (same forms)."),
    text: Optional[str] = typer.Option(None, help="The text to tokenize with both and align."),
    file: Optional[Path] = typer.Option(None, help="Read the text from this UTF-8 file instead."),
    mode: str = typer.Option("exact", help="'exact' (byte offsets) or 'dtw' (FuseLLM's token-string DTW)."),
    special: bool = typer.Option(True, "--special/--no-special", help="Let the tokenizers add BOS/EOS/CLS..."),
    json_out: bool = typer.Option(False, "--json", help="Print groups, ids, token strings and exactness as JSON."),
) -> None:
    """Tokenize one text with two tokenizers and show which tokens spell the same bytes."""
    import json

    from rich.markup import escape
    from rich.table import Table

    from stillroom.tokenization.align import align
    from stillroom.tokenization.tokens import TokenTable

    if (text is None) == (file is None):
        raise ConfigError("give exactly one of --text or --file")
    _choice("--mode", mode, ("exact", "dtw"))
    if file is not None:
        if not file.is_file():
            raise MissingPathError(f"--file {file} does not exist (or is not a file); pass a UTF-8 text file")
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--file {file}: byte {e.start} is not UTF-8; --file must be UTF-8 text") from None
        if "\x00" in text:
            raise DataError(f"--file {file} holds NUL bytes, so it is binary; --file must be UTF-8 text")
    if not text:
        raise DataError("the text to align is empty; give some text with --text or --file")
    src_tok, tgt_tok = _vocab_tokenizer(source, "--source"), _vocab_tokenizer(target, "--target")
    src_table, tgt_table = TokenTable.from_tokenizer(src_tok), TokenTable.from_tokenizer(tgt_tok)
    src_ids = src_tok(text, add_special_tokens=special).input_ids
    tgt_ids = tgt_tok(text, add_special_tokens=special).input_ids
    al = align(src_ids, tgt_ids, src_table, tgt_table, mode=mode, text=text)
    result = al.to_dict()
    if json_out:
        result.update(source=source, target=target, src_ids=list(src_ids), tgt_ids=list(tgt_ids))
        print(json.dumps(result, ensure_ascii=False))
        return
    src_name, tgt_name = Path(source).name, Path(target).name
    table = Table(title=f"{src_name} ⇄ {tgt_name}: {len(src_ids)} / {len(tgt_ids)} tokens, {len(al)} groups, "
                        f"{result['exact_fraction']:.1%} of target tokens in exact groups ({mode})")
    for col in ("#", src_name, tgt_name, "text", "exact"):
        table.add_column(col)

    def show(tab: TokenTable, ids: list[int]) -> str:  # each token's own bytes, "|"-separated, spaces visible
        return escape("|".join(tab.token_bytes[i].decode("utf-8", "backslashreplace").replace(" ", "␣")
                               .replace("\n", "\\n") or tab.token_strings[i] for i in ids))

    for k, g in enumerate(result["groups"]):
        style = None if g["exact"] else "yellow"
        table.add_row(str(k), show(src_table, g["src_ids"]), show(tgt_table, g["tgt_ids"]),
                      escape(repr(g["tgt_text"] or g["src_text"])), "✓" if g["exact"] else "✗", style=style)
    console.print(table)
