"""stillroom: distil and fuse teacher language models into a student, whatever tokenizers they use.

Data flows one way through small modules:
tokenizer tables (``tokens``) -> alignment (``align``, ``vocab``) -> teacher signals (``cache``)
-> fusion (``fusion``) -> losses (``losses``) -> trainer (``trainer``).
"""

__version__ = "0.1.0"

__all__ = ["SparseTarget", "__version__", "generate"]


def __getattr__(name: str):
    # Heavier entry points load on first use, so ``import stillroom`` (and ``stillroom --version``) stays cheap.
    if name == "SparseTarget":
        from stillroom.targets import SparseTarget

        return SparseTarget
    if name == "generate":
        from stillroom.generation.healing import generate

        return generate
    raise AttributeError(f"module 'stillroom' has no attribute {name!r}")
